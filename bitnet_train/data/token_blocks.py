"""Pack tokenised documents into fixed-length training sequences.

Each document is framed as <bos> text <eos> and the stream is cut into blocks of seq_len
tokens. A block may span a document boundary; the bos/eos frame tells the model where one
document ends, as in the LLaMA and BitNet pretraining setups (no cross-document masking).
"""
import torch


def pack_documents(token_lists: list[list[int]], seq_len: int, bos_id: int, eos_id: int) -> torch.Tensor:
    stream = []
    for ids in token_lists:
        stream.extend([bos_id, *ids, eos_id])
    n_blocks = len(stream) // seq_len
    if n_blocks == 0:
        raise ValueError(f"only {len(stream)} tokens: fewer than one sequence of seq_len={seq_len}")
    return torch.tensor(stream[: n_blocks * seq_len], dtype=torch.long).view(n_blocks, seq_len)
