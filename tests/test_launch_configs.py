"""launch/ parses as accelerate and DeepSpeed will read it, and names our model's pieces.

FSDP through accelerate does not run on this CPU machine, and DeepSpeed needs an extra and minutes
of compilation (test_deepspeed_* in test_distributed.py). So the FSDP config goes through the real
`accelerate launch`, whose rank receives the environment accelerate builds from the file, and the
FSDP plugin is built from that environment, which runs accelerate's checks of it; the DeepSpeed
configs (whose launcher needs DeepSpeed installed) are read with accelerate's public config class
and their plugin built from the values they hold.
"""
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import pytest
import yaml
from accelerate.commands.config.config_args import ClusterConfig
from accelerate.commands.launch import launch_command_parser
from accelerate.utils import DeepSpeedPlugin, DistributedType, FullyShardedDataParallelPlugin

from bitnet_train import model as model_module
from bitnet_train.config import compose_config
from bitnet_train.config import StageConfig
from bitnet_train.model import BitNetTrainConfig, BitNetTrainForCausalLM
from bitnet_train.pipeline import validate_run
from bitnet_train.distributed import configure_deepspeed

ROOT = Path(__file__).resolve().parent.parent
LAUNCH = ROOT / "launch"
CONFIGS = {
    "single_gpu": DistributedType.NO,
    "ddp": DistributedType.MULTI_GPU,
    "fsdp": DistributedType.FSDP,
    "deepspeed_zero2": DistributedType.DEEPSPEED,
    "deepspeed_zero3": DistributedType.DEEPSPEED,
    "multi_node": DistributedType.MULTI_GPU,
}


def launch_env(name: str, tmp_path: Path) -> dict[str, str]:
    """What `accelerate launch --config_file launch/accelerate/NAME.yaml` gives a rank: its
    accelerate and FSDP settings, dumped by a one-line script the launcher starts (one rank)."""
    dump = tmp_path / "env.json"
    script = "import json, os, sys; json.dump(dict(os.environ), open(sys.argv[1], 'w'))"
    (tmp_path / "dump_env.py").write_text(script)
    subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(LAUNCH / "accelerate" / f"{name}.yaml"),
         "--num_processes", "1", str(tmp_path / "dump_env.py"), str(dump)],
        cwd=ROOT, check=True, capture_output=True, timeout=300,
    )
    return {k: v for k, v in json.loads(dump.read_text()).items() if k.startswith(("ACCELERATE_", "FSDP_"))}


def tiny_model() -> BitNetTrainForCausalLM:
    return BitNetTrainForCausalLM(BitNetTrainConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, bos_token_id=0, eos_token_id=1, pad_token_id=2))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_accelerate_config_has_only_known_keys_and_its_mode(name):
    config = ClusterConfig.from_yaml_file(LAUNCH / "accelerate" / f"{name}.yaml")  # unknown keys raise
    assert config.distributed_type == CONFIGS[name]
    options = set(vars(launch_command_parser().parse_args(["script.py"])))  # every option, at its default
    for section in ("fsdp_config", "deepspeed_config"):
        unknown = set(getattr(config, section) or {}) - options
        assert not unknown, f"{name}.{section}: accelerate launch has no options {unknown}"


