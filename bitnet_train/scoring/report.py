"""The table the pipeline prints at the end: each stage's checkpoint measured on the same
held-out built-in data (instructions no stage trained on; see data/chat_tasks.py).

Columns: task accuracy (exact match of greedy replies), preference accuracy and log-prob margin
(chosen vs the plausible wrong reply), and, for a DPO stage and its reference (the model it
started from), DPO's implicit reward margin and accuracy relative to that reference. Under the
table, each DPO stage's held-out pairs fixed and broken against that reference (McNemar's z).
report.json also holds task and preference accuracy per task.
"""
import json
from pathlib import Path

from ..config import RunConfig
from ..data.chat import encode_pairs
from ..data.chat_tasks import preference_pair, task_examples
from ..model_factory import load_checkpoint_model
from .preference import pair_logps, pairs_changed, preference_metrics, reward_metrics
from .tasks import task_accuracy

COLUMNS = {
    "task_accuracy": "task accuracy",
    "preference_accuracy": "preference accuracy",
    "logp_margin": "log-prob margin",
    "reward_margin": "reward margin",
    "reward_accuracy": "reward accuracy",
}


def dpo_references(cfg: RunConfig, outputs: dict[str, Path]) -> dict[str, Path]:
    """Each DPO entry's frozen reference: the checkpoint it started from (as pipeline.py picks it)."""
    references, previous = {}, None
    for name, path in outputs.items():
        stage = cfg.stages[name]
        start = Path(stage.init_from) if stage.init_from else previous
        if stage.kind == "dpo" and start is not None:
            references[name] = start
        previous = path
    return references


def held_out_pairs(cfg: RunConfig, tokenizer) -> tuple[list, list[str]]:
    """The report's preference pairs and each one's task (encoded task by task, so a pair dropped
    for length cannot shift the labels of the rest)."""
    examples = task_examples(cfg.stages["dpo"].data.num_eval_examples, held_out=True, seed=cfg.seed)
    pairs, tasks = [], []
    for task in sorted({ex.task for ex in examples}):
        triples = [preference_pair(ex) for ex in examples if ex.task == task]
        encoded = encode_pairs(tokenizer, triples, cfg.stages["dpo"].data.seq_len, f"report preference pairs ({task})")
        pairs += encoded
        tasks += [task] * len(encoded)
    return pairs, tasks


def evaluate_stages(cfg: RunConfig, outputs: dict[str, Path], tokenizer, device="cpu") -> dict[str, dict]:
    tasks = task_examples(cfg.stages["sft"].data.num_eval_examples, held_out=True, seed=cfg.seed)
    pairs, pair_tasks = held_out_pairs(cfg, tokenizer)
    logps, results = {}, {}

    def measure(path: Path) -> dict:
        model = load_checkpoint_model(path, cfg.model.quantize).to(device)
        logps[path] = pair_logps(model, tokenizer, pairs)
        return {**task_accuracy(model, tokenizer, tasks), **preference_metrics(logps[path], pair_tasks)}

    row_of = {path: name for name, path in outputs.items()}
    for name, path in outputs.items():
        results[name] = measure(path)
    for name, ref in dpo_references(cfg, outputs).items():
        if ref not in row_of:  # a DPO stage that started from a checkpoint outside this pipeline
            row_of[ref] = f"{name} reference"
            results[row_of[ref]] = measure(ref)
        beta = cfg.stages[name].beta
        results[row_of[ref]].update(reward_metrics(logps[ref], logps[ref], beta))
        results[name].update(reward_metrics(logps[outputs[name]], logps[ref], beta))
        results[name].update(pairs_changed(logps[outputs[name]], logps[ref]), reference=row_of[ref])
    return results


def format_table(results: dict[str, dict]) -> str:
    header = ["stage", *COLUMNS.values()]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for name, row in results.items():
        cells = [f"{row[k]:.3f}" if k in row else "" for k in COLUMNS]
        lines.append("| " + " | ".join([name, *cells]) + " |")
    for name, row in results.items():
        if "mcnemar_z" in row:
            lines.append(
                f"\n{name} against {row['reference']}: {row['pairs_fixed']} held-out pairs fixed, "
                f"{row['pairs_broken']} broken (McNemar z = {row['mcnemar_z']:.1f})"
            )
    return "\n".join(lines)


def write_report(cfg: RunConfig, outputs: dict[str, Path], tokenizer, out_dir: Path, device="cpu") -> str:
    """Measure every stage, save report.json and report.md in the run directory, return the table."""
    results = evaluate_stages(cfg, outputs, tokenizer, device)
    table = format_table(results)
    (out_dir / "report.json").write_text(json.dumps(results, indent=1))
    (out_dir / "report.md").write_text(table + "\n")
    return table
