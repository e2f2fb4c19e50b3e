"""Our packed format (docs/formats.md): what bitnet-train's kernels consume. This module owns it:
the format's name, its writer and its one checked reader.

`write` stores each BitLinear as `NAME.qweight` (packed codes) + `NAME.qscale` (s), everything
else in float32 (norms, embedding, Qwen2's q/k/v biases), plus config.json and the tokenizer.
config.json is the training config, so it records the architecture choices the engine computes
(model.py: hidden_act, sub_norms, qkv_bias, tie_word_embeddings). `read_packed` verifies the
checksums, checks every tensor against the config and hands back the BitLinears in the 2-bit
layout whatever the file's layout: the engine (engine/weights.py) builds on it, and so does
`load_packed_model`, the pure-torch model whose weights are codes / s.
"""
import copy
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..checkpoint import CheckpointError, verify_manifest
from ..model import BitNetTrainConfig, BitNetTrainForCausalLM
from ..quant import BitLinear, quantize_activation, straight_through
from ..ternary_layout import (
    base3_row_bytes,
    pack_ternary,
    pack_ternary_base3,
    packed_row_bytes,
    unpack_ternary,
    unpack_ternary_base3,
)

if TYPE_CHECKING:  # source.py imports PACKED_FORMAT from here
    from .source import TernaryCheckpoint

PACKED_FORMAT = "bitnet-train-packed"  # the safetensors metadata "format" of every file we write
# The metadata "version": 1 (no key) was written when only 2B4T could be exported; its config.json
# lacks sub_norms/qkv_bias, whose defaults are 2B4T's, so it reads as before. 2 adds converted
# Llama-family models. A newer version may hold tensors this reader does not know: refused.
FORMAT_VERSION = 2
WEIGHTS = "model.safetensors"
# layout name (stored in the safetensors metadata) -> pack, row bytes for in_features
LAYOUTS = {
    "2bit": (pack_ternary, packed_row_bytes),
    "base3": (pack_ternary_base3, base3_row_bytes),
}


def write(ckpt: "TernaryCheckpoint", out: Path, layout: str) -> Path:
    pack, _ = LAYOUTS[layout]
    tensors = dict(ckpt.full_precision)
    for w in ckpt.ternary:
        tensors[f"{w.module}.qweight"] = pack(w.codes)
        tensors[f"{w.module}.qscale"] = w.scale.reshape(1)
    save_file(tensors, str(out / WEIGHTS),
              metadata={"format": PACKED_FORMAT, "layout": layout, "version": str(FORMAT_VERSION)})
    config = copy.deepcopy(ckpt.config)
    # Marks the directory as packed: training's init_from (model_factory.load_checkpoint_model)
    # refuses offline-quantized checkpoints instead of loading qweight-less BitLinears at random.
    config.quantization_config = {"quant_method": PACKED_FORMAT, "quantization_mode": "offline"}
    config.save_pretrained(out)
    ckpt.tokenizer.save_pretrained(out)
    return out / WEIGHTS


# ---------------------------------------------------------------------- the reader


@dataclass
class PackedLinear:
    qweight: torch.Tensor  # uint8 (out, ceil(in/128)*32): the 2-bit layout, whatever the file's
    scale: torch.Tensor  # float32 (1,): s, W_q = codes / s
    in_features: int


@dataclass
class PackedExport:
    """An export as read and checked: BitLinears by module name, every other tensor by its training
    name (float32; a tied lm_head is the embedding and is not repeated)."""

    config: BitNetTrainConfig
    layout: str  # the file's layout
    linears: dict[str, PackedLinear]
    tensors: dict[str, torch.Tensor]

    def get(self, name: str) -> torch.Tensor:
        """A tensor by its file name: `MODULE.qweight` (2-bit layout), `MODULE.qscale`, or a float one."""
        module, _, kind = name.rpartition(".")
        if kind == "qweight":
            return self.linears[module].qweight
        if kind == "qscale":
            return self.linears[module].scale
        return self.tensors[name]


