"""DPO: the sigmoid loss and its RPO term against their closed forms (docs/dpo.md), a frozen reference,
logged reward metrics."""
import json
import math

import pytest
import torch
from accelerate import Accelerator

from bitnet_train.config import compose_config
from bitnet_train.data.tokenizer import builtin_tokenizer
from bitnet_train.losses import dpo_sigmoid_loss, sequence_logps
from bitnet_train.model_factory import build_model
from bitnet_train.stages.dpo import DPOStage, chosen_nll
from bitnet_train.trainer import RunContext, train

# Two pairs: sequence log-probs of the policy and of the reference.
POLICY_CHOSEN, POLICY_REJECTED = torch.tensor([-1.0, -3.0]), torch.tensor([-2.0, -2.5])
REF_CHOSEN, REF_REJECTED = torch.tensor([-1.5, -3.0]), torch.tensor([-1.5, -2.0])


def test_sigmoid_loss_and_rewards_match_a_hand_computation():
    loss_sum, metrics = dpo_sigmoid_loss(POLICY_CHOSEN, POLICY_REJECTED, REF_CHOSEN, REF_REJECTED, beta=0.1)
    # pair 1: chosen ratio +0.5, rejected -0.5 -> rewards 0.05, -0.05, margin 0.1
    # pair 2: chosen ratio  0.0, rejected -0.5 -> rewards 0.00, -0.05, margin 0.05
    expected = math.log1p(math.exp(-0.1)) + math.log1p(math.exp(-0.05))  # -log sigmoid(m) = log(1 + e^-m)
    assert loss_sum.item() == pytest.approx(expected, rel=1e-6)
    assert metrics["rewards/chosen"].item() == pytest.approx(0.05, abs=1e-7)
    assert metrics["rewards/rejected"].item() == pytest.approx(-0.10, abs=1e-7)
    assert metrics["rewards/margins"].item() == pytest.approx(0.15, abs=1e-7)
    assert metrics["rewards/accuracies"].item() == 2.0


@pytest.mark.parametrize("beta", [0.1, 1.0, 3.0])
def test_sigmoid_loss_and_rewards_match_the_closed_form_on_random_pairs(beta):
    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (-10 * torch.rand(16, generator=g, dtype=torch.float64) for _ in range(4))
    loss_sum, metrics = dpo_sigmoid_loss(pc, pr, rc, rr, beta=beta)
    rewards = [(beta * (a - c), beta * (b - d)) for a, b, c, d in zip(pc.tolist(), pr.tolist(), rc.tolist(), rr.tolist())]
    # -log sigmoid(r_w - r_l) = log(1 + exp(-(r_w - r_l))), summed over pairs (the stage divides by pairs)
    assert loss_sum.item() == pytest.approx(sum(math.log1p(math.exp(-(w - l))) for w, l in rewards), rel=1e-12)
    assert metrics["rewards/chosen"].item() == pytest.approx(sum(w for w, _ in rewards), rel=1e-12)
    assert metrics["rewards/rejected"].item() == pytest.approx(sum(l for _, l in rewards), rel=1e-12)
    assert metrics["rewards/margins"].item() == pytest.approx(sum(w - l for w, l in rewards), rel=1e-12)
    assert metrics["rewards/accuracies"].item() == sum(w > l for w, l in rewards)


def test_rpo_term_is_each_chosen_replys_nll_per_token_summed_over_pairs():
    # RPO: alpha * (-log pi(y_w|x) / |y_w|) per pair; replies of 2 and 3 tokens -> 1.0/2 + 3.0/3
    assert chosen_nll(POLICY_CHOSEN, torch.tensor([2.0, 3.0])).item() == pytest.approx(1.5)


@pytest.fixture(scope="module")
def tok():
    return builtin_tokenizer(4096)


def test_reference_stays_frozen_while_the_policy_trains(tmp_path, tok):
    cfg = compose_config([
        "logging=off", "logging.plot=false", "stages.dpo.data.num_train_examples=8", "stages.dpo.data.num_eval_examples=4",
        "stages.dpo.max_steps=3", "stages.dpo.micro_batch_size=4", "stages.dpo.schedule.lr_peak=1e-2", "stages.dpo.schedule.warmup_steps=0",
    ])
    torch.manual_seed(0)
    model = build_model(cfg.model, tok)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    stage = DPOStage(cfg.stages["dpo"], tok, seed=0, max_seq_len=256)
    ctx = RunContext(tmp_path, Accelerator(cpu=True), cfg.logging, seed=0, run_name="t", run_config={}, tokenizer=tok)
    train(stage, model, cfg.stages["dpo"], ctx)

    reference = stage.reference.state_dict()
    assert all(torch.equal(reference[k], start[k]) for k in start)
    assert not any(p.requires_grad for p in stage.reference.parameters())
    assert any(not torch.equal(v, start[k]) for k, v in model.state_dict().items())
    logged = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert {"train/rewards/chosen", "train/rewards/rejected", "train/rewards/margins",
            "train/rewards/accuracies"} <= set(logged)


def dpo_stage(tok, *overrides):
    cfg = compose_config(["stages.dpo.data.num_train_examples=8", "stages.dpo.data.num_eval_examples=4", *overrides])
    return cfg, DPOStage(cfg.stages["dpo"], tok, seed=0, max_seq_len=256)


def test_rpo_alpha_adds_the_per_token_nll_of_each_chosen_reply(tok):
    cfg, plain = dpo_stage(tok)
    _, rpo = dpo_stage(tok, "stages.dpo.rpo_alpha=0.5")
    torch.manual_seed(0)
    model = build_model(cfg.model, tok)
    for stage in (plain, rpo):
        stage.bind_model(model)
    batch = plain.batch("train", torch.arange(4))
    chosen = {k: v[:4] for k, v in batch.items()}
    logps = sequence_logps(model(chosen["input_ids"]).logits, chosen["labels"])
    lengths = (chosen["labels"][:, 1:] != -100).sum(dim=1)
    assert len(set(lengths.tolist())) > 1  # replies of different lengths: each divided by its own
    expected = -(logps / lengths).sum()

    out = rpo.loss(model, batch)
    assert out.metrics["nll/chosen"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert out.loss_sum.item() == pytest.approx(plain.loss(model, batch).loss_sum.item() + 0.5 * expected.item(), rel=1e-5)
