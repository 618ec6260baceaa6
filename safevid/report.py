"""Metrics to TensorBoard and W&B (`train.report_to`), beside metrics.jsonl, on rank 0.

metrics.jsonl stays the record the project's own tools read; these are views of it. A
reporter that is asked for but cannot be imported is a configuration error at start-up, never
a silent omission.
"""

from __future__ import annotations

import numbers
from pathlib import Path

from safevid.config import ConfigError

REPORTERS = ("tensorboard", "wandb")
TENSORBOARD_DIR = "tensorboard"


def check_available(names: list[str]) -> None:
    """Raise ConfigError naming `train.report_to` when a requested reporter is not installed."""
    missing = []
    for name in names:
        try:
            if name == "tensorboard":
                import tensorboard  # noqa: F401
                from torch.utils.tensorboard import SummaryWriter  # noqa: F401
            elif name == "wandb":
                import wandb  # noqa: F401
        except ImportError:
            missing.append(name)
    if missing:
        raise ConfigError(f"key 'train.report_to': {', '.join(missing)} asked for but not "
                          f"installed (pip install {' '.join(missing)}), or leave it out of "
                          "train.report_to")


def _scalars(record: dict) -> dict[str, float]:
    return {k: float(v) for k, v in record.items()
            if k != "step" and isinstance(v, numbers.Real) and not isinstance(v, bool)}


class Reporters:
    """Each step's record to every requested reporter."""

    def __init__(self, names: list[str], out_dir: Path, start_step: int, config: dict):
        self.writers: list = []
        self.wandb_run = None
        if "tensorboard" in names:
            from torch.utils.tensorboard import SummaryWriter

            # Steps after the checkpoint a run resumes from are about to be redone: purge
            # their events so each step shows once (as metrics.jsonl does).
            self.writers.append(SummaryWriter(str(out_dir / TENSORBOARD_DIR),
                                              purge_step=start_step + 1 if start_step else None))
        if "wandb" in names:
            import wandb

            # One W&B run per output_dir, resumed with it: the id is kept in the run directory.
            id_file = out_dir / "wandb_id"
            run_id = id_file.read_text().strip() if id_file.is_file() else wandb.util.generate_id()
            id_file.write_text(run_id)
            self.wandb_run = wandb.init(id=run_id, resume="allow", name=out_dir.name,
                                        dir=str(out_dir), config=config)

    def write(self, record: dict) -> None:
        step = int(record["step"])
        values = _scalars(record)
        for writer in self.writers:
            for key, value in values.items():
                writer.add_scalar(key, value, step)
            writer.flush()
        if self.wandb_run is not None:
            self.wandb_run.log(values, step=step)

    def close(self) -> None:
        for writer in self.writers:
            writer.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()


def read_tensorboard(out_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series in a run's TensorBoard events, as (step, value), through
    TensorBoard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out_dir / TENSORBOARD_DIR), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
