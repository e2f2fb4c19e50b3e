"""Pretraining on a data stream (data.streaming=true): blocks packed as the stream is read, the
position saved in checkpoints, resumed exactly; local files stand in for a hub dataset."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import load_dataset
from safetensors.torch import load_file

from bitnet_train.config import ConfigError, compose_config
from bitnet_train.data import token_stream
from bitnet_train.data.sources import DataError
from bitnet_train.data.token_blocks import frame_documents
from bitnet_train.data.token_stream import FramedStream, StreamedBatches
from bitnet_train.pipeline import run_pipeline, validate_run
from bitnet_train.stages.pretrain import PretrainStage

from test_token_cache import caches, data_args, run_cli, stage, wait_until

WORDS = "the cat sat on a mat while the dog slept by the door and rain fell".split()


def write_parts(directory: Path, parts: int, rows: int) -> list[Path]:
    """jsonl files of documents of 3 to 40 words; every 13th row has no text (skipped, counted)."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for p in range(parts):
        lines = []
        for i in range(rows):
            words = " ".join(rng.choice(WORDS, rng.integers(3, 40)))
            lines.append(json.dumps({"text": "" if i % 13 == 12 else f"part {p} row {i}: {words}"}))
        paths.append(directory / f"part-{p}.jsonl")
        paths[-1].write_text("\n".join(lines) + "\n")
    return paths


def documents(paths: list[Path]) -> list[str]:
    return [t for p in paths for t in (json.loads(line)["text"] for line in p.read_text().splitlines()) if t]


def encode(texts: list[str]) -> list[list[int]]:
    """A stand-in tokenizer: one id per character."""
    return [[ord(c) % 251 + 3 for c in text] for text in texts]


def framed(paths: list[Path], is_train=lambda i: True, max_bad: float = 0.1) -> FramedStream:
    dataset = load_dataset("json", data_files=[str(p) for p in paths], split="train", streaming=True)
    return FramedStream(dataset, "text", encode, 1, 2, is_train, max_bad)


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(token_stream, "CHUNK_ROWS", 7)  # many chunks, and some end inside a file


def test_the_stream_is_the_framed_training_documents_in_order_epoch_after_epoch(tmp_path, small_chunks):
    paths = write_parts(tmp_path, 2, 30)
    docs = documents(paths)
    held_out = lambda i: i % 5 != 4  # noqa: E731
    epoch = frame_documents(encode([d for i, d in enumerate(docs) if held_out(i)]), 1, 2)
    got = framed(paths, held_out).take(2 * len(epoch) + 100)
    assert np.array_equal(got, np.concatenate([epoch, epoch, epoch[:100]]))


