"""Our packed format (docs/formats.md): what bitnet-train's kernels consume.

`write` stores each BitLinear as `NAME.qweight` (packed codes) + `NAME.qscale` (s), everything
else in float32, plus config.json and the tokenizer. `load_packed_model` is the pure-torch reader:
it unpacks, checks, and rebuilds a BitNetTrainForCausalLM whose weights are codes / s.
"""
import copy
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..checkpoint import CheckpointError, verify_manifest
from ..model import BitNetTrainConfig, BitNetTrainForCausalLM
from ..ternary_layout import pack_ternary, pack_ternary_base3, unpack_ternary, unpack_ternary_base3
from ..quant import BitLinear, quantize_activation, straight_through
from .source import PACKED_FORMAT, TernaryCheckpoint

WEIGHTS = "model.safetensors"
# layout name (stored in the safetensors metadata) -> pack, unpack(packed, in_features, dtype)
LAYOUTS = {
    "2bit": (pack_ternary, unpack_ternary),
    "base3": (pack_ternary_base3, unpack_ternary_base3),
}


def write(ckpt: TernaryCheckpoint, out: Path, layout: str) -> Path:
    pack, _ = LAYOUTS[layout]
    tensors = dict(ckpt.full_precision)
    for w in ckpt.ternary:
        tensors[f"{w.module}.qweight"] = pack(w.codes)
        tensors[f"{w.module}.qscale"] = w.scale.reshape(1)
    save_file(tensors, str(out / WEIGHTS), metadata={"format": PACKED_FORMAT, "layout": layout})
    config = copy.deepcopy(ckpt.config)
    # Marks the directory as packed: training's init_from (model_factory.load_checkpoint_model)
    # refuses offline-quantized checkpoints instead of loading qweight-less BitLinears at random.
    config.quantization_config = {"quant_method": PACKED_FORMAT, "quantization_mode": "offline"}
    config.save_pretrained(out)
    ckpt.tokenizer.save_pretrained(out)
    return out / WEIGHTS


class PackedBitLinear(BitLinear):
    """A BitLinear whose weight already is codes / s.

    Running BitLinear's weight quantizer again would be wrong: mean|codes / s| is (nonzero
    fraction) / s, so the re-derived scale shrinks every weight (llama.cpp's converter bug,
    REFERENCE.md section 4). Activations are quantized exactly as in training.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = straight_through(x, quantize_activation(x))
        return F.linear(x, self.weight.to(x.dtype))


def packed_layout(f, path: Path) -> str:
    """The layout of an open packed weights file, after checking that it is one of ours."""
    meta = f.metadata() or {}
    if meta.get("format") != PACKED_FORMAT or meta.get("layout") not in LAYOUTS:
        raise CheckpointError(
            f"{path} is not a {PACKED_FORMAT} file (metadata {meta}): only the `own` and `own-1.6` formats of "
            "`bitnet-train export` hold packed weights; export the checkpoint again with one of them"
        )
    return meta["layout"]


def load_packed_model(directory: str | Path) -> BitNetTrainForCausalLM:
    """Verify checksums, unpack every layer (rejecting non-ternary codes) and rebuild the model."""
    directory = Path(directory)
    verify_manifest(directory)
    path = directory / WEIGHTS
    model = BitNetTrainForCausalLM(BitNetTrainConfig.from_pretrained(directory)).eval()
    try:
        with safe_open(str(path), framework="pt") as f:
            _, unpack = LAYOUTS[packed_layout(f, path)]
            state = {}
            for name, module in list(model.named_modules()):
                if isinstance(module, BitLinear):
                    state[f"{name}.weight"] = _dequantize(f, path, name, module, unpack)
                    model.set_submodule(name, _packed_like(module))
            tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
            for name in model.state_dict().keys() - state.keys() - tied:
                state[name] = _get(f, path, name)
    except SafetensorError as e:
        raise CheckpointError(f"{path} cannot be read ({e}); export it again") from e
    if tied:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state)
    return model


def _get(f, path: Path, name: str) -> torch.Tensor:
    if name not in f.keys():
        raise CheckpointError(f"{path} has no tensor {name}; the export is incomplete: export it again")
    return f.get_tensor(name)


def _dequantize(f, path: Path, name: str, module: BitLinear, unpack) -> torch.Tensor:
    packed, scale = _get(f, path, f"{name}.qweight"), _get(f, path, f"{name}.qscale")
    try:
        codes = unpack(packed, module.in_features)
    except ValueError as e:
        raise CheckpointError(
            f"{path}: tensor {name}.qweight is malformed ({e}); the file is corrupt or not ternary: export it again"
        ) from e
    if codes.shape[0] != module.out_features:
        raise CheckpointError(
            f"{path}: tensor {name}.qweight holds {codes.shape[0]} rows, the config needs {module.out_features}; "
            "config.json and the weights do not belong together: export again"
        )
    if scale.shape != (1,) or not bool(torch.isfinite(scale).all() and (scale > 0).all()):
        raise CheckpointError(f"{path}: tensor {name}.qscale must be one finite positive float, got {scale}")
    return codes / scale.float()


def _packed_like(module: BitLinear) -> PackedBitLinear:
    return PackedBitLinear(module.in_features, module.out_features, device=module.weight.device)
