"""Benchmarks (not tests) of one training step (forward, backward, AdamW).

    bitnet-train bench train [--model tiny|125m] [--batch 8] [--seq 256] [--reps 10]

times the ternary model against the same model with quantize=false on the CPU, in one process,
interleaved, so machine noise hits both alike.

    bitnet-train bench train-gpu [--models 700m 2b4t] [--variants ...] [--json FILE]

times, on one CUDA GPU, bf16 autocast with float32 master weights (as `precision=bf16` trains):
the quantize=false baseline, our QAT with the fused Triton BitLinear and with the pure-torch
one, and the same model with its BitLinears handed to torchao's `bitnet_training()` and to
onebitllms' `BitNetLinear` (`pip install -c constraints.txt .[bench]`). Each variant is built,
warmed up and timed in turn (several 2B-parameter models with AdamW states do not fit together,
so the rounds cannot interleave); the baseline is timed first and again last, and the table
shows both, so drift over the run is visible.
"""
import argparse
import gc
import json
import statistics
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
import torch.nn as nn

from ..estimate import ModelShape, flops_per_token, memory_per_gpu
from ..kernels.chunked_ce import linear_cross_entropy_sum
from ..model import BitNetTrainConfig, BitNetTrainForCausalLM
from ..model_factory import named_model_config
from ..quant import BitLinear, set_bitlinear_kernel


def step_time(model, optimizer, ids) -> float:
    start = time.perf_counter()
    loss = model(ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def run(size: str, batch: int, seq: int, reps: int, vocab: int) -> dict[str, float]:
    base = named_model_config(size, vocab).to_dict()
    models = {}
    for quantize in (True, False):
        torch.manual_seed(0)
        cfg = BitNetTrainConfig(**{**base, "quantize": quantize})
        model = BitNetTrainForCausalLM(cfg).train()
        models[quantize] = (model, torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95)))
    ids = torch.randint(0, vocab, (batch, seq))
    times = {True: [], False: []}
    for rep in range(reps + 2):
        for quantize, (model, opt) in models.items():
            t = step_time(model, opt, ids)
            if rep >= 2:  # the first two steps allocate optimizer state and warm caches
                times[quantize].append(t)
    return {"ternary": statistics.median(times[True]), "fp32": statistics.median(times[False])}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="bitnet-train bench train", description=__doc__)
    p.add_argument("--model", default="tiny")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    r = run(args.model, args.batch, args.seq, args.reps, args.vocab)
    tokens = args.batch * args.seq
    print(f"training step, model={args.model}, batch {args.batch} x seq {args.seq}, "
          f"{torch.get_num_threads()} threads, median of {args.reps}")
    print("| model | step (ms) | tokens/s | ratio vs fp32 |")
    print("|---|---|---|---|")
    for name in ("fp32", "ternary"):
        print(f"| {name} (quantize={name == 'ternary'}) | {r[name] * 1e3:.1f} | {tokens / r[name]:,.0f} | "
              f"{r[name] / r['fp32']:.2f}x |")


# --- bench train-gpu -----------------------------------------------------------------------

LLAMA3_VOCAB = 128256  # 2B4T's tokenizer; also the 700m config's in docs/bench_cuda.md
# Dense bf16 tensor-core peak (no sparsity), for MFU; --peak-tflops for other GPUs.
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "A800": 312.0, "L40S": 362.0}


def use_torchao(model: nn.Module) -> None:
    """torchao's BitNet training (its prototype API, torchao 0.18): every BitLinear's weight
    becomes a BitNetTrainingLinearWeight, whose F.linear quantizes and runs torch._int_mm.
    Our BitLinears are switched to a plain F.linear first, so nothing is quantized twice."""
    from torchao import quantize_
    from torchao.prototype.quantized_training import bitnet_training

    for module in model.modules():
        if isinstance(module, BitLinear):
            module.quantize = False
    quantize_(model, bitnet_training(), filter_fn=lambda module, fqn: isinstance(module, BitLinear))


def use_onebitllms(model: nn.Module) -> None:
    """onebitllms' BitNetLinear (Triton quantizers, then F.linear) in place of every BitLinear,
    holding the same Parameter objects, so the names and the initial weights are unchanged.
    (Its own replace_linear_with_bitnet_linear does the same but sets torch's default dtype.)"""
    from onebitllms import BitNetLinear

    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, BitLinear):
                swapped = BitNetLinear(child.in_features, child.out_features, bias=child.bias is not None)
                swapped.weight = child.weight
                swapped.bias = child.bias
                setattr(parent, name, swapped)


