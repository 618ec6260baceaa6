"""Attention backends for the row layouts of `safevid.data.collate`, chosen once at start-up.

- `sdpa_mask`: a boolean [R, 1, L, L] mask built on the step's device from the per-token
  `group` / `branch` ids, for torch's SDPA. Works everywhere; L^2 memory and work. The
  correctness twin of the others.
- `sdpa_units`: the same mask, but each row is cut where no later query sees an earlier key
  (between units, and around padding), and SDPA runs once per piece on its slice of the mask.
  The work follows the sum of n^2 over units, as FlexAttention's does, on any device; a row of
  two 730-token units costs half the attention of `sdpa_mask`. The CPU default (FlexAttention
  has no backward on CPU).
- `flex`: FlexAttention with a block mask made from the same ids: no [L, L] tensor, and blocks
  that no query may see are skipped, so the work follows the sum of n^2 over units rather than
  L^2. Every layout, shared-prefix included. The GPU default.
- `flash_varlen`: flash-attn's varlen kernel through transformers' position-id packing: the
  real tokens of all rows become one row, and sequences are found where the text positions
  restart at 0. Packed and padded layouts only: a shared-prefix unit's rejected answer must see
  the prompt but not the chosen answer before it, which varlen cannot express. Used only when
  named (`model.attention=flash_varlen`) or when flash-attn is installed and the layout is not
  shared-prefix.
"""

from __future__ import annotations

import importlib.util

import torch

BACKENDS = ("auto", "sdpa_mask", "sdpa_units", "flex", "flash_varlen")
# transformers' name for the `sdpa_units` attention function (registered on first use).
UNITS_IMPLEMENTATION = "safevid_sdpa_units"
# Pieces shorter than this are merged into the next (padding cuts a row at every token):
# merging never changes the result, only adds a little work.
MIN_PIECE = 64


class AttentionError(ValueError):
    """A backend that cannot serve this layout or device; the message says what to change."""


def _flash_unfit(device: torch.device, dtype: torch.dtype | None) -> str | None:
    """Why flash-attn's kernel cannot run here (it takes fp16/bf16 only, on Ampere or newer),
    or None."""
    if dtype is not None and dtype not in (torch.float16, torch.bfloat16):
        return f"flash-attn runs in fp16 or bf16 only, and this run is {dtype}"
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] < 8:
        return f"flash-attn needs an Ampere or newer GPU, and {torch.cuda.get_device_name(device)} is older"
    return None


def choose(requested: str, device: torch.device, shared_prefix: bool,
           dtype: torch.dtype | None = None) -> str:
    """The backend for this run; refuses (never silently swaps) a combination that cannot work."""
    if requested not in BACKENDS:
        raise AttentionError(f"model.attention={requested!r}: must be one of {', '.join(BACKENDS)}")
    has_flash = importlib.util.find_spec("flash_attn") is not None
    if requested == "auto":
        if device.type != "cuda":
            return "sdpa_units"
        usable = has_flash and not shared_prefix and _flash_unfit(device, dtype) is None
        return "flash_varlen" if usable else "flex"
    if requested == "flex" and device.type != "cuda":
        raise AttentionError("model.attention=flex: FlexAttention has no backward pass on CPU; use "
                             "model.attention=sdpa_units (or auto) on CPU")
    if requested == "flash_varlen":
        if device.type != "cuda" or not has_flash:
            raise AttentionError("model.attention=flash_varlen needs a CUDA device and the "
                                 "flash-attn package; use model.attention=auto")
        if shared_prefix:
            raise AttentionError("model.attention=flash_varlen cannot express shared-prefix pairs "
                                 "(the rejected answer sees the prompt but not the chosen answer); "
                                 "use model.attention=flex, or data.shared_prefix=false")
        unfit = _flash_unfit(device, dtype)
        if unfit is not None:
            raise AttentionError(f"model.attention=flash_varlen: {unfit}; use model.dtype=bf16 "
                                 "(or fp16) on an Ampere or newer GPU, or model.attention=flex")
    return requested


def hf_attn_implementation(backend: str) -> dict[str, str]:
    """What transformers loads the model with: the backend for the language model; the vision
    tower (which never sees our rows) keeps SDPA."""
    if backend == "sdpa_units":
        register_units()
    text = {"sdpa_mask": "sdpa", "sdpa_units": UNITS_IMPLEMENTATION, "flex": "flex_attention",
            "flash_varlen": "flash_attention_2"}[backend]
    return {"text_config": text, "vision_config": "sdpa"}


