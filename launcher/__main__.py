"""`python -m safevid.launcher [CONFIG] [key=value ...]`: run training on this node."""

from __future__ import annotations

import os
import subprocess
import sys

from safevid.launcher.local import launch_command


def main(argv: list[str]) -> int:
    cmd, env = launch_command(argv)
    # A new process group, so that a signal to the launcher reaches every rank.
    return subprocess.call(cmd, env=env) if os.name != "posix" else os.execvpe(cmd[0], cmd, env)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