@dataclass(frozen=True)
class Variant:
    name: str
    quantize: bool  # the BitNetTrainConfig switch the model is built with
    prepare: Callable[[nn.Module], None]


VARIANTS = {v.name: v for v in [
    Variant("bf16", False, lambda model: None),
    Variant("qat-triton", True, lambda model: set_bitlinear_kernel(model, "triton")),
    Variant("qat-torch", True, lambda model: None),
    Variant("torchao", True, use_torchao),
    Variant("onebitllms", True, use_onebitllms),
]}
BASELINE = "bf16"


def build_variant(name: str, base: dict, device: str) -> nn.Module:
    variant = VARIANTS[name]
    torch.manual_seed(0)
    with torch.device(device):  # initialise on the GPU: a 2B model's CPU init takes minutes
        model = BitNetTrainForCausalLM(BitNetTrainConfig(**{**base, "quantize": variant.quantize}))
    variant.prepare(model)
    return model.train()


def auto_batch(shape: ModelShape, seq: int, gpu_bytes: float) -> int:
    """The largest power-of-two batch whose estimated peak (bitnet_train.estimate) fills at most
    80% of the GPU; the timing halves it again on an out-of-memory error."""
    batch = 1
    while memory_per_gpu(shape, "single_gpu", 1, 2 * batch * seq, False).total <= 0.8 * gpu_bytes:
        batch *= 2
    return batch


@dataclass
class Row:
    model: str
    variant: str
    batch: int
    seq: int
    compiled: bool = False
    chunked_ce: bool = False
    step_s: float | None = None
    peak_gib: float | None = None
    # Where one more step made the host wait for the GPU (torch's sync debug mode): file:line.
    sync_sites: list[str] = field(default_factory=list)
    error: str | None = None

    @property
    def tokens_per_s(self) -> float | None:
        return None if self.step_s is None else self.batch * self.seq / self.step_s


def step_loss(model: nn.Module, ids: torch.Tensor, chunked_ce: bool) -> torch.Tensor:
    """The mean next-token loss, through lm_head + cross_entropy or the chunked linear-CE."""
    if not chunked_ce:
        return model(ids, labels=ids).loss
    h = model.model(ids)[:, :-1].flatten(0, 1)  # every label counts: the mean needs no count from the GPU
    return linear_cross_entropy_sum(h, model.lm_head.weight, ids[:, 1:].flatten()) / h.shape[0]


def gpu_step(model: nn.Module, optimizer, ids: torch.Tensor, chunked_ce: bool) -> None:
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = step_loss(model, ids, chunked_ce)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def host_sync_sites(step: Callable[[], None]) -> list[str]:
    """file:line of every operation in `step` that waits for the GPU, once each, in order."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return list(dict.fromkeys(f"{w.filename}:{w.lineno}" for w in caught if "synchroniz" in str(w.message)))


def time_variant(model_name: str, variant: str, base: dict, batch: int, seq: int, steps: int, warmup: int,
                 compiled: bool, chunked_ce: bool) -> Row:
    """Median step time over `steps` after `warmup` steps (optimizer states, Triton autotuning,
    torch.compile's compilation)."""
    row = Row(model_name, variant, batch, seq, compiled, chunked_ce)
    model = optimizer = None
    gc.collect()  # the previous variant's model and optimizer state
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    try:
        model = build_variant(variant, base, "cuda")
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), fused=True)
        if compiled:  # in place; with the chunked loss, the blocks only (the head runs in chunks)
            (model.model if chunked_ce else model).compile()
        ids = torch.randint(0, base["vocab_size"], (batch, seq), device="cuda")
        times = []
        for i in range(warmup + steps):
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            gpu_step(model, optimizer, ids, chunked_ce)
            end.record()
            end.synchronize()
            if i >= warmup:
                times.append(start.elapsed_time(end) / 1e3)
        row.step_s = statistics.median(times)
        row.peak_gib = torch.cuda.max_memory_allocated() / 2**30
        row.sync_sites = host_sync_sites(lambda: gpu_step(model, optimizer, ids, chunked_ce))
    except torch.cuda.OutOfMemoryError:
        row.error = "out of memory"
    except Exception as e:  # a peer library failing must not cost the other rows of a GPU session
        row.error = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:160]}"
    finally:
        del model, optimizer
    return row


