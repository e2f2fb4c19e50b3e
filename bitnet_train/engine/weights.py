"""The engine's tensors: an export of our packed format (docs/formats.md) read for the kernels.

Each decoder layer runs four ternary products instead of seven: q/k/v share their input (the
input_layernorm output), and so do gate/up, so their packed rows are concatenated into one
weight and one kernel call per token. Each projection keeps its own weight scale: the fused
layer carries one scale *per output row*, the s_w of the projection that row came from.
(Splitting one fused scale evenly is a bug seen in a peer's GPU path, REFERENCE.md section 5:
q/k/v have 2560/640/640 rows and three different scales.)

The LM head is the one large full-precision matrix (2B4T: 128256 x 2560, 1.3 GB in float32), and
at decode it is read once per token like every other weight, so its storage sets a floor on
decode speed. `head_dtype` chooses it: fp32 (default; exactly the training model's head), bf16
(half the bytes), int8 (a quarter: per-row absmax int8, as served models keep their output matrix
in a quantized type; on the CPU a compiled GEMV reads it with float32 activations). The error each adds is measured in docs/bench_engine.md.
"""
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open

from ..checkpoint import CheckpointError, verify_manifest
from ..export.own_format import LAYOUTS, WEIGHTS, packed_layout
from ..kernels import cpu
from ..model import BitNetTrainConfig
from ..ternary_layout import pack_ternary, packed_row_bytes

HEAD_DTYPES = ("fp32", "bf16", "int8")
ATTENTION = ("q_proj", "k_proj", "v_proj")
GATE_UP = ("gate_proj", "up_proj")


@dataclass
class TernaryLinear:
    """One or more BitLinears that read the same input, as one packed weight."""

    qweight: torch.Tensor  # uint8 (N, Kpad/4), docs/formats.md layout, rows of every projection
    row_scale: torch.Tensor  # float32 (N,): s_w of the projection each row belongs to
    in_features: int
    splits: tuple[int, ...]  # rows per projection, in order

    def __post_init__(self):
        # One projection: its s_w (one element), so the door's bitlinear call can apply it.
        self.single_scale = self.row_scale[:1] if len(self.splits) == 1 else None

    def to(self, device) -> "TernaryLinear":
        return TernaryLinear(self.qweight.to(device), self.row_scale.to(device), self.in_features, self.splits)


def fuse(parts: list[tuple[torch.Tensor, torch.Tensor]], in_features: int) -> TernaryLinear:
    """Concatenate (qweight, qscale) pairs of projections with a common input."""
    qweight = torch.cat([q for q, _ in parts]).contiguous()
    row_scale = torch.cat([s.float().reshape(1).expand(q.shape[0]) for q, s in parts]).contiguous()
    return TernaryLinear(qweight, row_scale, in_features, tuple(q.shape[0] for q, _ in parts))


@dataclass
class Head:
    """The LM head in a chosen storage type; returns float32 logits (N, vocab)."""

    dtype: str
    weight: torch.Tensor  # float32 / bfloat16 / int8 (vocab, hidden)
    scale: torch.Tensor | None = None  # int8 only: per-row multiplier, W ~ weight * scale

    @classmethod
    def from_float(cls, weight: torch.Tensor, dtype: str = "fp32") -> "Head":
        if dtype not in HEAD_DTYPES:
            raise ValueError(f"head_dtype must be one of {', '.join(HEAD_DTYPES)}, got {dtype!r}")
        weight = weight.float()
        if dtype == "fp32":
            return cls(dtype, weight.contiguous())
        if dtype == "bf16":
            return cls(dtype, weight.to(torch.bfloat16).contiguous())
        # Symmetric per-row absmax: each vocabulary row keeps its own range, so rows with small
        # norms (rare tokens) do not lose their precision to the largest row.
        scale = weight.abs().amax(dim=1).clamp(min=1e-12) / 127.0
        codes = (weight / scale[:, None]).round().clamp(-127, 127).to(torch.int8)
        return cls(dtype, codes.contiguous(), scale)

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        if self.dtype == "fp32":
            return F.linear(h.float(), self.weight)
        if self.dtype == "bf16":
            return F.linear(h.to(torch.bfloat16), self.weight).float()
        if h.device.type == "cpu":  # float32 activations on the compiled int8-weight GEMV
            return cpu.int8_weight_linear(h, self.weight, self.scale)
        # torch's weight-only int8 matmul (gpt-fast's): bf16 activations, int8 weights scaled per row.
        return torch._weight_int8pack_mm(h.to(torch.bfloat16), self.weight, self.scale.to(torch.bfloat16)).float()

    def to(self, device) -> "Head":
        return Head(self.dtype, self.weight.to(device), None if self.scale is None else self.scale.to(device))


@dataclass
class LayerWeights:
    input_norm: torch.Tensor
    qkv: TernaryLinear
    attn_sub_norm: torch.Tensor
    o: TernaryLinear
    post_norm: torch.Tensor
    gate_up: TernaryLinear
    ffn_sub_norm: torch.Tensor
    down: TernaryLinear


