"""The inference model: the training model's function (model.py) on the integer kernels.

Per layer and token the maths is model.py's, line for line: RMSNorm in float32, q/k/v (+ Qwen2's
biases), RoPE (rotate-half), GQA attention over the cache, attn_sub_norm, o_proj, the gated FFN
(ReLU² or SiLU) with its sub-norm. The config's architecture choices (hidden_act, sub_norms,
qkv_bias, tie_word_embeddings) select the same variants as model.py does, so 2B4T and converted
Llama / Qwen2 models run on one engine. Only the BitLinears differ: instead of float matmuls of
fake-quantized tensors, the activations are quantized to int8 once per token, multiplied exactly
with the packed ternary codes, and rescaled by 1 / (s_w * s_a), then a bias is added. That is the
same number up to float32 rounding.

The kernels come from one narrow door, chosen by device: bitnet_train.kernels.cuda on a GPU,
bitnet_train.kernels.cpu otherwise (compiled AVX2 / scalar, or its pure-torch fallback). The two
doors have the same functions, so the layers below never ask which one runs.

On the CPU with the compiled kernels, the same layers and the final norm run as one call per
forward step (kernels/cpu/decoder.h): at batch 1 each of the ~40 torch ops of a layer costs about as
much as the GEMV beside it, and decode is meant to be bound by reading the weights. The torch layers
stay the GPU path, the fallback, and what tests hold the compiled stack to.
"""
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F

from ..kernels import cpu as cpu_door
from ..model import ACTIVATIONS, RotaryEmbedding, apply_rope
from .weights import EngineWeights, LayerWeights, TernaryLinear, load_weights


def default_device() -> torch.device:
    """A GPU when the CUDA door can run there, else the CPU."""
    from ..kernels import cuda

    return torch.device("cuda") if cuda.is_available() else torch.device("cpu")


def door_for(device: torch.device):
    if device.type == "cuda":
        from ..kernels import cuda

        return cuda
    if device.type != "cpu":
        raise ValueError(f"the engine runs on the CPU or a CUDA GPU, not {device}")
    return cpu_door


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """model.RMSNorm's operations in the same order (the engine runs in float32 throughout); no
    weight is no norm (model.sub_norm's Identity)."""
    if weight is None:
        return x
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


# Below this many tokens a step's torch ops (norms, RoPE, attention over the cache) are too small to
# gain from torch's threads, and each fork/join can wait for a descheduled thread: on this 2-core
# machine under load, `sin` of 128 values took 12 ms on 2 threads and 2 us on one, and a 30-layer
# decode step ran 2.5x faster with torch on one thread. The kernels keep their own thread count.
SMALL_STEP_TOKENS = 16


