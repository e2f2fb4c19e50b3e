"""Benchmark (not a test): one training step of the ternary model against the same model with
quantize=false, in one process, interleaved, so machine noise hits both alike.

    bitnet-train bench train [--model tiny|125m] [--batch 8] [--seq 256] [--reps 10]
"""
import argparse
import statistics
import time

import torch

from ..model import BitNetTrainConfig, BitNetTrainForCausalLM
from ..model_factory import named_model_config


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


if __name__ == "__main__":
    main()
