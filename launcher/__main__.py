"""`python -m safevid.launcher [CONFIG] [key=value ...]`: run training on this node."""

from __future__ import annotations

import os
import sys

from safevid.launcher.local import launch_command


def main(argv: list[str]) -> int:
    cmd, env = launch_command(argv)
    # Replace this process with the DeepSpeed runner, so that Slurm's and the user's signals
    # reach it (and through it every rank) directly.
    os.execvpe(cmd[0], cmd, env)
    return 1  # not reached


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