@pytest.mark.parametrize("step_tokens", [37, 400])
def test_a_stream_resumed_from_its_state_continues_exactly(tmp_path, small_chunks, step_tokens):
    paths = write_parts(tmp_path, 3, 20)
    whole = framed(paths).take(4000)  # about two epochs
    stream, states = framed(paths), []
    for start in range(0, 4000 - step_tokens, step_tokens):
        states.append((start, json.loads(json.dumps(stream.state_dict()))))  # what a checkpoint keeps
        assert np.array_equal(stream.take(step_tokens), whole[start : start + step_tokens]), start
    for start, state in states[:: max(1, len(states) // 25)]:  # each resume opens the dataset again
        resumed = framed(paths)  # as a new process would
        resumed.load_state_dict(state)
        assert np.array_equal(resumed.take(step_tokens), whole[start : start + step_tokens]), start


def test_one_and_two_ranks_see_the_same_global_batches_in_disjoint_shares(tmp_path, small_chunks):
    paths = write_parts(tmp_path, 2, 30)
    one = StreamedBatches(framed(paths), 16, micro_batch=2, grad_accum=4, world=1)
    two = [StreamedBatches(framed(paths), 16, micro_batch=2, grad_accum=2, world=2) for _ in range(2)]
    for _ in range(6):
        whole = torch.cat([one[i] for i in one.next_step(0)])
        shares = [torch.cat([two[r][i] for i in two[r].next_step(r)]) for r in range(2)]
        assert not set(map(tuple, shares[0].tolist())) & set(map(tuple, shares[1].tolist()))
        assert sorted(torch.cat(shares).tolist()) == sorted(whole.tolist())
    assert one.state_dict() == two[0].state_dict() == two[1].state_dict()


@pytest.mark.slow
def test_two_ranks_share_the_tokenizing_and_take_the_one_rank_stream(tmp_path, monkeypatch):
    """tests/token_stream_worker.py on 2 gloo ranks: each tokenizes half of every chunk's texts and
    both take exactly the stream that one process takes."""
    import token_stream_worker as worker

    monkeypatch.setattr(token_stream, "CHUNK_ROWS", worker.CHUNK_ROWS)
    paths = write_parts(tmp_path / "data", 2, 30)
    encoded = []
    reference = FramedStream(load_dataset("json", data_files=[str(p) for p in paths], split="train", streaming=True),
                             "text", lambda texts: encoded.extend(texts) or worker.encode(texts), 1, 2,
                             worker.is_train, 0.1)
    n_tokens = 1500  # within the first epoch, so that no text is encoded twice
    want = reference.take(n_tokens)
    root = Path(__file__).resolve().parents[1]
    path = os.pathsep.join([str(root), *filter(None, [os.environ.get("PYTHONPATH")])])
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           str(root / "tests" / "token_stream_worker.py"), str(tmp_path), str(n_tokens),
                           *map(str, paths)],
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path},
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    shares = [json.loads((tmp_path / f"encoded{r}.json").read_text()) for r in range(2)]
    for r in range(2):
        assert np.array_equal(np.load(tmp_path / f"tokens{r}.npy"), want)
    assert not set(shares[0]) & set(shares[1])
    assert sorted(shares[0] + shares[1]) == sorted(encoded)
    assert abs(len(shares[0]) - len(shares[1])) <= len(encoded) // worker.CHUNK_ROWS + 1  # half each


def test_resuming_with_another_global_batch_is_refused(tmp_path):
    paths = write_parts(tmp_path, 1, 10)
    state = StreamedBatches(framed(paths), 16, 2, 2, 1).state_dict()
    with pytest.raises(ConfigError, match="global batches of 4 .* this run has 8"):
        StreamedBatches(framed(paths), 16, 2, 4, 1).load_state_dict(state)


def test_rows_without_text_above_the_threshold_stop_the_stream_naming_the_field(tmp_path, small_chunks):
    paths = write_parts(tmp_path, 1, 30)  # 2 of 30 rows have no text: 6.7%
    assert len(framed(paths, max_bad=0.1).take(500)) == 500
    with pytest.raises(DataError, match="lack a non-empty text field 'text'.*max_bad_row_fraction=0.01"):
        framed(paths, max_bad=0.01).take(5000)


def streaming_args(tmp_path: Path, paths: list[Path], *more: str) -> list[str]:
    return [*data_args(tmp_path, *paths), "stages.pretrain.data.streaming=true", "pipeline=[pretrain]",
            "stages.pretrain.data.max_bad_row_fraction=0.1", *more]


def test_the_validation_split_is_cached_from_the_held_out_documents_of_the_first_rows(tmp_path):
    paths = write_parts(tmp_path / "data", 1, 200)
    args = streaming_args(tmp_path, paths)
    with pytest.raises(DataError, match="needs data.max_documents"):
        stage(args)
    s = stage([*args, "stages.pretrain.data.max_documents=130"])
    index = json.loads((caches(tmp_path)[0] / "index.json").read_text())
    usable = sum(1 for line in paths[0].read_text().splitlines()[:130] if json.loads(line)["text"])
    assert index["splits"]["validation"]["documents"] == usable // 20  # every 20th (validation_fraction 0.05)
    assert index["splits"]["train"]["tokens"] == 0 and s.train_size is None and s.eval_size > 0
    with pytest.raises(ConfigError, match="max_steps=0 must be > 0 with data.streaming=true"):
        validate_run(compose_config([*args, "stages.pretrain.max_steps=0"]))


