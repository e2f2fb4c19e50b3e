"""Evaluation: batched greedy decoding, preference and reward metrics, the report's reference."""
from pathlib import Path

import pytest
import torch

from bitnet_train.config import compose_config
from bitnet_train.data.chat import generation_prompt
from bitnet_train.data.chat_tasks import chat_messages, task_examples
from bitnet_train.data.tokenizer import builtin_tokenizer
from bitnet_train.scoring import greedy_replies, pairs_changed, preference_metrics, reward_metrics
from bitnet_train.scoring.report import dpo_references, format_table, held_out_pairs
from bitnet_train.model_factory import build_model


def test_batched_greedy_replies_equal_one_prompt_at_a_time():
    tok = builtin_tokenizer(4096)
    cfg = compose_config([])
    torch.manual_seed(0)
    model = build_model(cfg.model, tok)
    # Prompts of different lengths, so the batch is left-padded.
    prompts = [generation_prompt(tok, chat_messages(ex)) for ex in task_examples(6, held_out=True, seed=0)]
    assert len({len(p) for p in prompts}) > 1
    batched = greedy_replies(model, tok, prompts, max_new_tokens=6)
    assert batched == [greedy_replies(model, tok, [p], max_new_tokens=6)[0] for p in prompts]


def test_preference_and_reward_metrics_by_hand():
    policy = torch.tensor([[-1.0, -2.0], [-3.0, -2.5], [-1.0, -1.0]])  # (chosen, rejected) per pair
    reference = torch.tensor([[-1.5, -1.5], [-3.0, -2.0], [-1.0, -1.0]])
    assert preference_metrics(policy) == pytest.approx({"preference_accuracy": 1 / 3, "logp_margin": 0.5 / 3})
    assert preference_metrics(policy, ["sorting", "counting", "sorting"]) == pytest.approx({
        "preference_accuracy": 1 / 3, "logp_margin": 0.5 / 3,
        "preference_accuracy/counting": 0.0, "preference_accuracy/sorting": 0.5,
    })
    # reward margins: 0.1 * [(0.5 - -0.5), (0 - -0.5), 0] = [0.1, 0.05, 0]
    assert reward_metrics(policy, reference, beta=0.1) == pytest.approx(
        {"reward_margin": 0.05, "reward_accuracy": 2 / 3}
    )
    assert reward_metrics(reference, reference, beta=0.1) == {"reward_margin": 0.0, "reward_accuracy": 0.0}


def test_pairs_fixed_and_broken_against_the_reference_by_hand():
    reference = torch.tensor([[-2.0, -1.0], [-2.0, -1.0], [-2.0, -1.0], [-1.0, -2.0], [-1.0, -2.0]])
    policy = torch.tensor([[-1.0, -2.0], [-1.0, -2.0], [-2.0, -1.0], [-2.0, -1.0], [-1.0, -2.0]])
    # pairs 0 and 1 fixed, pair 3 broken; 2 stays wrong, 4 stays right: z = (2 - 1) / sqrt(3)
    assert pairs_changed(policy, reference) == pytest.approx(
        {"pairs_fixed": 2, "pairs_broken": 1, "mcnemar_z": 3 ** -0.5}
    )
    assert pairs_changed(reference, reference) == {"pairs_fixed": 0, "pairs_broken": 0, "mcnemar_z": 0.0}


def test_report_pairs_are_labelled_with_their_own_task():
    tok = builtin_tokenizer(4096)
    cfg = compose_config(["stages.dpo.data.num_eval_examples=10"])
    examples = task_examples(10, held_out=True, seed=cfg.seed)
    pairs, tasks = held_out_pairs(cfg, tok)
    assert len(pairs) == len(tasks) == 10 and len(set(tasks)) == 5
    for (chosen, rejected), task in zip(pairs, tasks):
        prompt = tok.decode(chosen.input_ids)
        assert [ex.task for ex in examples if f"User: {ex.instruction}<|eot_id|>" in prompt] == [task]


def test_the_dpo_reference_is_the_checkpoint_the_stage_started_from():
    outputs = {"pretrain": Path("p"), "sft": Path("s"), "dpo": Path("d")}
    cfg = compose_config([])
    assert dpo_references(cfg, outputs) == {"dpo": Path("s")}
    cfg = compose_config(["stages.dpo.init_from=/elsewhere"])
    assert dpo_references(cfg, outputs) == {"dpo": Path("/elsewhere")}


def test_table_leaves_blank_what_a_stage_did_not_measure():
    table = format_table({"pretrain": {"task_accuracy": 0.0}, "dpo": {"task_accuracy": 0.25, "reward_margin": 0.5}})
    lines = table.splitlines()
    assert lines[0].startswith("| stage | task accuracy |")
    assert lines[2] == "| pretrain | 0.000 |  |  |  |  |"
    assert lines[3] == "| dpo | 0.250 |  |  | 0.500 |  |"


def test_table_states_the_pairs_a_dpo_stage_fixed_and_broke():
    dpo = {"task_accuracy": 0.3, "pairs_fixed": 89, "pairs_broken": 54, "mcnemar_z": 2.93, "reference": "sft"}
    table = format_table({"sft": {"task_accuracy": 0.3}, "dpo": dpo})
    assert table.splitlines()[-1] == "dpo against sft: 89 held-out pairs fixed, 54 broken (McNemar z = 2.9)"
