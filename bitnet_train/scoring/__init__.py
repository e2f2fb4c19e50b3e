"""Measuring what SFT and DPO did: task accuracy of greedy replies, preference accuracy and DPO
reward margins on held-out data, and the summary table the pipeline prints at the end.

Every function takes a model and a tokenizer, so any engine that behaves like a transformers
causal LM (forward returning logits, `generate`) can be measured the same way.
"""
from .preference import pair_logps, pairs_changed, preference_metrics, reward_metrics
from .tasks import greedy_replies, task_accuracy

__all__ = ["greedy_replies", "pair_logps", "pairs_changed", "preference_metrics", "reward_metrics", "task_accuracy"]