def test_a_streamed_hub_dataset_with_its_own_validation_split(tmp_path):
    hub = tmp_path / "hub"
    write_parts(hub, 1, 60)[0].rename(hub / "train.jsonl")
    write_parts(tmp_path / "v", 1, 40)[0].rename(hub / "validation.jsonl")
    s = stage([*data_args(tmp_path), "stages.pretrain.data.source=hub", f"stages.pretrain.data.name={hub}",
               "stages.pretrain.data.streaming=true", "stages.pretrain.data.max_documents=30",
               "stages.pretrain.data.max_bad_row_fraction=0.1",
               "stages.pretrain.data.validation_split=validation"])
    index = json.loads((caches(tmp_path)[0] / "index.json").read_text())
    assert index["splits"]["validation"]["documents"] == 28  # rows 13 and 26 of the first 30 have no text
    assert isinstance(s, PretrainStage) and s.tokens.is_train(19)  # a named split: nothing held out


# The child runs with small chunks, so that a resume starts inside a file, past chunk boundaries.
SMALL_CHUNKS = (
    "import sys\n"
    "from bitnet_train.data import token_stream\n"
    "token_stream.CHUNK_ROWS = 16\n"
    "from bitnet_train.cli import main\n"
    "sys.argv = ['bitnet-train', *sys.argv[1:]]\n"
    "main()\n"
)


def newest(checkpoints: Path) -> int:
    return max(int(p.name.split("_")[1]) for p in checkpoints.iterdir() if ".tmp-" not in p.name)


def losses(run: Path) -> list[tuple]:
    rows = [json.loads(line) for line in (run / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r.get("train/loss"), r.get("val/loss")) for r in rows]


@pytest.mark.slow
def test_a_streamed_run_stopped_by_sigterm_and_by_kill_9_resumes_to_the_uninterrupted_run(tmp_path, monkeypatch):
    paths = write_parts(tmp_path / "data", 2, 120)
    more = ["stages.pretrain.data.max_documents=100", "stages.pretrain.max_steps=12", "stages.pretrain.save_every=2",
            "stages.pretrain.eval_every=4", "logging.log_every=1", "runtime.num_threads=1"]
    reference = tmp_path / "reference"
    monkeypatch.setattr(token_stream, "CHUNK_ROWS", 16)
    run_pipeline(compose_config(streaming_args(reference, paths, *more)))

    args = streaming_args(tmp_path, paths, *more)
    metrics = tmp_path / "run" / "pretrain" / "metrics.jsonl"
    checkpoints = tmp_path / "run" / "pretrain" / "checkpoints"
    logged = lambda n: lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= n  # noqa: E731
    proc = run_cli(args, code=SMALL_CHUNKS)
    wait_until(logged(3), proc)
    proc.send_signal(signal.SIGTERM)  # saves at the end of the step and stops
    assert proc.wait(timeout=300) == 128 + signal.SIGTERM, proc.stderr.read()[-3000:]
    stopped_at = newest(checkpoints)

    proc = run_cli(args, code=SMALL_CHUNKS)
    wait_until(lambda: newest(checkpoints) >= stopped_at + 4, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    done = run_cli(args, code=SMALL_CHUNKS)
    assert done.wait(timeout=600) == 0, done.stderr.read()[-3000:]
    assert losses(tmp_path / "run") == losses(reference / "run")
    a = load_file(tmp_path / "run" / "pretrain" / "final" / "model.safetensors")
    b = load_file(reference / "run" / "pretrain" / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
