"""GGUF for llama.cpp-family servers: TQ2_0 / TQ1_0 ternary tensors, written with the `gguf` package.

We write the file ourselves instead of running llama.cpp's converter, which re-ternarizes already
ternary weights with a mean|W| scale and gets their magnitude wrong, maps 2B4T's sub-norms under
other names and wants a SentencePiece tokenizer (convert_hf_to_gguf.py).

The llama.cpp architecture is the model's own (source.stock_architecture): `bitnet` for 2B4T,
`llama` or `qwen2` for a converted model, so stock llama.cpp runs it with the right activation.

Exactness. gguf's TQ quantizers re-derive each 256-value block's scale as max|block|. Fed
W_q = codes / s, every block that holds a nonzero code gets exactly 1/s and the codes come back
exact; but the block scale is stored as fp16, so the file dequantizes to codes * fp16(1/s): the
codes are exact, the per-tensor scale is rounded to 11 significant bits (relative error at most
2^-11 = 4.9e-4, the same for every block of a tensor). `quantize_exact` checks exactly that.
"""
import json
import logging
import re
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType, MODEL_TENSOR, TENSOR_NAMES

from ..checkpoint import CheckpointError, verify_manifest
from .source import TernaryCheckpoint, TernaryWeight, stock_architecture

log = logging.getLogger(__name__)

WEIGHTS = "model.gguf"
# "bitnet": RoPE there is rotate-half (NEOX), as ours; but upstream's graph computes the FFN with
# SiLU, not ReLU², which no GGUF key can change (docs/formats.md). "llama" and "qwen2" compute
# SiLU gated FFNs, as their teachers did.
ARCHS = {
    "bitnet": gguf.MODEL_ARCH.BITNET,
    "llama": gguf.MODEL_ARCH.LLAMA,
    "qwen2": gguf.MODEL_ARCH.QWEN2,
}
# llama.cpp's `llama` graph rotates interleaved pairs (RoPE "NORM"); Hugging Face's Llama rotates
# halves. llama.cpp's converter reorders the q/k rows to match (LlamaModel.permute), and so do we.
INTERLEAVED_ROPE = {"llama"}
QTYPES = {"tq2": GGMLQuantizationType.TQ2_0, "tq1": GGMLQuantizationType.TQ1_0}
FILE_TYPES = {GGMLQuantizationType.TQ2_0: gguf.LlamaFileType.MOSTLY_TQ2_0,
              GGMLQuantizationType.TQ1_0: gguf.LlamaFileType.MOSTLY_TQ1_0}
FP16_MIN_NORMAL, FP16_MAX = float(np.finfo(np.float16).tiny), float(np.finfo(np.float16).max)

# Our (= Hugging Face BitNet) parameter names -> llama.cpp's bitnet tensors.
GLOBAL_TENSORS = {
    "model.embed_tokens": MODEL_TENSOR.TOKEN_EMBD,
    "model.norm": MODEL_TENSOR.OUTPUT_NORM,
    "lm_head": MODEL_TENSOR.OUTPUT,
}
LAYER_TENSORS = {
    "input_layernorm": MODEL_TENSOR.ATTN_NORM,
    "self_attn.q_proj": MODEL_TENSOR.ATTN_Q,
    "self_attn.k_proj": MODEL_TENSOR.ATTN_K,
    "self_attn.v_proj": MODEL_TENSOR.ATTN_V,
    "self_attn.attn_sub_norm": MODEL_TENSOR.ATTN_SUB_NORM,
    "self_attn.o_proj": MODEL_TENSOR.ATTN_OUT,
    "post_attention_layernorm": MODEL_TENSOR.FFN_NORM,
    "mlp.gate_proj": MODEL_TENSOR.FFN_GATE,
    "mlp.up_proj": MODEL_TENSOR.FFN_UP,
    "mlp.ffn_sub_norm": MODEL_TENSOR.FFN_SUB_NORM,
    "mlp.down_proj": MODEL_TENSOR.FFN_DOWN,
}
# llama.cpp picks its pre-tokenizer regex by name (tokenizer.ggml.pre).
LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
    r"\s*[\r\n]+|\s+(?!\S)|\s+"
)


def gguf_name(name: str) -> str:
    module, _, kind = name.rpartition(".")  # kind: weight or bias
    if module in GLOBAL_TENSORS:
        return f"{TENSOR_NAMES[GLOBAL_TENSORS[module]]}.{kind}"
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", module)
    if m is None or m.group(2) not in LAYER_TENSORS:
        raise CheckpointError(f"tensor {name} has no llama.cpp counterpart; this is not a BitNet or Llama-family checkpoint")
    return f"{TENSOR_NAMES[LAYER_TENSORS[m.group(2)]].format(bid=int(m.group(1)))}.{kind}"


