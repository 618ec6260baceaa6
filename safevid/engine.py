"""What every process of a job builds alike before its own work: device and dtype, the
DeepSpeed config, the model family, attention backend and length rules, and the frozen
reference model. Shared by `safevid train` and `safevid precompute-ref`, so that the reference
log-probs one computes are those the other would."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch

from safevid.config import Config, ConfigError, check_lengths, resolve_path


@dataclass
class Setup:
    device: torch.device
    dtype: torch.dtype
    family: object  # safevid.models.family.Family
    backend: str  # attention backend
    ds: dict  # the DeepSpeed config
    load_args: dict  # for safevid.models.dpo_model.load

    @property
    def zero_stage(self) -> int:
        return int(self.ds.get("zero_optimization", {}).get("stage", 0))


def device_and_dtype(cfg: Config) -> tuple[torch.device, torch.dtype]:
    device = torch.device(f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available()
                          else "cpu")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}.get(cfg.model.dtype)
    return device, dtype or auto_dtype(device)


def auto_dtype(device: torch.device) -> torch.dtype:
    """`auto`: bf16 on a GPU that has it, else fp32 (training, and evaluation alike)."""
    bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    return torch.bfloat16 if bf16 else torch.float32


def deepspeed_config(cfg: Config, micro_steps: int, world: int, dtype: torch.dtype) -> dict:
    """ZeRO settings from `train.deepspeed_config`, batch geometry and precision from ours."""
    path = resolve_path(cfg.train.deepspeed_config)
    if not path.is_file():
        raise ConfigError(f"key 'train.deepspeed_config': {path} not found")
    try:
        ds = json.loads(path.read_text())
    except ValueError as exc:
        raise ConfigError(f"key 'train.deepspeed_config': {path} is not JSON ({exc})") from exc
    _settle_zero_plus_plus(ds.get("zero_optimization", {}), world, path.name)
    ds.update(
        train_micro_batch_size_per_gpu=cfg.train.micro_batch_pairs,
        gradient_accumulation_steps=micro_steps,
        train_batch_size=cfg.train.micro_batch_pairs * micro_steps * world,
        gradient_clipping=cfg.train.max_grad_norm,
        zero_allow_untested_optimizer=True,
        steps_per_print=10**9,
        bf16={"enabled": dtype == torch.bfloat16},
        fp16={"enabled": dtype == torch.float16},
    )
    ds.setdefault("wall_clock_breakdown", False)
    if offloads_optimizer(ds):
        # Our AdamW (torch's, unfused: its states live on the CPU) steps the offloaded fp32
        # partitions. DeepSpeed refuses a client optimizer there unless told, to push its own
        # CPU Adam, which would compile a C++ op on first use on every node.
        ds.setdefault("zero_force_ds_cpu_optimizer", False)
    return ds


def offloads_optimizer(ds: dict) -> bool:
    """Whether ZeRO keeps the optimizer states off the GPU (ZeRO-Offload to CPU or NVMe)."""
    device = ds.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
    return device in ("cpu", "nvme")


QUANTIZED_KEYS = ("zero_quantized_weights", "zero_quantized_nontrainable_weights",
                  "zero_quantized_gradients")


def _settle_zero_plus_plus(zero: dict, world: int, source: str) -> None:
    """Fill ZeRO++'s `"zero_hpz_partition_size": "auto"` with the ranks per node, and refuse
    what this machine cannot run (a ConfigError on every rank alike)."""
    key = "key 'train.deepspeed_config'"
    if zero.get("zero_hpz_partition_size") == "auto":
        # hpZ's secondary partition is one node's ranks: DeepSpeed's launcher (ours) says how
        # many in LOCAL_SIZE, torchrun in LOCAL_WORLD_SIZE.
        local = os.environ.get("LOCAL_SIZE") or os.environ.get("LOCAL_WORLD_SIZE")
        if not local and world > 1:
            raise ConfigError(f"{key}: {source}: zero_hpz_partition_size \"auto\" needs the "
                              "launcher's LOCAL_SIZE or LOCAL_WORLD_SIZE; none is set, so write "
                              "the number of ranks per node")
        zero["zero_hpz_partition_size"] = int(local or 1)
    hpz = int(zero.get("zero_hpz_partition_size", 1))
    if hpz > 1 and world % hpz:
        raise ConfigError(f"{key}: {source}: zero_hpz_partition_size {hpz} does not divide the "
                          f"world size {world}")
    quantized = [k for k in QUANTIZED_KEYS if zero.get(k)]
    if quantized and not torch.cuda.is_available():
        # DeepSpeed's CPU back end has no quantizer kernels: qwZ fails in zero.Init and qgZ at
        # the first reduction across nodes ("This op had not been implemented on CPU
        # backend."), while qgZ within one node silently does a plain reduce-scatter.
        raise ConfigError(f"{key}: {source} runs on GPUs only ({', '.join(quantized)} need "
                          "DeepSpeed's CUDA quantizer kernels); on CPU use zero3.json or "
                          "zero2.json, or leave the quantized settings out (hpZ alone runs)")


def prepare(cfg: Config, micro_steps: int, world: int) -> Setup:
    """Device, dtype, DeepSpeed config, family, attention backend and the effective
    `data.max_length`, settled before any weight is read and the same way on every rank (a
    refusal is a ConfigError on all of them)."""
    from safevid.models import attention
    from safevid.models.dpo_model import load_family

    device, dtype = device_and_dtype(cfg)
    ds = deepspeed_config(cfg, micro_steps, world, dtype)
    try:
        family = load_family(cfg.model.name_or_path, cfg.model.family, cfg.model.trust_remote_code)
        backend = attention.choose(cfg.model.attention, device, cfg.data.shared_prefix, dtype)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    cfg.data.max_length = check_lengths(cfg, family.context_window())
    if cfg.model.ref_name_or_path:
        # Decided from files alone: on rank 0, the outcome on every rank (a shared file system
        # may show ranks different things for a moment).
        from safevid.distributed import from_first_rank

        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        from_first_rank(lambda: check_reference_matches(cfg, family.name), rank)
    load_args = dict(dtype=dtype, fused=cfg.train.fused_logprobs, family=family.name,
                     backend=backend, trust_remote_code=cfg.model.trust_remote_code)
    return Setup(device, dtype, family, backend, ds, load_args)


def check_reference_matches(cfg: Config, policy_family: str) -> None:
    """A separate reference scores the policy's token ids and pixels: it must be of the same
    family and read the same tokens. Checked from config and tokenizer files, before any
    weight is read."""
    from safevid.models.dpo_model import load_family
    from safevid.models.family import load_tokenizer

    ref, remote = cfg.model.ref_name_or_path, cfg.model.trust_remote_code
    where = f"key 'model.ref_name_or_path': {ref}"
    try:
        family = load_family(ref, "auto", remote).name
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{where} cannot be read as a model ({exc})") from exc
    if family != policy_family:
        raise ConfigError(f"{where} is a {family} model; the policy is {policy_family}")
    if load_tokenizer(ref, remote).get_vocab() != load_tokenizer(cfg.model.name_or_path,
                                                                 remote).get_vocab():
        raise ConfigError(f"{where} has another vocabulary than the policy "
                          f"{cfg.model.name_or_path}; DPO compares both models on the same tokens")


def build_reference(cfg: Config, setup: Setup):
    """The frozen reference (`model.ref_name_or_path`, else the policy's initial weights; one
    of the policy's family and vocabulary, as `prepare` checked), partitioned like the policy
    under ZeRO-3; (a module in eval mode that returns (logps, lengths), its LoadedModel)."""
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig

    from safevid.models.dpo_model import load

    # from_pretrained partitions under the newest HfDeepSpeedConfig alive: the reference's.
    ds_hf = HfDeepSpeedConfig(reference_ds(setup.ds)) if setup.zero_stage >= 3 else None  # noqa: F841
    ref = load(name_or_path=cfg.model.ref_name_or_path or cfg.model.name_or_path,
               **setup.load_args)
    ref.model.requires_grad_(False)
    if setup.zero_stage < 3:
        # Below ZeRO-3 every rank holds whole weights anyway: the reference is a plain module on
        # the device (DeepSpeed refuses a stage-1/2 engine without an optimizer).
        return ref.model.to(setup.device).eval(), ref
    deepspeed.zero.register_external_parameter(ref.model.head, ref.model.hf.lm_head.weight)
    engine, *_ = deepspeed.initialize(model=ref.model, config=reference_ds(setup.ds))
    engine.eval()
    return engine, ref


def ref_fingerprint(cfg: Config, setup: Setup) -> dict:
    """What this run's reference log-probs depend on: one definition for `precompute-ref`,
    which writes it, and training, which checks it."""
    from safevid.dpo import Batcher
    from safevid.reference import fingerprint, quantized_weights

    return fingerprint(cfg, setup.family.name, str(setup.dtype).removeprefix("torch."),
                       Batcher.layout_of(cfg.data).name, quantized_weights(reference_ds(setup.ds)))


def reference_ds(ds: dict) -> dict:
    """The reference's DeepSpeed config: the policy's without ZeRO++'s hpZ and qgZ. A frozen
    model never runs the backward pass those serve, and zero.Init creates hpZ's process group
    once per process and asserts on a second ("ZeRO parameter intra parallel group is already
    initialized")."""
    zero = {**ds.get("zero_optimization", {}), "zero_hpz_partition_size": 1,
            "zero_quantized_gradients": False}
    return {**ds, "zero_optimization": zero}