@contextmanager
def torch_threads(n: int):
    """torch's intra-op threads set to n for the block (a process-wide setting, restored after)."""
    before = torch.get_num_threads()
    if n == before:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class KVCache:
    """Keys and values of every layer, allocated once for `max_tokens` positions.

    Shapes (layers, batch, kv_heads, max_tokens, head_dim); `length` positions are filled.
    Preallocation keeps decode free of the per-token concatenations a growing cache would do.
    """

    def __init__(self, layers: int, batch: int, kv_heads: int, max_tokens: int, head_dim: int, device):
        shape = (layers, batch, kv_heads, max_tokens, head_dim)
        if torch.device(device).type == "cpu":  # attention streams it every step: on 2 MB pages
            self.k, self.v = cpu_door.huge_page_zeros(*shape), cpu_door.huge_page_zeros(*shape)
        else:
            self.k = torch.zeros(shape, dtype=torch.float32, device=device)
            self.v = torch.zeros(shape, dtype=torch.float32, device=device)
        self.length = 0

    @property
    def max_tokens(self) -> int:
        return self.k.shape[3]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's keys/values at the positions after `length`; return all filled ones."""
        end = self.length + k.shape[2]
        self.k[layer, :, :, self.length:end] = k
        self.v[layer, :, :, self.length:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


class Engine:
    """Prefill and decode of an exported ternary model (2B4T or converted) on the ternary kernels."""

    def __init__(self, weights: EngineWeights, device: str | torch.device | None = None):
        self.device = torch.device(device) if device is not None else default_device()
        self.door = door_for(self.device)
        self.weights = weights.to(self.device)
        c = self.config = weights.config
        self.n_heads, self.n_kv_heads = c.num_attention_heads, c.num_key_value_heads
        self.head_dim = c.hidden_size // c.num_attention_heads
        self.eps = c.rms_norm_eps
        self.act = ACTIVATIONS[c.hidden_act]
        self.rotary = RotaryEmbedding(self.head_dim, c.rope_parameters["rope_theta"]).to(self.device)
        self.native = None
        self._rope: tuple[torch.Tensor, torch.Tensor] | None = None  # _rope_tables
        if self.device.type == "cpu":
            self.native = cpu_door.native_decoder(
                c.hidden_size, c.intermediate_size, self.n_heads, self.n_kv_heads, self.eps, c.hidden_act,
                [(l.input_norm, l.qkv.qweight, l.qkv.row_scale, l.qkv.bias, l.attn_sub_norm, l.o.qweight,
                  l.o.row_scale, l.post_norm, l.gate_up.qweight, l.gate_up.row_scale, l.ffn_sub_norm,
                  l.down.qweight, l.down.row_scale) for l in self.weights.layers], self.weights.norm)

    @classmethod
    def from_export(cls, directory: str | Path, head_dtype: str = "fp32", device=None) -> "Engine":
        return cls(load_weights(directory, head_dtype), device)

    @property
    def vocab_size(self) -> int:
        return self.weights.embed.shape[0]

    def new_cache(self, batch: int, max_tokens: int) -> KVCache:
        return KVCache(len(self.weights.layers), batch, self.n_kv_heads, max_tokens, self.head_dim, self.device)

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, cache: KVCache | None = None, logits_to_keep: int = 0) -> torch.Tensor:
        """float32 logits (B, T or logits_to_keep, vocab) of token ids (B, T).

        With a cache, the tokens continue the cached sequence (positions cache.length...) and are
        appended to it; without one, they are a whole sequence from position 0.
        """
        ids = ids.to(self.device)
        B, T = ids.shape
        past = cache.length if cache is not None else 0
        if cache is not None and past + T > cache.max_tokens:
            raise ValueError(f"the KV cache holds {cache.max_tokens} tokens; {past} are used and {T} more do not "
                             "fit: allocate a larger one with new_cache")
        small = self.device.type == "cpu" and B * T <= SMALL_STEP_TOKENS
        with torch_threads(1 if small else torch.get_num_threads()):
            h = self.weights.embed[ids]
            if self.native is not None and cpu_door.backend() != "torch":
                # The compiled stack writes every layer's keys and values into a cache: a step
                # without one gets a scratch cache of its own length. It ends with the final norm.
                scratch = cache if cache is not None else self.new_cache(B, T)
                cos, sin = (t[past:past + T].numpy() for t in self._rope_tables(past + T))
                self.native.forward(h.numpy(), cos, sin, scratch.k.numpy(), scratch.v.numpy(), past)
            else:
                positions = torch.arange(past, past + T, device=self.device).expand(B, T)
                rope = self.rotary(positions, torch.float32)
                for i, layer in enumerate(self.weights.layers):
                    h = self._layer(i, layer, h, rope, cache)
                h = rms_norm(h, self.weights.norm, self.eps)
            if cache is not None:
                cache.length = past + T
            if logits_to_keep:
                h = h[:, -logits_to_keep:]
        # The head is the one large product of a decode step: it keeps all of torch's threads.
        return self.weights.head(h.reshape(-1, h.shape[-1])).view(B, h.shape[1], -1)

    __call__ = forward

    def _rope_tables(self, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin (positions, head_dim) of positions 0 .. end - 1 at least, computed once and grown by
        doubling: the rotary embedding is elementwise in the position, so a table's row is bit for bit
        the value a step computes alone (a test holds it), and a decode step skips ~10 torch ops."""
        if self._rope is None or self._rope[0].shape[0] < end:
            n = max(end, 256, 2 * (self._rope[0].shape[0] if self._rope is not None else 0))
            cos, sin = self.rotary(torch.arange(n, device=self.device).view(1, n), torch.float32)
            self._rope = (cos[0, 0].contiguous(), sin[0, 0].contiguous())
        return self._rope

    def _layer(self, i: int, layer: LayerWeights, x, rope, cache: KVCache | None) -> torch.Tensor:
        x = x + self._attention(i, layer, rms_norm(x, layer.input_norm, self.eps), rope, cache)
        h = rms_norm(x, layer.post_norm, self.eps)
        gate, up = self.linear(h, layer.gate_up)
        return x + self.linear(rms_norm(self.act(gate) * up, layer.ffn_sub_norm, self.eps), layer.down)[0]

    def _attention(self, i: int, layer: LayerWeights, x, rope, cache: KVCache | None) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.linear(x, layer.qkv)
        q = apply_rope(q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2), *rope)
        k = apply_rope(k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2), *rope)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        past = 0
        if cache is not None:
            past = cache.length
            k, v = cache.update(i, k, v)
        # As model.attention_bias: SDPA's own causal mask is exact for a sequence from position 0
        # and needless for one new token; new tokens after a cache need an explicit offset mask.
        mask = None
        if past and T > 1:
            mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(diagonal=past)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1,
                                           enable_gqa=True)
        y = y.transpose(1, 2).reshape(B, T, -1)
        return self.linear(rms_norm(y, layer.attn_sub_norm, self.eps), layer.o)[0]

    def linear(self, x: torch.Tensor, lin: TernaryLinear) -> tuple[torch.Tensor, ...]:
        """The BitLinear outputs (one per fused projection) of x (..., in_features)."""
        lead = x.shape[:-1]
        x2d = x.reshape(-1, x.shape[-1])
        scale = lin.single_scale
        if scale is not None:  # one projection: the door's quantize + product + rescale in one call
            y = self.door.bitlinear(x2d, lin.qweight, scale, lin.in_features)
        else:
            q, s_a = self.door.quantize_activations(x2d)
            dot = self.door.ternary_matmul_int(q, lin.qweight)
            # The kernels' rescale, float32 for float32: dot / (s_w * s_a), with s_w per row.
            y = dot.float() / (lin.row_scale * s_a[:, None])
        if lin.bias is not None:  # after the rescale, as BitLinear's F.linear adds it
            y = y + lin.bias
        return tuple(part.view(*lead, -1) for part in y.split(lin.splits, dim=-1))
