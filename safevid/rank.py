"""One process of a launched job (`safevid train`, `safevid precompute-ref`): config, process
environment, the job's function, and an end that never leaves the other ranks waiting."""

from __future__ import annotations

import os
import socket
import sys
import traceback
from collections.abc import Callable

from safevid.config import ConfigError, load_config, resolve_path

DEFAULT_CONFIG = "configs/demo.yaml"


def config_args(config: str | None, overrides: list[str]) -> tuple[str, list[str]]:
    """The config path and overrides of `CMD [CONFIG] [key=value ...]`: a first word with `=`
    is an override of the default config."""
    overrides = list(overrides)
    if config is not None and "=" in config:
        config, overrides = None, [config, *overrides]
    return str(resolve_path(config or DEFAULT_CONFIG)), overrides


def run_rank(prog: str, config: str | None, overrides: list[str], job: Callable) -> int:
    """Load the config, then `job(cfg)`; its errors end this rank with a message."""
    config_path, overrides = config_args(config, overrides)
    try:
        cfg = load_config(config_path, overrides)
    except ConfigError as exc:
        print(f"{prog}: config error: {exc}", file=sys.stderr)
        return 2
    from safevid.distributed import prepare_env

    prepare_env()
    import warnings

    # DeepSpeed calls collectives that torch has renamed; the notice says nothing to a user.
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    from safevid.checkpoint import CheckpointError
    from safevid.data.stream import DataError

    where = f"rank {os.environ.get('RANK', '0')} on {socket.gethostname()}"
    try:
        rc = job(cfg)
    except (ConfigError, DataError, CheckpointError) as exc:
        # The same input gives every rank the same error: one line from the first rank says it.
        if os.environ.get("RANK", "0") == "0":
            print(f"{prog}: error: {exc}", file=sys.stderr, flush=True)
        exit_now(2)
    except BaseException as exc:  # noqa: BLE001  a failed rank must end, never hang the job
        traceback.print_exc()
        first = (str(exc).splitlines() or [""])[0]
        print(f"{prog}: {where} failed: {type(exc).__name__}: {first}"
              f" (a collective that failed or timed out after train.collective_timeout_s="
              f"{cfg.train.collective_timeout_s:g}s means another rank died or hung)",
              file=sys.stderr, flush=True)
        exit_now(1)
    from safevid.distributed import shutdown
    from safevid.lifecycle import ignore_stop_signals

    shutdown()
    # The launcher repeats a stop signal until the ranks have exited; at interpreter exit
    # Python would put back the default action, which for SIGUSR1 is to die.
    ignore_stop_signals()
    return rc


def exit_now(code: int) -> None:
    """End a failed rank at once: a normal interpreter exit would join prefetch threads and
    tear down a process group whose peers may be gone, and can hang or abort on the way."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
