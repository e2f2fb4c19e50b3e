import subprocess
import sys
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ValidationError

import bitnet_train
from bitnet_train.config import RunConfig, compose_config

ROOT = Path(__file__).resolve().parent.parent
RECIPES = Path(bitnet_train.__file__).parent / "configs" / "recipes"


def test_default_config_is_typed():
    cfg = compose_config([])
    assert isinstance(cfg, RunConfig)
    assert cfg.stages["pretrain"].optim.betas == [0.9, 0.95]
    assert cfg.stages["sft"].loss_reduction == "sum" and cfg.stages["dpo"].beta == 0.1


@pytest.mark.parametrize("size", ["tiny", "125m", "700m", "1.3b", "3b", "2b4t"])
def test_every_named_size_composes(size):
    cfg = compose_config([f"model={size}"])
    assert cfg.model.hidden_size % cfg.model.num_attention_heads == 0
    assert cfg.model.num_attention_heads % cfg.model.num_key_value_heads == 0


def test_2b4t_matches_the_report():
    m = compose_config(["model=2b4t"]).model
    assert (m.hidden_size, m.intermediate_size, m.num_hidden_layers) == (2560, 6912, 30)
    assert (m.num_attention_heads, m.num_key_value_heads, m.rope_theta) == (20, 5, 500000.0)


@pytest.mark.parametrize("recipe", sorted(p.stem for p in RECIPES.glob("*.yaml")))
def test_every_recipe_composes(recipe):
    compose_config([f"recipes={recipe}"])


def test_a_stage_data_preset_is_chosen_per_stage():
    cfg = compose_config(["data@stages.sft.data=ultrachat", "data@stages.dpo.data=ultrafeedback"])
    assert (cfg.stages["sft"].data.source, cfg.stages["sft"].data.name) == ("hub", "HuggingFaceH4/ultrachat_200k")
    assert cfg.stages["dpo"].data.validation_split == "test_prefs"
    assert cfg.stages["pretrain"].data.source == "builtin"


def test_mistyped_key_fails_naming_it():
    with pytest.raises(ConfigCompositionException, match="stages.pretrain.schedule.lr_pek"):
        compose_config(["stages.pretrain.schedule.lr_pek=1e-3"])


def test_wrong_type_fails_naming_the_key():
    with pytest.raises(ConfigCompositionException, match="stages.pretrain.max_steps=lots") as err:
        compose_config(["stages.pretrain.max_steps=lots"])
    assert isinstance(err.value.__cause__, ValidationError)
    assert "could not be converted to Integer" in str(err.value.__cause__)


def test_mistyped_key_in_a_yaml_file_fails(tmp_path):
    recipe_dir = tmp_path / "recipes"
    recipe_dir.mkdir()
    (recipe_dir / "typo.yaml").write_text("# @package _global_\nstages:\n  pretrain:\n    micro_batch_sise: 4\n")
    with pytest.raises(ConfigCompositionException) as err:
        compose_config(["recipes=typo", f"hydra.searchpath=[file://{tmp_path}]"])
    assert "full_key: stages.pretrain.micro_batch_sise" in str(err.value)


def test_cli_reports_a_typo_before_any_compute(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "bitnet_train.cli", "stages.pretrain.max_step=3", f"output_dir={tmp_path}/run"],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )
    assert out.returncode != 0
    assert "stages.pretrain.max_step" in out.stderr
    assert not (tmp_path / "run" / "pretrain").exists()
