"""Export the trained policy as a plain transformers model directory (`output_dir/hf/`)."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch


def gather_state_dict(module: torch.nn.Module, rank: int) -> dict[str, torch.Tensor]:
    """Full parameters on rank 0, gathered one at a time so no rank holds two ZeRO-3 copies."""
    import deepspeed

    state: dict[str, torch.Tensor] = {}
    for name, param in module.named_parameters():
        with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
            if rank == 0:
                state[name] = param.detach().to("cpu", copy=True)
    if rank == 0:
        # Persistent buffers only: the state dict's own keys. Non-persistent ones (rotary
        # frequencies) are rebuilt by the model, and saving them makes loaders report
        # unexpected keys.
        persistent = set(module.state_dict().keys())
        for name, buf in module.named_buffers():
            if name in persistent:
                state[name] = buf.detach().to("cpu", copy=True)
    return state


# What a checkpoint directory holds beside weights and tokenizer for its processor: frame sizes,
# normalisation, patching (Qwen's min/max pixels), and a chat template kept beside the processor.
PROCESSOR_FILES = ("preprocessor_config.json", "video_preprocessor_config.json",
                   "processor_config.json", "chat_template.json", "chat_template.jinja")


def copy_processor_files(source: str, out_dir: Path, family) -> None:
    """The source checkpoint's processor files, so the export preprocesses frames as training
    did. A hub checkpoint's come from the local hub cache, if loading it put them there; where
    there are none, the family writes the settings it trained with."""
    src = Path(source)
    if not src.is_dir():
        from huggingface_hub import snapshot_download

        try:
            src = Path(snapshot_download(source, allow_patterns=list(PROCESSOR_FILES),
                                         local_files_only=True))
        except Exception:  # noqa: BLE001  not in the cache: nothing to copy
            src = out_dir / ".none"
    copied = False
    for name in PROCESSOR_FILES:
        if (src / name).is_file() and not (out_dir / name).exists():
            shutil.copyfile(src / name, out_dir / name)
            copied = True
    if not copied:
        family.save_preprocessor(out_dir)


def export_hf(loaded, out_dir: Path, rank: int, source: str) -> None:
    hf = loaded.model.hf
    state = gather_state_dict(hf, rank)
    if rank != 0:
        return
    # Written beside and renamed into place: a directory named hf/ is always a whole model.
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    hf.save_pretrained(str(tmp), state_dict=state)
    loaded.tokenizer.save_pretrained(str(tmp))
    copy_processor_files(source, tmp, loaded.family)
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.replace(out_dir)
