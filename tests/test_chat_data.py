"""Chat data: the 2B4T template, assistant-only labels, built-in tasks, hub-shaped loaders."""
import json
import re

import pytest

from bitnet_train.config import DataConfig
from bitnet_train.data.chat import (
    chat_splits,
    encode_chat,
    generation_prompt,
    preference_splits,
    require_assistant_mask,
)
from bitnet_train.data.chat_tasks import is_held_out, preference_pair, task_examples
from bitnet_train.data.sources import DataError
from bitnet_train.data.tokenizer import builtin_tokenizer
from bitnet_train.losses import IGNORE

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Reverse the letters: a b c"},
    {"role": "assistant", "content": "c b a"},
    {"role": "user", "content": "What is 12 + 7?"},
    {"role": "assistant", "content": "19"},
]


@pytest.fixture(scope="module")
def tok():
    return builtin_tokenizer(4096)


def test_chat_template_renders_the_2b4t_format(tok):
    text = tok.apply_chat_template(CONVERSATION, tokenize=False)
    assert text == (
        "<|begin_of_text|>System: Be brief.<|eot_id|>User: Reverse the letters: a b c<|eot_id|>"
        "Assistant: c b a<|eot_id|>User: What is 12 + 7?<|eot_id|>Assistant: 19<|eot_id|>"
    )


