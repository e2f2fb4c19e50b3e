"""The token cache: built once, reused, rebuilt when the data or the tokenizer changes, never read
when partial; pretraining batches are slices of it, on one rank or many."""
import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bitnet_train.config import compose_config
from bitnet_train.data import token_cache
from bitnet_train.data.sources import DataError
from bitnet_train.data.stream import BatchStream
from bitnet_train.data.tokenizer import load_tokenizer
from bitnet_train.engine.perplexity import read_documents, token_blocks
from bitnet_train.pipeline import run_pipeline
from bitnet_train.stages.pretrain import PretrainStage

from conftest import TINY

ROOT = Path(__file__).resolve().parent.parent
TEXT = "The quick brown fox jumps over the lazy dog, and the dog sleeps on. "


def data_args(tmp_path: Path, *files: Path) -> list[str]:
    args = [*TINY, f"stages.pretrain.data.cache_dir={tmp_path / 'cache'}", f"output_dir={tmp_path / 'run'}"]
    if files:
        args += ["stages.pretrain.data.source=files", f"stages.pretrain.data.files=[{','.join(map(str, files))}]"]
    return args


def stage(args: list[str], tokenizer_args: list[str] = ()) -> PretrainStage:
    cfg = compose_config([*args, *tokenizer_args])
    return PretrainStage(cfg.stages["pretrain"], load_tokenizer(cfg.tokenizer), cfg.seed, 4096)


def all_blocks(s: PretrainStage, split: str) -> torch.Tensor:
    return s.batch(split, torch.arange(len(s.blocks[split])))["input_ids"]