@dataclass
class EngineWeights:
    config: BitNetTrainConfig
    embed: torch.Tensor  # float32 (vocab, hidden)
    layers: list[LayerWeights]
    norm: torch.Tensor
    head: Head

    def to(self, device) -> "EngineWeights":
        layers = [
            LayerWeights(**{k: v.to(device) for k, v in vars(layer).items()}) for layer in self.layers
        ]
        return EngineWeights(self.config, self.embed.to(device), layers, self.norm.to(device), self.head.to(device))


def build_weights(
    config: BitNetTrainConfig, get, head_dtype: str = "fp32"
) -> EngineWeights:
    """Engine weights from `get(name)`: float tensors by their training names, and for each BitLinear
    module `NAME`, `get("NAME.qweight")` (2-bit layout) and `get("NAME.qscale")`."""
    hidden, inter = config.hidden_size, config.intermediate_size

    head_dim = hidden // config.num_attention_heads
    rows = {"q_proj": config.num_attention_heads * head_dim, "k_proj": config.num_key_value_heads * head_dim,
            "v_proj": config.num_key_value_heads * head_dim, "o_proj": hidden, "gate_proj": inter,
            "up_proj": inter, "down_proj": hidden}

    def ternary(prefix: str, names, in_features: int) -> TernaryLinear:
        parts = []
        for n in names:
            qweight = get(f"{prefix}.{n}.qweight")
            if qweight.shape != (rows[n], packed_row_bytes(in_features)):
                raise CheckpointError(
                    f"tensor {prefix}.{n}.qweight has shape {tuple(qweight.shape)}, the config needs "
                    f"({rows[n]}, {packed_row_bytes(in_features)}): config.json and the weights do not belong "
                    "together; export again")
            parts.append((qweight, get(f"{prefix}.{n}.qscale")))
        return fuse(parts, in_features)

    layers = []
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}"
        layers.append(LayerWeights(
            input_norm=get(f"{p}.input_layernorm.weight").float(),
            qkv=ternary(f"{p}.self_attn", ATTENTION, hidden),
            attn_sub_norm=get(f"{p}.self_attn.attn_sub_norm.weight").float(),
            o=ternary(f"{p}.self_attn", ("o_proj",), config.num_attention_heads * head_dim),
            post_norm=get(f"{p}.post_attention_layernorm.weight").float(),
            gate_up=ternary(f"{p}.mlp", GATE_UP, hidden),
            ffn_sub_norm=get(f"{p}.mlp.ffn_sub_norm.weight").float(),
            down=ternary(f"{p}.mlp", ("down_proj",), inter),
        ))
    embed = get("model.embed_tokens.weight").float()
    head = embed if config.tie_word_embeddings else get("lm_head.weight")
    return EngineWeights(config, embed, layers, get("model.norm.weight").float(), Head.from_float(head, head_dtype))


def load_weights(directory: str | Path, head_dtype: str = "fp32") -> EngineWeights:
    """Verify an export's checksums and read it for the engine; every problem names its file."""
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
    path = directory / WEIGHTS
    try:
        with safe_open(str(path), framework="pt") as f:
            reader = _PackedReader(f, path, config, packed_layout(f, path))
            return build_weights(config, reader.get, head_dtype)
    except SafetensorError as e:
        raise CheckpointError(f"{path} cannot be read ({e}); export it again") from e


class _PackedReader:
    """Tensors of an open packed file, checked on the way in, in the kernels' 2-bit layout."""

    def __init__(self, f, path: Path, config: BitNetTrainConfig, layout: str):
        self.f, self.path, self.layout = f, path, layout
        self.in_features = {
            name: config.intermediate_size if name == "down_proj" else config.hidden_size
            for name in (*ATTENTION, "o_proj", *GATE_UP, "down_proj")
        }
        self.keys = set(f.keys())

    def _raw(self, name: str) -> torch.Tensor:
        if name not in self.keys:
            raise CheckpointError(f"{self.path} has no tensor {name}: the export is incomplete or was made for "
                                  "another config; export it again")
        return self.f.get_tensor(name)

    def get(self, name: str) -> torch.Tensor:
        t = self._raw(name)
        if name.endswith(".qscale"):
            if t.shape != (1,) or not bool(torch.isfinite(t).all() and (t > 0).all()):
                raise CheckpointError(f"{self.path}: tensor {name} must be one finite positive float, got {t}")
        elif name.endswith(".qweight"):
            t = self._codes(name, t)
        return t

    def _codes(self, name: str, packed: torch.Tensor) -> torch.Tensor:
        in_features = self.in_features[name.rsplit(".", 2)[-2]]
        _, unpack = LAYOUTS[self.layout]
        try:
            if self.layout != "2bit":  # the kernels read only the 2-bit layout: repack once, at load
                return pack_ternary(unpack(packed, in_features, dtype=torch.int8))
            if packed.dtype != torch.uint8 or packed.dim() != 2 or packed.shape[1] != packed_row_bytes(in_features):
                raise ValueError(f"expected uint8 (rows, {packed_row_bytes(in_features)}), got {packed.dtype} "
                                 f"{tuple(packed.shape)}")
            # A 2-bit field holding 3 (both bits set) is not t + 1 for any ternary t.
            if bool((packed & (packed >> 1) & 0x55).any()):
                raise ValueError("it holds the 2-bit code 3")
        except ValueError as e:
            raise CheckpointError(f"{self.path}: tensor {name} is malformed ({e}); the file is corrupt or not "
                                  "ternary: export it again") from e
        return packed.contiguous()