def test_the_chat_template_is_saved_with_the_tokenizer(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(tmp_path).chat_template == tok.chat_template


def test_labels_keep_exactly_the_assistant_replies(tok):
    enc = encode_chat(tok, CONVERSATION)
    trained = [t for t in enc.labels if t != IGNORE]
    masked = [t for t, label in zip(enc.input_ids, enc.labels) if label == IGNORE]
    assert tok.decode(trained) == " c b a<|eot_id|> 19<|eot_id|>"
    assert tok.decode(masked) == (
        "<|begin_of_text|>System: Be brief.<|eot_id|>User: Reverse the letters: a b c<|eot_id|>Assistant:"
        "User: What is 12 + 7?<|eot_id|>Assistant:"
    )
    assert all(label in (IGNORE, t) for t, label in zip(enc.input_ids, enc.labels))


def test_final_reply_only_labels_the_last_assistant_turn(tok):
    enc = encode_chat(tok, CONVERSATION, final_reply_only=True)
    assert tok.decode([t for t in enc.labels if t != IGNORE]) == " 19<|eot_id|>"


def test_generation_prompt_stops_where_the_trained_reply_starts(tok):
    # The reply's first token carries the space after "Assistant:", as in training.
    prompt = generation_prompt(tok, CONVERSATION)
    assert tok.decode(prompt).endswith("User: What is 12 + 7?<|eot_id|>Assistant:")
    assert prompt == encode_chat(tok, CONVERSATION).input_ids[: len(prompt)]


def test_a_tokenizer_without_chat_template_is_refused_by_name(tok):
    bare = tok.__class__.from_pretrained(tok.name_or_path)
    bare.chat_template = None
    with pytest.raises(DataError, match=re.escape(tok.name_or_path) + ".*no chat template.*CHAT_TEMPLATE"):
        require_assistant_mask(bare)


def test_a_chat_template_without_generation_block_is_refused(tok):
    plain = tok.__class__.from_pretrained(tok.name_or_path)
    plain.chat_template = plain.chat_template.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    with pytest.raises(DataError, match="generation"):
        require_assistant_mask(plain)


# ---- built-in tasks -------------------------------------------------------------------------

CHECKS = {
    "addition": lambda q: str(sum(map(int, re.findall(r"\d+", q)))),
    "reversal": lambda q: " ".join(q.split(": ")[1].split()[::-1]),
    "sorting": lambda q: " ".join(sorted(q.split(": ")[1].split())),
    "counting": lambda q: str(len(q.split(": ")[1].split())),
    "maximum": lambda q: str(max(map(int, re.findall(r"\d+", q)))),
}


def test_builtin_answers_are_correct_and_rejected_replies_wrong():
    examples = task_examples(200, held_out=False, seed=3)
    assert {ex.task for ex in examples} == set(CHECKS)
    for ex in examples:
        assert CHECKS[ex.task](ex.instruction) == ex.answer, ex
        assert ex.wrong != ex.answer, ex


def mistake_kind(ex) -> str:
    """Names how a rejected reply differs from the answer (the kinds data/chat_tasks.py promises)."""
    question, answer, wrong = ex.instruction, ex.answer.split(), ex.wrong.split()
    if ex.task in ("addition", "counting"):
        return f"{int(ex.wrong) - int(ex.answer):+d}"
    if ex.task == "maximum":
        numbers = sorted(map(int, re.findall(r"\d+", question)))
        return "second largest" if int(ex.wrong) == numbers[-2] else f"{int(ex.wrong) - numbers[-1]:+d}"
    assert len(wrong) == len(answer), ex
    if ex.task == "reversal" and wrong == question.split(": ")[1].split():
        return "copied"
    if sorted(wrong) == sorted(answer):
        return "neighbours swapped"
    changed = [i for i, (w, a) in enumerate(zip(wrong, answer)) if w != a]
    assert len(changed) == 1, ex
    i = changed[0]
    return "written twice" if i and wrong[i] == wrong[i - 1] else f"{int(wrong[i]) - int(answer[i]):+d}"


def test_rejected_replies_are_near_misses_of_several_kinds():
    kinds = {}
    for ex in task_examples(1000, held_out=False, seed=0):
        kinds.setdefault(ex.task, set()).add(mistake_kind(ex))
    assert kinds["addition"] == {"+1", "-1", "+10", "-10"}
    assert kinds["counting"] == {"+1", "-1"}
    assert kinds["maximum"] == {"second largest", "+1", "+2", "+3", "-1", "-2", "-3"}  # minus: beside 99
    assert kinds["reversal"] == {"copied", "neighbours swapped", "written twice"}
    assert kinds["sorting"] == {"neighbours swapped", "written twice", "+1"}


def test_builtin_tasks_are_deterministic_and_held_out_apart():
    train, held = task_examples(300, False, seed=5), task_examples(100, True, seed=5)
    assert train == task_examples(300, False, seed=5)
    assert not {ex.instruction for ex in train} & {ex.instruction for ex in held}
    assert all(is_held_out(ex.instruction) for ex in held) and not any(is_held_out(ex.instruction) for ex in train)
    assert len({ex.instruction for ex in train}) == len(train)


def test_builtin_preference_pairs_put_the_correct_answer_first():
    cfg = DataConfig(num_train_examples=20, num_eval_examples=10)
    splits = preference_splits(cfg, seed=0)
    for row, ex in zip(splits["validation"], task_examples(10, True, seed=0)):
        assert (row["prompt"], row["chosen"], row["rejected"]) == preference_pair(ex)
        assert row["chosen"] == ex.answer != row["rejected"]


def test_wrong_reply_fraction_gives_that_share_of_near_miss_demonstrations_in_training_only():
    cfg = DataConfig(num_train_examples=1000, num_eval_examples=50, wrong_reply_fraction=0.3)
    splits = chat_splits(cfg, seed=0)
    train, held = task_examples(1000, False, seed=0), task_examples(50, True, seed=0)
    replies = [messages[-1]["content"] for messages in splits["train"]["messages"]]
    assert all(reply in (ex.answer, ex.wrong) for reply, ex in zip(replies, train))
    assert 0.25 < sum(reply == ex.wrong for reply, ex in zip(replies, train)) / len(train) < 0.35
    assert [messages[-1]["content"] for messages in splits["validation"]["messages"]] == [ex.answer for ex in held]
    # The same instructions slip whatever the number of examples drawn.
    fewer = chat_splits(DataConfig(num_train_examples=100, num_eval_examples=50, wrong_reply_fraction=0.3), seed=0)
    assert fewer["train"]["messages"] == splits["train"]["messages"][:100]
    clean = chat_splits(DataConfig(num_train_examples=100, num_eval_examples=50), seed=0)
    assert [m[-1]["content"] for m in clean["train"]["messages"]] == [ex.answer for ex in train[:100]]
    with pytest.raises(ValueError, match="wrong_reply_fraction=1.5"):
        chat_splits(DataConfig(wrong_reply_fraction=1.5), seed=0)


# ---- hub-shaped files -----------------------------------------------------------------------


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def files_cfg(path, **kw) -> DataConfig:
    return DataConfig(source="files", files=[path], validation_fraction=0.25, **kw)


def test_chat_files_with_messages_load_and_bad_rows_are_counted(tmp_path):
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    rows = [good] * 19 + [{"messages": [{"role": "user", "content": "no reply"}]}]
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    splits = chat_splits(files_cfg(path, max_bad_row_fraction=0.5), seed=0)
    assert len(splits["train"]) + len(splits["validation"]) == 19
    with pytest.raises(DataError, match="messages"):
        chat_splits(files_cfg(path, max_bad_row_fraction=0.0), seed=0)


def test_both_preference_shapes_normalise_to_the_same_pair(tmp_path):
    user = {"role": "user", "content": "What is 2 + 2?"}
    lists = {
        "prompt": "What is 2 + 2?",  # UltraFeedback repeats the prompt as a string
        "chosen": [user, {"role": "assistant", "content": "4"}],
        "rejected": [user, {"role": "assistant", "content": "5"}],
    }
    strings = {"prompt": "What is 2 + 2?", "chosen": "4", "rejected": "5"}
    expected = {"prompt": [user], "chosen": "4", "rejected": "5"}
    for name, row in [("lists", lists), ("strings", strings)]:
        splits = preference_splits(files_cfg(write_jsonl(tmp_path / f"{name}.jsonl", [row] * 8)), seed=0)
        assert splits["train"][0] == expected, name


def test_preference_rows_with_different_prompts_are_rejected(tmp_path):
    a = {"role": "user", "content": "a"}
    b = {"role": "user", "content": "b"}
    reply = {"role": "assistant", "content": "x"}
    path = write_jsonl(tmp_path / "bad.jsonl", [{"chosen": [a, reply], "rejected": [b, reply]}] * 4)
    with pytest.raises(DataError, match="preference pair"):
        preference_splits(files_cfg(path), seed=0)