def write_rows(path: Path, n: int, words: int = 30) -> Path:
    text = TEXT * (words // 14 + 1)
    path.write_text("".join(json.dumps({"text": f"document {i}: {text}"}) + "\n" for i in range(n)))
    return path


def caches(tmp_path: Path) -> list[Path]:
    """The whole caches (a partial one is named KEY.tmp-PID)."""
    dirs = (p for p in (tmp_path / "cache").iterdir() if p.is_dir() and p.name != "file_hashes")
    return sorted(p for p in dirs if ".tmp-" not in p.name)


def test_builtin_corpus_gives_the_blocks_of_the_in_memory_path_and_of_the_engines_perplexity(tmp_path):
    s = stage(data_args(tmp_path))
    tokenizer = load_tokenizer(compose_config(data_args(tmp_path)).tokenizer)
    assert torch.equal(all_blocks(s, "validation"), token_blocks(tokenizer, read_documents("builtin"), 32))
    from bitnet_train.data.builtin_text import builtin_documents, split_every_nth
    from bitnet_train.data.token_blocks import pack_documents

    train_docs = split_every_nth(builtin_documents(), 0.05)[0]
    ids = tokenizer(train_docs, add_special_tokens=False)["input_ids"]
    assert torch.equal(all_blocks(s, "train"), pack_documents(ids, 32, tokenizer.bos_token_id, tokenizer.eos_token_id))


def test_a_second_run_reuses_the_cache_without_tokenizing(tmp_path, monkeypatch, caplog):
    first = all_blocks(stage(data_args(tmp_path)), "train")
    monkeypatch.setattr(token_cache, "build", lambda *a: pytest.fail("the cache was built again"))
    with caplog.at_level("INFO"):
        again = stage(data_args(tmp_path))
    assert "token cache reused" in caplog.text
    assert torch.equal(all_blocks(again, "train"), first)
    assert len(caches(tmp_path)) == 1


def test_the_cache_is_uint16_for_a_small_vocabulary_and_ignores_seq_len(tmp_path):
    s32 = stage(data_args(tmp_path))
    s64 = stage([*data_args(tmp_path), "stages.pretrain.data.seq_len=64"])
    assert s32.blocks["train"].rows.dtype.name == "uint16"
    n = len(s64.blocks["train"]) * 64
    assert torch.equal(all_blocks(s64, "train").flatten(), all_blocks(s32, "train").flatten()[:n])
    assert len(caches(tmp_path)) == 1


def test_a_changed_file_is_never_served_stale_ids(tmp_path):
    data = write_rows(tmp_path / "rows.jsonl", 60)
    before = all_blocks(stage(data_args(tmp_path, data)), "train")
    with open(data, "a") as f:
        f.write(json.dumps({"text": "one more document, appended later " * 5}) + "\n")
    after = all_blocks(stage(data_args(tmp_path, data)), "train")
    assert len(caches(tmp_path)) == 2
    assert len(after) > len(before)


def test_a_changed_tokenizer_builds_its_own_cache(tmp_path):
    a = stage(data_args(tmp_path))
    b = stage(data_args(tmp_path), ["tokenizer.vocab_size=512"])
    assert len(caches(tmp_path)) == 2
    assert len(b.blocks["train"]) > len(a.blocks["train"])  # a smaller vocabulary needs more tokens


def test_a_partial_cache_left_by_a_crash_is_removed_and_rebuilt_never_read(tmp_path, caplog):
    whole = all_blocks(stage(data_args(tmp_path)), "train")
    built = caches(tmp_path)[0]
    partial = built.with_name(f"{built.name}.tmp-999999")  # what a build killed half-way leaves
    built.rename(partial)
    (partial / "index.json").unlink()
    with open(partial / "train.bin", "r+b") as f:
        f.truncate(100)
    with caplog.at_level("WARNING"):
        again = stage(data_args(tmp_path))
    assert "removing the partial token cache" in caplog.text
    assert not partial.exists() and caches(tmp_path) == [built]
    assert torch.equal(all_blocks(again, "train"), whole)


def test_a_cache_built_by_another_tokenizer_is_refused(tmp_path):
    stage(data_args(tmp_path))
    index = caches(tmp_path)[0] / "index.json"
    saved = json.loads(index.read_text())
    saved["tokenizer"] = {"name": "some/other-tokenizer", "fingerprint": "0" * 64}
    index.write_text(json.dumps(saved))
    with pytest.raises(DataError, match="built by another tokenizer .some/other-tokenizer.; delete that directory"):
        stage(data_args(tmp_path))


def test_disk_full_while_writing_removes_the_partial_cache_and_keeps_older_ones(tmp_path, monkeypatch):
    older = stage(data_args(tmp_path))
    data = write_rows(tmp_path / "rows.jsonl", 60)
    real = token_cache.frame_documents

    def full_disk(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(token_cache, "frame_documents", full_disk)
    with pytest.raises(DataError, match="the disk is full.*older caches are intact.*set data.cache_dir"):
        stage(data_args(tmp_path, data))
    assert len(caches(tmp_path)) == 1 and not list((tmp_path / "cache").glob("*.tmp-*"))
    assert torch.equal(all_blocks(stage(data_args(tmp_path)), "train"), all_blocks(older, "train"))
    monkeypatch.setattr(token_cache, "frame_documents", real)  # space freed: the same command succeeds
    assert len(stage(data_args(tmp_path, data)).blocks["train"]) > 0


def test_undecodable_rows_are_counted_and_skipped_below_the_threshold(tmp_path, caplog):
    data = write_rows(tmp_path / "rows.jsonl", 199)
    data.write_bytes(b'{"text": "caf\xe9 latin-1, not UTF-8"}\n' + data.read_bytes())  # first: start-up checks see it
    cfg = compose_config([*data_args(tmp_path, data), "stages.pretrain.data.max_bad_row_fraction=0.01",
                          "stages.pretrain.max_steps=1", "stages.pretrain.eval_every=1"])
    with caplog.at_level("WARNING"):
        run_pipeline(cfg)
    assert "1 of 200 rows (0.5%) hold bytes that are not UTF-8; skipped them" in caplog.text


def test_undecodable_files_above_the_threshold_fail_and_name_it(tmp_path):
    good = [tmp_path / f"doc{i}.txt" for i in range(30)]
    for p in good:
        p.write_text(TEXT * 10)
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9 ".encode("latin-1") * 100)
    with pytest.raises(DataError, match=r"1 of 31 rows \(3.2%\) hold bytes that are not UTF-8: above data.max_bad_row"):
        stage(data_args(tmp_path, *good, bad))


def test_one_short_line_names_the_tokens_one_sequence_needs(tmp_path):
    (tmp_path / "short.txt").write_text("hello world\n")
    cfg = compose_config([*data_args(tmp_path, tmp_path / "short.txt")])
    with pytest.raises(DataError, match=r"the train split holds \d+ tokens \(1 documents.*needs at least 32 tokens"):
        run_pipeline(cfg)
    assert not (tmp_path / "run" / "pretrain").exists()


def test_three_short_documents_cannot_fill_a_validation_split(tmp_path):
    data = write_rows(tmp_path / "rows.jsonl", 3, words=200)
    with pytest.raises(DataError, match="validation split is empty.*every 20th document.*at least 20 documents"):
        stage(data_args(tmp_path, data))


def test_a_hub_dataset_with_its_own_validation_split(tmp_path):
    hub = tmp_path / "hub"
    hub.mkdir()
    write_rows(hub / "train.jsonl", 40)
    write_rows(hub / "validation.jsonl", 5)
    s = stage([*data_args(tmp_path), "stages.pretrain.data.source=hub", f"stages.pretrain.data.name={hub}",
               "stages.pretrain.data.validation_split=validation"])
    index = json.loads((caches(tmp_path)[0] / "index.json").read_text())
    assert index["splits"]["validation"]["documents"] == 5 and index["splits"]["train"]["documents"] == 40
    assert index["held_out_every"] is None and s.eval_size > 0


def test_two_ranks_read_disjoint_shares_of_the_same_global_batch(tmp_path):
    s = stage(data_args(tmp_path))
    one = BatchStream(s.train_size, micro_batch=4, grad_accum=2, world=1, seed=7)
    two = [BatchStream(s.train_size, micro_batch=4, grad_accum=1, world=2, seed=7) for _ in range(2)]
    for _ in range(3):
        whole = torch.cat(one.next_step(0))
        shares = [torch.cat(two[rank].next_step(rank)) for rank in range(2)]
        assert not set(shares[0].tolist()) & set(shares[1].tolist())
        assert sorted(torch.cat(shares).tolist()) == sorted(whole.tolist())
        assert torch.equal(s.batch("train", torch.cat(shares))["input_ids"].sort(0).values,
                           s.batch("train", whole)["input_ids"].sort(0).values)


# kill -9: the build sleeps between batches so that the kill lands inside it (the files are real).
SLOW_BUILD = (
    "import sys, time\n"
    "from bitnet_train.data import token_cache\n"
    "token_cache.BATCH_CHARS = 2000\n"
    "real = token_cache.frame_documents\n"
    "token_cache.frame_documents = lambda *a: (time.sleep(0.2), real(*a))[1]\n"
    "from bitnet_train.cli import main\n"
    "sys.argv = ['bitnet-train', *sys.argv[1:]]\n"
    "main()\n"
)


def run_cli(args: list[str], code: str = "from bitnet_train.cli import main; import sys; sys.argv[0] = 'x'; main()"
            ) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-c", code, *args], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_until(condition, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None and not condition():
        time.sleep(0.02)
    assert proc.poll() is None, f"the run ended before the kill: {proc.stderr.read()[-3000:]}"


@pytest.mark.slow
def test_kill_9_during_the_cache_build_and_during_training_then_the_same_command_finishes_exactly(tmp_path):
    data = write_rows(tmp_path / "rows.jsonl", 400)
    steps = ["stages.pretrain.max_steps=8", "stages.pretrain.save_every=2", "stages.pretrain.eval_every=4",
             "logging.log_every=1", "runtime.num_threads=1"]
    reference = tmp_path / "reference"
    reference.mkdir()
    run_pipeline(compose_config([*data_args(reference, data), *steps]))

    args = [*data_args(tmp_path, data), *steps]
    proc = run_cli(args, code=SLOW_BUILD)
    wait_until(lambda: any(p.stat().st_size > 0 for p in (tmp_path / "cache").glob("*.tmp-*/train.bin")), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert list((tmp_path / "cache").glob("*.tmp-*")) and not caches(tmp_path)  # the partial cache is left behind

    proc = run_cli(args)
    metrics = tmp_path / "run" / "pretrain" / "metrics.jsonl"
    wait_until(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 4, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    done = run_cli(args)
    assert done.wait(timeout=600) == 0, done.stderr.read()[-3000:]
    assert not list((tmp_path / "cache").glob("*.tmp-*")) and len(caches(tmp_path)) == 1
    a = load_file(tmp_path / "run" / "pretrain" / "final" / "model.safetensors")
    b = load_file(reference / "run" / "pretrain" / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
