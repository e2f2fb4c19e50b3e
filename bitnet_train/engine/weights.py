"""The engine's tensors: an export of our packed format (docs/formats.md) read for the kernels.

Each decoder layer runs four ternary products instead of seven: q/k/v share their input (the
input_layernorm output), and so do gate/up, so their packed rows are concatenated into one
weight and one kernel call per token. Each projection keeps its own weight scale: the fused
layer carries one scale *per output row*, the s_w of the projection that row came from, and
a converted Qwen2's q/k/v biases are concatenated the same way.
(Splitting one fused scale evenly is a bug seen in a peer's GPU path, microsoft/BitNet's gpu/
fused QKV: q/k/v have 2560/640/640 rows and three different scales.)

The LM head is the one large full-precision matrix (2B4T: 128256 x 2560, 1.3 GB in float32), and
at decode it is read once per token like every other weight, so its storage sets a floor on
decode speed. `head_dtype` chooses it: fp32 (default; exactly the training model's head), bf16
(half the bytes), int8 (a quarter: per-row absmax int8, as served models keep their output matrix
in a quantized type), int4 (an eighth and a bit: 4-bit codes with one scale per 128 values, as
llama.cpp's Q4_0) and ternary (a sixteenth: per-row absmean ternary codes on the layers' GEMV,
as ternary-headed models such as PrismML's Bonsai ship). int4 and ternary run on the CPU kernels
only. The error each adds is measured in docs/bench_engine.md.
"""
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .. import quant
from ..export.own_format import read_packed
from ..kernels import cpu
from ..model import BitNetTrainConfig
from ..ternary_layout import pack_ternary

HEAD_DTYPES = ("fp32", "bf16", "int8", "int4", "ternary")
CPU_ONLY_HEADS = ("int4", "ternary")  # their kernels exist on the CPU only
ATTENTION = ("q_proj", "k_proj", "v_proj")
GATE_UP = ("gate_proj", "up_proj")


@dataclass
class TernaryLinear:
    """One or more BitLinears that read the same input, as one packed weight."""

    qweight: torch.Tensor  # uint8 (N, Kpad/4), docs/formats.md layout, rows of every projection
    row_scale: torch.Tensor  # float32 (N,): s_w of the projection each row belongs to
    in_features: int
    splits: tuple[int, ...]  # rows per projection, in order
    bias: torch.Tensor | None = None  # float32 (N,): Qwen2's q/k/v biases, added after the rescale

    def __post_init__(self):
        # One projection: its s_w (one element), so the door's bitlinear call can apply it.
        self.single_scale = self.row_scale[:1] if len(self.splits) == 1 else None

    def to(self, device) -> "TernaryLinear":
        return TernaryLinear(self.qweight.to(device), self.row_scale.to(device), self.in_features, self.splits,
                             _to(self.bias, device))


def _to(t: torch.Tensor | None, device) -> torch.Tensor | None:
    return None if t is None else t.to(device)


def fuse(parts: list[tuple[torch.Tensor, torch.Tensor]], in_features: int,
         biases: list[torch.Tensor] | None = None) -> TernaryLinear:
    """Concatenate (qweight, qscale) pairs of projections with a common input (and their biases)."""
    qweight = torch.cat([q for q, _ in parts]).contiguous()
    row_scale = torch.cat([s.float().reshape(1).expand(q.shape[0]) for q, s in parts]).contiguous()
    bias = torch.cat([b.float() for b in biases]).contiguous() if biases else None
    return TernaryLinear(qweight, row_scale, in_features, tuple(q.shape[0] for q, _ in parts), bias)


