"""The typed recipe schema: one dataclass per YAML section.

Every field is checked when a recipe is loaded (`config/loader.py`): its type from the annotation,
and its allowed values or range from `field(metadata=...)` via the helpers below. A key that is not
a field here is an error naming the key, the file and the keys that are allowed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from megatron_lowp.device import DEVICE_TYPES, HPU_MODES
from megatron_lowp.numerics import FORMATS, ROUNDING_MODES


def choice(default: Any, *allowed: Any, doc: str = ""):
    """A field whose value must be one of `allowed`."""
    return field(default=default, metadata={"choices": tuple(allowed), "doc": doc})


def choice_from(default: Any, source: str, doc: str = ""):
    """A field whose allowed values are a registry's names, "module:NAME": a tuple, a dict's keys, or a
    function returning them; read when a recipe is validated, so the registry is the one source."""
    return field(default=default, metadata={"choices_from": source, "doc": doc})


def bounded(default: Any, *, ge: float | None = None, gt: float | None = None, le: float | None = None, doc: str = ""):
    """A numeric field with an inclusive/exclusive range."""
    return field(default=default, metadata={"ge": ge, "gt": gt, "le": le, "doc": doc})


@dataclass
class RunConfig:
    name: str = "run"
    out_dir: str = "runs"
    seed: int = bounded(1234, ge=0)
    # auto: resume from the newest complete checkpoint if there is one; never: start fresh
    # (refuses a run directory that already has results unless overwrite); or a checkpoint path.
    resume: str = "auto"
    overwrite: bool = False  # with resume: never, move an existing run directory aside (never deleted)


@dataclass
class ModelConfig:
    arch: str = choice_from("llama", "megatron_lowp.model:ARCHS", doc="ngpt: the normalized Transformer (model/ngpt.py)")
    preset: str | None = None  # fills dimensions not set explicitly, from configs/model/<preset>.yaml
    vocab_size: int | None = bounded(None, ge=2, doc="null: follow the tokenizer")
    d_model: int = bounded(256, ge=8)
    n_layers: int = bounded(4, ge=1)
    n_heads: int = bounded(4, ge=1)
    n_kv_heads: int | None = bounded(None, ge=1, doc="null: same as n_heads (no grouping)")
    ffn_hidden_size: int | None = bounded(None, ge=1, doc="null: Llama rule, 8/3 d_model rounded up to multiple_of")
    multiple_of: int = bounded(256, ge=1)
    max_seq_len: int = bounded(2048, ge=1)
    rope_theta: float = bounded(10000.0, gt=0)
    norm_eps: float = bounded(1e-5, gt=0)
    tie_embeddings: bool = False
    init_std: float = bounded(0.02, gt=0)
    # MLP: swiglu (gated SiLU, Llama and the original nGPT) or relu2 (squared ReLU, ungated: the
    # nGPT-NVFP4 paper's 1.2B model).
    mlp: str = choice("swiglu", "swiglu", "relu2")
    # nGPT only (arch: ngpt)
    ngpt_alpha_init: float = bounded(0.05, gt=0, doc="ngpt: initial eigen learning rate of the residual updates")
    ngpt_normalize_down_inputs: bool = True  # ngpt: unit-norm inputs of attn.out and mlp.down ("FNGPT")


@dataclass
class RoleConfig:
    """How one GEMM operand role is quantized (see megatron_lowp/precision/spec.py); format null = high precision."""

    format: str | None = choice(None, None, *FORMATS)
    rounding: str = choice("nearest", *ROUNDING_MODES)
    scaling: str = choice("tensor", "tensor", "channel", doc="fp8: one scale per tensor or per row")
    power_of_two: bool = False  # fp8: round the scale down to a power of two (the FP8 paper)
    flavour: str = choice("device", "device", "ocp", "gaudi2",
                          doc="fp8_e4m3: the E4M3 variant; device: the one the device computes in (448 OCP, 240 Gaudi2)")
    tensor_scale: str = choice("amax", "amax", "fixed", "off", doc="nvfp4: the FP32 second-level scale")
    tensor_amax: float | None = bounded(None, gt=0, doc="nvfp4 with tensor_scale: fixed")
    scale_rounding: str = choice("decode", "decode", "encode", doc="nvfp4: TE/hardware or FP4-paper convention")
    tile: bool = False  # nvfp4: 16x16 tiles (2-D weights) instead of 1x16 blocks
    amax: str = choice("current", "current", "delayed", doc="fp8 per-tensor: scale from this tensor or from past steps")
    amax_history: int = bounded(1, ge=1, doc="delayed: optimizer steps whose max amax sets the scale")


@dataclass
class QafConfig:
    """Quantization-aware finetuning ("FP4 All the Way"): a closing phase whose forward stays
    quantized while backward and update run in high precision, with the learning rate re-warmed."""

    start_step: int | None = bounded(None, ge=1, doc="first QAF step")
    start_tokens: int | None = bounded(None, ge=1, doc="start once this many tokens are trained")
    start_fraction: float | None = bounded(None, gt=0, le=1, doc="start at this fraction of train.steps")
    auto: bool = False  # start when the gradient-noise ratio falls below precision.grad_noise.threshold
    warmup_steps: int = bounded(40, ge=0, doc="linear re-warmup after the switch (the paper: 40)")
    lr: float | None = bounded(None, gt=0, doc="peak LR after the switch; null: optim.lr (the paper resets it)")
    # The main schedule before a planned switch: "full" decays it to optim.min_lr at the step before
    # QAF (the paper: the main run has decayed when the finetune starts); "run" keeps it over all
    # train.steps, so QAF cuts it off before it decays.
    main_decay: str = choice("full", "full", "run")


@dataclass
class GradNoiseConfig:
    """The sqrt(3) rule ("FP4 All the Way"): every N steps measure ||grad|| / (sigma_q sqrt(d)), the
    gradient against the noise that quantized backward adds to it (precision/grad_noise.py)."""

    every: int = bounded(0, ge=0, doc="steps between measurements; 0 turns the monitor off")
    threshold: float = bounded(3**0.5, gt=0, doc="warn (and start QAF if qaf.auto) below this ratio")


@dataclass
class AlignmentWatchConfig:
    """The SwiGLU alignment watch (precision/alignment.py, docs/probe.md), every telemetry_every steps:
    warn when an FFN channel's gate and up weights are aligned and its down-projection inputs stand
    out from the other channels' (the FP8 paper's divergence mechanism)."""

    min_cos: float = bounded(0.5, gt=0, le=1, doc="|cos(w_gate[i], w_up[i])| at or above which a channel is aligned")
    min_outlier_ratio: float = bounded(64.0, gt=1, doc="a channel's max |down input| over the median channel's "
                                       "at or above which it is an outlier")


@dataclass
class PrecisionConfig:
    recipe: str = choice_from("bf16", "megatron_lowp.precision:available_recipes", doc="a registered recipe")
    # Per-role specs, used by recipe: custom (named recipes bring their own).
    x: RoleConfig = field(default_factory=RoleConfig)
    w: RoleConfig = field(default_factory=RoleConfig)
    dy: RoleConfig = field(default_factory=RoleConfig)
    w_t: RoleConfig = field(default_factory=RoleConfig)
    dy_t: RoleConfig = field(default_factory=RoleConfig)
    x_t: RoleConfig = field(default_factory=RoleConfig)
    # Linears kept in high precision, by glob over their names ("layers.0.*", "*.attn.out", "lm_head");
    # the embedding is not a linear and always stays high precision.
    high_precision: list[str] = field(default_factory=lambda: ["lm_head"])
    high_precision_first_blocks: int = bounded(0, ge=0)
    high_precision_last_blocks: int = bounded(0, ge=0)
    # Smooth-SwiGLU: rescale the MLP's linear branch before the down projection (an exact
    # reformulation, any recipe); per token (the FP8 paper's code) or per FFN channel (its text).
    smooth_swiglu: bool = False
    smooth_swiglu_granularity: str = choice("token", "token", "channel")
    qaf: QafConfig = field(default_factory=QafConfig)
    grad_noise: GradNoiseConfig = field(default_factory=GradNoiseConfig)
    # Per-layer numerics telemetry (amax, overflow and underflow rates per role) into numerics.jsonl
    # every N optimizer steps; 0 turns it off.
    telemetry_every: int = bounded(0, ge=0)
    alignment_watch: AlignmentWatchConfig = field(default_factory=AlignmentWatchConfig)
    # emulated: quantize-dequantize then matmul (every device, the reference); native: FP8 GEMMs on
    # the FP8 bytes (torch._scaled_mm) where both operands are per-tensor FP8.
    backend: str = choice("emulated", "emulated", "native")
    # false: forward passes compute in FP32 instead of the device's BF16 autocast (exactness checks,
    # e.g. tensor parallelism against one process, where BF16 rounding would hide the comparison)
    autocast: bool = True


@dataclass
class OptimConfig:
    name: str = choice("adamw", "adamw")
    lr: float = bounded(3e-4, gt=0)
    min_lr: float = bounded(3e-5, ge=0, doc="floor of the cosine / wsd decay")
    weight_decay: float = bounded(0.1, ge=0)
    beta1: float = bounded(0.9, ge=0, le=1)
    beta2: float = bounded(0.95, ge=0, le=1)
    eps: float = bounded(1e-8, gt=0)
    moments: str = choice("fp32", "fp32", "bf16", "fp8", doc="storage of the Adam moments (fp8: >=2-D params only)")
    moment1_format: str = choice("fp8_e4m3", "fp8_e4m3", "fp8_e5m2", doc="moments=fp8: format of m")
    moment2_format: str = choice("fp8_e5m2", "fp8_e4m3", "fp8_e5m2", doc="moments=fp8: format of v")
    moments_rounding: str = choice("nearest", "nearest", "stochastic", doc="rounding of the stored moments")
    master_weights: str = choice("fp32", "fp32", "fp16_pts",
                                 doc="fp16_pts: round >=2-D weights to FP16 with a per-tensor scale after each step")
    schedule: str = choice("cosine", "cosine", "wsd", "constant")
    warmup_steps: int = bounded(0, ge=0)
    decay_fraction: float = bounded(0.2, gt=0, le=1, doc="wsd: share of steps spent decaying")
    decay_shape: str = choice("linear", "linear", "1-sqrt", doc="wsd: shape of the decay")


@dataclass
class DataSource:
    """One dataset of a blend in data.train: both keys are required."""

    path: str = field(metadata={"doc": "indexed-dataset prefix (PREFIX.bin / PREFIX.idx) or embedded"})
    weight: float = field(metadata={"gt": 0, "doc": "relative sampling weight; the weights are normalized"})


@dataclass
class DataConfig:
    # An indexed-dataset prefix (PREFIX.bin / PREFIX.idx, e.g. from `megatron-lowp prepare`), "embedded"
    # for the shipped corpus, or (train only) a weighted blend [{path: PREFIX, weight: W}, ...] with
    # Megatron's blending semantics (megatron_lowp/data/blend.py, docs/data.md).
    train: str | list[DataSource] = "embedded"
    valid: str | None = "embedded"
    tokenizer: str = "embedded"  # a sentencepiece .model file or "embedded"
    # A dataset whose PREFIX_prepare.json records another tokenizer is an error unless this is true.
    allow_tokenizer_mismatch: bool = False


@dataclass
class TrainConfig:
    steps: int = bounded(1000, ge=1)
    micro_batch_size: int = bounded(8, ge=1)
    global_batch_size: int = bounded(8, ge=1)
    seq_len: int = bounded(256, ge=1)
    grad_clip: float = bounded(1.0, ge=0, doc="0 disables clipping")
    log_every: int = bounded(10, ge=1)
    eval_every: int = bounded(100, ge=0, doc="0 disables validation")
    # The validation set (megatron_lowp/data/validation.py): this many sequences of data.valid, run in
    # chunks of eval_batch_size; both fixed by the recipe, so the validation loss is the same number at
    # any micro-batch size, accumulation or world size, and in `megatron-lowp eval`.
    eval_samples: int = bounded(128, ge=1, doc="validation sequences (of seq_len + 1 tokens)")
    eval_batch_size: int = bounded(8, ge=1, doc="validation sequences per forward (memory, not results)")
    checkpoint_every: int = bounded(100, ge=0, doc="0: only at the end of the run")
    keep_checkpoints: int = bounded(0, ge=0, doc="keep the newest N checkpoints; 0 keeps all")
    # Stop (with a checkpoint) after this step while the schedule still follows `steps`: for
    # job time limits, and to test that a resumed run matches an uninterrupted one.
    stop_at_step: int | None = bounded(None, ge=1)
    # A step whose gradient norm is NaN/Inf: skip its update (counted), roll back to the last
    # checkpoint and skip that step's data, or stop. More than max_nonfinite_steps in a row stops.
    nan_policy: str = choice("skip", "skip", "rollback", "stop")
    max_nonfinite_steps: int = bounded(5, ge=1, doc="consecutive non-finite steps tolerated before stopping")
    loss_spike_factor: float = bounded(2.0, gt=1, doc="log an event when a step's loss exceeds this x its running mean")
    # torch.compile each transformer block (quantized linears included); the first step pays the
    # compile (logged), graph breaks are counted (train/compile.py, docs/compile.md).
    compile: bool = False
    # Per transformer block: full recomputes the whole block in backward (keeps its input only);
    # selective keeps every linear's saved operands and recomputes the norms, attention core and MLP
    # gating (model/checkpointing.py). Losses are bit-identical to none.
    activation_checkpointing: str = choice("none", "none", "full", "selective")


@dataclass
class ParallelConfig:
    # single: one process; ddp: DistributedDataParallel; fsdp: FSDP2 (fully_shard per block);
    # deepspeed: DeepSpeed ZeRO (stage from deepspeed_config or zero_stage). Launch several ranks
    # with launch/ (torchrun, Slurm, deepspeed).
    engine: str = choice_from("single", "megatron_lowp.parallel:ENGINES")
    tp: int = bounded(1, ge=1, doc="tensor-parallel degree: ranks per dp x tp mesh row splitting each block "
                                   "(engines single and fsdp; docs/launch.md)")
    # tp > 1: the residual stream and the norms hold seq_len / tp positions per rank (all-gathered
    # into each block's attention and MLP, reduce-scattered out), less activation memory
    sequence_parallel: bool = False
    timeout_s: float = bounded(600.0, gt=0, doc="a collective waiting longer (a dead or hung rank) ends the job")
    fsdp_param_dtype: str = choice("autocast", "autocast", "fp32",
                                   doc="fsdp: all-gather parameters in the autocast dtype (BF16) or in FP32")
    zero_stage: int = choice(1, 0, 1, 2, 3, doc="deepspeed: ZeRO stage when no deepspeed_config is given")
    deepspeed_config: str | None = None  # deepspeed: a JSON file (configs/deepspeed/*.json); batch keys are ours


@dataclass
class DeviceConfig:
    type: str = choice("auto", *DEVICE_TYPES)
    hpu_mode: str = choice("lazy", *HPU_MODES)
    deterministic: bool = True  # torch.use_deterministic_algorithms: bit-exact resume
    # Intra-op CPU threads per process; null: OMP_NUM_THREADS if set, else the usable cores divided
    # among this node's ranks (megatron_lowp/device/threads.py)
    cpu_threads: int | None = bounded(None, ge=1)
    # CPU tensors of this many KiB or more go back to the OS when freed (glibc's mmap threshold, fixed;
    # 0: glibc's dynamic default, whose heap keeps a quantized step's freed buffers; device/cpu_malloc.py)
    cpu_mmap_threshold_kib: int = bounded(64, ge=0, le=32768)


@dataclass
class WandbConfig:
    enabled: bool = False
    project: str = "megatron-lowp"
    entity: str | None = None
    mode: str = choice("offline", "online", "offline")


@dataclass
class LoggingConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)
    tensorboard: bool = False
    progress: bool = True  # progress bar on a terminal; plain log lines otherwise
    # memory.json: the memory ledger's prediction next to what the first step measured, by category
    # (megatron_lowp/memory/), and the peak at the end of the run.
    memory: bool = True


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    device: DeviceConfig = field(default_factory=DeviceConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
