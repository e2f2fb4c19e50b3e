"""Benchmark (not a test): pretraining data at corpus scale.

    bitnet-train bench data [--sizes-mb 10,100,1000] [--throughput-mb 20] [--rounds 3] [--dir DIR]
                            [--loss-chunk-tokens 0,256]

The benchmark writes a synthetic .jsonl corpus itself: 10 MB parts of documents of about 2 KB
cut from the built-in text at random places, so the tokenizer sees real prose.

Throughput (in this process, on the first --throughput-mb of it): the token cache's build
(`open_token_cache` into an empty directory: reading, batch encoding, framing, writing) against
the tokenizers library's own ceiling on the same text, `Tokenizer.encode_batch` on the same
batches with the text already in memory, timed around the calls alone. The two alternate for
--rounds rounds and the medians are compared, in wall time and in the process's CPU time
(which a machine shared with other jobs disturbs less).

Memory and start-up (each --sizes-mb corpus, the tiny model, fresh processes):
  1. a training run with an empty cache directory: its peak RSS (VmHWM, read every 10 ms);
  2. the same run again, the cache reused: its peak RSS and the seconds from the process start
     to the end of its first optimizer step (imports and model set-up included);
  3. in this process, the seconds that building the pretraining stage takes with the cache in
     place: the data's share of that start-up.
Each --loss-chunk-tokens value (model.loss_chunk_tokens; 0: the loss from the full logits) gets
its own reusing run, one after the other; the building run takes the first.
Then the fixed part of every start-up: a fresh process that only imports what a training run
imports (as the command line does, torch and transformers outside the garbage collector), its
seconds from start to exit and its peak RSS, the median of --rounds.
Corpora and caches stay under --dir (delete it afterwards); parts are shared between sizes.
"""
import argparse
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

from ..config import compose_config
from ..data.builtin_text import builtin_documents
from ..data.corpus import jsonl_values, open_corpus
from ..data.token_cache import batch_encoder, batches, open_token_cache
from ..data.tokenizer import builtin_tokenizer
from ..stages.pretrain import PretrainStage

PART_MB = 10
DOC_CHARS = 2000
MODEL = ["model.hidden_size=64", "model.intermediate_size=128", "model.num_hidden_layers=2",
         "model.num_attention_heads=4", "model.num_key_value_heads=2"]


