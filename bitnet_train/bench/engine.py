"""End-to-end engine benchmark: prefill and decode tokens/s of a 2B4T-shaped model.

The model has 2B4T's shapes (hidden 2560, FFN 6912, 30 layers, 20/5 heads, vocab 128256, tied
embedding) and random ternary weights packed directly in memory, so no 2B4T training is needed:
the kernels' speed does not depend on the code values.

Decode is memory-bound, so beside tokens/s the table gives the bytes each token reads (every
packed weight plus the head), the bandwidth that implies, and the read bandwidth of this machine
measured in the same run: the ratio is what to compare across loaded and idle runs. The head is
timed in each storage type (`head_dtype`), with the logit error it adds against the fp32 head.

    bitnet-train bench engine [--threads 2] [--prompt 128] [--decode 32] [--heads fp32,bf16,int8]
"""
import argparse
import os
import statistics
import time
from dataclasses import dataclass

import torch

from ..engine import Engine
from ..engine.weights import ATTENTION, GATE_UP, HEAD_DTYPES, Head, build_weights
from ..kernels import cpu
from ..model import BitNetTrainConfig
from ..ternary_layout import packed_row_bytes
from .kernels import cpu_model

SHAPE_2B4T = dict(hidden_size=2560, intermediate_size=6912, num_hidden_layers=30, num_attention_heads=20,
                  num_key_value_heads=5, vocab_size=128256, max_position_embeddings=4096,
                  rope_parameters={"rope_type": "default", "rope_theta": 500000.0}, tie_word_embeddings=True)

# Every byte whose four 2-bit fields are valid codes u = t + 1 in {0, 1, 2}: 3^4 = 81 bytes.
_VALID_BYTES = torch.tensor([a | b << 2 | c << 4 | d << 6 for a in range(3) for b in range(3)
                             for c in range(3) for d in range(3)], dtype=torch.uint8)


def random_packed(rows: int, in_features: int, gen: torch.Generator) -> torch.Tensor:
    """Uniformly random ternary codes, packed (drawn per byte: 4x fewer draws than per code)."""
    idx = torch.randint(0, len(_VALID_BYTES), (rows, packed_row_bytes(in_features)), generator=gen)
    return _VALID_BYTES[idx]


def random_2b4t(head_dtype: str = "fp32", seed: int = 0, **overrides) -> tuple[Engine, torch.Tensor]:
    """A 2B4T-shaped engine with random weights, and its float32 embedding (for other heads)."""
    config = BitNetTrainConfig(**{**SHAPE_2B4T, **overrides})
    gen = torch.Generator().manual_seed(seed)
    h, i, hd = config.hidden_size, config.intermediate_size, config.hidden_size // config.num_attention_heads
    rows = {"q_proj": config.num_attention_heads * hd, "k_proj": config.num_key_value_heads * hd,
            "v_proj": config.num_key_value_heads * hd, "o_proj": h, "gate_proj": i, "up_proj": i, "down_proj": h}
    ins = {**{n: h for n in (*ATTENTION, "o_proj", *GATE_UP)}, "down_proj": i}
    embed = torch.randn(config.vocab_size, h, generator=gen) * 0.02

    def get(name: str) -> torch.Tensor:
        module, kind = name.rsplit(".", 1)
        proj = module.rsplit(".", 1)[-1]
        if kind == "qweight":
            return random_packed(rows[proj], ins[proj], gen)
        if kind == "qscale":  # s = 1 / mean|W|: latent weights of std ~0.02 give s ~ 60
            return torch.empty(1).uniform_(30.0, 90.0, generator=gen)
        if name == "model.embed_tokens.weight":
            return embed
        return 1.0 + 0.1 * torch.randn(h if "mlp.ffn_sub_norm" not in name else i, generator=gen)  # norms

    return Engine(build_weights(config, get, head_dtype), device="cpu"), embed


