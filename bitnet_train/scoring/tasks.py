"""Task accuracy: exact match of greedy replies to held-out instructions with checkable answers."""
from collections import defaultdict

import torch

from ..data.chat import generation_prompt
from ..data.chat_tasks import TaskExample, chat_messages
from ..data.tokenizer import EOT


@torch.no_grad()
def greedy_replies(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, batch_size: int = 64) -> list[str]:
    """Greedy continuations of token-id prompts, each cut at the end of the assistant turn."""
    stops = [tokenizer.convert_tokens_to_ids(EOT), tokenizer.eos_token_id]
    device = next(model.parameters()).device
    model.eval()
    replies = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        width = max(len(p) for p in chunk)
        # Left padding keeps every prompt's last token at the end, where generation continues.
        ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(p)) + p for p in chunk], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=device)
        out = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
            eos_token_id=stops, pad_token_id=tokenizer.pad_token_id,
        )
        for row in out[:, width:].tolist():
            end = next((i for i, t in enumerate(row) if t in stops), len(row))
            replies.append(tokenizer.decode(row[:end]).strip())
    return replies


def task_accuracy(model, tokenizer, examples: list[TaskExample], batch_size: int = 64) -> dict[str, float]:
    """Share of exact-match answers, overall ("task_accuracy") and per task ("task_accuracy/NAME")."""
    prompts = [generation_prompt(tokenizer, chat_messages(ex)) for ex in examples]
    longest = max(len(tokenizer(" " + ex.answer, add_special_tokens=False)["input_ids"]) for ex in examples)
    replies = greedy_replies(model, tokenizer, prompts, max_new_tokens=longest + 2, batch_size=batch_size)
    hits: dict[str, list[bool]] = defaultdict(list)
    for ex, reply in zip(examples, replies):
        hits[ex.task].append(reply == ex.answer)
    every = [h for task_hits in hits.values() for h in task_hits]
    return {"task_accuracy": sum(every) / len(every),
            **{f"task_accuracy/{task}": sum(h) / len(h) for task, h in sorted(hits.items())}}
