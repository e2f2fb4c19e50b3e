"""Sequence packing: documents framed <bos> ids <eos>, one stream, cut into seq_len blocks."""
import numpy as np
import pytest
import torch

from bitnet_train.data.token_blocks import TokenBlocks, frame_documents, pack_documents

BOS, EOS = 1, 2


def packed_one_token_at_a_time(docs: list[list[int]], seq_len: int) -> torch.Tensor:
    """The plainest reading of the framing rule, to compare against."""
    stream = []
    for ids in docs:
        stream += [BOS, *ids, EOS]
    n = len(stream) // seq_len
    return torch.tensor(stream[: n * seq_len]).view(n, seq_len)


def test_each_document_is_framed_by_bos_and_eos_in_order():
    assert frame_documents([[5, 6], [7]], BOS, EOS).tolist() == [BOS, 5, 6, EOS, BOS, 7, EOS]


def test_an_empty_document_keeps_its_frame_and_no_documents_give_no_tokens():
    assert frame_documents([[], [9]], BOS, EOS).tolist() == [BOS, EOS, BOS, 9, EOS]
    assert len(frame_documents([], BOS, EOS)) == 0


def test_frame_writes_the_dtype_asked_for():
    assert frame_documents([[60000]], BOS, EOS, np.uint16).dtype == np.uint16


def test_blocks_span_document_boundaries_and_drop_the_ragged_tail():
    blocks = pack_documents([[5, 6, 7], [8, 9]], seq_len=3, bos_id=BOS, eos_id=EOS)
    assert blocks.tolist() == [[BOS, 5, 6], [7, EOS, BOS], [8, 9, EOS]]
    assert pack_documents([[5, 6, 7], [8]], 5, BOS, EOS).tolist() == [[BOS, 5, 6, 7, EOS]]  # BOS, 8, EOS dropped


@pytest.mark.parametrize("seq_len", [1, 2, 7, 32])
def test_packing_equals_the_plain_rule_on_random_documents(seq_len):
    g = torch.Generator().manual_seed(seq_len)
    docs = [torch.randint(3, 4096, (int(n),), generator=g).tolist() for n in torch.randint(0, 40, (50,), generator=g)]
    assert torch.equal(pack_documents(docs, seq_len, BOS, EOS), packed_one_token_at_a_time(docs, seq_len))


def test_fewer_tokens_than_one_sequence_fail_naming_both_numbers():
    with pytest.raises(ValueError, match="only 5 tokens: fewer than one sequence of seq_len=8"):
        pack_documents([[5, 6, 7]], 8, BOS, EOS)


def test_indexing_returns_the_rows_asked_for_in_that_order_as_int64():
    blocks = TokenBlocks(np.arange(20, dtype=np.uint16), seq_len=4)
    assert len(blocks) == 5
    got = blocks[torch.tensor([3, 0, 3])]
    assert got.dtype == torch.int64
    assert got.tolist() == [[12, 13, 14, 15], [0, 1, 2, 3], [12, 13, 14, 15]]


def test_blocks_of_a_memory_mapped_stream_equal_those_in_memory(tmp_path):
    stream = frame_documents([list(range(3, 40)), list(range(100, 171))], BOS, EOS, np.uint16)
    stream.tofile(tmp_path / "train.bin")
    mapped = np.memmap(tmp_path / "train.bin", dtype=np.uint16, mode="r", shape=(len(stream),))
    idx = torch.tensor([4, 1, 0])
    assert torch.equal(TokenBlocks(mapped, 16)[idx], TokenBlocks(stream, 16)[idx])