def read_packed(directory: str | Path) -> PackedExport:
    """Verify an export's checksums and read it; every problem names its file, its tensor and what to do."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory} is not a directory; pass an export made by `bitnet-train export` "
                              "(e.g. OUT/own)")
    verify_manifest(directory)
    try:
        config = BitNetTrainConfig.from_pretrained(directory)
    except (OSError, ValueError, TypeError) as e:
        raise CheckpointError(f"{directory / 'config.json'} cannot be read as a bitnet-train config ({e}); "
                              "export the checkpoint again") from e
    with torch.device("meta"):  # the module tree only: names and shapes, no memory
        skeleton = BitNetTrainForCausalLM(config)
    path = directory / WEIGHTS
    try:
        with safe_open(str(path), framework="pt") as f:
            reader = _Reader(f, path, packed_layout(f, path))
            bitlinears = {name: m for name, m in skeleton.named_modules() if isinstance(m, BitLinear)}
            linears = {name: reader.linear(name, m.in_features, m.out_features) for name, m in bitlinears.items()}
            skip = {f"{name}.weight" for name in bitlinears}
            if config.tie_word_embeddings:
                skip.add("lm_head.weight")
            tensors = {name: reader.tensor(name) for name in skeleton.state_dict() if name not in skip}
    except SafetensorError as e:
        raise CheckpointError(f"{path} cannot be read ({e}); export it again") from e
    return PackedExport(config, reader.layout, linears, tensors)


def packed_layout(f, path: Path) -> str:
    """The layout of an open packed weights file, after checking that it is one of ours."""
    meta = f.metadata() or {}
    if meta.get("format") != PACKED_FORMAT or meta.get("layout") not in LAYOUTS:
        raise CheckpointError(
            f"{path} is not a {PACKED_FORMAT} file (metadata {meta}): only the `own` and `own-1.6` formats of "
            "`bitnet-train export` hold packed weights; export the checkpoint again with one of them"
        )
    version = meta.get("version", "1")
    if not version.isdigit() or int(version) > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} is {PACKED_FORMAT} version {version}; this bitnet-train reads versions 1 to {FORMAT_VERSION}: "
            "upgrade bitnet-train, or export the checkpoint again with this one"
        )
    return meta["layout"]


class _Reader:
    """Tensors of an open packed file, checked on the way in."""

    def __init__(self, f, path: Path, layout: str):
        self.f, self.path, self.layout = f, path, layout
        self.keys = set(f.keys())

    def tensor(self, name: str) -> torch.Tensor:
        if name not in self.keys:
            raise CheckpointError(f"{self.path} has no tensor {name}: the export is incomplete or was made for "
                                  "another config; export it again")
        return self.f.get_tensor(name)

    def linear(self, module: str, in_features: int, out_features: int) -> PackedLinear:
        name = f"{module}.qweight"
        packed = self.tensor(name)
        _, row_bytes = LAYOUTS[self.layout]
        expected = (out_features, row_bytes(in_features))
        if packed.dtype != torch.uint8 or tuple(packed.shape) != expected:
            raise CheckpointError(
                f"{self.path}: tensor {name} has shape {tuple(packed.shape)} ({packed.dtype}), the config needs "
                f"{expected} (torch.uint8): config.json and the weights do not belong together; export again")
        try:
            qweight = self._two_bit(packed, in_features)
        except ValueError as e:
            raise CheckpointError(f"{self.path}: tensor {name} is malformed ({e}); the file is corrupt or not "
                                  "ternary: export it again") from e
        scale = self.tensor(f"{module}.qscale")
        if scale.shape != (1,) or not bool(torch.isfinite(scale).all() and (scale > 0).all()):
            raise CheckpointError(f"{self.path}: tensor {module}.qscale must be one finite positive float, "
                                  f"got {scale}; export again")
        return PackedLinear(qweight, scale.float(), in_features)

    def _two_bit(self, packed: torch.Tensor, in_features: int) -> torch.Tensor:
        if self.layout == "base3":  # unpacking checks every byte (<= 242); repacked once, at load
            return pack_ternary(unpack_ternary_base3(packed, in_features, dtype=torch.int8))
        # A 2-bit field holding 3 (both bits set) is not t + 1 for any ternary t.
        if bool((packed & (packed >> 1) & 0x55).any()):
            raise ValueError("it holds the 2-bit code 3")
        return packed.contiguous()


# ---------------------------------------------------------------------- the pure-torch model


class PackedBitLinear(BitLinear):
    """A BitLinear whose weight already is codes / s.

    Running BitLinear's weight quantizer again would be wrong: mean|codes / s| is (nonzero
    fraction) / s, so the re-derived scale shrinks every weight (llama.cpp's converter bug:
    convert_hf_to_gguf.py re-ternarizes with a mean|W| scale). Activations are quantized exactly
    as in training, and a bias is added after the product, as BitLinear does.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = straight_through(x, quantize_activation(x))
        return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


def load_packed_model(directory: str | Path) -> BitNetTrainForCausalLM:
    """The training model's architecture with every BitLinear holding codes / s (read_packed's checks)."""
    export = read_packed(directory)
    model = BitNetTrainForCausalLM(export.config).eval()
    state = dict(export.tensors)
    for name, lin in export.linears.items():
        module = model.get_submodule(name)
        state[f"{name}.weight"] = unpack_ternary(lin.qweight, lin.in_features) / lin.scale
        packed = PackedBitLinear(module.in_features, module.out_features, bias=module.bias is not None)
        model.set_submodule(name, packed)
    if export.config.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state)
    return model
