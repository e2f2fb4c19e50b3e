"""The quickstart's task-accuracy and preference evaluations, run on the inference engine.

`EngineCausalLM` gives the engine the small part of a transformers causal LM that tasks.py and
preference.py use (a forward returning `.logits`, greedy `generate`, `parameters()` for the
device), so those functions measure an exported checkpoint exactly as they measure the training
model: same held-out data, same prompts, same scoring.
"""
from pathlib import Path
from types import SimpleNamespace

import torch
from transformers import AutoTokenizer

from ..config import RunConfig
from ..data.chat import encode_pairs
from ..data.chat_tasks import preference_pair, task_examples
from ..engine import Engine, Sampling, generate
from .preference import pair_logps, preference_metrics
from .tasks import task_accuracy


class EngineCausalLM:
    """An Engine behind the causal-LM calls the evaluation functions make."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self._on_device = torch.empty(0, device=engine.device)

    def parameters(self):
        yield self._on_device  # evaluation code reads the device from the first parameter

    def eval(self) -> "EngineCausalLM":
        return self

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **_) -> SimpleNamespace:
        # Right padding needs no mask (causal attention: real tokens never see later pads);
        # left padding would, and the engine scores whole sequences from position 0 only.
        if attention_mask is not None and not bool(attention_mask[:, 0].all()):
            raise ValueError("EngineCausalLM scores right-padded batches only; got a left-padded attention_mask")
        return SimpleNamespace(logits=self.engine.forward(input_ids))

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, max_new_tokens: int = 20,
                 do_sample: bool = False, eos_token_id=None, pad_token_id: int | None = None,
                 temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, **_) -> torch.Tensor:
        """transformers' generate for a left-padded batch: the input rows, then the new tokens,
        right-padded with pad_token_id. Each row is generated on its own (no padding inside the
        engine), which greedy batching must equal anyway (tests/test_evaluation.py)."""
        stops = tuple(eos_token_id if isinstance(eos_token_id, (list, tuple)) else
                      () if eos_token_id is None else (eos_token_id,))
        sampling = Sampling(temperature, top_k, top_p) if do_sample else Sampling()
        mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        rows = [generate(self.engine, ids[m.bool()].tolist(), max_new_tokens, sampling, stops)
                for ids, m in zip(input_ids.cpu(), mask.cpu())]
        width = max(len(r) for r in rows)
        pad = pad_token_id if pad_token_id is not None else (stops[0] if stops else 0)
        new = torch.tensor([r + [pad] * (width - len(r)) for r in rows], dtype=input_ids.dtype)
        return torch.cat([input_ids.cpu(), new], dim=1)


def evaluate_export(export_dir: str | Path, num_examples: int = 200, seq_len: int = 128,
                    seed: int = RunConfig.seed, head_dtype: str = "fp32",
                    engine: Engine | None = None) -> dict[str, float]:
    """Task accuracy and preference metrics of an export on the report's held-out built-in data.
    The defaults are the report's with the default configs (data.num_eval_examples, seq_len 128,
    the run's `seed`); pass the run's values to score the same examples as its report."""
    tokenizer = AutoTokenizer.from_pretrained(export_dir)
    model = EngineCausalLM(engine or Engine.from_export(export_dir, head_dtype))
    tasks = task_examples(num_examples, held_out=True, seed=seed)
    triples = map(preference_pair, task_examples(num_examples, held_out=True, seed=seed))
    pairs = encode_pairs(tokenizer, triples, seq_len, "held-out preference pairs")
    return {**task_accuracy(model, tokenizer, tasks), **preference_metrics(pair_logps(model, tokenizer, pairs))}
