"""Pack tokenised documents into fixed-length training sequences.

Each document is framed as <bos> text <eos> and the stream is cut into blocks of seq_len
tokens. A block may span a document boundary; the bos/eos frame tells the model where one
document ends, as in the LLaMA and BitNet pretraining setups (no cross-document masking).

The framed stream is what the token cache stores on disk (data/token_cache.py); `TokenBlocks`
cuts a stream into blocks without copying it, so a batch reads only its own blocks and a
memory-mapped corpus of any size costs no memory until it is read.
"""
import itertools

import numpy as np
import torch


def frame_documents(token_lists: list[list[int]], bos_id: int, eos_id: int, dtype=np.int64) -> np.ndarray:
    """<bos> ids <eos> for every document, concatenated into one stream."""
    lengths = np.fromiter((len(ids) for ids in token_lists), dtype=np.int64, count=len(token_lists))
    starts = np.cumsum(lengths + 2) - (lengths + 2)
    stream = np.empty(int(lengths.sum()) + 2 * len(token_lists), dtype=dtype)
    is_text = np.ones(len(stream), dtype=bool)
    is_text[starts] = is_text[starts + lengths + 1] = False
    stream[starts], stream[starts + lengths + 1] = bos_id, eos_id
    stream[is_text] = np.fromiter(itertools.chain.from_iterable(token_lists), dtype=dtype, count=int(lengths.sum()))
    return stream


class TokenBlocks:
    """A framed token stream seen as (len, seq_len) blocks, the ragged tail dropped; indexing
    copies only the rows asked for (a view of a memmap reads just those pages)."""

    def __init__(self, stream: np.ndarray, seq_len: int):
        n_blocks = len(stream) // seq_len
        self.rows = stream[: n_blocks * seq_len].reshape(n_blocks, seq_len)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, indices: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.rows[np.asarray(indices)].astype(np.int64))


def pack_documents(token_lists: list[list[int]], seq_len: int, bos_id: int, eos_id: int) -> torch.Tensor:
    """Every block of the framed documents, in memory: for texts small enough to hold whole."""
    blocks = TokenBlocks(frame_documents(token_lists, bos_id, eos_id), seq_len)
    if len(blocks) == 0:
        n_tokens = sum(len(ids) + 2 for ids in token_lists)
        raise ValueError(f"only {n_tokens} tokens: fewer than one sequence of seq_len={seq_len}")
    return blocks[torch.arange(len(blocks))]