def read_gbs(nbytes: int = 1 << 30, reps: int = 7) -> float:
    """This machine's read bandwidth now: median time of torch summing a buffer far beyond L3."""
    buf = torch.ones(nbytes // 4)
    buf.sum()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        buf.sum()
        times.append(time.perf_counter() - t0)
    return nbytes / statistics.median(times) / 1e9


@dataclass
class EngineResult:
    head_dtype: str
    prefill_tok_s: float
    decode_tok_s: float
    head_ms: float  # the head alone, one token
    bytes_per_token: int  # weights read per decoded token (packed layers + head)
    logits_rel_error: float  # max |logits - fp32-head logits| / max |fp32-head logits|
    greedy_agreement: float  # share of decode steps whose argmax equals the fp32 head's

    @property
    def decode_gbs(self) -> float:
        return self.bytes_per_token * self.decode_tok_s / 1e9


def weight_bytes(engine: Engine) -> int:
    layers = sum(lin.qweight.numel() for layer in engine.weights.layers
                 for lin in (layer.qkv, layer.o, layer.gate_up, layer.down))
    head = engine.weights.head.weight
    return layers + head.numel() * head.element_size()


def run_once(engine: Engine, prompt: torch.Tensor, decode: int) -> tuple[float, float, torch.Tensor, list[int]]:
    """(prefill seconds, decode seconds, prefill logits, greedy tokens) of one generation."""
    cache = engine.new_cache(1, prompt.shape[1] + decode)
    t0 = time.perf_counter()
    logits = engine.forward(prompt, cache, logits_to_keep=1)
    t1 = time.perf_counter()
    first, tokens = logits[0, -1], []
    for _ in range(decode):
        tokens.append(int(logits[0, -1].argmax()))
        logits = engine.forward(torch.tensor([[tokens[-1]]]), cache)
    return t1 - t0, time.perf_counter() - t1, first, tokens


def bench_head(engine: Engine, embed: torch.Tensor, head_dtype: str, prompt, decode: int, reps: int,
               reference: tuple[torch.Tensor, list[int]] | None) -> tuple[EngineResult, torch.Tensor, list[int]]:
    engine.weights.head = Head.from_float(embed, head_dtype)
    runs = [run_once(engine, prompt, decode) for _ in range(reps + 1)][1:]  # the first warms up
    prefill_s = statistics.median(r[0] for r in runs)
    decode_s = statistics.median(r[1] for r in runs)
    _, _, logits, tokens = runs[0]
    h = torch.randn(1, engine.config.hidden_size)
    head = engine.weights.head
    head(h)
    t0 = time.perf_counter()
    for _ in range(5):
        head(h)
    head_ms = (time.perf_counter() - t0) / 5 * 1e3
    if reference is None:
        err, agree = 0.0, 1.0
    else:
        ref_logits, ref_tokens = reference
        err = float((logits - ref_logits).abs().max() / ref_logits.abs().max())
        # Compare the first decode steps only up to the first disagreement: after it the
        # sequences differ and later steps are not comparable.
        same = next((k for k, (a, b) in enumerate(zip(tokens, ref_tokens)) if a != b), len(tokens))
        agree = same / len(tokens)
    result = EngineResult(head_dtype, prompt.shape[1] / prefill_s, decode / decode_s, head_ms,
                          weight_bytes(engine), err, agree)
    return result, logits, tokens


def format_table(results: list[EngineResult], threads: int, read_gbs: float, prompt: int, decode: int) -> str:
    load = os.getloadavg()
    lines = [
        f"CPU: {cpu_model()}, {threads} threads, kernels {cpu.backend()}; load average "
        f"{load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} (1/5/15 min); read bandwidth measured now: "
        f"{read_gbs:.1f} GB/s.",
        f"2B4T shape, random ternary weights; prefill {prompt} tokens, then {decode} greedy decode steps "
        "(medians of runs).",
        "",
        "| head | prefill tok/s | decode tok/s | head alone (ms/token) | bytes/token (GB) | decode GB/s | "
        "% of read BW | logits rel. error vs fp32 head | greedy steps equal to fp32 head |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r.head_dtype} | {r.prefill_tok_s:.1f} | {r.decode_tok_s:.2f} | {r.head_ms:.1f} | "
            f"{r.bytes_per_token / 1e9:.3f} | {r.decode_gbs:.1f} | {100 * r.decode_gbs / read_gbs:.0f}% | "
            f"{r.logits_rel_error:.2e} | {100 * r.greedy_agreement:.0f}% |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="bitnet-train bench engine", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt", type=int, default=128, help="prefill length")
    p.add_argument("--decode", type=int, default=32, help="decode steps")
    p.add_argument("--reps", type=int, default=3, help="timed generations per head (after one warm-up)")
    p.add_argument("--heads", default=",".join(HEAD_DTYPES), help="head storage types to time")
    p.add_argument("--layers", type=int, default=None, help="fewer layers, for a quick look")
    args = p.parse_args(argv or [])
    heads = [h.strip() for h in args.heads.split(",")]
    cpu.set_num_threads(args.threads)
    engine, embed = random_2b4t(**({"num_hidden_layers": args.layers} if args.layers else {}))
    prompt = torch.randint(0, engine.vocab_size, (1, args.prompt), generator=torch.Generator().manual_seed(1))
    bandwidth = read_gbs()
    results, reference = [], None
    for head_dtype in ["fp32", *[h for h in heads if h != "fp32"]]:  # fp32 first: the reference
        result, logits, tokens = bench_head(engine, embed, head_dtype, prompt, args.decode, args.reps, reference)
        reference = reference or (logits, tokens)
        if head_dtype in heads:
            results.append(result)
    print(format_table(results, args.threads, bandwidth, args.prompt, args.decode))


if __name__ == "__main__":
    main()
