"""The real launch/slurm/train.sbatch on a machine without SLURM: stand-ins for sbatch, srun,
scancel and scontrol (tests/slurm_stand_ins/) on PATH, 2 "nodes" of 1 CPU rank each, the tiny model.

A notice (SIGUSR1) sent as `--signal=B:USR1@...` sends it (to the batch shell) or as the plain
form does (to every process of the job's step) makes both ranks save one step and the job
requeue itself once; the requeued job (the script again, same ids) resumes and ends with the
weights of an uninterrupted run, bit for bit. A notice that one node's launcher alone hears stops
both ranks at one step. `scancel --signal=TERM` (twice) saves and does not requeue; REQUEUE=0
turns the requeue off.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from safetensors.torch import load_file

from conftest import TINY

ROOT = Path(__file__).resolve().parent.parent
STAND_INS = ROOT / "tests" / "slurm_stand_ins"
SCRIPT = ROOT / "launch" / "slurm" / "train.sbatch"
MAX_STEPS = 40
OVERRIDES = [*TINY, f"stages.pretrain.max_steps={MAX_STEPS}", "stages.pretrain.save_every=20", "logging.log_every=1"]
NOTICE_EXIT, SCANCEL_EXIT = 128 + signal.SIGUSR1, 128 + signal.SIGTERM

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Job:
    """One run of the batch script through the sbatch stand-in, in `where` (runs/ lands there)."""

    def __init__(self, where: Path, env: dict):
        where.mkdir(parents=True, exist_ok=True)
        if not (where / "launch").exists():
            (where / "launch").symlink_to(ROOT / "launch")  # the script runs from a repository root
        self.where = where
        self.calls = where / "calls"
        self.log = where / f"job-{time.monotonic_ns()}.out"
        self.env = {
            **os.environ,
            "PATH": f"{STAND_INS}:{Path(sys.executable).parent}:{os.environ['PATH']}",
            "ACCELERATE_USE_CPU": "1",  # gloo ranks on the CPU (docs/launch.md)
            "OMP_NUM_THREADS": "1",
            "WANDB_MODE": "disabled",
            "SLURM_NNODES": "2",
            "GPUS_PER_NODE": "1",
            "MAIN_PORT": str(free_port()),
            "SLURM_STAND_IN_DIR": str(where),
            **env,
        }
        with self.log.open("w") as out:
            self.proc = subprocess.Popen([str(STAND_INS / "sbatch"), str(SCRIPT), *OVERRIDES], cwd=where, env=self.env,
                                         stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_for_training(self, run_dir: Path, timeout: float = 300) -> None:
        metrics = run_dir / "pretrain" / "metrics.jsonl"
        deadline = time.monotonic() + timeout
        while not (metrics.exists() and metrics.read_text().strip()):
            assert self.proc.poll() is None, f"the job ended before training:\n{self.output()}"
            assert time.monotonic() < deadline, f"no training step within {timeout} s:\n{self.output()}"
            time.sleep(0.2)

    def step_processes(self) -> list[psutil.Process]:
        """What SLURM calls the job's step: every process under srun (launchers and ranks)."""
        shell = psutil.Process(self.proc.pid)
        srun = next(p for p in shell.children(recursive=True) if "srun" in " ".join(p.cmdline()))
        return srun.children(recursive=True)

    def finish(self, timeout: float = 300) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"the job did not end within {timeout} s:\n{self.output()}")

    def kill(self) -> None:
        """The batch shell and everything under it (the ranks run in sessions of their own)."""
        if self.proc.poll() is None:
            send([*psutil.Process(self.proc.pid).children(recursive=True), psutil.Process(self.proc.pid)], signal.SIGKILL)
            self.proc.wait()

    def output(self) -> str:
        return self.log.read_text()

    def calls_to(self, command: str) -> list[str]:
        calls = self.calls.read_text().splitlines() if self.calls.exists() else []
        return [c for c in calls if c.startswith(command + " ")]

    def requeues(self) -> list[str]:
        return self.calls_to("requeue")

    def scancel(self, *args: str) -> None:
        subprocess.run([str(STAND_INS / "scancel"), *args], env=self.env, check=True)


def send(processes, sig) -> None:
    for p in processes:
        try:
            p.send_signal(sig)
        except psutil.NoSuchProcess:
            pass


def stopped_step(output: str) -> int:
    """The step the run saved on its stop, from rank 0's one line."""
    lines = [line for line in output.splitlines() if line.startswith("bitnet-train: stopped by signal")]
    assert len(lines) == 1, output
    return int(lines[0].split(" at step ")[1].split(";")[0])


def checkpoint_steps(run_dir: Path) -> list[int]:
    return sorted(int(p.name.split("_")[1]) for p in (run_dir / "pretrain" / "checkpoints").glob("step_*"))


def final_weights(run_dir: Path) -> dict:
    return load_file(run_dir / "pretrain" / "final" / "model.safetensors")


