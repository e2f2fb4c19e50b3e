"""BatchStream: which examples each rank trains on at each step, across epochs and resumes."""
import pytest
import torch

from bitnet_train.data.stream import BatchStream


def global_batches(stream: BatchStream, steps: int) -> list[list[int]]:
    """Each step's examples over all ranks, in micro-batch order (rank r holds every world-th one)."""
    out = []
    for _ in range(steps):
        state = stream.state_dict()
        per_rank = []
        for rank in range(stream.world):
            stream.load_state_dict(state)  # every rank draws the same step
            per_rank.append(stream.next_step(rank))
        micro = [per_rank[i % stream.world][i // stream.world] for i in range(stream.accum * stream.world)]
        out.append(torch.cat(micro).tolist())
    return out


def test_an_epoch_visits_each_example_at_most_once_and_drops_the_ragged_tail():
    stream = BatchStream(num_examples=10, micro_batch=2, grad_accum=2, world=1, seed=0)
    assert stream.steps_per_epoch == 2
    first_epoch = [i for batch in global_batches(stream, 2) for i in batch]
    assert len(first_epoch) == len(set(first_epoch)) == 8


def test_the_next_epoch_starts_a_new_order():
    stream = BatchStream(num_examples=10, micro_batch=2, grad_accum=2, world=1, seed=0)
    batches = global_batches(stream, 4)
    assert stream.state_dict() == {"epoch": 1, "offset": 8, "global_batch": 4}
    first, second = batches[0] + batches[1], batches[2] + batches[3]
    assert len(set(second)) == 8 and first != second


def test_the_order_depends_on_the_seed():
    a = global_batches(BatchStream(100, 4, 1, 1, seed=0), 3)
    b = global_batches(BatchStream(100, 4, 1, 1, seed=1), 3)
    assert a != b


@pytest.mark.parametrize("steps_before", [0, 1, 2, 3, 5])  # 2 and 5: at and past an epoch boundary
def test_a_stream_resumed_from_its_state_continues_exactly(steps_before):
    uninterrupted = BatchStream(10, 2, 2, 1, seed=3)
    expected = global_batches(uninterrupted, steps_before + 3)[steps_before:]
    first = BatchStream(10, 2, 2, 1, seed=3)
    global_batches(first, steps_before)
    resumed = BatchStream(10, 2, 2, 1, seed=3)
    resumed.load_state_dict(first.state_dict())
    assert global_batches(resumed, 3) == expected


@pytest.mark.parametrize("world, accum", [(2, 1), (4, 1), (2, 2), (4, 2)])
def test_one_and_several_ranks_see_the_same_global_batches(world, accum):
    ranks = BatchStream(64, micro_batch=2, grad_accum=accum, world=world, seed=7)
    one = BatchStream(64, micro_batch=2, grad_accum=accum * world, world=1, seed=7)
    assert global_batches(ranks, 10) == global_batches(one, 10)  # 10 steps cross epoch boundaries


def test_the_state_does_not_depend_on_the_split_of_the_global_batch():
    two_ranks = BatchStream(64, micro_batch=4, grad_accum=1, world=2, seed=7)
    one_rank = BatchStream(64, micro_batch=4, grad_accum=2, world=1, seed=7)
    global_batches(two_ranks, 5)
    global_batches(one_rank, 5)
    assert two_ranks.state_dict() == one_rank.state_dict()


def test_a_checkpoint_from_two_ranks_resumes_on_one_rank_with_twice_the_accumulation():
    two_ranks = BatchStream(64, micro_batch=4, grad_accum=1, world=2, seed=7)
    expected = global_batches(BatchStream(64, 4, 1, 2, seed=7), 9)[5:]
    global_batches(two_ranks, 5)
    one_rank = BatchStream(64, micro_batch=4, grad_accum=2, world=1, seed=7)
    one_rank.load_state_dict(two_ranks.state_dict())
    assert global_batches(one_rank, 4) == expected


def test_resuming_with_another_global_batch_is_refused():
    saved = BatchStream(64, micro_batch=4, grad_accum=1, world=2, seed=7).state_dict()
    halved = BatchStream(64, micro_batch=4, grad_accum=1, world=1, seed=7)
    with pytest.raises(ValueError, match="global batches of 8 examples, this run has 4"):
        halved.load_state_dict(saved)


def test_a_global_batch_larger_than_the_data_is_refused():
    with pytest.raises(ValueError, match="larger than the 10 training examples"):
        BatchStream(10, micro_batch=4, grad_accum=2, world=2, seed=0)