def write_parts(directory: Path, n_parts: int) -> list[Path]:
    """PART_MB-MB .jsonl files of ~DOC_CHARS-character documents; written once, reused after."""
    text = "\n\n".join(builtin_documents())
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n_parts):
        path = directory / f"part-{i:04d}.jsonl"
        if not path.exists():
            rng = np.random.default_rng(i)
            starts = rng.integers(0, len(text) - DOC_CHARS, PART_MB * 1_000_000 // DOC_CHARS)
            tmp = path.with_suffix(".tmp")
            tmp.write_text("".join(json.dumps({"text": text[s:s + DOC_CHARS]}) + "\n" for s in starts))
            os.replace(tmp, path)
        paths.append(path)
    return paths


def peak_rss_mb(pid: int) -> float:
    """A process's own peak RSS so far (VmHWM), 0 once it has exited. Not wait4's ru_maxrss: Linux
    keeps that high-water mark across fork and exec, so a child's counts the RSS of the parent
    that spawned it (this benchmark's process, holding torch and the throughput round's text)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    return next((int(line.split()[1]) / 1024 for line in status.splitlines() if line.startswith("VmHWM:")), 0.0)


def train_once(files: list[Path], cache: Path, out: Path, steps: int, threads: int, loss_chunk_tokens: int) -> dict:
    """One training run in a fresh process: its peak RSS and the seconds to its first step."""
    args = [*MODEL, f"model.loss_chunk_tokens={loss_chunk_tokens}", "logging=off", "logging.progress_bar=false", "logging.plot=false", "logging.log_every=1",
            "stages.pretrain.data.source=files", f"stages.pretrain.data.files=[{','.join(map(str, files))}]",
            f"stages.pretrain.data.cache_dir={cache}", "stages.pretrain.data.seq_len=256",
            f"stages.pretrain.max_steps={steps}", f"stages.pretrain.eval_every={steps}",
            "stages.pretrain.eval_batches=2", f"stages.pretrain.save_every={steps}", "pipeline=[pretrain]",
            f"runtime.num_threads={threads}", f"output_dir={out}"]
    metrics = out / "pretrain" / "metrics.jsonl"
    shutil.rmtree(out, ignore_errors=True)  # a finished run would be skipped, not trained
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f"{out.name}.log", "w") as log:
        start = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "bitnet_train.cli", *args], stdout=log, stderr=log)
        first_step, peak = None, 0.0
        while True:
            peak = max(peak, peak_rss_mb(proc.pid))
            pid, status = os.waitpid(proc.pid, os.WNOHANG)
            if pid:
                break
            if first_step is None and metrics.exists() and '"step": 1' in metrics.read_text():
                first_step = time.perf_counter() - start
            time.sleep(0.01)
    if os.waitstatus_to_exitcode(status):
        raise SystemExit(f"training run failed; see {log.name}")
    return {"first_step_s": first_step, "peak_rss_mb": peak}


def throughput(files: list[Path], root: Path, rounds: int) -> dict:
    """Median wall and CPU seconds of the cache build and of encode_batch alone, alternating."""
    tokenizer = builtin_tokenizer(4096)
    encode = batch_encoder(tokenizer)
    texts = [v for v in jsonl_values(files, "text", Counter()) if isinstance(v, str)]
    cfg = compose_config([f"stages.pretrain.data.files=[{','.join(map(str, files))}]", "output_dir=unused",
                          "stages.pretrain.data.source=files"]).stages["pretrain"].data
    times: dict[str, list[tuple[float, float]]] = {"cache": [], "ceiling": []}
    tokens = 0
    for r in range(rounds):
        wall, cpu, tokens = 0.0, 0.0, 0
        for batch in batches(iter(texts)):
            w, c = time.perf_counter(), time.process_time()
            ids = encode(batch)
            wall, cpu = wall + time.perf_counter() - w, cpu + time.process_time() - c
            tokens += sum(map(len, ids))
        times["ceiling"].append((wall, cpu))
        cfg.cache_dir = str(root / f"throughput_cache_{r}")
        shutil.rmtree(cfg.cache_dir, ignore_errors=True)
        w, c = time.perf_counter(), time.process_time()
        open_token_cache(cfg, tokenizer, open_corpus(cfg, root / "file_hashes"))
        times["cache"].append((time.perf_counter() - w, time.process_time() - c))
        shutil.rmtree(cfg.cache_dir)
    med = {k: (statistics.median(w for w, _ in v), statistics.median(c for _, c in v)) for k, v in times.items()}
    return {"tokens": tokens, **med}


def stage_seconds(files: list[Path], cache: Path) -> float:
    """Building the pretraining stage with its cache in place: the data's share of a start-up."""
    cfg = compose_config([f"stages.pretrain.data.files=[{','.join(map(str, files))}]", "output_dir=unused",
                          "stages.pretrain.data.source=files", f"stages.pretrain.data.cache_dir={cache}",
                          "stages.pretrain.data.seq_len=256"])
    tokenizer = builtin_tokenizer(4096)
    start = time.perf_counter()
    PretrainStage(cfg.stages["pretrain"], tokenizer, cfg.seed, 256)
    return time.perf_counter() - start


IMPORTS = """
from bitnet_train.cli import long_lived_imports
with long_lived_imports(fresh_process=True):
    import bitnet_train.preemption, bitnet_train.pipeline, bitnet_train.sweep, bitnet_train.trainer
print(next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM:")))
"""


def training_state_mb() -> float:
    """The benchmark model's weights, gradients and AdamW moments (fp32: 16 bytes a parameter): the
    issue's memory target is this plus 500 MB."""
    from ..model_factory import build_model

    model = build_model(compose_config([*MODEL, "output_dir=unused"]).model, builtin_tokenizer(4096))
    return 16 * sum(p.numel() for p in model.parameters()) / 2**20


def imports_once() -> dict:
    """A fresh process importing what a training run imports: its seconds and peak RSS."""
    start = time.perf_counter()
    peak_kb = subprocess.run([sys.executable, "-c", IMPORTS], capture_output=True, text=True, check=True).stdout
    return {"seconds": time.perf_counter() - start, "peak_rss_mb": int(peak_kb) / 1024}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="bitnet-train bench data", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes-mb", default="10,100,1000")
    p.add_argument("--throughput-mb", type=int, default=20)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--dir", default="/tmp/bitnet_bench_data")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--loss-chunk-tokens", default="0,256")
    args = p.parse_args(argv)
    root = Path(args.dir)
    sizes = [int(s) for s in args.sizes_mb.split(",") if s]
    chunks = [int(c) for c in args.loss_chunk_tokens.split(",") if c]
    parts = write_parts(root / "corpus", max(1, max([*sizes, args.throughput_mb]) // PART_MB))
    logging.getLogger("bitnet_train.data.token_cache").setLevel(logging.WARNING)

    t = throughput(parts[: max(1, args.throughput_mb // PART_MB)], root, args.rounds)
    (cache_wall, cache_cpu), (ceil_wall, ceil_cpu) = t["cache"], t["ceiling"]
    print(f"tokenization, {args.throughput_mb} MB, {t['tokens'] / 1e6:.1f} M text tokens, median of {args.rounds}, "
          f"load average after: {os.getloadavg()[0]:.1f}")
    print("| | wall s | text tokens/s (wall) | CPU s |")
    print("|---|---|---|---|")
    print(f"| encode_batch alone (ceiling) | {ceil_wall:.1f} | {t['tokens'] / ceil_wall:,.0f} | {ceil_cpu:.1f} |")
    print(f"| token cache build | {cache_wall:.1f} | {t['tokens'] / cache_wall:,.0f} | {cache_cpu:.1f} |")
    print(f"| cache / ceiling | | {ceil_wall / cache_wall:.0%} | {ceil_cpu / cache_cpu:.0%} |", flush=True)

    print(f"\ntraining runs: tiny model (hidden 64, 2 layers), seq 256, {args.steps} steps, {args.threads} threads")
    print("| corpus | cached tokens | build tokens/s | peak RSS, building run | loss chunk tokens | peak RSS, reusing run "
          "| first step, reusing run | of which the data stage | load average |")
    print("|---|---|---|---|---|---|---|---|---|", flush=True)
    for size in sizes:
        files = parts[: max(1, size // PART_MB)]
        cache = root / f"cache_{size}mb"
        shutil.rmtree(cache, ignore_errors=True)
        build = train_once(files, cache, root / f"run_{size}mb_build", args.steps, args.threads, chunks[0])
        index = json.loads(next(cache.glob("*/index.json")).read_text())
        tokens = sum(s["tokens"] for s in index["splits"].values())
        built = f"| {size} MB | {tokens / 1e6:.1f} M | {index['tokens_per_second']:,.0f} | {build['peak_rss_mb']:.0f} MB "
        for chunk in chunks:
            reuse = train_once(files, cache, root / f"run_{size}mb_reuse", args.steps, args.threads, chunk)
            data_s = stage_seconds(files, cache)
            print(f"{built}| {chunk or 'off'} | {reuse['peak_rss_mb']:.0f} MB | {reuse['first_step_s']:.1f} s "
                  f"| {data_s:.2f} s | {os.getloadavg()[0]:.1f} |", flush=True)
            built = "| | | | "  # the building run's columns once per corpus
    state = training_state_mb()
    print(f"model + optimizer state {state:.1f} MB: the reusing runs' peak RSS target is below {state + 500:.0f} MB")
    runs = [imports_once() for _ in range(args.rounds)]
    print(f"\nimports alone (a fresh process, median of {args.rounds}): "
          f"{statistics.median(r['seconds'] for r in runs):.1f} s, "
          f"peak RSS {statistics.median(r['peak_rss_mb'] for r in runs):.0f} MB; load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
