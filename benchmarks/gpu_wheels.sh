#!/usr/bin/env bash
# Wheels for the GPU check (benchmarks/gpu_check.sh): the packages that the GPU machine's image
# lacks, for CPython 3.12 on x86-64 Linux, into .whl/ at the repository root (git-ignored).
# Run it where PyPI is reachable; the GPU machine has no network. The image already has torch,
# triton, transformers, accelerate, numpy, pyyaml, pillow, protobuf, sentencepiece, msgpack,
# ninja, py-cpuinfo, nvidia-ml-py, einops, psutil, tqdm and pytest, so none of those (and never
# a torch or CUDA wheel) is fetched.
#
#   bash benchmarks/gpu_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
DEST=.whl
mkdir -p "$DEST"

# The versions the test suite runs against here.
DEEPSPEED=deepspeed==0.19.8
PACKAGES=(
  hjson==3.1.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0  # deepspeed
  typing-inspection==0.4.5 typing-extensions==4.16.0                           # pydantic
  webdataset==1.0.2 braceexpand==0.1.7                                         # the data stream
  decord==0.6.0 av==18.1.0                                                     # demo videos
  omegaconf==2.4.0                                                             # configs
  transformers==5.24.0  # the image's is older; the Qwen2-VL family is written against 5.24
)

# One version of each: two wheels of one package make the offline install fail.
for spec in "$DEEPSPEED" "${PACKAGES[@]}"; do
  name=${spec%%==*}
  rm -f "$DEST/${name//-/_}"-*.whl "$DEST/$name"-*.whl
done

"$PY" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
  --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux2010_x86_64 --platform manylinux1_x86_64 -d "$DEST" "${PACKAGES[@]}"

# DeepSpeed publishes only a source distribution: build its pure-Python wheel here. No ops are
# compiled into it (DS_BUILD_OPS=0), and the trainer needs none: its optimizer is torch's AdamW.
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --disable-pip-version-check --no-deps -w "$DEST" "$DEEPSPEED"

ls -l "$DEST"
echo "total: $(du -sh "$DEST" | cut -f1) in $(ls "$DEST"/*.whl | wc -l) wheels"

# What the carried wheels need but do not bring: each must be in the GPU machine's image.
"$PY" - "$DEST" <<'EOF'
import re
import sys
import zipfile
from pathlib import Path

def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()

wheels = sorted(Path(sys.argv[1]).glob("*.whl"))
carried = {norm(w.name.split("-")[0]) for w in wheels}
needed = set()
for w in wheels:
    with zipfile.ZipFile(w) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        for line in z.read(meta).decode().splitlines():
            if line.startswith("Requires-Dist:") and "extra ==" not in line:
                needed.add(norm(re.split(r"[ ;<>=!~(\[]", line.split(":", 1)[1].strip())[0]))
print("expected in the GPU image:", ", ".join(sorted(needed - carried)))
EOF
