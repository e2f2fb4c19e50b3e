"""Back-of-the-envelope plan for a run: memory per GPU in each launch mode, and the throughput
that training on `tokens` in `days` on `gpus` GPUs requires.

    bitnet-train estimate                                   # recipes/bitnet_2b4t, 256 GPUs, 30 days
    bitnet-train estimate --gpus 64 --days 90 --micro-batch 2

Memory model (bytes per GPU; P parameters, N data-parallel ranks, b x s tokens per micro-batch):
- Training state. trainer.py keeps fp32 master weights (4P; the ternary weights exist only
  inside each forward), fp32 gradients (4P) and AdamW's two fp32 moments (8P): 16P in all.
  DDP replicates all of it; ZeRO-2 shards gradients and moments (4P + 12P/N); ZeRO-3 and FSDP
  full shard shard everything (16P/N) and gather one block's weights at a time (plus the next,
  prefetched): 2 blocks x 4 B x block parameters.
- Activations per token and block, counted from model.py: 5h + 3*kv + 6i bf16 elements (the
  residual and norm outputs, q/k/v before and after RoPE, the attention output; gate, up, ReLU,
  ReLU^2, product, sub-norm) and 6h + i int8 codes, which is all each BitLinear keeps of its
  input (quant.TernaryLinear; q, k and v each keep their own). Attention scores are never
  stored (SDPA). With block checkpointing, each block keeps only its input (h)
  and one block's full activations exist at a time, during its recomputation.
- Logits: 2 B (bf16) + 4 B (the fp32 log-softmax) + 2 B (their gradient) per vocabulary entry
  and token. At 128256 entries this is the largest activation of all. With the chunked loss
  (model.loss_chunk_tokens = c, kernels/chunked_ce.py) the loss never holds them: the head in
  bf16 (2 B a head weight), its fp32 gradient (4 B), the hidden states' gradient (4 B a token
  and hidden unit: the residual stream stays fp32 under autocast), and at the peak of one chunk
  the larger of its logits (bf16, then fp32, then the fp32 log-softmax: 8 B a chunk token and
  vocabulary entry) and its gradient with the head-gradient product (6 B, and 2 + 4 B a head
  weight).
Not counted: allocator fragmentation, communication buckets, the CUDA context (~1-3 GB together):
plan for 10-20% headroom. FLOPs per token: 6 x (non-embedding parameters + the output head)
plus 6 x layers x seq x h for attention (fwd + bwd); fake quantization trains with ordinary bf16
matmuls, so this is the same count as for a full-precision model.
"""
import argparse
from dataclasses import dataclass

from .config import ModelConfig

GB = 1e9
LLAMA3_VOCAB = 128256
# Sharding of (weights, gradients, AdamW moments) over N ranks: True = divided by N.
MODES = {
    "single_gpu": (False, False, False),
    "ddp": (False, False, False),
    "multi_node_ddp": (False, False, False),
    "deepspeed_zero2": (False, True, True),
    "deepspeed_zero3": (True, True, True),
    "fsdp_full_shard": (True, True, True),
}
BYTES_WEIGHT, BYTES_GRAD, BYTES_ADAM = 4, 4, 8  # fp32 master weights, fp32 grads, two fp32 moments
BYTES_ACTIVATION = 2  # bf16
BYTES_CODE = 1  # int8
BYTES_LOGIT = 2 + 4 + 2  # bf16 logits, fp32 log-softmax, bf16 gradient


@dataclass(frozen=True)
class ModelShape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool

    @classmethod
    def from_config(cls, cfg: ModelConfig, vocab: int) -> "ModelShape":
        return cls(cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.num_attention_heads,
                   cfg.num_key_value_heads, vocab, cfg.tie_word_embeddings)

    @property
    def kv_dim(self) -> int:
        return self.hidden // self.heads * self.kv_heads

    @property
    def block_params(self) -> int:
        h, i, kv = self.hidden, self.intermediate, self.kv_dim
        attention = 2 * h * h + 2 * h * kv  # q, o: h x h; k, v: h x kv (GQA); no biases
        ffn = 3 * h * i  # gate, up, down
        norms = 3 * h + i  # input, post-attention, attn_sub_norm (h); ffn_sub_norm (i)
        return attention + ffn + norms

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def params(self) -> int:
        head = 0 if self.tied else self.vocab * self.hidden
        return self.embedding_params + self.layers * self.block_params + self.hidden + head  # + final norm

    @property
    def block_activation_bytes(self) -> int:
        """Bytes stored per token by one block for its backward (see the module docstring)."""
        h, i, kv = self.hidden, self.intermediate, self.kv_dim
        return (5 * h + 3 * kv + 6 * i) * BYTES_ACTIVATION + (6 * h + i) * BYTES_CODE


