"""Chat data for SFT and DPO: loading, rendering with the chat template, assistant-only labels.

Rendering goes through the tokenizer's own chat template (the built-in tokenizer carries the
2B4T one). Which tokens are the assistant's comes from the template's {% generation %} block
via transformers' assistant-token mask, so labels never depend on guessing token boundaries.

Prompts for generation are cut from the rendered conversation at the reply's first token rather
than rendered with `add_generation_prompt`: the template ends that prompt in "Assistant: ", and a
byte-level BPE attaches that space to the reply's first word (" 42"), so a prompt ending in a
lone " " token is one the model never saw in training.

Data shapes (the common hub ones):
  chat:       {"messages": [{"role": ..., "content": ...}, ...]} with at least one assistant turn
  preference: chosen/rejected as message lists ending in the assistant reply (UltraFeedback),
              optionally after a "prompt" message list; or "prompt", "chosen", "rejected" strings.
Preference rows are normalised to prompt (message list), chosen and rejected (reply strings).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..config import DataConfig
from ..losses import IGNORE
from .chat_tasks import chat_messages, demonstration, preference_pair, task_examples
from .sources import DataError, keep_valid_rows, load_splits

if TYPE_CHECKING:  # imported where used (data/sources.py says why)
    from datasets import Dataset, DatasetDict

log = logging.getLogger(__name__)

PROBE = [{"role": "user", "content": "1 + 1"}, {"role": "assistant", "content": "2"}]


@dataclass
class Encoded:
    """One rendered conversation: token ids and labels (IGNORE outside the trained reply)."""

    input_ids: list[int]
    labels: list[int]


def tokenizer_name(tokenizer) -> str:
    return getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__


def require_assistant_mask(tokenizer) -> None:
    """Fail early, naming the tokenizer, unless its chat template marks the assistant's tokens."""
    fix = (
        "use tokenizer.name=builtin (it carries the 2B4T template), or save your tokenizer with "
        "tokenizer.chat_template = bitnet_train.data.tokenizer.CHAT_TEMPLATE and point tokenizer.name at it"
    )
    if not tokenizer.chat_template:
        raise DataError(f"tokenizer {tokenizer_name(tokenizer)!r} has no chat template; {fix}")
    if not any(_render(tokenizer, PROBE)["assistant_masks"]):
        raise DataError(
            f"the chat template of tokenizer {tokenizer_name(tokenizer)!r} does not mark assistant replies "
            "with {% generation %}, so the loss cannot be restricted to them; " + fix
        )


def _render(tokenizer, messages: list[dict]) -> dict:
    return tokenizer.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )


def _last_span(mask: list[int]) -> list[int]:
    """Keep only the last run of ones: the final assistant reply."""
    end = max(i for i, m in enumerate(mask) if m) + 1
    start = end
    while start > 0 and mask[start - 1]:
        start -= 1
    return [1 if start <= i < end else 0 for i in range(len(mask))]


def encode_chat(tokenizer, messages: list[dict], final_reply_only: bool = False) -> Encoded:
    """Token ids of the rendered conversation; labels keep the assistant's tokens only (each reply
    with its closing <|eot_id|>, so the model learns to stop), or only the last reply."""
    out = _render(tokenizer, messages)
    mask = out["assistant_masks"]
    if final_reply_only:
        mask = _last_span(mask)
    return Encoded(out["input_ids"], [t if m else IGNORE for t, m in zip(out["input_ids"], mask)])


def generation_prompt(tokenizer, messages: list[dict]) -> list[int]:
    """Ids that prompt for the final assistant reply of `messages` (its content is a placeholder)."""
    enc = encode_chat(tokenizer, messages, final_reply_only=True)
    first = next(i for i, label in enumerate(enc.labels) if label != IGNORE)
    return enc.input_ids[:first]


def truncate(enc: Encoded, seq_len: int) -> Encoded | None:
    """The first seq_len tokens, or None when no trained token is left in them."""
    # The label at position 0 is never predicted (next-token shift), hence labels[1:].
    labels = enc.labels[:seq_len]
    if all(label == IGNORE for label in labels[1:]):
        return None
    return Encoded(enc.input_ids[:seq_len], labels)


def pad_right(rows: list[list[int]], value: int) -> torch.Tensor:
    """Right padding: with causal attention, real tokens never see the pads after them."""
    width = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (width - len(r)) for r in rows], dtype=torch.long)


def collate(encoded: list[Encoded], pad_id: int) -> dict:
    return {
        "input_ids": pad_right([e.input_ids for e in encoded], pad_id),
        "labels": pad_right([e.labels for e in encoded], IGNORE),
    }


def encode_conversations(tokenizer, conversations, seq_len: int, what: str) -> list[Encoded]:
    """SFT examples: every assistant reply trained; conversations with none left after the cut
    to seq_len are dropped and counted."""
    encoded = [truncate(encode_chat(tokenizer, messages), seq_len) for messages in conversations]
    kept = [e for e in encoded if e is not None]
    _report_dropped(what, len(encoded) - len(kept), len(encoded), seq_len)
    return kept


