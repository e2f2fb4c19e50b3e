"""BitNet b1.58 2B4T as a transformers model (tech report arXiv 2504.12285, section 2).

Read top to bottom beside the report: RMSNorm, RoPE, attention with GQA and the attention
sub-norm, the ReLU² gated FFN with its sub-norm, the pre-norm block, the model, the LM head.
Every projection inside a block is a BitLinear (quant.py); embedding and lm_head stay in full
precision. Parameter names are exactly those of the Hugging Face BitNet checkpoints, so the
released bf16 master weights load straight in and our checkpoints load in `BitNetForCausalLM`.

The same classes hold a ternary copy of a Llama-family model (conversion, stages/convert.py),
chosen by config as transformers does: `hidden_act` (relu2 for 2B4T, silu for Llama/Qwen2),
`sub_norms` (2B4T's attn_sub_norm/ffn_sub_norm; off for Llama, or inserted as BitDistill's
SubLN), `qkv_bias` (Qwen2's q/k/v biases) and `tie_word_embeddings`. Llama's parameter names
are 2B4T's without the sub-norms, so a teacher's state dict loads by name.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, AutoModelForCausalLM, BitNetConfig, GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import CausalLMOutputWithPast

from .kernels.chunked_ce import next_token_loss_sum as chunked_next_token_loss_sum
from .losses import next_token_loss_sum
from .quant import BitLinear


@strict
class BitNetTrainConfig(BitNetConfig):
    """transformers' BitNetConfig plus our switches: `quantize=False` is the full-precision twin;
    `sub_norms` and `qkv_bias` describe a converted Llama-family model (module docstring)."""

    model_type = "bitnet_train"
    quantize: bool = True
    sub_norms: bool = True
    qkv_bias: bool = False

    def validate_architecture(self):
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act={self.hidden_act!r} is not supported; use one of {sorted(ACTIVATIONS)}")


# The FFN's gate activation: 2B4T squares a ReLU (report 2.1); Llama and Qwen2 use SiLU.
ACTIVATIONS = {"relu2": lambda x: F.relu(x).square(), "silu": F.silu}


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        # λ of a SubLN that conversion inserted where the teacher has no norm: x + λ·(norm(x) − x),
        # so that at λ = 0 the student computes its teacher (stages/convert.py). 1 everywhere else.
        self.strength = 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 as Llama does: bf16 variance loses too many bits.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        y = self.weight * x32.to(x.dtype)
        return y if self.strength == 1.0 else x + self.strength * (y - x)


class RotaryEmbedding(nn.Module):
    """RoPE with Llama's rotate-half convention, which the released checkpoints were trained in."""

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq  # (B, T, head_dim/2)
        angles = torch.cat((freqs, freqs), dim=-1)[:, None]  # (B, 1, T, head_dim)
        return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + rotate_half(x) * sin


class Attention(nn.Module):
    """GQA self-attention; the report's change to Llama is attn_sub_norm before o_proj."""

    def __init__(self, config: BitNetTrainConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads = config.num_attention_heads
        self.n_kv_heads = config.num_key_value_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        q, bias = config.quantize, config.qkv_bias
        self.q_proj = BitLinear(config.hidden_size, self.n_heads * self.head_dim, quantize=q, bias=bias)
        self.k_proj = BitLinear(config.hidden_size, self.n_kv_heads * self.head_dim, quantize=q, bias=bias)
        self.v_proj = BitLinear(config.hidden_size, self.n_kv_heads * self.head_dim, quantize=q, bias=bias)
        self.o_proj = BitLinear(self.n_heads * self.head_dim, config.hidden_size, quantize=q)
        self.attn_sub_norm = sub_norm(config, config.hidden_size)

    def forward(self, x, rope, mask, cache: Cache | None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None and T > 1, enable_gqa=True
        )
        y = y.transpose(1, 2).reshape(B, T, -1)
        return self.o_proj(self.attn_sub_norm(y))


class FeedForward(nn.Module):
    """down(ffn_sub_norm(relu(gate(x))² * up(x))): the report's ReLU² GLU with a sub-norm
    (Llama: down(silu(gate(x)) * up(x)))."""

    def __init__(self, config: BitNetTrainConfig):
        super().__init__()
        q = config.quantize
        self.gate_proj = BitLinear(config.hidden_size, config.intermediate_size, quantize=q)
        self.up_proj = BitLinear(config.hidden_size, config.intermediate_size, quantize=q)
        self.down_proj = BitLinear(config.intermediate_size, config.hidden_size, quantize=q)
        self.ffn_sub_norm = sub_norm(config, config.intermediate_size)
        self.act = ACTIVATIONS[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.ffn_sub_norm(self.act(self.gate_proj(x)) * self.up_proj(x)))


def sub_norm(config: BitNetTrainConfig, dim: int) -> nn.Module:
    """2B4T's sub-norm, or nothing (Llama). Inserted into a converted Llama (BitDistill's SubLN) its
    gain starts at 1: it rescales each token's input to o_proj/down_proj to unit RMS, which the
    ternary activation quantizer needs more than the teacher did."""
    return RMSNorm(dim, eps=config.rms_norm_eps) if config.sub_norms else nn.Identity()


class DecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: BitNetTrainConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = FeedForward(config)

    def forward(self, x, rope, mask, cache=None):
        x = x + self.self_attn(self.input_layernorm(x), rope, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class BitNetTrainPreTrainedModel(PreTrainedModel):
    config_class = BitNetTrainConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["DecoderLayer"]
    _supports_sdpa = True

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)
        elif isinstance(module, RotaryEmbedding):
            head_dim = module.inv_freq.numel() * 2
            theta = self.config.rope_parameters["rope_theta"]
            module.inv_freq.copy_(1.0 / theta ** (torch.arange(0, head_dim, 2).float() / head_dim))


class BitNetTrainModel(BitNetTrainPreTrainedModel):
    def __init__(self, config: BitNetTrainConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        head_dim = config.hidden_size // config.num_attention_heads
        self.rotary_emb = RotaryEmbedding(head_dim, config.rope_parameters["rope_theta"])
        self.gradient_checkpointing = False
        self.post_init()

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None):
        B, T = input_ids.shape
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + T, device=input_ids.device).expand(B, T)
        x = self.embed_tokens(input_ids)
        rope = self.rotary_emb(position_ids, x.dtype)
        mask = attention_bias(attention_mask, T, past, x.device)
        for layer in self.layers:
            x = layer(x, rope, mask, past_key_values)
        return self.norm(x)