@dataclass
class Head:
    """The LM head in a chosen storage type; returns float32 logits (N, vocab)."""

    dtype: str
    # fp32 / bf16: (vocab, hidden); int8: (vocab, hidden) on CUDA, cpu.int8_group_rows of it on the CPU;
    # int4: cpu.pack_int4's codes; ternary: cpu.group_rows of the packed codes
    weight: torch.Tensor
    scale: torch.Tensor | None = None  # int8, ternary: per row; int4: per 128 values (cpu.pack_int4)
    vocab: int = 0
    hidden: int = 0

    @classmethod
    def from_float(cls, weight: torch.Tensor, dtype: str = "fp32") -> "Head":
        head = cls._stored(weight, dtype)
        if head.weight.device.type == "cpu":  # read whole every decode step: on 2 MB pages (cpu.on_huge_pages)
            head.weight = cpu.on_huge_pages(head.weight)
        return head

    @classmethod
    def _stored(cls, weight: torch.Tensor, dtype: str) -> "Head":
        if dtype not in HEAD_DTYPES:
            raise ValueError(f"head_dtype must be one of {', '.join(HEAD_DTYPES)}, got {dtype!r}")
        weight = weight.float()
        shape = dict(vocab=weight.shape[0], hidden=weight.shape[1])
        if dtype == "fp32":
            return cls(dtype, weight.contiguous(), **shape)
        if dtype == "bf16":
            return cls(dtype, weight.to(torch.bfloat16).contiguous(), **shape)
        if dtype == "int4":
            return cls(dtype, *cpu.pack_int4(weight), **shape)
        if dtype == "ternary":
            # BitNet's absmean ternarization, one scale per vocabulary row.
            s = 1.0 / weight.abs().mean(dim=1).clamp(min=quant.EPS)
            codes = (weight * s[:, None]).round().clamp(-1, 1).to(torch.int8)
            return cls(dtype, cpu.group_rows(pack_ternary(codes)), s.contiguous(), **shape)
        # Symmetric per-row absmax: each vocabulary row keeps its own range, so rows with small
        # norms (rare tokens) do not lose their precision to the largest row.
        scale = weight.abs().amax(dim=1).clamp(min=1e-12) / 127.0
        codes = (weight / scale[:, None]).round().clamp(-127, 127).to(torch.int8)
        if codes.device.type == "cpu":  # the CPU GEMV's streaming layout; CUDA's kernel reads rows
            codes = cpu.int8_group_rows(codes)
        return cls(dtype, codes.contiguous(), scale, **shape)

    @property
    def nbytes(self) -> int:
        """What a decode step reads: the stored weight and its scales."""
        return sum(t.numel() * t.element_size() for t in (self.weight, self.scale) if t is not None)

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        if self.dtype == "fp32":
            return F.linear(h.float(), self.weight)
        if self.dtype == "bf16":
            return F.linear(h.to(torch.bfloat16), self.weight).float()
        if self.dtype == "int4":
            return cpu.int4_weight_linear(h, self.weight, self.scale, self.vocab)
        if self.dtype == "ternary":
            return cpu.bitlinear(h, self.weight, self.scale, self.hidden, rows=self.vocab)
        if h.device.type == "cpu":  # float32 activations on the compiled int8-weight GEMV, grouped rows
            return cpu.int8_weight_linear(h, self.weight, self.scale, rows=self.vocab)
        # torch's weight-only int8 matmul (gpt-fast's): bf16 activations, int8 weights scaled per row.
        return torch._weight_int8pack_mm(h.to(torch.bfloat16), self.weight, self.scale.to(torch.bfloat16)).float()

    def to(self, device) -> "Head":
        if torch.device(device).type != "cpu" and self.dtype in CPU_ONLY_HEADS:
            raise ValueError(f"head_dtype {self.dtype} runs on the CPU kernels only; on {device} use one of "
                             f"{', '.join(d for d in HEAD_DTYPES if d not in CPU_ONLY_HEADS)}")
        weight = self.weight
        if self.dtype == "int8" and (weight.device.type == "cpu") != (torch.device(device).type == "cpu"):
            # The CPU GEMV reads int8_group_rows' layout, torch's CUDA kernel row-major rows.
            weight = (cpu.int8_ungroup_rows(weight, self.vocab, self.hidden) if weight.device.type == "cpu"
                      else cpu.int8_group_rows(weight.cpu()))
        return Head(self.dtype, weight.to(device), None if self.scale is None else self.scale.to(device),
                    self.vocab, self.hidden)


@dataclass
class LayerWeights:
    """One decoder layer; a sub-norm is None where the model has none (a converted Llama without SubLN)."""

    input_norm: torch.Tensor
    qkv: TernaryLinear
    attn_sub_norm: torch.Tensor | None
    o: TernaryLinear
    post_norm: torch.Tensor
    gate_up: TernaryLinear
    ffn_sub_norm: torch.Tensor | None
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
            LayerWeights(**{k: _to(v, device) for k, v in vars(layer).items()}) for layer in self.layers
        ]
        return EngineWeights(self.config, self.embed.to(device), layers, self.norm.to(device), self.head.to(device))


def build_weights(config: BitNetTrainConfig, get, head_dtype: str = "fp32") -> EngineWeights:
    """Engine weights from `get(name)`: float tensors by their training names, and for each BitLinear
    module `NAME`, `get("NAME.qweight")` (2-bit layout) and `get("NAME.qscale")`, already checked
    (own_format.read_packed). The config's architecture choices (model.py) say which tensors exist:
    sub-norms with `sub_norms`, q/k/v biases with `qkv_bias`."""
    hidden, inter = config.hidden_size, config.intermediate_size
    attention_width = config.num_attention_heads * (hidden // config.num_attention_heads)

    def ternary(prefix: str, names, in_features: int, bias: bool = False) -> TernaryLinear:
        parts = [(get(f"{prefix}.{n}.qweight"), get(f"{prefix}.{n}.qscale")) for n in names]
        return fuse(parts, in_features, [get(f"{prefix}.{n}.bias") for n in names] if bias else None)

    def sub_norm(name: str) -> torch.Tensor | None:
        return get(f"{name}.weight").float() if config.sub_norms else None

    layers = []
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}"
        layers.append(LayerWeights(
            input_norm=get(f"{p}.input_layernorm.weight").float(),
            qkv=ternary(f"{p}.self_attn", ATTENTION, hidden, bias=config.qkv_bias),
            attn_sub_norm=sub_norm(f"{p}.self_attn.attn_sub_norm"),
            o=ternary(f"{p}.self_attn", ("o_proj",), attention_width),
            post_norm=get(f"{p}.post_attention_layernorm.weight").float(),
            gate_up=ternary(f"{p}.mlp", GATE_UP, hidden),
            ffn_sub_norm=sub_norm(f"{p}.mlp.ffn_sub_norm"),
            down=ternary(f"{p}.mlp", ("down_proj",), inter),
        ))
    embed = get("model.embed_tokens.weight").float()
    head = Head.from_float(embed if config.tie_word_embeddings else get("lm_head.weight"), head_dtype)
    if config.tie_word_embeddings and head_dtype == "fp32":
        embed = head.weight  # the same values: one copy (on huge pages), not two
    return EngineWeights(config, embed, layers, get("model.norm.weight").float(), head)


def load_weights(directory: str | Path, head_dtype: str = "fp32") -> EngineWeights:
    """An export of our packed format (own or own-1.6), read and checked by own_format.read_packed."""
    export = read_packed(directory)
    return build_weights(export.config, export.get, head_dtype)