@dataclass(frozen=True)
class Memory:
    weights: float
    grads: float
    optimizer: float
    gathered: float  # full weights of the blocks being computed (ZeRO-3 / FSDP only)
    activations: float
    logits: float

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.optimizer + self.gathered + self.activations + self.logits


def activation_bytes(m: ModelShape, tokens: int, checkpointing: bool) -> float:
    if checkpointing:  # every block's input, and one block's activations during its recomputation
        return tokens * (m.layers * m.hidden * BYTES_ACTIVATION + m.block_activation_bytes)
    return tokens * m.layers * m.block_activation_bytes


def logit_bytes(m: ModelShape, tokens: int, loss_chunk_tokens: int) -> float:
    if not loss_chunk_tokens:
        return tokens * m.vocab * BYTES_LOGIT
    head, chunk = m.vocab * m.hidden, min(loss_chunk_tokens, tokens) * m.vocab
    return head * (2 + 4) + tokens * m.hidden * 4 + max(8 * chunk, 6 * chunk + 6 * head)


def memory_per_gpu(m: ModelShape, mode: str, ranks: int, tokens: int, checkpointing: bool,
                   loss_chunk_tokens: int = 0) -> Memory:
    if mode not in MODES:
        raise ValueError(f"unknown launch mode {mode!r}; known: {sorted(MODES)}")
    shard_w, shard_g, shard_o = MODES[mode]
    p = m.params

    def part(sharded: bool) -> float:
        return p / ranks if sharded else p

    return Memory(
        weights=part(shard_w) * BYTES_WEIGHT,
        grads=part(shard_g) * BYTES_GRAD,
        optimizer=part(shard_o) * BYTES_ADAM,
        gathered=2 * m.block_params * BYTES_WEIGHT if shard_w else 0.0,
        activations=activation_bytes(m, tokens, checkpointing),
        logits=logit_bytes(m, tokens, loss_chunk_tokens),
    )


def flops_per_token(m: ModelShape, seq_len: int) -> float:
    matmul_params = m.layers * m.block_params + m.vocab * m.hidden  # the output head is a matmul, the embedding is not
    return 6 * matmul_params + 6 * m.layers * seq_len * m.hidden


@dataclass(frozen=True)
class Throughput:
    tokens_per_s: float
    tokens_per_s_per_gpu: float
    flops_per_s_per_gpu: float


def required_throughput(m: ModelShape, tokens: float, days: float, gpus: int, seq_len: int) -> Throughput:
    per_s = tokens / (days * 86400)
    return Throughput(per_s, per_s / gpus, per_s / gpus * flops_per_token(m, seq_len))


