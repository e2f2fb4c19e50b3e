"""Generation with the engine: prefill the prompt once, then decode one token per step from the
KV cache. Greedy (temperature 0) or sampled (temperature, top-k, top-p)."""
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .model import Engine


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0: greedy (argmax)
    top_k: int = 0  # 0: no top-k cut
    top_p: float = 1.0  # 1: no nucleus cut
    seed: int | None = None

    def __post_init__(self):
        if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"need temperature >= 0, top_k >= 0 and 0 < top_p <= 1; got {self}")


def next_token(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None) -> int:
    """One token id from the float32 logits (vocab,) of the last position."""
    if sampling.temperature == 0:
        # numpy's argmax (first maximum, as torch's) takes ~20 us on a 128k vocabulary, torch's ~200.
        return int(logits.numpy().argmax()) if logits.device.type == "cpu" else int(logits.argmax())
    logits = logits / sampling.temperature
    if sampling.top_k:
        kth = torch.topk(logits, min(sampling.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p < 1:
        sorted_logits, order = logits.sort(descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the tokens ranked above it already reach top_p (the first always stays).
        drop = probs.cumsum(-1) - probs >= sampling.top_p
        logits = logits.masked_fill(drop.scatter(0, order, drop), float("-inf"))
    probs = logits.softmax(-1)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


def generate(
    engine: Engine,
    prompt: list[int],
    max_new_tokens: int,
    sampling: Sampling = Sampling(),
    stop_ids: tuple[int, ...] = (),
    stop_when: Callable[[list[int]], bool] | None = None,
) -> list[int]:
    """The new token ids after `prompt`, ending early at a stop id or when stop_when(new ids) holds
    (e.g. a stop string appeared in their text)."""
    if not prompt:
        raise ValueError("generate needs at least one prompt token (e.g. the tokenizer's bos)")
    generator = torch.Generator().manual_seed(sampling.seed) if sampling.seed is not None else None
    cache = engine.new_cache(1, len(prompt) + max_new_tokens)
    logits = engine.forward(torch.tensor([prompt]), cache, logits_to_keep=1)
    out: list[int] = []
    while len(out) < max_new_tokens:
        token = next_token(logits[0, -1], sampling, generator)
        out.append(token)
        if token in stop_ids or len(out) == max_new_tokens or (stop_when is not None and stop_when(out)):
            break
        logits = engine.forward(torch.tensor([[token]]), cache)
    return out
