import os

import pytest
import torch

# Without a GPU, Triton kernels run in Triton's CPU interpreter (tests/test_triton_*.py). Triton
# decides that when it is first imported, and importing transformers imports it, so the switch is
# set here, before any test module imports either.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# A model and data small enough that a pretraining run takes seconds on a 2-core CPU.
TINY = [
    "logging=off",
    "logging.progress_bar=false",
    "logging.plot=false",
    "model.hidden_size=64",
    "model.intermediate_size=128",
    "model.num_hidden_layers=2",
    "model.num_attention_heads=4",
    "model.num_key_value_heads=2",
    "stages.pretrain.data.seq_len=32",
    "stages.pretrain.micro_batch_size=8",
    "stages.pretrain.schedule.warmup_steps=2",
    "stages.pretrain.schedule.lr_peak=3e-3",
    "stages.pretrain.schedule.lr_stage2_peak=1.5e-3",
    "stages.pretrain.eval_batches=4",
]


def random_codes(shape, seed=0) -> torch.Tensor:
    """Ternary codes in {-1, 0, 1} as float32, reproducible by seed."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-1, 2, shape, generator=g).float()


@pytest.fixture
def tiny_overrides():
    return list(TINY)