def report(m: ModelShape, gpus: int, gpus_per_node: int, micro_batch: int, seq_len: int, tokens: float,
           days: float, gpu_memory_gb: float, peak_tflops: float, loss_chunk_tokens: int = 0) -> str:
    tokens_per_micro = micro_batch * seq_len
    loss = f"the loss {loss_chunk_tokens} tokens at a time" if loss_chunk_tokens else "the full logits"
    lines = [
        f"model: {m.params / 1e9:.3f}B parameters ({m.embedding_params / 1e9:.3f}B embedding, "
        f"{m.layers} blocks of {m.block_params / 1e6:.2f}M), vocab {m.vocab}, tied={m.tied}",
        f"micro-batch {micro_batch} x {seq_len} = {tokens_per_micro} tokens per GPU; fp32 weights/grads/AdamW, "
        f"bf16 activations, int8 codes of the BitLinear inputs, {loss}",
        "",
        "| mode | ranks | weights | grads | AdamW | gathered | activations (ckpt / none) | logits | "
        f"total GB (ckpt / none) | fits {gpu_memory_gb:.0f} GB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for mode in MODES:
        ranks = 1 if mode == "single_gpu" else (gpus_per_node if mode in ("ddp",) else gpus)
        ckpt = memory_per_gpu(m, mode, ranks, tokens_per_micro, True, loss_chunk_tokens)
        full = memory_per_gpu(m, mode, ranks, tokens_per_micro, False, loss_chunk_tokens)
        fits = "yes" if ckpt.total <= gpu_memory_gb * GB * 0.85 else "no"
        lines.append(
            f"| {mode} | {ranks} | {ckpt.weights / GB:.2f} | {ckpt.grads / GB:.2f} | {ckpt.optimizer / GB:.2f} | "
            f"{ckpt.gathered / GB:.2f} | {ckpt.activations / GB:.2f} / {full.activations / GB:.2f} | "
            f"{ckpt.logits / GB:.2f} | {ckpt.total / GB:.1f} / {full.total / GB:.1f} | {fits} |"
        )
    need = required_throughput(m, tokens, days, gpus, seq_len)
    mfu = need.flops_per_s_per_gpu / (peak_tflops * 1e12)
    lines += [
        "",
        f"'fits' keeps 15% headroom, with block checkpointing. ddp = one node ({gpus_per_node} GPUs); the "
        f"others use all {gpus}. DDP's memory does not depend on the rank count.",
        f"{tokens:.3g} tokens in {days:g} days on {gpus} GPUs: {need.tokens_per_s:,.0f} tokens/s in all, "
        f"{need.tokens_per_s_per_gpu:,.0f} tokens/s per GPU",
        f"= {need.flops_per_s_per_gpu / 1e12:.0f} TFLOP/s per GPU ({flops_per_token(m, seq_len) / 1e9:.2f} GFLOP "
        f"per token), {mfu:.0%} of a {peak_tflops:g} TFLOP/s peak (MFU); block checkpointing adds one "
        "forward (x4/3 compute)",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="bitnet-train estimate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default="bitnet_2b4t", help="recipe whose model, seq_len and micro-batch to use")
    parser.add_argument("--vocab", type=int, default=LLAMA3_VOCAB, help="vocabulary size (the tokenizer's)")
    parser.add_argument("--gpus", type=int, default=256)
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--days", type=float, default=30.0)
    parser.add_argument("--tokens", type=float, default=4e12)
    parser.add_argument("--micro-batch", type=int, help="sequences per GPU (default: the recipe's)")
    parser.add_argument("--seq-len", type=int, help="default: the recipe's stages.pretrain.data.seq_len")
    parser.add_argument("--gpu-memory-gb", type=float, default=80.0)
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak (H100 SXM: 989)")
    args = parser.parse_args(argv)
    if args.gpus < 1 or args.days <= 0 or args.tokens <= 0:
        parser.error("--gpus, --days and --tokens must be positive")

    from .config import compose_config

    cfg = compose_config([f"recipes={args.recipe}"])
    shape = ModelShape.from_config(cfg.model, args.vocab)
    stage = cfg.stages[cfg.pipeline[0]]  # the recipe's first (longest) stage: pretrain, or convert
    micro_batch, seq_len = args.micro_batch or stage.micro_batch_size, args.seq_len or stage.data.seq_len
    # Distillation (convert) needs the teacher's and the student's full logits: no chunking there.
    chunk = 0 if stage.kind == "convert" else cfg.model.loss_chunk_tokens
    print(report(shape, args.gpus, args.gpus_per_node, micro_batch, seq_len, args.tokens, args.days,
                 args.gpu_memory_gb, args.peak_tflops, chunk))
    if stage.kind == "convert":
        print(teacher_memory(shape, micro_batch * seq_len, stage.precision == "bf16"))


def teacher_memory(m: ModelShape, tokens: int, bf16: bool) -> str:
    """A conversion also holds its frozen teacher on every rank (not sharded: it is no engine's
    model), in the stage's precision, and the teacher's logits with their fp32 log-softmax for the KL."""
    weights = m.params * (2 if bf16 else 4)
    logits = tokens * m.vocab * ((2 if bf16 else 4) + 4)
    return (f"conversion: + frozen teacher {weights / GB:.2f} GB ({'bf16' if bf16 else 'fp32'}, every rank) "
            f"+ teacher logits {logits / GB:.2f} GB per GPU, on top of every total above")


if __name__ == "__main__":
    main()
