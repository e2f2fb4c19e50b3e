"""The conversion ablation of docs/convert.md: held-out perplexity on the built-in text at equal
token budgets for the teacher, naive ternarization, plain QAT, + λ warm-up, + distillation, + SubLN.

    python docs/convert_ablation.py OUT_DIR [TEACHER [I[:STEPS] ...]]   # runs what is missing, then table + plot

I ...: only these entries of ORDER (two drivers can then share the work; default: all), each
trained for STEPS steps (default STEPS below; fewer steps give fewer budget columns).

Every variant is recipes/convert_smollm2 (its sequence length, batch, learning rate and
evaluation blocks) with a few overrides (VARIANTS) and seeds 1 and 2; the learning rate is
constant after its warm-up, so each evaluation (every EVAL_EVERY steps) is a budget of its own.
The teacher and the untrained ternary student are scored on the same validation blocks by the
same sum of token losses as the trainer's evaluation.
"""
import json
import math
import subprocess
import sys
from pathlib import Path

import torch

# One thread: the ablation runs for an hour or more beside other work on a 2-core machine, and
# every row of a table must use the same thread count (a matmul's summation order depends on it).
STEPS, EVAL_EVERY, MICRO_BATCH, SEQ_LEN, EVAL_BATCHES, WARMUP = 100, 20, 2, 128, 16, 10
COMMON = [
    "recipes=convert_smollm2", "logging=off", "logging.progress_bar=false", "runtime.num_threads=1",
    f"stages.convert.eval_every={EVAL_EVERY}", "logging.log_every=1", f"stages.convert.micro_batch_size={MICRO_BATCH}",
    f"stages.convert.data.seq_len={SEQ_LEN}", f"stages.convert.eval_batches={EVAL_BATCHES}",
]
NO_KD = ["stages.convert.kd_weight=0"]
VARIANTS = {
    "plain QAT": ["stages.convert.quant_warmup_steps=0", *NO_KD],
    "+ λ warm-up": [f"stages.convert.quant_warmup_steps={WARMUP}", *NO_KD],
    "+ distillation": [f"stages.convert.quant_warmup_steps={WARMUP}", "stages.convert.kd_weight=1"],
    "+ SubLN": [f"stages.convert.quant_warmup_steps={WARMUP}", "stages.convert.kd_weight=1", "model.sub_norms=true"],
    # Not one of the cumulative rows: distillation without the warm-up's cost.
    "plain QAT + distillation": ["stages.convert.quant_warmup_steps=0", "stages.convert.kd_weight=1"],
}
# The comparison that matters first (plain QAT vs warm-up + distillation, two seeds), then the rest.
ORDER = [("plain QAT", 1), ("+ distillation", 1), ("plain QAT", 2), ("+ distillation", 2),
         ("+ λ warm-up", 1), ("+ SubLN", 1), ("+ λ warm-up", 2), ("+ SubLN", 2), ("plain QAT + distillation", 1),
         ("plain QAT + distillation", 2)]


def run_dir(out: Path, variant: str, seed: int) -> Path:
    slug = variant.strip("+ ").replace(" ", "_").replace("λ", "lambda")
    return out / f"{slug}_seed{seed}"


def train(out: Path, teacher: str | None, variant: str, seed: int, steps: int) -> None:
    target = run_dir(out, variant, seed)
    if (target / "convert" / "final").is_dir():
        return
    overrides = [
        *COMMON, *VARIANTS[variant], f"seed={seed}", f"output_dir={target}",
        f"stages.convert.max_steps={steps}", f"stages.convert.save_every={steps}",
    ]
    if teacher:
        overrides.append(f"stages.convert.teacher={teacher}")
    subprocess.run([sys.executable, "-m", "bitnet_train.cli", *overrides], check=True)


def val_points(out: Path, variant: str, seed: int) -> dict[int, float]:
    path = run_dir(out, variant, seed) / "convert" / "metrics.jsonl"
    if not path.is_file():
        return {}
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return {r["step"]: r["val/ppl"] for r in rows if "val/ppl" in r}


def train_curve(out: Path, variant: str, seed: int) -> list[tuple[int, float]]:
    path = run_dir(out, variant, seed) / "convert" / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
    return [(r["step"], r["train/nll"]) for r in rows if "train/nll" in r]


