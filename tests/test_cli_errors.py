"""Bad input gets one line, `bitnet-train: <what and how to fix it>`, and exit code 2, before any
compute; a bug keeps its traceback, and BITNET_TRAIN_VERBOSE=1 shows the traceback of bad input."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bitnet_train import cli
from bitnet_train.config import ConfigError

ROOT = Path(__file__).resolve().parent.parent
QUIET = ["logging=off", "logging.progress_bar=false", "logging.plot=false"]


@pytest.fixture(autouse=True)
def plain_environment(monkeypatch):
    for name in cli.VERBOSE_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(sys, "argv", ["bitnet-train"])


def one_line_error(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exit_:
        cli.train_main(argv)
    assert exit_.value.code == cli.USER_ERROR_EXIT
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("bitnet-train: "), err
    return err[0]


@pytest.mark.parametrize("override, expected", [
    ("stages.pretrain.max_step=3", "Could not override 'stages.pretrain.max_step'"),  # a typo in a key
    ("stages.pretrain.precision=bf61", "Invalid value 'bf61', expected one of [fp32, bf16]"),
    ("stages.pretrain.max_steps=lots", "Value 'lots' of type 'str' could not be converted to Integer"),
    ("recipes=quickstrat", "Could not find 'recipes/quickstrat'"),
    ("pipeline=[pretrain", "no viable alternative at input '[pretrain'"),  # an unparsable override
    ("model.hidden_size=???", "missing mandatory value: hidden_size"),
])
def test_a_config_that_does_not_compose_is_one_line(capsys, tmp_path, override, expected):
    line = one_line_error(capsys, [override, f"output_dir={tmp_path}/run", *QUIET])
    assert expected in line
    assert "full_key" not in line and "Config search path" not in line


@pytest.mark.parametrize("override, expected", [
    ("stages.pretrain.eval_every=0", "stages.pretrain.eval_every=0 must be >= 1"),
    ("stages.pretrain.optim.betas=[0.9]", "stages.pretrain.optim.betas=[0.9] must be two values"),
    ("stages.pretrain.schedule.lr_peak=-1", "stages.pretrain.schedule.lr_peak=-1.0 must be > 0"),
    ("stages.pretrain.init_from=/nonexistent/ckpt", "stages.pretrain.init_from=/nonexistent/ckpt does not exist"),
    ("stages.pretrain.data.source=files", "data.source=files needs data.files"),
])
def test_a_config_that_cannot_train_is_one_line_before_any_compute(capsys, tmp_path, override, expected):
    line = one_line_error(capsys, [override, f"output_dir={tmp_path}/run", *QUIET])
    assert expected in line
    assert not (tmp_path / "run" / "pretrain").exists()


def test_a_bug_keeps_its_traceback(monkeypatch, tmp_path):
    def broken(cfg):
        raise KeyError("a bug")

    monkeypatch.setattr("bitnet_train.pipeline.run_pipeline", broken)
    with pytest.raises(KeyError, match="a bug"):
        cli.train_main([f"output_dir={tmp_path}/run", *QUIET])


def test_verbose_shows_the_traceback_of_bad_input(monkeypatch, tmp_path):
    monkeypatch.setenv("BITNET_TRAIN_VERBOSE", "1")
    with pytest.raises(ConfigError, match="eval_every=0"):
        cli.train_main(["stages.pretrain.eval_every=0", f"output_dir={tmp_path}/run", *QUIET])


def test_hydra_full_error_is_restored(monkeypatch, tmp_path, capsys):
    one_line_error(capsys, ["stages.pretrain.eval_every=0", f"output_dir={tmp_path}/run", *QUIET])
    assert "HYDRA_FULL_ERROR" not in os.environ


def bitnet_train(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bitnet_train.cli", *args, *QUIET], capture_output=True, text=True,
                          cwd=ROOT, timeout=300, env=env)


@pytest.mark.slow
def test_sft_data_without_messages_is_one_line_before_pretraining(tmp_path):
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"text": "no conversation here"}) + "\n" for _ in range(3)))
    out = bitnet_train("pipeline=[pretrain,sft]", "stages.sft.data.source=files", f"stages.sft.data.files=[{data}]",
                       f"output_dir={tmp_path}/run")
    assert out.returncode == cli.USER_ERROR_EXIT
    assert out.stderr.strip().splitlines()[-1].startswith(f"bitnet-train: stages.sft: 3 of the first 3 rows of {data}")
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "run" / "pretrain").exists()


@pytest.mark.slow
def test_a_real_process_prints_a_bad_value_as_one_line_and_a_traceback_when_verbose(tmp_path):
    args = ("stages.pretrain.save_every=0", f"output_dir={tmp_path}/run")
    quiet = bitnet_train(*args)
    assert quiet.returncode == cli.USER_ERROR_EXIT and "Traceback" not in quiet.stderr
    assert quiet.stderr.strip().splitlines()[-1] == "bitnet-train: stages.pretrain.save_every=0 must be >= 1"
    loud = bitnet_train(*args, env={**os.environ, "BITNET_TRAIN_VERBOSE": "1"})
    assert loud.returncode == 1 and "Traceback" in loud.stderr and "ConfigError" in loud.stderr
