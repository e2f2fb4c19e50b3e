"""SFT: assistant-only loss, the documented sum/mean reductions, invariance to accumulation."""
import math
from types import SimpleNamespace

import pytest
import torch
from accelerate import Accelerator

from bitnet_train.config import compose_config
from bitnet_train.data.tokenizer import builtin_tokenizer
from bitnet_train.losses import IGNORE, next_token_loss_sum
from bitnet_train.model_factory import build_model
from bitnet_train.stages.sft import SFTStage
from bitnet_train.trainer import RunContext, train

TINY = ["logging=off", "stages.sft.data.num_train_examples=8", "stages.sft.data.num_eval_examples=4", "stages.sft.max_steps=1"]


@pytest.fixture(scope="module")
def tok():
    return builtin_tokenizer(4096)


def sft_config(*overrides):
    return compose_config([*TINY, *overrides])


class UniformLM(torch.nn.Module):
    """Logits = one bias vector at every position: its gradient can be written down by hand. The
    stage asks the model for the summed loss (model.py's forward), computed as ours does."""

    def __init__(self, vocab: int):
        super().__init__()
        self.bias = torch.nn.Parameter(torch.zeros(vocab))

    def forward(self, ids, labels, loss_reduction):
        assert loss_reduction == "sum"
        return SimpleNamespace(loss=next_token_loss_sum(self.bias.expand(*ids.shape, -1), labels)[0])


class Captured(Exception):
    """Raised from the patched optimizer step once the gradients are recorded."""


def first_step_grads(monkeypatch, tmp_path, stage, model, cfg) -> list[torch.Tensor]:
    """The gradients the shared loop hands to the optimizer at its first step."""
    grads = []

    def capture(self, *args, **kwargs):
        grads.extend(p.grad.detach().clone() for p in model.parameters())
        raise Captured

    monkeypatch.setattr(torch.optim.AdamW, "step", capture)
    ctx = RunContext(tmp_path, Accelerator(cpu=True), cfg.logging, seed=0, run_name="t", run_config={},
                     tokenizer=None)
    with pytest.raises(Captured):
        train(stage, model, cfg.stages["sft"], ctx)
    return grads


def test_loss_is_summed_over_assistant_tokens_only(tok):
    cfg = sft_config()
    stage = SFTStage(cfg.stages["sft"], tok, seed=0, max_seq_len=256)
    batch = stage.batch("train", torch.arange(2))
    out = stage.loss(UniformLM(len(tok)), batch)
    assistant_tokens = int((batch["labels"][:, 1:] != IGNORE).sum())
    # Uniform logits: every predicted token costs log V, whatever it is.
    assert out.units == stage.units(batch) == assistant_tokens
    assert out.loss_sum.item() == pytest.approx(assistant_tokens * math.log(len(tok)), rel=1e-6)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_reduction_gives_the_documented_gradient(monkeypatch, tmp_path, tok, reduction):
    # For logits = b = 0, d(-log softmax(b)[y]) / db = 1/V - onehot(y). Summed over the N assistant
    # tokens of the global batch: N/V - counts. `mean` divides that by N, `sum` does not.
    cfg = sft_config("stages.sft.micro_batch_size=2", "stages.sft.grad_accum=2", f"stages.sft.loss_reduction={reduction}",
                     "stages.sft.data.num_train_examples=4", "stages.sft.optim.grad_clip=1e9")
    stage = SFTStage(cfg.stages["sft"], tok, seed=0, max_seq_len=256)
    model = UniformLM(len(tok))
    (grad,) = first_step_grads(monkeypatch, tmp_path, stage, model, cfg)
    targets = stage.batch("train", torch.arange(4))["labels"][:, 1:]  # one global batch = the 4 examples
    targets = targets[targets != IGNORE]
    expected = len(targets) / len(tok) - torch.bincount(targets, minlength=len(tok)).float()
    if reduction == "mean":
        expected /= len(targets)
    torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-6)


def test_sum_gradient_is_the_same_for_1x4_micro_batches_and_1x1(monkeypatch, tmp_path, tok):
    grads = {}
    for micro, accum in [(1, 4), (4, 1)]:
        cfg = sft_config(f"stages.sft.micro_batch_size={micro}", f"stages.sft.grad_accum={accum}", "stages.sft.loss_reduction=sum",
                         "stages.sft.data.num_train_examples=4", "stages.sft.optim.grad_clip=1e9")
        torch.manual_seed(0)
        model = build_model(cfg.model, tok)
        stage = SFTStage(cfg.stages["sft"], tok, seed=0, max_seq_len=256)
        grads[micro, accum] = first_step_grads(monkeypatch, tmp_path / f"{micro}x{accum}", stage, model, cfg)
    for a, b in zip(grads[1, 4], grads[4, 1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert max(g.abs().max() for g in grads[4, 1]) > 1.0  # summed, not averaged: sizeable gradients


def test_sft_refuses_a_tokenizer_without_chat_template(tok):
    bare = tok.__class__.from_pretrained(tok.name_or_path)
    bare.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        SFTStage(sft_config().stages["sft"], bare, seed=0, max_seq_len=256)
