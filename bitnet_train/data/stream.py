"""A resumable, rank-aware stream of global batches.

Every optimizer step consumes one global batch of `global_batch` examples, in an order fixed
by (seed, epoch) and computed a batch at a time (data/permutation.py), so that it costs no memory
however many examples there are. Rank r of w takes every w-th micro-batch of it, so 1 rank x 4
micro-batches and 2 ranks x 2 micro-batches see exactly the same examples per step. The position
is two integers, saved in every checkpoint with the global batch size and nothing about its
split, which makes resuming exact on any number of ranks and micro-batches that keeps the global
batch.
"""
from dataclasses import asdict, dataclass

import torch

from ..config import ConfigError
from .permutation import Permutation


@dataclass
class StreamPosition:
    epoch: int = 0
    offset: int = 0  # examples of this epoch already consumed


class BatchStream:
    def __init__(self, num_examples: int, micro_batch: int, grad_accum: int, world: int, seed: int):
        self.n = num_examples
        self.micro = micro_batch
        self.accum = grad_accum
        self.world = world
        self.global_batch = micro_batch * grad_accum * world
        if self.global_batch > num_examples:
            raise ValueError(
                f"a global batch of {self.global_batch} examples (micro_batch_size x grad_accum x ranks) "
                f"is larger than the {num_examples} training examples; lower micro_batch_size or grad_accum"
            )
        self.seed = seed
        self.pos = StreamPosition()

    @property
    def steps_per_epoch(self) -> int:
        return self.n // self.global_batch

    def next_step(self, rank: int) -> list[torch.Tensor]:
        """Example indices of this rank's micro-batches for the next optimizer step."""
        if self.pos.offset + self.global_batch > self.n:  # drop the ragged tail, start a new epoch
            self.pos = StreamPosition(self.pos.epoch + 1, 0)
        order = Permutation(self.n, seed=self.seed * 1_000_003 + self.pos.epoch)
        idx = order.take(self.pos.offset, self.global_batch)
        self.pos.offset += self.global_batch
        micro = idx.view(self.accum * self.world, self.micro)
        return [micro[i] for i in range(rank, len(micro), self.world)]

    def state_dict(self) -> dict:
        return {**asdict(self.pos), "global_batch": self.global_batch}

    def load_state_dict(self, state: dict) -> None:
        state = dict(state)
        require_same_global_batch(state.pop("global_batch", self.global_batch), self)  # absent in old checkpoints
        self.pos = StreamPosition(**state)


def require_same_global_batch(saved: int, stream) -> None:
    """A resumed run must cut the data into the global batches of the run it continues."""
    if saved != stream.global_batch:
        raise ConfigError(
            f"the checkpoint was trained on global batches of {saved} examples, this run has {stream.global_batch} "
            f"(micro_batch_size {stream.micro} x grad_accum {stream.accum} x {stream.world} ranks); set grad_accum "
            f"so that the global batch is {saved} again"
        )