def architecture(ckpt: TernaryCheckpoint) -> str:
    """llama.cpp's architecture name for this checkpoint; it must compute the model's activation."""
    arch = stock_architecture(ckpt.config)
    if arch != "bitnet" and ckpt.config.hidden_act != "silu":
        raise CheckpointError(
            f"{ckpt.path}: a {ckpt.config.hidden_act} FFN without sub-norms has no llama.cpp architecture "
            f"(its {arch} graph computes SiLU); export hf or own"
        )
    return gguf.MODEL_ARCH_NAMES[ARCHS[arch]]


def rope_rows(codes: torch.Tensor, heads: int) -> torch.Tensor:
    """Rotate-half q/k rows reordered for interleaved RoPE: per head, rows (i, i + d/2) become (2i, 2i + 1)."""
    out, cols = codes.shape
    return codes.reshape(heads, 2, out // heads // 2, cols).transpose(1, 2).reshape(out, cols)


def llama_cpp_layout(ckpt: TernaryCheckpoint, arch: str) -> list[TernaryWeight]:
    if arch not in INTERLEAVED_ROPE:
        return ckpt.ternary
    heads = {"self_attn.q_proj": ckpt.config.num_attention_heads, "self_attn.k_proj": ckpt.config.num_key_value_heads}
    reordered = []
    for w in ckpt.ternary:
        n = next((h for suffix, h in heads.items() if w.module.endswith(suffix)), None)
        reordered.append(w if n is None else TernaryWeight(w.name, rope_rows(w.codes, n), w.scale))
    return reordered


def check(ckpt: TernaryCheckpoint, qtype: GGMLQuantizationType) -> None:
    architecture(ckpt)
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    for w in ckpt.ternary:
        if w.codes.shape[1] % block:
            raise CheckpointError(
                f"{ckpt.path}: tensor {w.name} has in_features={w.codes.shape[1]}, but {qtype.name} packs rows in "
                f"blocks of {block}: GGUF needs hidden and intermediate sizes that are multiples of {block} "
                "(2B4T's and Llama 3 8B's are, SmolLM2-135M's 576 is not); for this model export hf (or own for 2B4T)"
            )
        inv = float(1.0 / w.scale)
        if not FP16_MIN_NORMAL <= inv <= FP16_MAX:
            raise CheckpointError(
                f"{ckpt.path}: tensor {w.name} has scale mean|W| = {inv:.3g}, outside fp16's normal range "
                f"[{FP16_MIN_NORMAL:.3g}, {FP16_MAX:.3g}], where GGUF's fp16 block scale would lose it; "
                "export our own format (own, own-1.6) or hf, which store it in float32"
            )


def quantize_exact(w: TernaryWeight, qtype: GGMLQuantizationType) -> np.ndarray:
    """TQ blocks of W_q = codes / s, checked to dequantize to exactly codes * fp16(1/s)."""
    packed = gguf.quants.quantize((w.codes.float() / w.scale).numpy(), qtype)
    expected = w.codes.float().numpy() * np.float32(np.float16(1.0 / w.scale))
    if not np.array_equal(gguf.quants.dequantize(packed, qtype), expected):
        raise CheckpointError(
            f"tensor {w.name}: gguf's {qtype.name} quantizer did not give back codes * fp16(1/s); the "
            "installed gguf package changed its quantizer: use one whose TQ block scale is max|block|"
        )
    return packed


def write(ckpt: TernaryCheckpoint, out: Path, qtype: GGMLQuantizationType) -> Path:
    check(ckpt, qtype)
    arch = architecture(ckpt)
    if arch == "bitnet" and not ckpt.config.tie_word_embeddings:
        log.warning(
            "%s has an untied lm_head: it is written as output.weight, but upstream llama.cpp's bitnet graph "
            "uses token_embd as the head and ignores it (docs/formats.md)", ckpt.path
        )
    path = out / WEIGHTS
    writer = gguf.GGUFWriter(path, arch)
    add_architecture(writer, ckpt, qtype)
    add_tokenizer(writer, ckpt.tokenizer, ckpt.config.vocab_size)
    for name, tensor in ckpt.full_precision.items():
        writer.add_tensor(gguf_name(name), tensor.numpy())
    for w in llama_cpp_layout(ckpt, arch):
        writer.add_tensor(gguf_name(w.name), quantize_exact(w, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def add_architecture(writer: gguf.GGUFWriter, ckpt: TernaryCheckpoint, qtype: GGMLQuantizationType) -> None:
    c = ckpt.config
    writer.add_file_type(FILE_TYPES[qtype])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_vocab_size(c.vocab_size)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    writer.add_rope_freq_base(c.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)


def add_tokenizer(writer: gguf.GGUFWriter, tokenizer, vocab_size: int) -> None:
    """A byte-level BPE as llama.cpp's "gpt2" tokenizer model: tokens, types, merges, specials."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    if spec["model"]["type"] != "BPE" or spec["model"].get("byte_fallback"):
        raise CheckpointError(
            f"the tokenizer is a {spec['model']['type']} model; the GGUF export supports byte-level BPE "
            "(the built-in tokenizer, LLaMA 3): export own or hf for this one"
        )
    n = len(tokenizer)
    if n > vocab_size:
        raise CheckpointError(f"the tokenizer has {n} tokens but the model's vocab_size is {vocab_size}")
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    tokens = tokenizer.convert_ids_to_tokens(list(range(n)))
    types = [gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL for i in range(n)]
    # Embedding rows past the tokenizer (a padded vocabulary) still need a token each.
    tokens += [f"[PAD{i}]" for i in range(n, vocab_size)]
    types += [gguf.TokenType.UNUSED] * (vocab_size - n)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer_name(spec["pre_tokenizer"]))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]])
    for kind in ("bos", "eos", "pad"):
        token_id = getattr(tokenizer, f"{kind}_token_id")
        if token_id is not None:
            getattr(writer, f"add_{kind}_token_id")(token_id)
    first = tokenizer("a")["input_ids"][:1]
    writer.add_add_bos_token(tokenizer.bos_token_id is not None and first == [tokenizer.bos_token_id])
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


def pre_tokenizer_name(pre: dict | None) -> str:
    """llama.cpp's name for a tokenizer.json pre-tokenizer: GPT-2's regex or LLaMA 3's."""
    if pre and pre["type"] == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    steps = pre.get("pretokenizers", []) if pre and pre["type"] == "Sequence" else []
    if any(s["type"] == "Split" and s.get("pattern", {}).get("Regex") == LLAMA3_REGEX for s in steps):
        return "llama-bpe"
    raise CheckpointError(
        f"unknown pre-tokenizer {json.dumps(pre)[:200]}: llama.cpp would split text differently from "
        "training; the GGUF export knows GPT-2 byte-level and LLaMA 3: export own or hf for this tokenizer"
    )


def read_ternary(directory: str | Path) -> dict[str, tuple[torch.Tensor, float]]:
    """Verify checksums and return each TQ tensor's codes (int8) and its one fp16 scale.

    Rejects a tensor whose values are not ternary multiples of one per-tensor scale.
    """
    directory = Path(directory)
    verify_manifest(directory)
    path = directory / WEIGHTS
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, OSError) as e:
        raise CheckpointError(f"{path} is not a readable GGUF file ({e}); export it again") from e
    found = {}
    for t in reader.tensors:
        if t.tensor_type in FILE_TYPES:
            found[t.name] = _ternary_tensor(path, t)
    return found


def _ternary_tensor(path: Path, t) -> tuple[torch.Tensor, float]:
    block_bytes = gguf.GGML_QUANT_SIZES[t.tensor_type][1]
    # The fp16 scale is the last 2 bytes of every TQ1_0 / TQ2_0 block (ggml-common.h).
    scales = np.asarray(t.data).reshape(-1, block_bytes)[:, -2:].copy().view(np.float16).astype(np.float32)
    nonzero = np.unique(scales[scales != 0])
    if len(nonzero) > 1:
        raise CheckpointError(
            f"{path}: tensor {t.name} has {len(nonzero)} different block scales; a bitnet-train export has one "
            "per tensor: the file was not written by bitnet-train export or is corrupt; export it again"
        )
    scale = float(nonzero[0]) if len(nonzero) else 1.0
    codes = gguf.quants.dequantize(t.data, t.tensor_type) / np.float32(scale)
    if not np.isin(codes, (-1.0, 0.0, 1.0)).all():
        raise CheckpointError(
            f"{path}: tensor {t.name} holds values that are not -1, 0 or 1 times its scale: the packed "
            "tensor is malformed; export it again"
        )
    return torch.from_numpy(codes.astype(np.int8)), scale
