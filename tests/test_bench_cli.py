"""`bitnet-train bench NAME`: every benchmark is reachable and parses its own options."""
import pytest

from bitnet_train.cli import bench_main


@pytest.mark.parametrize("name", ["train", "kernels", "engine", "cuda"])
def test_every_benchmark_answers_help(name, capsys):
    with pytest.raises(SystemExit) as exit_:
        bench_main([name, "--help"])
    assert exit_.value.code == 0
    assert "usage" in capsys.readouterr().out


def test_an_unknown_benchmark_is_named():
    with pytest.raises(SystemExit, match="unknown benchmark 'gpu'.*cuda"):
        bench_main(["gpu"])
