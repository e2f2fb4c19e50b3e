"""The whole pipeline on tiny settings: pretrain -> SFT -> DPO -> report, and starting points."""
import copy
import json

import pytest

from bitnet_train.checkpoint import verify_manifest
from bitnet_train.config import ConfigError, compose_config
from bitnet_train.data.sources import DataError
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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.fixture(scope="module")
def three_stages():
    return compose_config(["pipeline=[pretrain,sft,dpo]", "output_dir=/tmp/unused"])


def with_value(cfg, key: str, value):
    """A copy of `cfg` with one dotted key set (Hydra would have composed the same)."""
    cfg = copy.deepcopy(cfg)
    *path, last = key.split(".")
    node = cfg
    for part in path:
        node = node[part] if isinstance(node, dict) else getattr(node, part)
    setattr(node, last, value)
    return cfg


@pytest.mark.parametrize("key, value, message", [
    ("stages.pretrain.max_steps", -1, "stages.pretrain.max_steps=-1 must be >= 0"),
    ("stages.sft.eval_every", 0, "stages.sft.eval_every=0 must be >= 1"),
    ("stages.sft.save_every", 0, "stages.sft.save_every=0 must be >= 1"),
    ("stages.pretrain.grad_accum", 0, "stages.pretrain.grad_accum=0 must be >= 1"),
    ("stages.dpo.micro_batch_size", 0, "stages.dpo.micro_batch_size=0 must be >= 1"),
    ("stages.sft.optim.betas", [0.9], "stages.sft.optim.betas=[0.9] must be two values in [0, 1)"),
    ("stages.pretrain.optim.grad_clip", 0.0, "stages.pretrain.optim.grad_clip=0.0 must be > 0"),
    ("stages.pretrain.schedule.lr_peak", -3e-3, "stages.pretrain.schedule.lr_peak=-0.003 must be > 0"),
    ("stages.dpo.schedule.wd", -0.1, "stages.dpo.schedule.wd=-0.1 must be >= 0"),
    ("stages.dpo.rpo_alpha", -1.0, "stages.dpo.rpo_alpha=-1.0 must be >= 0"),
    ("stages.dpo.beta", 0.0, "stages.dpo.beta=0.0 must be > 0"),
])
def test_a_value_that_cannot_train_fails_at_start_up_naming_the_key(three_stages, key, value, message):
    validate_run(three_stages)
    with pytest.raises(ConfigError) as err:
        validate_run(with_value(three_stages, key, value))
    assert str(err.value).startswith(message)


def test_a_negative_value_given_on_the_command_line_is_refused_too():
    cfg = compose_config(["pipeline=[pretrain,sft]", "stages.sft.max_steps=-4", "output_dir=/tmp/unused"])
    with pytest.raises(ConfigError, match=r"^stages\.sft\.max_steps=-4 must be >= 0"):
        validate_run(cfg)


def test_a_stage_outside_the_pipeline_is_not_checked(three_stages):
    cfg = with_value(three_stages, "stages.sft.eval_every", 0)
    cfg.pipeline = ["pretrain"]
    validate_run(cfg)


def files_stage(kind: str, path, *overrides):
    """A pipeline whose last stage, of `kind`, reads `path`."""
    pipeline = "[pretrain]" if kind == "pretrain" else f"[pretrain,{kind}]"
    return compose_config([
        f"pipeline={pipeline}", f"stages.{kind}.data.source=files", f"stages.{kind}.data.files=[{path}]",
        *overrides, "output_dir=/tmp/unused",
    ])


def test_sft_rows_without_messages_fail_before_pretraining(tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps({"text": f"row {i}"}) + "\n" for i in range(5)))
    with pytest.raises(DataError, match=rf"stages\.sft: 5 of the first 5 rows of {path} lack a 'messages' list"):
        validate_run(files_stage("sft", path))


def test_dpo_rows_need_a_preference_pair(tmp_path):
    good = {"prompt": "1 + 1", "chosen": "2", "rejected": "3"}
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps([good] * 99 + [{"prompt": "1 + 1", "chosen": "2"}]))
    validate_run(files_stage("dpo", path, "stages.dpo.data.max_bad_row_fraction=0.01"))  # 1 of 100: allowed
    with pytest.raises(DataError, match="1 of the first 100 rows .* lack a preference pair"):
        validate_run(files_stage("dpo", path, "stages.dpo.data.max_bad_row_fraction=0"))


def test_pretraining_text_passes_and_rows_without_the_text_field_fail(tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_text("\n\n  some text\n")
    validate_run(files_stage("pretrain", text))
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"content": "some text"}) + "\n")
    with pytest.raises(DataError, match="lack a non-empty text field 'text'"):
        validate_run(files_stage("pretrain", rows))
    validate_run(files_stage("pretrain", rows, "stages.pretrain.data.text_field=content"))


def test_parquet_rows_are_checked(tmp_path):
    from datasets import Dataset

    path = tmp_path / "chat.parquet"
    Dataset.from_dict({"messages": [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]]}).to_parquet(path)
    validate_run(files_stage("sft", path))
    with pytest.raises(DataError, match="lack a preference pair"):
        validate_run(files_stage("dpo", path))


def test_a_line_that_is_not_json_is_named(tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text('{"messages": []}\n{not json\n')
    with pytest.raises(DataError, match=rf"{path}, line 2: not JSON"):
        validate_run(files_stage("sft", path))