@pytest.mark.slow
def test_fsdp_shards_fully_with_our_decoder_layer_as_the_unit(tmp_path):
    with mock.patch.dict(os.environ, launch_env("fsdp", tmp_path)):
        plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True  # full shard
    assert plugin.transformer_cls_names_to_wrap == ["DecoderLayer"]
    assert plugin.state_dict_type.name == "FULL_STATE_DICT"  # checkpoints resume on any rank count
    plugin.set_auto_wrap_policy(tiny_model())  # raises if no module of that class is in the model
    assert plugin.auto_wrap_policy.keywords["transformer_layer_cls"] == {model_module.DecoderLayer}


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_config_is_accepted_and_leaves_the_batch_to_the_stage(stage):
    name = f"deepspeed_zero{stage}"
    json_path = LAUNCH / "deepspeed" / f"zero{stage}.json"
    raw = json.loads(json_path.read_text())
    assert raw["zero_optimization"]["stage"] == stage
    # distributed.configure_deepspeed fills these from the stage config; a number here would disagree with it.
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size",
                "gradient_clipping"):
        assert raw[key] == "auto", f"{json_path}: {key} must be 'auto' (set by the stage config)"
    if stage == 3:  # final/ needs the full weights gathered from the shards
        assert raw["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    launch = ClusterConfig.from_yaml_file(LAUNCH / "accelerate" / f"{name}.yaml").deepspeed_config
    assert launch["deepspeed_config_file"] == f"launch/deepspeed/zero{stage}.json"  # relative to the repository
    # The JSON holds every DeepSpeed setting: the accelerate config adds none that could disagree.
    assert set(launch) == {"deepspeed_config_file", "zero3_init_flag"}
    plugin = DeepSpeedPlugin(hf_ds_config=str(ROOT / launch["deepspeed_config_file"]),
                             zero3_init_flag=launch["zero3_init_flag"])
    assert plugin.zero_stage == stage


def test_stage_config_sets_deepspeeds_batch_accumulation_and_clipping():
    plugin = DeepSpeedPlugin(hf_ds_config=str(LAUNCH / "deepspeed" / "zero2.json"))
    acc = SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=plugin), num_processes=8,
                          distributed_type=DistributedType.DEEPSPEED)
    cfg = StageConfig(kind="pretrain", micro_batch_size=4, grad_accum=2)
    configure_deepspeed(acc, cfg)
    ds = plugin.deepspeed_config
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"],
            ds["gradient_clipping"]) == (4, 2, 64, 1.0)
    cfg.optim.grad_clip = 0.0
    with pytest.raises(ValueError, match="grad_clip > 0"):
        configure_deepspeed(acc, cfg)


def test_multi_node_config_and_slurm_script():
    multi = yaml.safe_load((LAUNCH / "accelerate" / "multi_node.yaml").read_text())
    assert multi["num_machines"] > 1 and multi["distributed_type"] == "MULTI_GPU"
    script = LAUNCH / "slurm" / "train.sbatch"
    subprocess.run(["bash", "-n", str(script)], check=True)  # syntax
    text = script.read_text()
    assert "launch/accelerate/multi_node.yaml" in text and "--machine_rank" in text and "output_dir=" in text
    assert os.access(script, os.X_OK)


def test_2b4t_recipe_plans_4t_tokens_at_4096():
    cfg = compose_config(["recipes=bitnet_2b4t"])
    validate_run(cfg)
    assert (cfg.model.hidden_size, cfg.model.num_hidden_layers, cfg.model.num_key_value_heads) == (2560, 30, 5)
    assert cfg.tokenizer.name == "meta-llama/Meta-Llama-3-8B"
    pre = cfg.stages["pretrain"]
    tokens_per_step = pre.micro_batch_size * pre.grad_accum * 256 * pre.data.seq_len  # as written: 256 GPUs
    assert pre.data.seq_len == 4096 and tokens_per_step == 4_194_304
    assert (pre.max_steps - 1) * tokens_per_step < 4e12 <= pre.max_steps * tokens_per_step
    assert pre.schedule.shape == "cosine" and pre.schedule.wd_shape == "cosine" and pre.schedule.wd_stage2 == 0.0
    assert pre.schedule.lr_stage2_peak < pre.schedule.lr_peak and 0 < pre.schedule.stage2_start < 1
    assert cfg.stages["sft"].loss_reduction == "sum"
    assert (cfg.stages["dpo"].beta, cfg.stages["dpo"].schedule.lr_peak, cfg.stages["dpo"].epochs) == (0.1, 2e-7, 2)
    assert cfg.pipeline == ["pretrain", "sft", "dpo"]
