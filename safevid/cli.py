"""`safevid` command line: one sub-command per stage; each stage's module owns its arguments."""

from __future__ import annotations

import importlib
import sys

# sub-command -> module with `main(argv: list[str]) -> int`; imported lazily so that
# `safevid plot` does not pay for importing deepspeed.
COMMANDS = {
    "demo": ("safevid.demo", "run the whole pipeline on the embedded default"),
    "prepare": ("safevid.data_prep.prepare", "videos + pairs -> WebDataset shards"),
    "generate": ("safevid.data_prep.generate_cli", "LLM stages: captions, pairs"),
    "train": ("safevid.train", "one process of a DPO run (the launcher starts one per device)"),
    "precompute-ref": ("safevid.reference", "reference log-probs once, for train.reference="
                       "precomputed (launched like train)"),
    "eval": ("safevid.eval.cli", "benchmark answers + judge -> report; --compare A B"),
    "plot": ("safevid.plot", "PNG curves of a run's metrics"),
}


def usage() -> str:
    lines = ["usage: safevid COMMAND [ARGS ...]", "", "commands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in {"-h", "--help"}:
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"safevid: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest) or 0)
