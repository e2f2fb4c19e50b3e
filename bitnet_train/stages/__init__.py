"""Stages differ by data and loss only; `build_stage` maps a stage kind to its class."""
from .pretrain import PretrainStage

STAGES = {"pretrain": PretrainStage}


def build_stage(kind: str, cfg, tokenizer, seed: int, max_seq_len: int):
    if kind not in STAGES:
        raise ValueError(f"unknown stage kind {kind!r}; known: {sorted(STAGES)}")
    return STAGES[kind](cfg, tokenizer, seed, max_seq_len)