def time_model(model_name: str, variants: list[str], batch: int, seq: int, steps: int, warmup: int,
               compiled: bool, chunked_ce: bool) -> list[Row]:
    """Every variant at one batch (the baseline first and last); all again at half the batch if
    any ran out of memory, so the rows stay comparable."""
    base = named_model_config(model_name, LLAMA3_VOCAB).to_dict()
    order = [BASELINE, *[v for v in variants if v != BASELINE], BASELINE]
    while True:
        rows = []
        for variant in order:
            rows.append(time_variant(model_name, variant, base, batch, seq, steps, warmup, compiled, chunked_ce))
            print("timed", format_row(rows[-1], rows[0], None), flush=True)  # the table follows at the end
        if batch == 1 or not any(r.error == "out of memory" for r in rows):
            return rows
        batch //= 2
        print(f"out of memory: {model_name} again at batch {batch}", flush=True)


def peak_tflops(device_name: str) -> float | None:
    return next((tf for key, tf in PEAK_BF16_TFLOPS.items() if key in device_name), None)


def mfu(row: Row, peak: float | None) -> float | None:
    """Model FLOPs (6 per matmul parameter per token, plus causal attention; estimate.py) per
    second over the GPU's dense bf16 peak, whatever number format the variant computes in."""
    if peak is None or row.tokens_per_s is None:
        return None
    base = named_model_config(row.model, LLAMA3_VOCAB)
    return flops_per_token(ModelShape.from_config(base, LLAMA3_VOCAB), row.seq) * row.tokens_per_s / (peak * 1e12)


def format_row(row: Row, baseline: Row, peak: float | None) -> str:
    shape = f"{row.batch} x {row.seq}"
    how = [word for word, on in (("compiled", row.compiled), ("chunked CE", row.chunked_ce)) if on]
    variant = f"{row.variant} ({', '.join(how)})" if how else row.variant
    if row.error:
        return f"| {row.model} | {variant} | {shape} | failed: {row.error} | | | | | |"
    ratio = f"{row.step_s / baseline.step_s:.2f}x" if baseline.step_s else "n/a"
    util = mfu(row, peak)
    return (f"| {row.model} | {variant} | {shape} | {row.step_s * 1e3:.1f} | {row.tokens_per_s:,.0f} | {ratio} | "
            f"{row.peak_gib:.1f} | {'n/a' if util is None else f'{100 * util:.1f}%'} | {len(row.sync_sites)} |")


def table(rows: list[Row], peak: float | None) -> str:
    """Markdown; the ratio is the step time over the first baseline step time of the same model,
    compilation and loss."""
    lines = ["| model | variant | batch x seq | step (ms) | tokens/s | step vs bf16 | peak mem (GiB) | MFU | host syncs |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        key = (row.model, row.compiled, row.chunked_ce, BASELINE)
        baseline = next(r for r in rows if (r.model, r.compiled, r.chunked_ce, r.variant) == key)
        lines.append(format_row(row, baseline, peak))
    return "\n".join(lines)


def gpu_main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="bitnet-train bench train-gpu", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["700m", "2b4t"])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--batch", type=int, default=0, help="per model; 0: the largest that fits (auto_batch)")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--compile", action="store_true", help="torch.compile every model (the default runs eager)")
    p.add_argument("--chunked-ce", action="store_true",
                   help="the loss through kernels/chunked_ce.py (no full logits) instead of lm_head + cross_entropy")
    p.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak for MFU (default: by GPU name)")
    p.add_argument("--json", default=None, help="also write the rows here")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bitnet-train bench train-gpu: needs a CUDA GPU and torch sees none "
                         "(the CPU benchmark is `bitnet-train bench train`)")
    name = torch.cuda.get_device_name()
    peak = args.peak_tflops or peak_tflops(name)
    total = torch.cuda.get_device_properties(0).total_memory
    print(f"{name}, {total / 2**30:.0f} GiB, torch {torch.__version__}; bf16 autocast, fp32 master weights, "
          f"fused AdamW; median of {args.steps} steps after {args.warmup}{'; torch.compile' if args.compile else ''}"
          f"{'; chunked cross-entropy' if args.chunked_ce else ''}",
          flush=True)
    rows = []
    for model_name in args.models:
        base = named_model_config(model_name, LLAMA3_VOCAB)
        batch = args.batch or auto_batch(ModelShape.from_config(base, LLAMA3_VOCAB), args.seq, total)
        rows += time_model(model_name, args.variants, batch, args.seq, args.steps, args.warmup, args.compile,
                           args.chunked_ce)
    print(table(rows, peak))
    for row in rows:  # what still makes a step wait for the GPU
        if row.sync_sites:
            print(f"host syncs, {row.model} {row.variant}: {', '.join(row.sync_sites)}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": name, "peak_tflops": peak,
                       "rows": [{**asdict(r), "tokens_per_s": r.tokens_per_s, "mfu": mfu(r, peak)} for r in rows]},
                      f, indent=1)


if __name__ == "__main__":
    main()
