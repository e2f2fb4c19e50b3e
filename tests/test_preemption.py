"""StopFlag: a stop signal heard by any rank stops every rank at the same step, and later
signals (during the save, or while the process exits) cannot interrupt the stop."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bitnet_train import preemption
from bitnet_train.checkpoint import verify_manifest
from bitnet_train.preemption import STOP_SIGNALS, StopFlag, listen

from conftest import TINY

ONE_PROCESS = SimpleNamespace(num_processes=1, device=torch.device("cpu"))


@pytest.fixture(autouse=True)
def fresh_process_state():
    """Each test starts as a process that heard nothing, and leaves pytest's handlers as it found them."""
    before = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    preemption._heard.clear()
    yield
    preemption._heard.clear()
    for s, handler in before.items():
        signal.signal(s, handler)


def test_no_signal_no_stop():
    with StopFlag() as stop:
        assert not stop.should_stop(ONE_PROCESS)
        assert stop.signum is None


def test_a_signal_stops_and_names_itself():
    with StopFlag() as stop:
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.should_stop(ONE_PROCESS)
        assert stop.signum == signal.SIGUSR1


def test_the_first_signal_wins_and_a_second_one_does_not_kill():
    with StopFlag() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)  # the default action would end this test process
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.should_stop(ONE_PROCESS) and stop.signum == signal.SIGTERM
    os.kill(os.getpid(), signal.SIGTERM)  # after the block too: the process is on its way out, saved
    assert stop.signum == signal.SIGTERM


def test_a_signal_before_the_loop_stops_it_at_its_first_step():
    listen()  # the CLI, at start-up
    os.kill(os.getpid(), signal.SIGUSR1)  # during data loading
    with StopFlag() as stop:
        assert stop.should_stop(ONE_PROCESS) and stop.signum == signal.SIGUSR1


def test_ctrl_c_outside_a_training_loop_interrupts_at_once():
    signal.signal(signal.SIGINT, signal.default_int_handler)  # Python's own, whatever ran before
    listen()
    with pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(1)  # the handler runs here
    assert preemption._heard == []


def test_handlers_are_restored_after_a_run_without_signal():
    before = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    with StopFlag():
        pass
    assert {s: signal.getsignal(s) for s in STOP_SIGNALS} == before


def _rank(rank: int, init_file: str, heard: list, results):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    acc = SimpleNamespace(num_processes=2, device=torch.device("cpu"))
    answers = []
    with StopFlag() as stop:
        for step in range(3):
            if heard[rank] is not None and step == 1:
                os.kill(os.getpid(), heard[rank])
            answers.append((stop.should_stop(acc), stop.signum))
    results.put((rank, answers))
    dist.destroy_process_group()


def run_two_ranks(tmp_path, heard: list) -> dict:
    ctx = mp.get_context("fork")  # fork: no re-import of torch in the children
    results = ctx.SimpleQueue()
    mp.start_processes(_rank, args=(str(tmp_path / "pg"), heard, results), nprocs=2, start_method="fork")
    return dict(results.get() for _ in range(2))


def test_a_signal_on_one_rank_stops_both_at_the_same_step(tmp_path):
    answers = run_two_ranks(tmp_path, [None, signal.SIGUSR1])
    expected = [(False, None), (True, signal.SIGUSR1), (True, signal.SIGUSR1)]
    assert answers[0] == expected and answers[1] == expected


def test_ranks_that_heard_different_signals_agree_on_one(tmp_path):
    answers = run_two_ranks(tmp_path, [signal.SIGTERM, signal.SIGUSR1])
    assert answers[0][1] == answers[1][1] == (True, max(signal.SIGTERM, signal.SIGUSR1))


@pytest.mark.slow
def test_a_second_sigterm_during_the_save_keeps_the_save_and_the_exit_code(tmp_path):
    root = Path(__file__).resolve().parent.parent
    run, started = tmp_path / "run", tmp_path / "save_started"
    env = {**os.environ, "SAVE_STARTED": str(started), "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    proc = subprocess.Popen([sys.executable, str(root / "tests" / "slow_save_train.py"), *TINY, "stages.pretrain.max_steps=1000",
                             "stages.pretrain.save_every=500", "logging.log_every=1", f"output_dir={run}"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: (run / "pretrain" / "metrics.jsonl").exists(), proc)
        proc.send_signal(signal.SIGTERM)
        wait_for(started.exists, proc)
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:  # inside the save, then on the way out
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.05)
        out, _ = proc.communicate(timeout=10)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, out
    assert "received SIGTERM while stopping: ignored" in out
    step = int(started.read_text())
    verify_manifest(run / "pretrain" / "checkpoints" / f"step_{step:08d}")  # complete, checksums match
    assert f"stopped by signal {int(signal.SIGTERM)} at step {step}" in out


def wait_for(condition, proc, timeout=180):
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the run ended or stalled before the moment to signal it:\n{proc.communicate()[0]}")
        time.sleep(0.05)