def pieces(mask: torch.Tensor, min_piece: int = MIN_PIECE) -> list[list[tuple[int, int]]]:
    """Per row of an [R, 1, L, L] may-attend mask, the [start, end) pieces it can be cut into.

    A row may be cut before position b when no query at or after b sees a key before b, and
    no query before b sees a key at or after b: with first[i] / last[i] the first / last key
    that query i sees, when min(first[b:]) >= b and max(last[:b]) < b. Read off the mask
    itself, so any boolean mask is cut exactly (causal or not); pieces shorter than
    `min_piece` are merged forward, which only adds work.
    """
    R, L = mask.shape[0], mask.shape[-1]
    if L == 0:
        return [[] for _ in range(R)]
    seen = mask[:, 0].to(torch.uint8)
    first = seen.argmax(dim=2)  # [R, L]: the first key each query sees
    last = (L - 1) - seen.flip(2).argmax(dim=2)  # and the last
    positions = torch.arange(L, device=mask.device)
    suffix_min = first.flip(1).cummin(dim=1).values.flip(1)
    prefix_max = torch.cat([torch.full_like(last[:, :1], -1), last.cummax(dim=1).values[:, :-1]], 1)
    cuts = (suffix_min >= positions) & (prefix_max < positions)
    out = []
    for row in cuts.cpu().tolist():
        spans, start = [], 0
        for b in (i for i, ok in enumerate(row) if ok and i > 0):
            if b - start >= min_piece:
                spans.append((start, b))
                start = b
        spans.append((start, L))
        out.append(spans)
    return out


def units_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                    value: torch.Tensor, attention_mask: torch.Tensor | None, **kwargs):
    """transformers attention function of `sdpa_units`: SDPA per piece of each row (see
    `pieces`). Exact: no query attends across a cut, so the pieces' outputs are the row's."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    R, L = query.shape[0], query.shape[2]
    if (attention_mask is None or attention_mask.dtype != torch.bool
            or tuple(attention_mask.shape) != (R, 1, L, key.shape[2]) or key.shape[2] != L):
        got = None if attention_mask is None else (tuple(attention_mask.shape), attention_mask.dtype)
        raise AttentionError("model.attention=sdpa_units needs one boolean [R, 1, L, L] mask per "
                             "row, as safevid.models.attention.prepare makes, and queries and "
                             f"keys of one length L; it got mask {got} for {R} rows, query length "
                             f"{L}, key length {key.shape[2]}")
    # Every layer gets the same mask object: its pieces are found once per forward. (An
    # attribute of that object, so a recomputed forward under gradient checkpointing finds
    # them too; stamped with the tensor's version, so an in-place edit is noticed.)
    cached = getattr(attention_mask, "_safevid_pieces", None)
    if cached is None or cached[0] != attention_mask._version:
        cached = (attention_mask._version, pieces(attention_mask))
        attention_mask._safevid_pieces = cached
    spans = cached[1]
    rows = []
    for r, row in enumerate(spans):
        outs = [sdpa_attention_forward(
            module, query[r:r + 1, :, a:b], key[r:r + 1, :, a:b], value[r:r + 1, :, a:b],
            attention_mask[r:r + 1, :, a:b, a:b], **kwargs)[0] for a, b in row]
        rows.append(outs[0] if len(outs) == 1 else torch.cat(outs, dim=1))
    return (rows[0] if len(rows) == 1 else torch.cat(rows, dim=0)), None


def register_units() -> None:
    """Make `UNITS_IMPLEMENTATION` known to transformers (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register(UNITS_IMPLEMENTATION, units_attention)


def allowed(group: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
    """[R, 1, L, L] bool, True = may attend. Padding attends to itself only, so that no query
    row is empty (an empty row turns softmax into NaN)."""
    L = group.shape[1]
    q_group, k_group = group[:, :, None], group[:, None, :]
    q_branch, k_branch = branch[:, :, None], branch[:, None, :]
    causal = torch.ones(L, L, dtype=torch.bool, device=group.device).tril()
    ok = (q_group == k_group) & (q_group >= 0) & causal & ((k_branch == 0) | (k_branch == q_branch))
    return (ok | torch.eye(L, dtype=torch.bool, device=group.device))[:, None]


def block_mask(group: torch.Tensor, branch: torch.Tensor):
    """The same rule as `allowed`, as a FlexAttention BlockMask (no [L, L] tensor is made)."""
    from torch.nn.attention.flex_attention import create_block_mask

    R, L = group.shape

    def mask_mod(b, h, q, k):
        gq, gk = group[b, q], group[b, k]
        bq, bk = branch[b, q], branch[b, k]
        same = (gq == gk) & (gq >= 0) & (k <= q) & ((bk == 0) | (bk == bq))
        return same | (q == k)

    # Compiled on CUDA: the mask is then built block by block, never as an [R, L, L] tensor
    # (uncompiled, create_block_mask materialises it). Uncompiled on CPU, where it serves only
    # forward checks and compiling would cost more than it saves.
    return create_block_mask(mask_mod, R, None, L, L, device=group.device,
                             _compile=group.device.type == "cuda")


def prepare(backend: str, group: torch.Tensor, branch: torch.Tensor):
    """The attention_mask argument for the language model (None for flash_varlen)."""
    if backend in ("sdpa_mask", "sdpa_units"):
        return allowed(group, branch)
    if backend == "flex":
        return block_mask(group, branch)
    return None


def mask_bytes(backend: str, rows: int, width: int, block: int = 128) -> int:
    """What the backend's mask takes in memory for `rows` x `width` tokens (for the benchmark)."""
    if backend in ("sdpa_mask", "sdpa_units"):
        return rows * width * width  # bool
    if backend == "flex":
        blocks = -(-width // block)
        return rows * blocks * blocks * 4 * 2 + rows * blocks * 4 * 2  # indices and counts
    return 4 * (rows + 1)  # cu_seqlens
