"""Stages differ by data and loss only; `build_stage` maps a stage kind to its class."""
from .convert import ConvertStage
from .dpo import DPOStage
from .pretrain import PretrainStage
from .sft import SFTStage

STAGES = {"pretrain": PretrainStage, "sft": SFTStage, "dpo": DPOStage, "convert": ConvertStage}


def build_stage(kind: str, cfg, tokenizer, seed: int, max_seq_len: int):
    if kind not in STAGES:
        raise ValueError(f"unknown stage kind {kind!r}; known: {sorted(STAGES)}")
    return STAGES[kind](cfg, tokenizer, seed, max_seq_len)
