"""DPO: the sigmoid loss (and its RPO term) by hand and against TRL's, a frozen reference, logged reward metrics."""
import json
import math
from collections import defaultdict
from types import SimpleNamespace

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


def trl_dpo_loss(beta: float, loss_types=("sigmoid",), loss_weights=(1.0,), reply_tokens: int = 1):
    """TRL 1.16's own `DPOTrainer._compute_loss`, run on a stand-in trainer and model output that
    carry exactly the precomputed log-probs above (its losses exist only inside it), each reply's
    log-prob spread evenly over `reply_tokens` completion tokens."""
    from trl import DPOTrainer

    n, length = len(POLICY_CHOSEN), reply_tokens + 2
    per_token = torch.zeros(2 * n, length)
    per_token[:, :reply_tokens] = torch.cat([POLICY_CHOSEN, POLICY_REJECTED]).unsqueeze(1) / reply_tokens
    outputs = SimpleNamespace(
        log_probs=per_token, entropy=torch.zeros(2 * n, length), mean_logits=torch.zeros(2 * n, length),
        is_top1=torch.zeros(2 * n, length, dtype=torch.bool),
    )
    trainer = SimpleNamespace(
        model=SimpleNamespace(training=True), beta=beta, loss_types=list(loss_types), loss_weights=list(loss_weights),
        f_divergence_type="reverse_kl", precompute_ref_logps=True, ld_alpha=None, use_weighting=False,
        aux_loss_enabled=False, _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0, _tp_size=1,
        accelerator=SimpleNamespace(device="cpu", gather=lambda t: t, gather_for_metrics=lambda t: t),
    )
    completion_mask = torch.zeros(2 * n, length + 1, dtype=torch.long)
    completion_mask[:, 1:reply_tokens + 1] = 1
    inputs = {
        "input_ids": torch.zeros(2 * n, length + 1, dtype=torch.long),
        "attention_mask": torch.ones(2 * n, length + 1, dtype=torch.long),
        "completion_mask": completion_mask, "ref_chosen_logps": REF_CHOSEN, "ref_rejected_logps": REF_REJECTED,
    }
    loss = DPOTrainer._compute_loss(trainer, lambda **kw: outputs, inputs, return_outputs=False)
    return loss, {k: v[0] for k, v in trainer._metrics["train"].items()}


def test_sigmoid_loss_matches_trl():
    loss_sum, metrics = dpo_sigmoid_loss(POLICY_CHOSEN, POLICY_REJECTED, REF_CHOSEN, REF_REJECTED, beta=0.1)
    trl_loss, trl_metrics = trl_dpo_loss(beta=0.1)
    pairs = len(POLICY_CHOSEN)
    assert loss_sum.item() / pairs == pytest.approx(trl_loss.item(), rel=1e-6)  # TRL averages over pairs
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert metrics[name].item() / pairs == pytest.approx(trl_metrics[name], rel=1e-6), name


def test_rpo_loss_matches_trls_sigmoid_plus_sft():
    # Two tokens per reply, so the NLL is divided by the reply length as TRL's per-token mean is.
    alpha, tokens = 0.5, 2
    loss_sum, _ = dpo_sigmoid_loss(POLICY_CHOSEN, POLICY_REJECTED, REF_CHOSEN, REF_REJECTED, beta=0.1)
    loss_sum = loss_sum + alpha * chosen_nll(POLICY_CHOSEN, torch.full_like(POLICY_CHOSEN, tokens))
    trl_loss, _ = trl_dpo_loss(beta=0.1, loss_types=("sigmoid", "sft"), loss_weights=(1.0, alpha), reply_tokens=tokens)
    assert loss_sum.item() / len(POLICY_CHOSEN) == pytest.approx(trl_loss.item(), rel=1e-6)


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