def encode_pairs(tokenizer, triples, seq_len: int, what: str) -> list[tuple[Encoded, Encoded]]:
    """Preference pairs from (prompt messages, chosen, rejected): only the final reply trained."""
    pairs, total = [], 0
    for prompt, chosen, rejected in triples:
        total += 1
        replies = [
            truncate(encode_chat(tokenizer, prompt + [{"role": "assistant", "content": r}], True), seq_len)
            for r in (chosen, rejected)
        ]
        if None not in replies:
            pairs.append((replies[0], replies[1]))
    _report_dropped(what, total - len(pairs), total, seq_len)
    return pairs


def _report_dropped(what: str, dropped: int, total: int, seq_len: int) -> None:
    if dropped == total:
        raise DataError(f"{what}: none of the {total} examples has a reply token within data.seq_len={seq_len}")
    if dropped:
        log.warning("%s: %d of %d examples have no reply token within data.seq_len=%d; dropped",
                    what, dropped, total, seq_len)


# ---- sources ---------------------------------------------------------------------------------


def is_message_list(value) -> bool:
    return isinstance(value, list) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value
    )


def is_conversation(row: dict) -> bool:
    messages = row.get("messages")
    return is_message_list(messages) and any(m["role"] == "assistant" and m["content"] for m in messages)


def check_wrong_reply_fraction(cfg: DataConfig, stage: str = "data") -> None:
    if not 0.0 <= cfg.wrong_reply_fraction <= 1.0:
        raise DataError(
            f"{stage}.data.wrong_reply_fraction={cfg.wrong_reply_fraction} is not a share; use a value in [0, 1]"
        )


def builtin_chat(cfg: DataConfig, seed: int) -> DatasetDict:
    """Training conversations with cfg.wrong_reply_fraction of near-miss replies; the held-out
    ones always correct, so validation loss measures the right answers."""
    from datasets import Dataset, DatasetDict

    check_wrong_reply_fraction(cfg)
    train = [demonstration(ex, cfg.wrong_reply_fraction) for ex in task_examples(cfg.num_train_examples, False, seed)]
    validation = [chat_messages(ex) for ex in task_examples(cfg.num_eval_examples, True, seed)]
    return DatasetDict(
        train=Dataset.from_dict({"messages": train}), validation=Dataset.from_dict({"messages": validation})
    )


def chat_splits(cfg: DataConfig, seed: int) -> DatasetDict:
    """train/validation conversations with a valid `messages` list."""
    from datasets import DatasetDict

    builtin = builtin_chat(cfg, seed) if cfg.source == "builtin" else None
    splits = load_splits(cfg, builtin)
    return DatasetDict({
        name: keep_valid_rows(ds, is_conversation, "a 'messages' list with an assistant reply", cfg)
        for name, ds in splits.items()
    })


def pair_from_row(row: dict) -> tuple[list[dict], str, str] | None:
    """(prompt messages, chosen reply, rejected reply) from either supported shape, else None."""
    prompt, chosen, rejected = row.get("prompt"), row.get("chosen"), row.get("rejected")
    if isinstance(chosen, str) and isinstance(rejected, str) and isinstance(prompt, str):
        return [{"role": "user", "content": prompt}], chosen, rejected
    if not (is_message_list(chosen) and is_message_list(rejected) and chosen and rejected):
        return None
    before = prompt if is_message_list(prompt) else []  # UltraFeedback's string prompt repeats chosen[0]
    chosen, rejected = before + chosen, before + rejected
    replies_last = chosen[-1]["role"] == rejected[-1]["role"] == "assistant"
    if not (replies_last and chosen[:-1] and chosen[:-1] == rejected[:-1]):
        return None
    return chosen[:-1], chosen[-1]["content"], rejected[-1]["content"]


def _normalise_pair(row: dict) -> dict:
    prompt, chosen, rejected = pair_from_row(row)
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def builtin_preferences(cfg: DataConfig, seed: int) -> DatasetDict:
    from datasets import Dataset, DatasetDict

    def split(n: int, held_out: bool) -> Dataset:
        prompts, chosen, rejected = zip(*map(preference_pair, task_examples(n, held_out, seed)))
        return Dataset.from_dict({"prompt": list(prompts), "chosen": list(chosen), "rejected": list(rejected)})

    return DatasetDict(train=split(cfg.num_train_examples, False), validation=split(cfg.num_eval_examples, True))


def preference_splits(cfg: DataConfig, seed: int) -> DatasetDict:
    """train/validation pairs normalised to prompt (messages), chosen and rejected (strings)."""
    from datasets import DatasetDict

    if cfg.source == "builtin":
        return load_splits(cfg, builtin_preferences(cfg, seed))
    what = "a preference pair (chosen/rejected message lists with one prompt, or prompt/chosen/rejected strings)"
    out = {}
    for name, ds in load_splits(cfg).items():
        ds = keep_valid_rows(ds, lambda row: pair_from_row(row) is not None, what, cfg)
        out[name] = ds.map(_normalise_pair, remove_columns=ds.column_names)
    return DatasetDict(out)
