"""Run configuration: a typed schema, YAML files, dotted `key=value` overrides.

Unknown keys and wrong types are errors that name the key (OmegaConf structured configs in
struct mode); cross-field rules are checked in `validate`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

REPO_ROOT = Path(__file__).resolve().parents[1]


class ConfigError(ValueError):
    """A configuration problem; the message names the key or file."""


@dataclass
class ModelConfig:
    # auto: from the checkpoint's config.json (llava_next_video, qwen2_vl, qwen2_5_vl)
    family: str = "auto"
    # Local transformers directory or hub id. Nothing is downloaded unless a hub id is named.
    name_or_path: str = "${demo.assets_dir}/model"
    freeze_vision: bool = True  # the LLaVA-NeXT-Video DPO recipe trains only the language model
    freeze_projector: bool = True
    # auto: FlexAttention on GPU (flash-attn varlen when installed and the layout allows it),
    # SDPA once per unit of a row on CPU (sdpa_units). Or sdpa_mask | sdpa_units | flex |
    # flash_varlen. Printed at start-up.
    attention: str = "auto"
    dtype: str = "auto"  # auto: bf16 where the device has it, else fp32
    trust_remote_code: bool = False
    # The frozen reference of the DPO-style losses: empty for the policy's initial weights, or
    # a directory / hub id (the same family and tokenizer), e.g. the SFT model one aligns from.
    ref_name_or_path: str = ""


@dataclass
class MixEntry:
    shards: str  # brace patterns and globs, like data.shards
    weight: float = 1.0  # share of each step's pairs
    name: str = ""  # reported as pairs/<name> in metrics.jsonl (default: mix<i>)


@dataclass
class DataConfig:
    # Brace patterns and globs, comma-separated: "data/train-{000000..000031}.tar".
    shards: str = "${demo.assets_dir}/shards/train-*.tar"
    eval_shards: str | None = "${demo.assets_dir}/shards/heldout-*.tar"
    # One sequence per pair, [prompt | chosen | rejected]: the prompt and its video go through
    # the language model once. Off: one sequence per answer (packed or padded).
    shared_prefix: bool = True
    packing: bool = True  # several units per row, under max_tokens_per_row
    max_tokens_per_row: int = 4096
    max_answer_tokens: int = 512
    # Prompt + one answer, in tokens; 0: the model's context window. A longer answer is cut
    # (without EOS); a pair whose prompt leaves no room is rejected with its lengths.
    max_length: int = 0
    max_prompt_length: int = 0  # 0: no limit of its own
    # indexed: a global seeded order from the shards' indexes, each rank reading only its own
    # samples (random access). stream: the sequential WebDataset stream with a shuffle buffer.
    loader: str = "indexed"
    groups: int = 0  # indexed: parts of the permutation each step draws from (0: pairs_per_step)
    # Weighted shard sets instead of data.shards (indexed loader), e.g.
    # [{shards: "safety/train-*.tar", weight: 3}, {shards: "general/train-*.tar", weight: 1}]
    mix: list[MixEntry] = field(default_factory=list)
    shuffle_buffer: int = 512  # stream loader
    decode_threads: int = 2
    eval_max_pairs: int = 512


@dataclass
class TrainConfig:
    seed: int = 0
    # Run length, as in transformers' Trainer: train.max_steps optimizer steps when > 0, else
    # train.epochs passes over the training pairs (ceil(epochs x pairs / pairs_per_step) steps).
    max_steps: int = 0
    epochs: float = 1.0
    pairs_per_step: int = 16  # global, whatever the world size
    micro_batch_pairs: int = 4  # per rank per forward
    lr: float = 5e-7
    weight_decay: float = 0.0
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_steps: int = 0
    lr_schedule: str = "cosine"  # cosine | linear | constant
    min_lr_ratio: float = 0.0
    max_grad_norm: float = 1.0
    gradient_checkpointing: bool = False
    fused_logprobs: bool = True
    save_every: int = 0  # 0: only the final checkpoint
    # A plain transformers directory, exports/step_<n>/, every this many steps (0: only hf/
    # at the end); exports are kept, unlike checkpoints.
    export_every: int = 0
    # Resume from this checkpoint (a step_<n> directory, or a run or checkpoints directory for
    # its newest complete one) when output_dir holds none of its own yet.
    resume_from: str = ""
    # live: a frozen reference model runs beside the policy. precomputed: its log-probs are
    # read from the files `safevid precompute-ref` wrote; no reference model is built.
    reference: str = "live"
    # Where the precomputed reference log-probs are (empty: beside each shard).
    ref_logps_dir: str = ""
    # Metrics besides metrics.jsonl: tensorboard (event files in <output_dir>/tensorboard),
    # wandb (needs the wandb package), none; comma-separated for several: tensorboard,wandb.
    report_to: str = "tensorboard"
    keep_checkpoints: int = 2
    eval_every: int = 0
    deepspeed_config: str = "ds_configs/zero3.json"
    export_hf: bool = True
    # Every collective gives up after this long: a dead or hung rank ends the job with an error
    # naming the rank instead of a silent hang. Generous, because a 7B checkpoint write or the
    # first step's compilation keeps the other ranks waiting at a barrier.
    collective_timeout_s: float = 1800.0


@dataclass
class LossConfig:
    type: str = "sigmoid"
    beta: float = 0.1
    label_smoothing: float = 0.0
    simpo_gamma: float = 0.5
    nll_weight: float = 0.0
    # ipo only: mean (the per-token mean log-ratio, as IPO's authors ran it) or sum
    ipo_form: str = "mean"


@dataclass
class DemoConfig:
    build: bool = False  # build the embedded demo data and tiny model when missing
    assets_dir: str = ".safevid/demo"
    seed: int = 0


@dataclass
class Config:
    output_dir: str = "runs/default"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    demo: DemoConfig = field(default_factory=DemoConfig)


def _explain(exc: OmegaConfBaseException, source: str) -> ConfigError:
    key = getattr(exc, "full_key", None) or getattr(exc, "key", None)
    msg = str(exc).splitlines()[0]
    where = f"key '{key}'" if key else "config"
    return ConfigError(f"{source}: {where}: {msg}")


def _string_field(key: str) -> tuple[bool, bool]:
    """(whether the schema's `key` holds a string, whether it may be null); (False, False) for
    any other key, unknown ones included (OmegaConf then names them)."""
    import dataclasses
    import typing

    kind: object = Config
    nullable = False
    for part in key.split("."):
        if typing.get_origin(kind) is list and part.isdigit():  # data.mix.0.shards
            kind, nullable = typing.get_args(kind)[0], False
            continue
        if not dataclasses.is_dataclass(kind):
            return False, False
        hints = typing.get_type_hints(kind)
        if part not in hints:
            return False, False
        kind = hints[part]
        args = typing.get_args(kind)
        nullable = type(None) in args
        if nullable:
            kind = next(a for a in args if a is not type(None))
    return kind is str, nullable


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Schema defaults <- YAML file <- `key=value` overrides, typed and resolved."""
    schema = OmegaConf.structured(Config)
    layers = [schema]
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            layers.append(OmegaConf.load(path))
        except Exception as exc:
            raise ConfigError(f"{path}: not valid YAML ({exc})") from exc
    try:
        cfg = OmegaConf.merge(*layers)
    except OmegaConfBaseException as exc:
        raise _explain(exc, str(path)) from exc
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, value = (part.strip() for part in item.split("=", 1))
        try:
            text, nullable = _string_field(key)
            # `null` for a key that may not be null goes to OmegaConf, which refuses it by name.
            if text and not (value == "null" and not nullable):
                # A string key takes the text as given: read as YAML, `data.shards=*.tar` or a
                # brace pattern would not parse and `output_dir=0123` would become "83". Bare
                # `null` clears it; a quoted 'null' is the text.
                null = value == "null"
                if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
                    value = value[1:-1]
                OmegaConf.update(cfg, key, None if null else value, merge=True)
            else:
                cfg.merge_with_dotlist([item])
        except OmegaConfBaseException as exc:
            raise _explain(exc, f"override {item!r}") from exc
        except (TypeError, ValueError) as exc:  # e.g. a list indexed by a name
            raise ConfigError(f"override {item!r}: key '{key}': {exc}") from exc
    try:
        obj: Config = OmegaConf.to_object(cfg)  # resolves ${...} interpolations
    except OmegaConfBaseException as exc:
        raise _explain(exc, str(path or "config")) from exc
    validate(obj)
    return obj


def validate(cfg: Config) -> None:
    from safevid.losses import IPO_FORMS, LOSS_TYPES, needs_reference
    from safevid.models.attention import BACKENDS
    from safevid.models.family import FAMILY_NAMES
    from safevid.report import REPORTERS

    checks = [
        (cfg.train.max_steps >= 0, "train.max_steps", "must be >= 0"),
        (cfg.train.epochs >= 0, "train.epochs", "must be >= 0"),
        (cfg.train.max_steps > 0 or cfg.train.epochs > 0, "train.max_steps",
         "set train.max_steps or train.epochs (both are 0)"),
        (cfg.train.export_every >= 0, "train.export_every", "must be >= 0"),
        (cfg.train.reference in ("live", "precomputed"), "train.reference",
         "must be live or precomputed"),
        (cfg.train.reference == "live" or needs_reference(cfg.loss.type), "train.reference",
         f"must be live with loss.type={cfg.loss.type}, which uses no reference"),
        (not cfg.model.ref_name_or_path or needs_reference(cfg.loss.type),
         "model.ref_name_or_path", f"must be empty with loss.type={cfg.loss.type}, which uses "
         "no reference"),
        (all(r in (*REPORTERS, "none") for r in _names(cfg.train.report_to)), "train.report_to",
         f"{cfg.train.report_to!r}: each name must be one of {', '.join(REPORTERS)}"),
        (cfg.loss.ipo_form in IPO_FORMS, "loss.ipo_form", f"must be one of {', '.join(IPO_FORMS)}"),
        (cfg.train.pairs_per_step > 0, "train.pairs_per_step", "must be > 0"),
        (cfg.train.micro_batch_pairs > 0, "train.micro_batch_pairs", "must be > 0"),
        (cfg.train.save_every >= 0, "train.save_every", "must be >= 0"),
        (cfg.train.collective_timeout_s > 0, "train.collective_timeout_s", "must be > 0"),
        (cfg.train.lr_schedule in ("cosine", "linear", "constant"), "train.lr_schedule",
         "must be cosine, linear or constant"),
        (cfg.loss.type in LOSS_TYPES, "loss.type", f"must be one of {', '.join(LOSS_TYPES)}"),
        (cfg.loss.beta > 0, "loss.beta", "must be > 0"),
        (0.0 <= cfg.loss.label_smoothing < 0.5, "loss.label_smoothing", "must be in [0, 0.5)"),
        (cfg.loss.label_smoothing == 0.0 or cfg.loss.type not in ("ipo", "hinge"),
         "loss.label_smoothing", f"must be 0 with loss.type={cfg.loss.type}"),
        (cfg.model.family in FAMILY_NAMES, "model.family", f"must be one of {', '.join(FAMILY_NAMES)}"),
        (cfg.model.attention in BACKENDS, "model.attention", f"must be one of {', '.join(BACKENDS)}"),
        (cfg.data.max_length >= 0, "data.max_length", "must be >= 0"),
        (cfg.data.max_prompt_length >= 0, "data.max_prompt_length", "must be >= 0"),
        (cfg.data.max_answer_tokens > 0, "data.max_answer_tokens", "must be > 0"),
        (cfg.data.loader in ("indexed", "stream"), "data.loader", "must be indexed or stream"),
        (cfg.data.groups >= 0, "data.groups", "must be >= 0"),
        (not cfg.data.mix or cfg.data.loader == "indexed", "data.mix",
         "needs data.loader=indexed"),
        (all(m.weight > 0 for m in cfg.data.mix), "data.mix", "weights must be > 0"),
        (cfg.model.dtype in ("auto", "bf16", "fp16", "fp32"), "model.dtype",
         "must be auto, bf16, fp16 or fp32"),
        (cfg.data.max_tokens_per_row > 0, "data.max_tokens_per_row", "must be > 0"),
    ]
    for ok, key, why in checks:
        if not ok:
            raise ConfigError(f"key '{key}': {why}")


def _names(spec: str) -> list[str]:
    return [n.strip() for n in spec.split(",") if n.strip()]


def reporters(cfg: Config) -> list[str]:
    """`train.report_to` as a list of reporter names (`none` names none)."""
    return [n for n in _names(cfg.train.report_to) if n != "none"]


def check_world_size(cfg: Config, world_size: int) -> int:
    """Micro-steps per optimizer step; the same on every rank, so collectives never deadlock."""
    per_rank, rem = divmod(cfg.train.pairs_per_step, world_size)
    if rem or per_rank % cfg.train.micro_batch_pairs:
        unit = world_size * cfg.train.micro_batch_pairs
        below = cfg.train.pairs_per_step // unit * unit
        nearest = " or ".join(str(v) for v in (below, below + unit) if v > 0)
        raise ConfigError(
            f"key 'train.pairs_per_step': {cfg.train.pairs_per_step} pairs do not split evenly "
            f"into {world_size} ranks x micro-batches of train.micro_batch_pairs="
            f"{cfg.train.micro_batch_pairs}: use a multiple of {unit}, the nearest being "
            f"{nearest} (or change train.micro_batch_pairs)"
        )
    return per_rank // cfg.train.micro_batch_pairs


def check_lengths(cfg: Config, context_window: int) -> int:
    """The effective `data.max_length`, checked against the model and the row budget at
    start-up (before any data is read), so that no sequence ever needs an oversized row."""
    d = cfg.data
    max_length = d.max_length or context_window
    if max_length > context_window:
        raise ConfigError(f"key 'data.max_length': {max_length} is over the model's context window "
                          f"of {context_window} tokens")
    if d.max_prompt_length and d.max_prompt_length >= max_length:
        raise ConfigError(f"key 'data.max_prompt_length': {d.max_prompt_length} leaves no room for "
                          f"an answer within data.max_length={max_length}")
    # A shared-prefix unit is prompt + chosen + rejected, with prompt + answer <= max_length and
    # each answer <= max_answer_tokens: at most max_length + min(max_answer_tokens,
    # max_length - 1) tokens.
    answer = min(d.max_answer_tokens, max_length - 1)
    unit = max_length + answer if d.shared_prefix else max_length
    if unit > d.max_tokens_per_row:
        what = (f"data.max_length + {answer} (a shared-prefix pair: prompt and both answers, "
                "each answer at most data.max_answer_tokens)" if d.shared_prefix
                else "data.max_length")
        raise ConfigError(f"key 'data.max_tokens_per_row': {d.max_tokens_per_row} is under {what} = "
                          f"{unit}; raise it or set data.max_length (now {max_length}) lower")
    return max_length


def resolve_path(path: str) -> Path:
    """As given (relative to the working directory), else relative to the repository."""
    p = Path(path)
    if p.exists() or p.is_absolute():
        return p
    return REPO_ROOT / p if (REPO_ROOT / p).exists() else p


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
