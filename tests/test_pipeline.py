"""The whole pipeline on tiny settings: pretrain -> SFT -> DPO -> report, and starting points."""
import json

import pytest

from bitnet_train.checkpoint import verify_manifest
from bitnet_train.config import compose_config
from bitnet_train.metrics import read_jsonl
from bitnet_train.pipeline import run_pipeline, validate_run

TINY = [
    # One thread: these tensors are too small to gain from two, and a shared CPU punishes oversubscription.
    "logging=off", "logging.plot=false", "logging.progress_bar=false", "runtime.num_threads=1",
    "stages.pretrain.max_steps=2", "stages.pretrain.micro_batch_size=4", "stages.pretrain.data.seq_len=32",
    "stages.pretrain.eval_batches=1",
    "stages.sft.max_steps=2", "stages.sft.micro_batch_size=4", "stages.sft.data.num_train_examples=8", "stages.sft.data.num_eval_examples=5",
    "stages.dpo.max_steps=2", "stages.dpo.micro_batch_size=4", "stages.dpo.data.num_train_examples=8", "stages.dpo.data.num_eval_examples=5",
]


def test_pretrain_sft_dpo_writes_every_checkpoint_and_the_report(tmp_path):
    cfg = compose_config([*TINY, "pipeline=[pretrain,sft,dpo,report]", f"output_dir={tmp_path}"])
    outputs = run_pipeline(cfg)

    assert list(outputs) == ["pretrain", "sft", "dpo"]
    for name, final in outputs.items():
        assert final == tmp_path / name / "final"
        verify_manifest(final)
        assert (final / "tokenizer.json").is_file() and (final / "model.safetensors").is_file()
    report = json.loads((tmp_path / "report.json").read_text())
    assert list(report) == ["pretrain", "sft", "dpo"]
    assert report["sft"]["reward_margin"] == 0.0  # the DPO reference is the SFT model itself
    assert {"task_accuracy", "preference_accuracy", "reward_margin"} <= set(report["dpo"])
    table = (tmp_path / "report.md").read_text()
    assert "| dpo |" in table and "task accuracy" in table
    # Perplexity is logged where the loss is a token NLL, and only there.
    for name, expect_ppl in [("sft", True), ("dpo", False)]:
        evals = [r for r in read_jsonl(tmp_path / name / "metrics.jsonl") if "val/loss" in r]
        assert evals and all(("val/ppl" in r) == expect_ppl for r in evals)


def test_a_stage_starts_from_a_transformers_bitnet_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHDYNAMO_DISABLE", "1")  # transformers' BitNet quantizers compile otherwise
    from transformers import BitNetConfig, BitNetForCausalLM

    from bitnet_train.data.tokenizer import builtin_tokenizer

    tok = builtin_tokenizer(4096)
    hf_dir = tmp_path / "hf-bitnet"
    config = BitNetConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=True,
    )
    BitNetForCausalLM(config).save_pretrained(hf_dir)

    out = tmp_path / "run"
    cfg = compose_config([*TINY, "pipeline=[sft]", f"stages.sft.init_from={hf_dir}", f"output_dir={out}"])
    outputs = run_pipeline(cfg)
    verify_manifest(outputs["sft"])
    saved = json.loads((outputs["sft"] / "config.json").read_text())
    assert (saved["hidden_size"], saved["num_hidden_layers"]) == (64, 2)  # the checkpoint's shape, not cfg.model's


def test_the_report_must_come_after_training():
    with pytest.raises(ValueError, match="after every training stage"):
        validate_run(compose_config(["pipeline=[sft,report,dpo]", "output_dir=/tmp/unused"]))


def test_a_wrong_reply_fraction_outside_0_1_fails_before_pretraining():
    cfg = compose_config(["pipeline=[pretrain,sft]", "stages.sft.data.wrong_reply_fraction=1.5", "output_dir=/tmp/unused"])
    with pytest.raises(ValueError, match=r"sft\.data\.wrong_reply_fraction=1\.5 is not a share"):
        validate_run(cfg)
