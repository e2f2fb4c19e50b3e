from pathlib import Path

import pytest
import yaml
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from omegaconf.errors import ValidationError

import bitnet_train
from bitnet_train.config import Precision, RunConfig, StageKind, compose_config
from bitnet_train.pipeline import validate_run

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
def test_every_recipe_composes_and_passes_the_start_up_checks(recipe):
    validate_run(compose_config([f"recipes={recipe}"]))


@pytest.mark.parametrize("key, allowed", [
    ("stages.sft.kind", "pretrain, sft, dpo"), ("stages.pretrain.precision", "fp32, bf16"),
    ("stages.sft.loss_reduction", "mean, sum"), ("stages.pretrain.schedule.shape", "linear, cosine"),
    ("stages.pretrain.schedule.wd_shape", "constant, cosine"), ("logging.wandb", "auto, online, offline, disabled"),
])
def test_a_choice_outside_its_enum_fails_at_composition_listing_the_choices(key, allowed):
    with pytest.raises(ConfigCompositionException) as err:
        compose_config([f"{key}=typo"])
    assert f"Invalid value 'typo', expected one of [{allowed}" in str(err.value.__cause__)


def test_choices_compare_and_serialise_as_their_strings():
    cfg = compose_config(["stages.pretrain.precision=bf16"])
    pre = cfg.stages["pretrain"]
    assert pre.precision is Precision.bf16 and pre.precision == "bf16" and f"{pre.precision}" == "bf16"
    assert pre.kind == StageKind.pretrain and cfg.stages["sft"].loss_reduction == "sum"
    saved = yaml.safe_load(OmegaConf.to_yaml(cfg))  # run_config.yaml, which sweep-summary reads back
    assert saved["stages"]["pretrain"]["precision"] == "bf16" and saved["logging"]["wandb"] == "auto"


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