@pytest.fixture
def start_job(tmp_path):
    """Starts jobs in tmp_path; a test that fails half-way leaves none of them running."""
    jobs = []

    def start(env: dict) -> Job:
        jobs.append(Job(tmp_path, env))
        return jobs[-1]

    yield start
    for job in jobs:
        job.kill()


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    where = tmp_path_factory.mktemp("uninterrupted")
    job = Job(where, {"SLURM_JOB_ID": "41"})
    assert job.finish() == 0, job.output()
    assert "train.sbatch: training finished" in job.output() and job.requeues() == []
    return where / "runs" / "bitnet-train-41"  # no RUN_NAME: the job id names the run


def assert_saved_on_stop(job: Job, run_dir: Path) -> int:
    step = stopped_step(job.output())
    assert 0 < step < MAX_STEPS
    # Both ranks stopped at that step: one checkpoint, and no rank was left in a collective.
    assert checkpoint_steps(run_dir) == [step]
    assert "Traceback" not in job.output()
    return step


def test_notice_to_the_batch_shell_requeues_an_array_task_that_resumes_bit_for_bit(tmp_path, start_job, uninterrupted):
    ids = {"SLURM_JOB_ID": "507", "SLURM_ARRAY_JOB_ID": "500", "SLURM_ARRAY_TASK_ID": "7", "RUN_NAME": "long"}
    run_dir = tmp_path / "runs" / "long_7"
    job = start_job(ids)
    job.wait_for_training(run_dir)
    job.proc.send_signal(signal.SIGUSR1)  # --signal=B:USR1@300: the batch shell only
    assert job.finish() == 0, job.output()
    step = assert_saved_on_stop(job, run_dir)
    assert job.calls_to("scancel") == ["scancel --signal=USR1 507"]  # the shell handed it to the steps
    assert job.requeues() == ["requeue 500_7"]
    assert "requeued job 500_7, which resumes from runs/long_7; exit 0" in job.output()

    requeued = start_job(ids)  # SLURM starts the same script again under the same ids
    assert requeued.finish() == 0, requeued.output()
    assert f"resumed pretrain from runs/long_7/pretrain/checkpoints/step_{step:08d}" in requeued.output()
    assert requeued.requeues() == ["requeue 500_7"]  # still the one from the notice
    mine, reference = final_weights(run_dir), final_weights(uninterrupted)
    assert mine.keys() == reference.keys()
    for name in mine:
        assert mine[name].equal(reference[name]), name
    records = [json.loads(line) for line in (run_dir / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in records if "train/loss" in r]
    assert train_steps == list(range(1, MAX_STEPS + 1))  # nothing lost, nothing twice


def test_notice_to_the_steps_reaches_every_rank_and_requeues(tmp_path, start_job):
    job = start_job({"SLURM_JOB_ID": "612"})
    run_dir = tmp_path / "runs" / "bitnet-train-612"
    job.wait_for_training(run_dir)
    send(job.step_processes(), signal.SIGUSR1)  # --signal=USR1@300: every process of the step, not the shell
    assert job.finish() == 0, job.output()
    assert_saved_on_stop(job, run_dir)
    assert job.requeues() == ["requeue 612"]
    assert "train.sbatch: SIGUSR1 received" not in job.output()  # the shell heard nothing itself


def test_scancel_signal_term_saves_and_does_not_requeue_even_sent_twice(tmp_path, start_job):
    job = start_job({"SLURM_JOB_ID": "613"})
    run_dir = tmp_path / "runs" / "bitnet-train-613"
    job.wait_for_training(run_dir)
    job.scancel("--signal=TERM", "613")
    time.sleep(0.5)
    job.scancel("--signal=TERM", "613")  # a second one, as launchers and SLURM often send
    assert job.finish() == SCANCEL_EXIT, job.output()
    assert_saved_on_stop(job, run_dir)
    assert job.requeues() == []
    assert "not requeued (only the notice SIGUSR1 requeues)" in job.output()


def test_a_notice_one_node_heard_stops_both_and_requeue_off_keeps_the_job_stopped(tmp_path, start_job):
    job = start_job({"SLURM_JOB_ID": "614", "REQUEUE": "0"})
    run_dir = tmp_path / "runs" / "bitnet-train-614"
    job.wait_for_training(run_dir)
    # Node 1's launcher only (as `kill` to one torchrun would): it hands the signal to its rank, and
    # rank 0, which heard nothing, stops at the same step through should_stop's all-reduce.
    launcher_1 = next(p for p in job.step_processes() if "accelerate_launch.py" in " ".join(p.cmdline())
                      and p.cmdline()[p.cmdline().index("--machine_rank") + 1] == "1")
    launcher_1.send_signal(signal.SIGUSR1)
    assert job.finish() == NOTICE_EXIT, job.output()
    assert_saved_on_stop(job, run_dir)
    assert job.requeues() == []
    assert "not requeued (REQUEUE=0" in job.output()
