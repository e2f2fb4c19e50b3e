"""End-to-end engine benchmark: prefill and decode tokens/s of a 2B4T-shaped model, optionally
against llama.cpp on the same weights in the same run.

The model has 2B4T's shapes (hidden 2560, FFN 6912, 30 layers, 20/5 heads, vocab 128256, tied
embedding) and random ternary weights packed directly in memory, so no 2B4T training is needed:
the kernels' speed does not depend on the code values.

Decode is memory-bound, so beside tokens/s the table gives the bytes each token reads (every
packed weight, the head, and the KV cache the step attends over), the bandwidth that implies, and its
share of this machine's read bandwidth, probed between every two generations of the run: each
generation is set against the mean of the probes just before and after it, so the share is what to
compare across loaded and idle runs (this VM's read bandwidth moved between 13 and 22 GB/s from one
probe to the next, a second apart). The head is
timed in each storage type (`head_dtype`), with the logit error and greedy agreement it gives
against the fp32 head.

`--baseline llama.cpp` (needs `pip install -e .[bench]`, i.e. llama-cpp-python) writes the same
random model as a TQ2_0 GGUF (the packed codes are TQ2_0's layout already; fp16 block scale 1/s),
with its tied head in each of `--llama-heads` (f16, and q6_k made by llama.cpp's own quantizer),
and times it through llama-cpp-python between our runs: every round runs every engine once, in a
rotated order, and the table gives the median and the range over rounds, and our/llama.cpp
ratios paired round by round. llama.cpp's bitnet graph uses a SiLU FFN where ours uses ReLU²
(docs/formats.md): the same work per token, so the speeds compare, the outputs do not.

    bitnet-train bench engine [--threads 2] [--prompt 128] [--decode 32] [--heads fp32,bf16,int8,int4,ternary]
                              [--rounds 3] [--baseline llama.cpp] [--llama-heads f16,q6_k]
"""
import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from ..engine import Engine
from ..engine.generate import Sampling, next_token
from ..engine.weights import ATTENTION, GATE_UP, HEAD_DTYPES, Head, build_weights
from ..kernels import cpu
from ..model import BitNetTrainConfig
from ..ternary_layout import packed_row_bytes
from .kernels import cpu_model, median_us, stream_read_gbs

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
    """This machine's read bandwidth now, GB/s: the faster of torch summing a buffer far beyond L3 and
    (with the compiled kernels) our own read of a buffer on huge pages, streamed as the GEMVs stream
    their weights (bench.kernels.stream_read_gbs). Medians of `reps`."""
    buf = torch.ones(nbytes // 4)
    buf.sum()
    torch_gbs = nbytes / median_us(buf.sum, reps) / 1e3
    del buf
    return max(torch_gbs, stream_read_gbs(nbytes, reps))


def layer_bytes(engine: Engine) -> int:
    return sum(lin.qweight.numel() for layer in engine.weights.layers
               for lin in (layer.qkv, layer.o, layer.gate_up, layer.down))


def kv_cache_bytes(config: BitNetTrainConfig, prompt: int, decode: int, element_bytes: int) -> int:
    """Keys and values a decode step reads, averaged over the run's steps: the step at position p attends
    over p + 1 positions of every layer (2B4T, 128-token prompt, float32: 22 MB, 3% of an int4-head step).
    Ours are float32, llama.cpp's f16 (its default cache type), so each is counted at its own size."""
    head_dim = config.hidden_size // config.num_attention_heads
    per_position = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * element_bytes
    return round(per_position * (prompt + (decode + 1) / 2))  # the mean of prompt + 1 .. prompt + decode


# ---------------------------------------------------------------------- one generation per engine


@dataclass
class Generation:
    prefill_s: float
    decode_s: float
    first_logits: torch.Tensor | None  # the prompt's last-position logits (ours only)
    tokens: list[int]
    read_gbs: float = float("nan")  # the read bandwidth around it: the mean of the probes just before and after


def run_ours(engine: Engine, head: Head, prompt: torch.Tensor, decode: int) -> Generation:
    engine.weights.head = head
    cache = engine.new_cache(1, prompt.shape[1] + decode)
    t0 = time.perf_counter()
    logits = engine.forward(prompt, cache, logits_to_keep=1)
    t1 = time.perf_counter()
    first, tokens = logits[0, -1], []
    for _ in range(decode):
        tokens.append(next_token(logits[0, -1], Sampling(), None))  # greedy, as engine.generate
        logits = engine.forward(torch.tensor([[tokens[-1]]]), cache)
    return Generation(t1 - t0, time.perf_counter() - t1, first, tokens)


@dataclass
class Runner:
    engine: str  # "ours" or "llama.cpp"
    head: str
    bytes_per_token: int  # read per decoded token: packed layers + head + KV cache (kv_cache_bytes)
    generate: Callable[[torch.Tensor, int], Generation]
    head_ms: float = float("nan")  # the head alone, one token (ours only)
    logits_rel_error: float = float("nan")  # max |logits - fp32-head logits| / max |fp32-head logits|
    greedy_agreement: float = float("nan")  # decode steps equal to the fp32 head's, up to the first difference
    head_weights: Head | None = None  # ours: the head it runs (bench engine --profile times it)
    runs: list[Generation] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"{self.engine} {self.head}"

    def decode_tok_s(self, decode: int) -> list[float]:
        return [decode / g.decode_s for g in self.runs]

    def prefill_tok_s(self, prompt: int) -> list[float]:
        return [prompt / g.prefill_s for g in self.runs]


def time_head(head: Head, hidden: int, reps: int = 5) -> float:
    h = torch.randn(1, hidden)
    head(h)
    t0 = time.perf_counter()
    for _ in range(reps):
        head(h)
    return (time.perf_counter() - t0) / reps * 1e3


def our_runners(engine: Engine, embed: torch.Tensor, heads: list[str], prompt: torch.Tensor,
                decode: int) -> list[Runner]:
    """A runner per head, with its error and greedy agreement against the fp32 head (untimed runs)."""
    layers = layer_bytes(engine) + kv_cache_bytes(engine.config, prompt.shape[1], decode, torch.float32.itemsize)
    reference = run_ours(engine, Head.from_float(embed, "fp32"), prompt, decode)
    runners = []
    for dtype in heads:
        head = Head.from_float(embed, dtype)
        check = run_ours(engine, head, prompt, decode)
        same = next((k for k, (a, b) in enumerate(zip(check.tokens, reference.tokens)) if a != b), decode)
        ref = reference.first_logits
        runners.append(Runner(
            "ours", dtype, layers + head.nbytes,
            lambda p, d, head=head: run_ours(engine, head, p, d),
            head_ms=time_head(head, engine.config.hidden_size),
            logits_rel_error=float((check.first_logits - ref).abs().max() / ref.abs().max()),
            greedy_agreement=same / decode,
            head_weights=head,
        ))
    return runners


class _Timed:
    """Calls `fn` and adds the seconds each call took to `seconds`."""

    def __init__(self, fn: Callable, seconds: list[float]):
        self.fn, self.seconds = fn, seconds

    def __call__(self, *args):
        t0 = time.perf_counter()
        out = self.fn(*args)
        self.seconds.append(time.perf_counter() - t0)
        return out


def profile_decode(engine: Engine, head: Head, prompt: torch.Tensor, decode: int) -> dict[str, float]:
    """Where a decode step's time goes, ms per step: the compiled decoder's pieces (its own timers), what
    of the decoder call they do not cover (thread-pool syncs, the binding), the head, and the rest of
    the step (Python, the embedding row, sampling)."""
    native = engine.native
    decoder_s, head_s = [], []
    engine.weights.head = _Timed(head, head_s)
    engine.native = SimpleNamespace(forward=_Timed(native.forward, decoder_s))
    try:
        cache = engine.new_cache(1, prompt.shape[1] + decode)
        logits = engine.forward(prompt, cache, logits_to_keep=1)
        decoder_s.clear(), head_s.clear()
        native.set_profiling(True)
        t0 = time.perf_counter()
        for _ in range(decode):
            logits = engine.forward(torch.tensor([[next_token(logits[0, -1], Sampling(), None)]]), cache)
        step_s = time.perf_counter() - t0
        pieces = native.profile()
    finally:
        native.set_profiling(False)
        engine.native, engine.weights.head = native, head
    ms = {name: 1e3 * seconds / decode for name, seconds in pieces.items() if name != "steps"}
    ms["decoder: syncs and binding"] = 1e3 * sum(decoder_s) / decode - sum(ms.values())
    ms["head"] = 1e3 * sum(head_s) / decode
    ms["outside: Python, embedding, sampling"] = 1e3 * (step_s - sum(decoder_s) - sum(head_s)) / decode
    return ms


def format_profile(profiles: dict[str, dict[str, float]], layers: int, head_bytes: dict[str, int],
                   bandwidth: float) -> str:
    """The profiles of our heads side by side; GB/s (and % of the read bandwidth) for the two streams."""
    heads = list(profiles)
    lines = [f"Where a decode step goes, ms per token (read bandwidth {bandwidth:.1f} GB/s):", "",
             "| piece | " + " | ".join(heads) + " |", "|---|" + "---:|" * len(heads)]
    for piece in profiles[heads[0]]:
        lines.append(f"| {piece} | " + " | ".join(f"{profiles[h][piece]:.2f}" for h in heads) + " |")
    lines.append("| **step** | " + " | ".join(f"**{sum(profiles[h].values()):.2f}**" for h in heads) + " |")

    def rate(nbytes: int, ms: float) -> str:
        gbs = nbytes / ms / 1e6
        return f"{gbs:.1f} GB/s ({100 * gbs / bandwidth:.0f}%)"

    lines.append("| GEMVs stream | " + " | ".join(rate(layers, profiles[h]["gemv"]) for h in heads) + " |")
    lines.append("| head streams | " + " | ".join(rate(head_bytes[h], profiles[h]["head"]) for h in heads) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------- llama.cpp on the same weights


LLAMA_HEADS = ("f16", "q6_k")


def write_tq2_gguf(engine: Engine, embed: torch.Tensor, path: Path) -> None:
    """The engine's random model as a llama.cpp `bitnet` GGUF: TQ2_0 layers, an F16 tied head, no vocabulary.

    A TQ2_0 block (256 values) is two of our packed 128-value blocks, byte for byte (ggml-common.h
    and docs/formats.md store value 32 i + j of a 128-chunk in bits 2i of byte j, as t + 1), followed
    by its fp16 scale: here 1/s, the same for every block of a tensor.
    """
    import gguf

    from ..export import gguf_format

    config = engine.config
    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.BITNET])
    # gguf_format writes the architecture keys from a checkpoint; only its config is read.
    gguf_format.add_architecture(writer, SimpleNamespace(config=config), gguf.GGMLQuantizationType.TQ2_0)
    writer.add_tokenizer_model("none")  # token ids in, logits out: no text
    writer.add_tensor(gguf_format.gguf_name("model.embed_tokens.weight"), embed.half().numpy())
    writer.add_tensor(gguf_format.gguf_name("model.norm.weight"), engine.weights.norm.numpy())
    for i, layer in enumerate(engine.weights.layers):
        p = f"model.layers.{i}"
        for name, norm in (("input_layernorm", layer.input_norm), ("self_attn.attn_sub_norm", layer.attn_sub_norm),
                           ("post_attention_layernorm", layer.post_norm), ("mlp.ffn_sub_norm", layer.ffn_sub_norm)):
            writer.add_tensor(gguf_format.gguf_name(f"{p}.{name}.weight"), norm.numpy())
        fused = [("self_attn", layer.qkv, ATTENTION), ("self_attn", layer.o, ("o_proj",)),
                 ("mlp", layer.gate_up, GATE_UP), ("mlp", layer.down, ("down_proj",))]
        for module, lin, names in fused:
            start = 0
            for name, rows in zip(names, lin.splits):
                tq2 = tq2_blocks(lin.qweight[start:start + rows], float(lin.row_scale[start]))
                writer.add_tensor(gguf_format.gguf_name(f"{p}.{module}.{name}.weight"), tq2,
                                  raw_dtype=gguf.GGMLQuantizationType.TQ2_0)
                start += rows
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def tq2_blocks(qweight: torch.Tensor, s: float) -> np.ndarray:
    """Packed rows (N, K/4), K a multiple of 256, as TQ2_0 blocks (N, K/256 * 66) with scale 1/s."""
    rows = qweight.shape[0]
    codes = qweight.numpy().reshape(rows, -1, 64)
    scale = np.full((rows, codes.shape[1], 1), 1.0 / s, dtype=np.float16).view(np.uint8)
    return np.concatenate([codes, scale], axis=-1).reshape(rows, -1)


