import json
import shutil
from pathlib import Path

import pytest
import torch

from bitnet_train.checkpoint import verify_manifest
from bitnet_train.config import compose_config
from bitnet_train.metrics import read_jsonl
from bitnet_train.model import BitNetTrainForCausalLM
from bitnet_train.pipeline import run_pipeline


def pretrain(tmp_path: Path, overrides: list[str], name: str = "run") -> Path:
    cfg = compose_config([*overrides, f"output_dir={tmp_path / name}"])
    return run_pipeline(cfg)["pretrain"].parent


def losses(stage_dir: Path, key: str = "train/loss") -> list[tuple[int, float]]:
    return [(r["step"], r[key]) for r in read_jsonl(stage_dir / "metrics.jsonl") if key in r]


def test_a_few_steps_lower_the_loss(tmp_path, tiny_overrides):
    stage = pretrain(tmp_path, [*tiny_overrides, "stages.pretrain.max_steps=30", "stages.pretrain.eval_every=15",
                                "logging.log_every=5", "logging.plot=true"])
    train = [v for _, v in losses(stage)]
    val = [v for _, v in losses(stage, "val/loss")]
    assert train[-1] < train[0] - 1.0
    assert val[-1] < val[0]
    assert all("val/ppl" in r for r in read_jsonl(stage / "metrics.jsonl") if "val/loss" in r)
    assert (stage / "loss.png").stat().st_size > 10_000
    verify_manifest(stage / "final")
    model = BitNetTrainForCausalLM.from_pretrained(stage / "final")
    assert model.config.quantize and model.config.vocab_size == 4096


def test_weight_decay_reaches_bitlinear_weights_only(tmp_path, tiny_overrides):
    """Stage 1 decays BitLinear weights; with a zero LR for everything else they alone shrink."""
    from bitnet_train.trainer import decay_mask_groups

    model = BitNetTrainForCausalLM.from_pretrained(
        pretrain(tmp_path, [*tiny_overrides, "stages.pretrain.max_steps=2", "stages.pretrain.eval_every=2"]) / "final"
    )
    decay, no_decay = decay_mask_groups(model)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(names[id(p)].endswith("_proj.weight") for p in decay["params"])
    assert {names[id(p)] for p in no_decay["params"]} >= {"model.embed_tokens.weight", "model.norm.weight"}
    assert len(decay["params"]) == 7 * model.config.num_hidden_layers


@pytest.mark.slow
def test_resume_continues_the_loss_curve_exactly(tmp_path, tiny_overrides):
    args = [*tiny_overrides, "stages.pretrain.max_steps=12", "stages.pretrain.save_every=4", "stages.pretrain.eval_every=6",
            "logging.log_every=1", "stages.pretrain.keep_checkpoints=5"]
    whole = pretrain(tmp_path, args, "whole")
    interrupted = pretrain(tmp_path, args, "interrupted")
    # Pretend the run died after step 4's checkpoint: later checkpoints and the output are gone,
    # and the metrics file holds lines from beyond the checkpoint that must not be kept.
    for p in ("final", "checkpoints/step_00000008", "checkpoints/step_00000012"):
        shutil.rmtree(interrupted / p)
    resumed = pretrain(tmp_path, args, "interrupted")
    assert resumed == interrupted
    assert losses(resumed) == losses(whole)  # bit-for-bit, every step
    assert losses(resumed, "val/loss") == losses(whole, "val/loss")
    a = torch.load(whole / "checkpoints/step_00000012/optimizer.pt", weights_only=True)
    b = torch.load(resumed / "checkpoints/step_00000012/optimizer.pt", weights_only=True)
    assert all(torch.equal(a["state"][k]["exp_avg"], b["state"][k]["exp_avg"]) for k in a["state"])


def test_checkpoint_holds_everything_needed_to_resume(tmp_path, tiny_overrides):
    stage = pretrain(tmp_path, [*tiny_overrides, "stages.pretrain.max_steps=4", "stages.pretrain.save_every=2",
                                "stages.pretrain.keep_checkpoints=1", "stages.pretrain.eval_every=4"])
    kept = sorted(p.name for p in (stage / "checkpoints").iterdir())
    assert kept == ["step_00000004"]  # older ones rotated away
    ckpt = stage / "checkpoints" / kept[0]
    assert {p.name for p in ckpt.iterdir()} == {
        "model.safetensors", "optimizer.pt", "rng.pt", "trainer_state.json", "manifest.json"}
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["step"] == 4 and state["stream"]["offset"] == 4 * 8


def test_rerunning_a_finished_run_skips_it(tmp_path, tiny_overrides):
    args = [*tiny_overrides, "stages.pretrain.max_steps=2", "stages.pretrain.eval_every=2"]
    stage = pretrain(tmp_path, args)
    before = (stage / "final" / "model.safetensors").stat().st_mtime_ns
    pretrain(tmp_path, args)
    assert (stage / "final" / "model.safetensors").stat().st_mtime_ns == before


def test_reusing_an_output_dir_with_another_config_fails(tmp_path, tiny_overrides):
    pretrain(tmp_path, [*tiny_overrides, "stages.pretrain.max_steps=2", "stages.pretrain.eval_every=2"])
    with pytest.raises(ValueError, match="different config"):
        pretrain(tmp_path, [*tiny_overrides, "stages.pretrain.max_steps=3", "stages.pretrain.eval_every=2"])


def test_full_precision_baseline_trains_with_the_same_recipe(tmp_path, tiny_overrides):
    stage = pretrain(tmp_path, [*tiny_overrides, "model.quantize=false", "stages.pretrain.max_steps=10",
                                "stages.pretrain.eval_every=10", "logging.log_every=5"])
    assert not BitNetTrainForCausalLM.from_pretrained(stage / "final").config.quantize
    train = [v for _, v in losses(stage)]
    assert train[-1] < train[0]


@pytest.mark.slow
def test_wandb_offline_run_is_written(tmp_path, tiny_overrides, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    args = [a for a in tiny_overrides if not a.startswith("logging=")]
    stage = pretrain(tmp_path, [*args, "logging.wandb=auto", "stages.pretrain.max_steps=2", "stages.pretrain.eval_every=2"])
    runs = list((stage / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
