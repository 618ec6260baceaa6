"""The module the DeepSpeed engine wraps, for any family: answer log-probs per sequence.

The forward is our own composition of the model's parts rather than `model(...)`: each distinct
video of the micro-batch goes through the vision tower once and its features go into every
placeholder run that shows it (both sequences of a pair, or the one shared prompt); the language
model runs on the collated rows with the chosen attention backend; the LM head is applied only
where an answer token is predicted (fused, it never builds [tokens x vocab]).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from safevid.models import attention
from safevid.models.family import Family, family_class

IGNORE = -100


class LogProbHead(nn.Module):
    """Answer-token log-probs from hidden states with the model's LM head.

    It owns no parameters. Under ZeRO-3 the LM-head weight is registered as an external
    parameter of this module, so DeepSpeed gathers it for this call (forward and backward) only.
    """

    def __init__(self, lm_head: nn.Linear, fused: bool):
        super().__init__()
        object.__setattr__(self, "_lm_head", lm_head)  # not a child: keeps state_dict unchanged
        self.fused = fused

    def forward(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        from safevid.kernels import fused_logprobs, naive_logprobs

        fn = fused_logprobs if self.fused else naive_logprobs
        return fn(hidden, self._lm_head.weight, labels, ignore_index=IGNORE)


class DPOModel(nn.Module):
    """The transformers model plus the log-prob head. `forward` returns summed answer log-probs
    and answer lengths per sequence, each [num_seqs] float32. Going through the engine (rather
    than calling submodules directly) keeps ZeRO-3's forward bookkeeping intact."""

    def __init__(self, hf_model: nn.Module, family: Family, fused: bool, backend: str):
        super().__init__()
        self.hf = hf_model
        self.head = LogProbHead(hf_model.lm_head, fused)
        object.__setattr__(self, "family", family)  # plain object, not a submodule
        self.backend = backend

    def forward(self, input_ids, positions, text_positions, group, branch, answer_src, answer_tgt,
                answer_seq, pixels, grid_thw, frames, video_of_slot, num_seqs: int):
        fam, hf = self.family, self.hf
        embeds = hf.get_input_embeddings()(input_ids)
        vision = fam.vision_modules(hf)
        vision_trains = any(p.requires_grad for m in vision for p in m.parameters())
        with torch.set_grad_enabled(vision_trains and torch.is_grad_enabled()):
            per_video = fam.video_features(hf, pixels, grid_thw, frames)
        feats = torch.cat([per_video[v] for v in video_of_slot.tolist()]).to(embeds.dtype)
        slots = (input_ids == fam.video_token_id).unsqueeze(-1)
        embeds = embeds.masked_scatter(slots, feats)
        if self.backend == "flash_varlen":
            # Padding-free: the real tokens of all rows as one row; sequences are found where
            # the text positions restart at 0.
            keep = (group >= 0).flatten()
            new_index = torch.cumsum(keep.long(), 0) - 1
            answer_src = new_index[answer_src]
            embeds = embeds.flatten(0, 1)[keep][None]
            positions = positions.flatten(1, 2)[:, keep][:, None]
            text_positions = text_positions.flatten()[keep][None]
        mask = attention.prepare(self.backend, group, branch)
        hidden = fam.language_model(hf)(
            inputs_embeds=embeds, attention_mask=mask,
            position_ids=fam.lm_position_ids(positions, text_positions), use_cache=False,
        ).last_hidden_state
        token_logps = self.head(hidden.flatten(0, 1)[answer_src], answer_tgt)
        zeros = torch.zeros(num_seqs, dtype=torch.float32, device=hidden.device)
        return (zeros.index_add(0, answer_seq, token_logps.float()),
                zeros.index_add(0, answer_seq, torch.ones_like(token_logps, dtype=torch.float32)))


@dataclass
class LoadedModel:
    model: DPOModel
    tokenizer: object
    family: Family


def load_family(name_or_path: str, family: str = "auto", trust_remote_code: bool = False) -> Family:
    """The family's data-side object for a checkpoint (no weights are read)."""
    from transformers import AutoConfig

    cls = family_class(family, name_or_path)
    config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    return cls(name_or_path, config)


def load(name_or_path: str, dtype: torch.dtype, fused: bool, family: str = "auto",
         backend: str = "sdpa_mask", trust_remote_code: bool = False) -> LoadedModel:
    from safevid.models.family import load_tokenizer

    fam = load_family(name_or_path, family, trust_remote_code)
    hf = type(fam).load_model(name_or_path, dtype, attention.hf_attn_implementation(backend),
                              trust_remote_code)
    return LoadedModel(DPOModel(hf, fam, fused, backend),
                       load_tokenizer(name_or_path, trust_remote_code), fam)


def freeze(loaded: LoadedModel, vision: bool, projector: bool) -> None:
    loaded.family.freeze(loaded.model.hf, vision, projector)
