"""What every export starts from: a training checkpoint turned into ternary codes and scales.

A checkpoint is either a stage's `final/` directory (a transformers checkpoint with the tokenizer)
or a `checkpoints/step_N/` directory (model.safetensors only: its config and tokenizer are the
stage's, read from the sibling `../../final/`). `ternary_weights` is the one place codes and scales
are computed for every format, with quant.ternarize: the codes the training forward used.
"""
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_model
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from ..checkpoint import MANIFEST, CheckpointError, verify_manifest
from ..model_factory import load_checkpoint_model
from ..model import BitNetTrainConfig, BitNetTrainForCausalLM
from ..quant import BitLinear, ternarize
from .own_format import PACKED_FORMAT

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
EMBEDDING_NAMES = ("model.embed_tokens.weight", "lm_head.weight")


@dataclass(frozen=True)
class TernaryWeight:
    name: str  # the training parameter, e.g. model.layers.0.self_attn.q_proj.weight
    codes: torch.Tensor  # int8 (out, in), values in {-1, 0, 1}
    scale: torch.Tensor  # float32 0-dim, the quantizer's multiplier s: W_q = codes / s

    @property
    def module(self) -> str:
        return self.name.removesuffix(".weight")


@dataclass
class TernaryCheckpoint:
    path: Path
    config: BitNetTrainConfig
    tokenizer: PreTrainedTokenizerBase
    ternary: list[TernaryWeight]
    full_precision: dict[str, torch.Tensor]  # embedding, norms, untied lm_head: float32, unchanged

    @property
    def num_params(self) -> int:
        return sum(w.codes.numel() for w in self.ternary) + sum(t.numel() for t in self.full_precision.values())

    @property
    def embedding_params(self) -> int:
        """The embedding and an untied lm_head: what the paper's non-embedding size leaves out."""
        return sum(t.numel() for name, t in self.full_precision.items() if name in EMBEDDING_NAMES)


def stock_architecture(config: BitNetTrainConfig) -> str:
    """The transformers / llama.cpp architecture that computes what this model computes.

    2B4T and a converted model with SubLN have sub-norms: BitNet's graph, whose activation is read
    from hidden_act. A converted model without them is its teacher's: Qwen2 (q/k/v biases) or Llama.
    """
    if config.sub_norms:
        if config.qkv_bias:
            raise CheckpointError(
                "a model with sub-norms and q/k/v biases has no stock architecture (BitNet's has no biases); "
                "convert a Qwen2 teacher without model.sub_norms, or export own"
            )
        return "bitnet"
    return "qwen2" if config.qkv_bias else "llama"


def ternary_weights(model: BitNetTrainForCausalLM) -> list[TernaryWeight]:
    """Every BitLinear's codes and scale, exactly as the training forward quantizes them."""
    found = []
    for name, module in model.named_modules():
        if isinstance(module, BitLinear):
            codes, s = ternarize(module.weight.detach())
            found.append(TernaryWeight(f"{name}.weight", codes.to(torch.int8), s))
    return found


def full_precision_tensors(model: BitNetTrainForCausalLM, ternary: list[TernaryWeight]) -> dict[str, torch.Tensor]:
    """Everything that is not a BitLinear weight; a tied lm_head is the embedding, stored once."""
    skip = {w.name for w in ternary}
    if model.config.tie_word_embeddings:
        skip.add("lm_head.weight")
    return {k: v.detach().float().contiguous() for k, v in model.state_dict().items() if k not in skip}


def read_checkpoint(path: str | Path, tokenizer: str | Path | None = None) -> TernaryCheckpoint:
    """Load a training checkpoint and compute its ternary codes and scales."""
    path = Path(path)
    model, stage_dir = load_training_model(path)
    ternary = ternary_weights(model)
    return TernaryCheckpoint(
        path=path,
        config=model.config,
        tokenizer=load_tokenizer(Path(tokenizer) if tokenizer else stage_dir, path),
        ternary=ternary,
        full_precision=full_precision_tensors(model, ternary),
    )


def load_training_model(path: Path) -> tuple[BitNetTrainForCausalLM, Path]:
    """The model (eval mode, quantizing) and the directory holding its config and tokenizer."""
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a directory; pass a stage's final/ or a checkpoints/step_N/ directory")
    if (path / MANIFEST).is_file():
        verify_manifest(path)  # a truncated or corrupt training checkpoint stops here, named
    if (path / "config.json").is_file():
        config_dir = path
    elif (path / "model.safetensors").is_file():
        config_dir = path.parent.parent / "final"
        if not (config_dir / "config.json").is_file():
            raise CheckpointError(
                f"{path} holds weights but no config.json, and {config_dir / 'config.json'} (the stage's "
                "final checkpoint, where a step checkpoint's config comes from) does not exist; export the "
                "stage's final/ directory, or copy the run's config.json into it"
            )
    else:
        raise CheckpointError(f"{path} holds neither config.json nor model.safetensors: it is not a checkpoint")
    require_ternary(config_dir)
    try:
        refuse_packed(path / "model.safetensors")
        if config_dir == path:
            model = load_checkpoint_model(path, quantize=True)
        else:
            model = BitNetTrainForCausalLM(BitNetTrainConfig.from_pretrained(config_dir))
            load_model(model, str(path / "model.safetensors"))
    except CheckpointError:
        raise
    except (SafetensorError, OSError, RuntimeError) as e:  # a shape mismatch is a RuntimeError
        raise CheckpointError(
            f"cannot read the weights of {path}: {e}; the file is truncated or corrupt, or it does not belong "
            f"with {config_dir / 'config.json'}"
        ) from e
    return model.eval(), config_dir


def require_ternary(config_dir: Path) -> None:
    """A full-precision baseline has no codes: ternarizing it would change what it computes."""
    raw = json.loads((config_dir / "config.json").read_text())
    if raw.get("quantize") is False:
        raise CheckpointError(
            f"{config_dir / 'config.json'} says quantize=false: that model was trained in full precision, "
            "and ternary packing would change its outputs; export a ternary (quantize=true) run"
        )


def refuse_packed(weights: Path) -> None:
    """An export's config.json is the training config: transformers would load it with random weights."""
    if not weights.is_file():
        return
    with safe_open(str(weights), framework="pt") as f:
        if (f.metadata() or {}).get("format") == PACKED_FORMAT:
            raise CheckpointError(
                f"{weights} is already a packed export, not a training checkpoint; export the stage's "
                "final/ or checkpoints/step_N/ directory it came from"
            )


def load_tokenizer(directory: Path, checkpoint: Path) -> PreTrainedTokenizerBase:
    if not any((directory / f).is_file() for f in TOKENIZER_FILES):
        raise CheckpointError(
            f"no tokenizer for {checkpoint}: {directory} has none of {', '.join(TOKENIZER_FILES)}; "
            "pass --tokenizer DIR (a saved tokenizer or a Hugging Face name's local copy)"
        )
    return AutoTokenizer.from_pretrained(directory)