def untrained_ppl(out: Path, teacher: str | None) -> dict[str, float]:
    """Teacher and naive ternarization, on the validation blocks the runs evaluate."""
    cache = out / "untrained.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    from bitnet_train.config import compose_config
    from bitnet_train.data.tokenizer import load_tokenizer
    from bitnet_train.losses import next_token_loss_sum
    from bitnet_train.model_factory import build_model
    from bitnet_train.stages.pretrain import PretrainStage
    from bitnet_train.teacher import init_from_teacher, load_teacher

    overrides = [*COMMON, *([f"stages.convert.teacher={teacher}"] if teacher else [])]
    cfg = compose_config(overrides)
    stage_cfg = cfg.stages["convert"]
    tokenizer = load_tokenizer(cfg.tokenizer)
    blocks = PretrainStage(stage_cfg, tokenizer, cfg.seed, cfg.model.max_position_embeddings).blocks["validation"]
    blocks = blocks[torch.arange(EVAL_BATCHES * MICRO_BATCH)]
    teacher_model = load_teacher(stage_cfg.teacher)
    student = build_model(cfg.model, tokenizer).eval()
    init_from_teacher(student, teacher_model)

    @torch.no_grad()
    def ppl(model) -> float:
        total, n = 0.0, 0
        for batch in blocks.split(MICRO_BATCH):
            loss, count = next_token_loss_sum(model(batch).logits, batch)
            total, n = total + float(loss), n + count
        return math.exp(total / n)

    result = {"teacher": ppl(teacher_model), "naive ternarization": ppl(student), "tokens": int(blocks[:, 1:].numel())}
    out.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(result))
    return result


def table(out: Path, untrained: dict) -> str:
    budgets = list(range(EVAL_EVERY, STEPS + 1, EVAL_EVERY))
    tokens = [b * MICRO_BATCH * SEQ_LEN for b in budgets]
    lines = [
        f"Held-out perplexity on the built-in text ({untrained['tokens']} tokens). Columns: training tokens.",
        "",
        "| variant | seed | " + " | ".join(f"{t:,}" for t in tokens) + " |",
        "|---|---|" + "---|" * len(tokens),
        f"| teacher (SmolLM2-135M-Instruct, Q4_1 dequantized) | - | {untrained['teacher']:.2f} (all budgets) |",
        f"| naive ternarization (no training) | - | {untrained['naive ternarization']:.4g} (0 tokens) |",
    ]
    for variant in VARIANTS:
        for seed in (1, 2):
            points = val_points(out, variant, seed)
            if points:
                cells = " | ".join(f"{points[b]:.1f}" if b in points else "-" for b in budgets)
                lines.append(f"| {variant} | {seed} | {cells} |")
    return "\n".join(lines)


def plot(out: Path, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, variant in enumerate(VARIANTS):
        for seed, style in ((1, "-"), (2, "--")):
            curve = train_curve(out, variant, seed)
            if curve:
                left.plot(*zip(*curve), style, color=f"C{i}", label=f"{variant}, seed {seed}")
            points = sorted(val_points(out, variant, seed).items())
            if points:
                right.plot(*zip(*points), style + "o", color=f"C{i}", label=f"{variant}, seed {seed}")
    left.set(xlabel="step", ylabel="train NLL (student)", title="training NLL")
    right.set(xlabel="step", ylabel="held-out perplexity", yscale="log", title="held-out perplexity")
    left.legend(fontsize=7)
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def main() -> None:
    out = Path(sys.argv[1])
    teacher = sys.argv[2] if len(sys.argv) > 2 else None
    entries = [arg.split(":") for arg in sys.argv[3:]] or [[str(i)] for i in range(len(ORDER))]
    chosen = [(*ORDER[int(e[0])], int(e[1]) if len(e) > 1 else STEPS) for e in entries]
    untrained = untrained_ppl(out, teacher)
    print(table(out, untrained), flush=True)
    for variant, seed, steps in chosen:
        train(out, teacher, variant, seed, steps)
        print(table(out, untrained), flush=True)
    plot(out, Path(__file__).parent / "convert_curves.png")


if __name__ == "__main__":
    main()