def quantize_head(source: Path, target: Path, threads: int) -> None:
    """llama.cpp's own quantizer: the same TQ2_0 layers (copied), the tied head as Q6_K."""
    import llama_cpp
    from llama_cpp._utils import suppress_stdout_stderr

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_TQ2_0
    params.token_embedding_type = llama_cpp.GGML_TYPE_Q6_K
    params.nthread = threads
    with suppress_stdout_stderr(disable=False):
        failed = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), params)
    if failed:
        raise RuntimeError(f"llama.cpp could not quantize {source} to a Q6_K head (error {failed})")


def llama_generate(llm, prompt: torch.Tensor, decode: int) -> Generation:
    import llama_cpp

    vocab = llm.n_vocab()

    def argmax() -> int:
        return int(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(vocab,)).argmax())

    llm.reset()
    t0 = time.perf_counter()
    llm.eval(prompt[0].tolist())
    t1 = time.perf_counter()
    tokens = []
    for _ in range(decode):
        tokens.append(argmax())
        llm.eval([tokens[-1]])
    return Generation(t1 - t0, time.perf_counter() - t1, None, tokens)


def llama_runners(engine: Engine, embed: torch.Tensor, heads: list[str], workdir: Path, prompt: int, decode: int,
                  threads: int) -> list[Runner]:
    try:
        import llama_cpp
    except ImportError as e:
        raise SystemExit(f"--baseline llama.cpp needs llama-cpp-python ({e}): pip install -e .[bench]") from e
    f16 = workdir / "tq2_f16.gguf"
    write_tq2_gguf(engine, embed, f16)
    files = {"f16": f16}
    if "q6_k" in heads:
        files["q6_k"] = workdir / "tq2_q6_k.gguf"
        quantize_head(f16, files["q6_k"], threads)
    head_bytes = {"f16": embed.numel() * 2, "q6_k": embed.numel() * 210 // 256}  # Q6_K: 210 bytes per 256
    layers = layer_bytes(engine) * 66 // 64  # a 2-byte scale per 64 bytes of codes
    layers += kv_cache_bytes(engine.config, prompt, decode, torch.float16.itemsize)
    runners = []
    for head in heads:
        llm = llama_cpp.Llama(str(files[head]), n_ctx=prompt + decode, n_batch=prompt, n_ubatch=prompt,
                              n_threads=threads, n_threads_batch=threads, verbose=False)
        runners.append(Runner("llama.cpp", head, layers + head_bytes[head],
                              lambda p, d, llm=llm: llama_generate(llm, p, d)))
    return runners


# ---------------------------------------------------------------------- rounds and the report


def run_rounds(runners: list[Runner], prompt: torch.Tensor, decode: int, rounds: int,
               bandwidth: Callable[[], float] | None = None) -> list[float]:
    """One warm-up each, then `rounds` rounds of one generation per runner, the order rotated each round.
    With `bandwidth`, the read bandwidth is probed before the first generation and after each one, and
    each generation's `read_gbs` is the mean of its two probes; returns every probe."""
    for r in runners:
        r.generate(prompt, decode)
    measured = [bandwidth()] if bandwidth is not None else []
    for k in range(rounds):
        for r in runners[k % len(runners):] + runners[:k % len(runners)]:
            generation = r.generate(prompt, decode)
            if bandwidth is not None:
                measured.append(bandwidth())
                generation.read_gbs = (measured[-2] + measured[-1]) / 2
            r.runs.append(generation)
    return measured


def spread(values: list[float], fmt: str = ".1f") -> str:
    if len(values) == 1:
        return format(values[0], fmt)
    return f"{statistics.median(values):{fmt}} ({min(values):{fmt}}-{max(values):{fmt}})"


def format_table(runners: list[Runner], threads: int, bandwidth: list[float], prompt: int, decode: int,
                 load: tuple[float, ...], load_after: tuple[float, ...] | None = None) -> str:
    """bandwidth: every probe of the read bandwidth; a generation's % is of its own (Generation.read_gbs)."""
    after = f", {load_after[0]:.2f} / {load_after[1]:.2f} / {load_after[2]:.2f} at the end" if load_after else ""
    lines = [
        f"CPU: {cpu_model()}, {threads} threads, kernels {cpu.backend()}; load average "
        f"{load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} (1/5/15 min) at the start{after}; read bandwidth "
        f"probed between generations: {spread(bandwidth)} GB/s.",
        f"2B4T shape, random ternary weights; prefill {prompt} tokens, then {decode} greedy decode steps; "
        f"{len(runners[0].runs)} interleaved rounds: median (min-max); % of read BW: of the probes on either side "
        "of each generation; bytes/token: "
        "weights, head and the KV cache a decode step reads (ours float32, llama.cpp f16).",
        "",
        "| engine | head | prefill tok/s | decode tok/s | head alone (ms/token) | bytes/token (GB) | decode GB/s | "
        "% of read BW | logits rel. error vs fp32 head | greedy steps equal to fp32 head |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in runners:
        tok_s = statistics.median(r.decode_tok_s(decode))
        achieved = r.bytes_per_token * tok_s / 1e9
        share = [100 * r.bytes_per_token * t / 1e9 / g.read_gbs for t, g in zip(r.decode_tok_s(decode), r.runs)]
        ours = r.engine == "ours"
        lines.append(
            f"| {r.engine} | {r.head} | {spread(r.prefill_tok_s(prompt))} | {spread(r.decode_tok_s(decode), '.2f')} | "
            f"{f'{r.head_ms:.1f}' if ours else '-'} | {r.bytes_per_token / 1e9:.3f} | {achieved:.1f} | "
            f"{spread(share, '.0f')}% | {f'{r.logits_rel_error:.2e}' if ours else '-'} | "
            f"{f'{100 * r.greedy_agreement:.0f}%' if ours else '-'} |")
    theirs = [r for r in runners if r.engine == "llama.cpp"]
    if theirs:
        lines += ["", "Ours / llama.cpp, paired round by round: median (min-max).", "",
                  "| ours head | llama.cpp head | decode ratio | prefill ratio |", "|---|---|---:|---:|"]
        for ours in (r for r in runners if r.engine == "ours"):
            for other in theirs:
                dec = [a / b for a, b in zip(ours.decode_tok_s(decode), other.decode_tok_s(decode))]
                pre = [a / b for a, b in zip(ours.prefill_tok_s(prompt), other.prefill_tok_s(prompt))]
                lines.append(f"| {ours.head} | {other.head} | {spread(dec, '.2f')}x | {spread(pre, '.2f')}x |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="bitnet-train bench engine", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt", type=int, default=128, help="prefill length")
    p.add_argument("--decode", type=int, default=32, help="decode steps")
    p.add_argument("--rounds", type=int, default=3, help="interleaved timed generations per engine (after a warm-up)")
    p.add_argument("--heads", default=",".join(HEAD_DTYPES), help="our head storage types to time")
    p.add_argument("--baseline", choices=["llama.cpp"], help="also time llama.cpp on the same weights")
    p.add_argument("--llama-heads", default=",".join(LLAMA_HEADS), help="llama.cpp head types (f16, q6_k)")
    p.add_argument("--layers", type=int, default=None, help="fewer layers, for a quick look")
    p.add_argument("--profile", action="store_true",
                   help="after the rounds, time the pieces of our decode steps (the compiled decoder's timers)")
    args = p.parse_args(argv or [])
    heads = [h.strip() for h in args.heads.split(",")]
    llama_heads = [h.strip() for h in args.llama_heads.split(",")]
    for name, chosen, known in (("--heads", heads, HEAD_DTYPES), ("--llama-heads", llama_heads, LLAMA_HEADS)):
        if not set(chosen) <= set(known):
            p.error(f"{name}: unknown {sorted(set(chosen) - set(known))}; choose from {', '.join(known)}")
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    load = os.getloadavg()
    cpu.set_num_threads(args.threads)
    engine, embed = random_2b4t(**({"num_hidden_layers": args.layers} if args.layers else {}))
    prompt = torch.randint(0, engine.vocab_size, (1, args.prompt), generator=torch.Generator().manual_seed(1))
    runners = our_runners(engine, embed, heads, prompt, args.decode)
    with tempfile.TemporaryDirectory(prefix="bench_engine_") as workdir:
        if args.baseline:
            runners += llama_runners(engine, embed, llama_heads, Path(workdir), args.prompt, args.decode, args.threads)
        bandwidth = run_rounds(runners, prompt, args.decode, args.rounds, bandwidth=lambda: read_gbs(reps=3))
    print(format_table(runners, args.threads, bandwidth, args.prompt, args.decode, load, os.getloadavg()))
    if args.profile:
        if engine.native is None or cpu.backend() == "torch":
            raise SystemExit("--profile times the compiled decoder: build the extension (see the README)")
        heads_used = {r.head: r.head_weights for r in runners if r.engine == "ours"}
        profiles = {name: profile_decode(engine, head, prompt, args.decode) for name, head in heads_used.items()}
        print()
        print(format_profile(profiles, layer_bytes(engine), {n: h.nbytes for n, h in heads_used.items()},
                             read_gbs(reps=3)))


if __name__ == "__main__":
    main()
