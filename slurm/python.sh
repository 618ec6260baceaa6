# Sourced by the scripts in slurm/ once they have found the repository ($repo): keeps $py when
# set (from $PYTHON), else the repository's .venv, else python3 (with safevid installed);
# exits 2 with what to set when that Python cannot import safevid.
if [ -z "${py:-}" ]; then
  if [ -x "$repo/.venv/bin/python" ]; then py="$repo/.venv/bin/python"; else py=python3; fi
fi
if ! "$py" -c "import safevid" 2>/dev/null; then
  echo "$(basename "$0"): $py cannot import safevid: run from the SafeVid repository (or submit" \
       "from it), or set SAFEVID_HOME=/path/to/SafeVid or PYTHON=/path/to/python" >&2
  exit 2
fi
