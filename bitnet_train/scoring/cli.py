"""`bitnet-train eval EXPORT_DIR`: perplexity, generation and the quickstart's evaluations of an
exported checkpoint, run on the inference engine.

    bitnet-train eval out/own --ppl builtin                  # built-in validation text
    bitnet-train eval out/own --ppl data.jsonl --seq-len 256 # .txt or .jsonl {"text": ...}
    bitnet-train eval out/own --generate "def main" --temperature 0.8 --seed 1
    bitnet-train eval out/own --tasks                        # task accuracy + preference metrics
"""
import argparse
import json

import torch
from transformers import AutoTokenizer

from ..checkpoint import CheckpointError
from ..engine import HEAD_DTYPES, Engine, Sampling, generate, perplexity, read_documents, token_blocks
from ..kernels import cpu

def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bitnet-train eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("export_dir", help="an export in our packed format (bitnet-train export ... --formats own)")
    p.add_argument("--ppl", metavar="FILE|builtin", help="perplexity on a .txt/.jsonl file or the built-in text")
    p.add_argument("--seq-len", type=int, default=128, help="perplexity window (pretraining's data.seq_len)")
    p.add_argument("--generate", metavar="PROMPT", action="append", default=[], help="continue PROMPT (repeatable)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--tasks", action="store_true", help="task accuracy and preference metrics (held-out built-in)")
    p.add_argument("--num-examples", type=int, default=200, help="held-out examples for --tasks")
    p.add_argument("--head-dtype", choices=HEAD_DTYPES, default="fp32",
                   help="LM head storage: fp32 is exact; bf16/int8/int4/ternary decode faster "
                        "(int4, ternary: CPU only; docs/bench_engine.md)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when the CUDA door can run)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all)")
    args = p.parse_args(argv)
    if not (args.ppl or args.generate or args.tasks):
        p.error("nothing to do: give --ppl, --generate and/or --tasks")
    return args


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    if args.threads:
        cpu.set_num_threads(args.threads)
    try:
        engine = Engine.from_export(args.export_dir, args.head_dtype, args.device)
    except CheckpointError as e:  # names the file and what to do: no traceback needed
        raise SystemExit(f"bitnet-train eval: {e}")
    tokenizer = AutoTokenizer.from_pretrained(args.export_dir)
    print(f"engine: {args.export_dir} on {engine.device} "
          f"({cpu.backend() if engine.device.type == 'cpu' else 'cuda'} kernels), head {args.head_dtype}")
    if args.ppl:
        result = perplexity(engine, token_blocks(tokenizer, read_documents(args.ppl), args.seq_len))
        print(f"perplexity {result.ppl:.3f} (loss {result.loss:.4f} over {result.tokens} tokens, "
              f"{args.ppl}, seq_len {args.seq_len})")
    sampling = Sampling(args.temperature, args.top_k, args.top_p, args.seed)
    for prompt in args.generate:
        ids = [tokenizer.bos_token_id, *tokenizer(prompt, add_special_tokens=False)["input_ids"]]
        new = generate(engine, ids, args.max_new_tokens, sampling, stop_ids=(tokenizer.eos_token_id,))
        print(f"generation: {prompt}{tokenizer.decode(new, skip_special_tokens=True)}")
    if args.tasks:
        from .engine_scores import evaluate_export

        metrics = evaluate_export(args.export_dir, args.num_examples, engine=engine)
        print("tasks: " + json.dumps({k: round(v, 4) for k, v in metrics.items()}))
