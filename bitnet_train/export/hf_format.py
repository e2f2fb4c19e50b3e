"""The Hugging Face BitNet format: loads with `AutoModelForCausalLM.from_pretrained`.

transformers' offline AutoBitLinear (transformers/integrations/bitnet.py) reads `weight` as uint8 (out/4, in),
4 codes per byte along dim 0, and multiplies its output by `weight_scale`, so weight_scale is
1/s = mean|W|, the inverse of our quantizer's multiplier. A tied lm_head is left out.

The config is the model's own architecture class (source.stock_architecture): BitNetForCausalLM
for 2B4T, LlamaForCausalLM / Qwen2ForCausalLM for a converted model, each with the `bitnet`
quantization config, as Hugging Face's 1.58-bit Llama checkpoints are: stock transformers loads
it without our package. AutoBitLinear multiplies its bias by weight_scale too, so a bias is
stored divided by it (times s).
"""
import dataclasses
from pathlib import Path

from safetensors.torch import save_file
from transformers import BitNetConfig, LlamaConfig, PretrainedConfig, Qwen2Config

from ..checkpoint import CheckpointError
from ..ternary_layout import HF_VALUES_PER_BYTE, pack_ternary_hf
from .source import TernaryCheckpoint, stock_architecture

WEIGHTS = "model.safetensors"
QUANTIZATION_CONFIG = {
    "quant_method": "bitnet",
    "linear_class": "autobitlinear",  # multiplies by weight_scale; plain "bitlinear" divides
    "quantization_mode": "offline",
}


def check(ckpt: TernaryCheckpoint) -> None:
    for w in ckpt.ternary:
        if w.codes.shape[0] % HF_VALUES_PER_BYTE:
            raise CheckpointError(
                f"{ckpt.path}: tensor {w.name} has {w.codes.shape[0]} output rows; the Hugging Face BitNet "
                f"format packs {HF_VALUES_PER_BYTE} rows per byte along dim 0, so out_features must be a "
                "multiple of 4: choose sizes divisible by 4, or export our own format (own, own-1.6)"
            )


CONFIG_CLASSES = {"bitnet": (BitNetConfig, "BitNetForCausalLM"), "llama": (LlamaConfig, "LlamaForCausalLM"),
                  "qwen2": (Qwen2Config, "Qwen2ForCausalLM")}


def hf_config(ckpt: TernaryCheckpoint) -> PretrainedConfig:
    config_class, model_class = CONFIG_CLASSES[stock_architecture(ckpt.config)]
    ours = ckpt.config.to_dict()
    # The fields the target class declares (ours are BitNetConfig's names, shared with Llama's).
    skip = {"model_type", "architectures", "transformers_version", "dtype"}
    config = config_class(**{
        f.name: ours[f.name] for f in dataclasses.fields(config_class) if f.name in ours and f.name not in skip
    })
    config.architectures = [model_class]
    config.quantization_config = dict(QUANTIZATION_CONFIG)
    # The embedding, norms and head are stored unchanged in float32; loading them in another
    # dtype would change the outputs.
    config.dtype = "float32"
    return config


def write(ckpt: TernaryCheckpoint, out: Path) -> Path:
    check(ckpt)
    tensors = dict(ckpt.full_precision)
    for w in ckpt.ternary:
        tensors[w.name] = pack_ternary_hf(w.codes)
        tensors[f"{w.module}.weight_scale"] = (1.0 / w.scale).reshape(1)
        bias = f"{w.module}.bias"
        if bias in tensors:
            tensors[bias] = tensors[bias] * w.scale
    save_file(tensors, str(out / WEIGHTS), metadata={"format": "pt"})
    hf_config(ckpt).save_pretrained(out)
    ckpt.tokenizer.save_pretrained(out)
    return out / WEIGHTS
