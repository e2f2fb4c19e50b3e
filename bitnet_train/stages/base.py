"""What a stage hands the training loop: its data and its loss, nothing else.

A stage's loss returns the *sum* of its per-unit losses (tokens, or preference pairs) and the
number of units; the loop turns that into the update for one global batch (trainer.py).

Optional methods, called only when the stage defines them:
- `bind_model(model)`: receives the starting weights, already on the training device and before
  a resume overwrites them (DPO copies its frozen reference from them).
- `begin_step(step, total_steps)`: called before each optimizer step (conversion's warm-up of
  the quantization strength).
- `state_dict() -> dict` and `load_state_dict(state)`: resumable state the stage keeps itself
  (a streaming dataset's position, say). The loop saves it in every checkpoint's trainer state,
  so it must be JSON (numbers, strings, lists, dicts), and hands it back on resume before the
  first step. The loop's own data order (data/stream.py) needs nothing from the stage.
- `batch_stream(micro_batch, grad_accum, world, seed)`: the stage's own order of training
  examples, in place of a BatchStream over `train_size` examples (pretraining on a data stream:
  data/token_stream.py). It has BatchStream's interface; the loop saves its state_dict in every
  checkpoint as it does the BatchStream's, and `batch("train", ...)` receives what it hands out.
"""
from dataclasses import dataclass, field
from typing import Protocol

import torch


@dataclass
class LossOutput:
    loss_sum: torch.Tensor  # summed over the batch's units; carries the graph
    units: float  # tokens or pairs in this batch
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)  # also sums over units


class Stage(Protocol):
    kind: str
    token_loss: bool  # the loss is a next-token NLL, so exp(val loss) is a perplexity
    train_size: int | None  # None: the stage has its own batch_stream (a stream of unknown length)
    eval_size: int

    def batch(self, split: str, indices: torch.Tensor) -> dict: ...

    def units(self, batch: dict) -> float: ...

    def loss(self, model, batch: dict) -> LossOutput: ...
