"""One rank of tests/test_token_stream.py's shared-tokenizing check (started with torchrun, gloo, CPU).

Each rank opens the train stream as the pretraining stage does (stages/pretrain.train_stream, here
with a stand-in tokenizer), takes the first N tokens and writes them, with the texts it encoded.

    torchrun --nproc_per_node 2 tests/token_stream_worker.py OUT_DIR N FILE...
"""
import json
import sys
from pathlib import Path

from types import SimpleNamespace

import numpy as np
import torch.distributed as dist

from bitnet_train.config import DataConfig
from bitnet_train.data import token_stream
from bitnet_train.data.builtin_text import held_out_every
from bitnet_train.stages import pretrain

CHUNK_ROWS = 7  # many chunks, as the single-process reference uses
VALIDATION_FRACTION = 0.2


def encode(texts: list[str]) -> list[list[int]]:
    """test_token_stream's stand-in tokenizer: one id per character."""
    return [[ord(c) % 251 + 3 for c in text] for text in texts]


def is_train(i: int) -> bool:
    """The stream's held-out rule (every n-th usable document is validation)."""
    every = held_out_every(VALIDATION_FRACTION)
    return i % every != every - 1


def main() -> None:
    out, n_tokens, paths = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
    dist.init_process_group("gloo")
    token_stream.CHUNK_ROWS = CHUNK_ROWS
    encoded = []

    def counting_encode(texts: list[str]) -> list[list[int]]:
        encoded.extend(texts)
        return encode(texts)

    pretrain.batch_encoder = lambda tokenizer: counting_encode
    data = DataConfig(source="files", files=paths, streaming=True, validation_fraction=VALIDATION_FRACTION,
                      max_bad_row_fraction=0.1)
    stream = pretrain.train_stream(data, SimpleNamespace(bos_token_id=1, eos_token_id=2))
    rank = dist.get_rank()
    np.save(out / f"tokens{rank}.npy", stream.take(n_tokens))
    (out / f"encoded{rank}.json").write_text(json.dumps(encoded))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
