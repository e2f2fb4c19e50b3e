"""Building a model from our config, and loading one from any compatible checkpoint."""
import json
import logging
from dataclasses import asdict
from pathlib import Path

from omegaconf import OmegaConf
from transformers import AutoConfig

from .config import ModelConfig
from .model import BitNetTrainConfig, BitNetTrainForCausalLM

log = logging.getLogger(__name__)

MODEL_CONFIGS = Path(__file__).resolve().parent / "configs" / "model"


def model_config(cfg: ModelConfig, vocab_size: int, **special_token_ids) -> BitNetTrainConfig:
    """The transformers config of a ModelConfig; `special_token_ids`: bos/eos/pad_token_id.

    ModelConfig's fields are BitNetConfig's names, so they pass straight through; only RoPE
    (transformers nests it in rope_parameters) and the training-only switch differ.
    """
    fields = asdict(cfg)
    rope_theta = fields.pop("rope_theta")
    fields.pop("gradient_checkpointing")  # how to train, not what the model is
    fields.pop("bitlinear_kernel")  # likewise (pipeline.py sets it on the built model)
    fields.pop("loss_chunk_tokens")  # likewise
    return BitNetTrainConfig(
        vocab_size=vocab_size,
        rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
        **fields,
        **special_token_ids,
    )


def named_model_config(name: str, vocab_size: int) -> BitNetTrainConfig:
    """A bitnet_train/configs/model/NAME.yaml architecture (read with OmegaConf: Hydra's compose costs seconds)."""
    raw = OmegaConf.load(MODEL_CONFIGS / f"{name}.yaml")
    raw.pop("defaults", None)
    return model_config(OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), raw)), vocab_size)


def build_model(cfg: ModelConfig, tokenizer) -> BitNetTrainForCausalLM:
    ids = {f"{t}_token_id": getattr(tokenizer, f"{t}_token_id") for t in ("bos", "eos", "pad")}
    model = BitNetTrainForCausalLM(model_config(cfg, len(tokenizer), **ids))
    if cfg.gradient_checkpointing:
        model.activation_checkpointing_enable()
    return model


def load_checkpoint_model(path: str | Path, quantize: bool) -> BitNetTrainForCausalLM:
    """Load our checkpoints or a transformers BitNet one (e.g. the released 2B4T bf16 master
    weights): the parameter names are the same, only the config class differs."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{path} is not a model checkpoint directory (no config.json); point init_from at a stage's "
            "'final' directory or a transformers BitNet checkpoint"
        )
    raw = json.loads((path / "config.json").read_text())
    if raw.get("model_type") not in ("bitnet", BitNetTrainConfig.model_type):
        raise ValueError(f"{path}: model_type {raw.get('model_type')!r} is not a BitNet checkpoint")
    if raw.get("quantization_config", {}).get("quantization_mode") == "offline":
        raise ValueError(
            f"{path} holds packed (offline-quantized) weights, which cannot be trained; "
            "start from the bf16 master weights instead"
        )
    hf = AutoConfig.from_pretrained(path, trust_remote_code=False).to_dict()
    for key in ("model_type", "quantization_config", "architectures", "transformers_version", "quantize"):
        hf.pop(key, None)
    config = BitNetTrainConfig(**hf, quantize=quantize)
    model = BitNetTrainForCausalLM.from_pretrained(path, config=config)
    log.info("loaded %s (quantize=%s)", path, quantize)
    return model