def attention_bias(attention_mask: torch.Tensor | None, T: int, past: int, device) -> torch.Tensor | None:
    """A boolean (B, 1, T, past+T) mask, or None when SDPA's own causal mask is exact.

    A mask is needed only with padding or when new queries attend to a cache.
    """
    if (attention_mask is None or bool(attention_mask.all())) and (past == 0 or T == 1):
        return None
    causal = torch.ones(T, past + T, dtype=torch.bool, device=device).tril(diagonal=past)
    mask = causal[None, None]
    if attention_mask is not None:
        mask = mask & attention_mask[:, None, None, -(past + T):].bool()
    return mask


class BitNetTrainForCausalLM(BitNetTrainPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: BitNetTrainConfig):
        super().__init__(config)
        self.model = BitNetTrainModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        # Tokens per chunk of the summed training loss's head (kernels/chunked_ce.py), which then
        # never holds the full logits; 0: the full logits. How to train, not what the model is:
        # set by the pipeline (model.loss_chunk_tokens), not saved with the weights.
        self.loss_chunk_tokens = 0
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        return_dict: bool | None = None,
        past_key_values: Cache | None = None,
        cache_position: torch.LongTensor | None = None,
        loss_reduction: str = "mean",
    ) -> CausalLMOutputWithPast:
        """No **kwargs: an argument this model does not know fails here instead of being dropped.

        With labels, `loss` is transformers' mean next-token loss, or with loss_reduction="sum" the
        sum that training uses (losses.py). That sum is computed here, inside the forward, because
        a sharded model (FSDP2) holds the head's full weight only while its forward runs; with
        loss_chunk_tokens set it comes from the hidden states a chunk at a time and `logits` is None.

        transformers renamed the KV cache `past_key_values` -> `cache` (5.2x); both are accepted.
        `return_dict` and older generate()'s `cache_position` change nothing: the output is always
        a ModelOutput and positions follow from the cache length.
        """
        if cache is not None and past_key_values is not None and cache is not past_key_values:
            raise TypeError("pass the KV cache once, as `cache` (or the older `past_key_values`), not both")
        cache = cache if cache is not None else past_key_values
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction={loss_reduction!r}; use 'mean' or 'sum'")
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        h = self.model(input_ids, attention_mask, position_ids, cache)
        if labels is not None and loss_reduction == "sum" and self.loss_chunk_tokens:
            loss, _ = chunked_next_token_loss_sum(h, self.lm_head.weight, labels, self.loss_chunk_tokens)
            return CausalLMOutputWithPast(loss=loss, logits=None, **{OUTPUT_CACHE_FIELD: cache})
        logits = self.lm_head(h[:, -logits_to_keep:] if logits_to_keep else h)
        loss = None
        if labels is not None and loss_reduction == "sum":
            loss, _ = next_token_loss_sum(logits, labels)
        elif labels is not None:  # transformers' convention: mean next-token loss
            loss = F.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100
            )
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{OUTPUT_CACHE_FIELD: cache})


# Where generate() looks for the cache in a model's output: `cache` from transformers 5.2x on,
# `past_key_values` before.
OUTPUT_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"

AutoConfig.register(BitNetTrainConfig.model_type, BitNetTrainConfig)
AutoModelForCausalLM.register(BitNetTrainConfig, BitNetTrainForCausalLM)
