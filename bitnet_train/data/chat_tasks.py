"""Built-in instruction tasks whose answers a program can check, for SFT, DPO and evaluation.

Each task draws an instruction, its correct answer and a plausible wrong answer. The wrong
answers are one consistent kind of mistake per task (one too many, the input copied instead of
reversed, descending instead of ascending, the smallest for the largest), as a model's own
errors tend to be: a preference signal DPO can learn from a few hundred pairs. SFT trains on the
correct answers, DPO on (correct, wrong) pairs, and evaluation checks greedy generations
against the correct answer.

Items are separated by spaces ("a b c", "3 1 2") so that each is one token of a byte-level
BPE: the tasks then test the model, not the tokenizer's merges.

Held-out split: an instruction is held out when a hash of its text says so, so the split does
not depend on the seed or on how many examples each stage asks for. SFT, DPO and the final
report therefore share one held-out set that no stage trains on.
"""
import random
import zlib
from dataclasses import dataclass

LETTERS = "abcdefghijklmnopqrstuvwxyz"
HELD_OUT_EVERY = 10  # one instruction in ten is held out


@dataclass(frozen=True)
class TaskExample:
    task: str
    instruction: str
    answer: str
    wrong: str  # a plausible wrong answer: the rejected reply of a preference pair


def _spaced(items) -> str:
    return " ".join(str(x) for x in items)


def addition(rng: random.Random) -> TaskExample:
    a, b = rng.randrange(50), rng.randrange(50)
    return TaskExample("addition", f"What is {a} + {b}?", str(a + b), str(a + b + 1))


def reversal(rng: random.Random) -> TaskExample:
    letters = _spaced(rng.sample(LETTERS, rng.randint(3, 6)))
    return TaskExample("reversal", f"Reverse the letters: {letters}", letters[::-1], letters)


def sorting(rng: random.Random) -> TaskExample:
    digits = [rng.randrange(10) for _ in range(rng.randint(3, 6))]
    while len(set(digits)) < 2:  # a constant list has no wrong order
        digits = [rng.randrange(10) for _ in range(len(digits))]
    return TaskExample(
        "sorting", f"Sort the numbers: {_spaced(digits)}", _spaced(sorted(digits)), _spaced(sorted(digits)[::-1])
    )


def counting(rng: random.Random) -> TaskExample:
    letters = [rng.choice(LETTERS) for _ in range(rng.randint(2, 9))]
    return TaskExample("counting", f"Count the letters: {_spaced(letters)}", str(len(letters)), str(len(letters) + 1))


def maximum(rng: random.Random) -> TaskExample:
    numbers = rng.sample(range(100), rng.randint(3, 5))
    return TaskExample("maximum", f"What is the largest of {_spaced(numbers)}?", str(max(numbers)), str(min(numbers)))


TASKS = (addition, reversal, sorting, counting, maximum)


def is_held_out(instruction: str) -> bool:
    return zlib.crc32(instruction.encode()) % HELD_OUT_EVERY == 0


def task_examples(n: int, held_out: bool, seed: int) -> list[TaskExample]:
    """`n` distinct examples of the chosen split, cycling through the tasks; deterministic."""
    rng = random.Random(f"chat-tasks-{seed}-{held_out}")
    seen: set[str] = set()
    out: list[TaskExample] = []
    attempts = 0
    while len(out) < n:
        attempts += 1
        if attempts > 1000 * (n + 1):
            raise ValueError(f"could not draw {n} distinct {'held-out' if held_out else 'training'} task examples")
        ex = TASKS[len(out) % len(TASKS)](rng)
        if ex.instruction in seen or is_held_out(ex.instruction) != held_out:
            continue
        seen.add(ex.instruction)
        out.append(ex)
    return out


def chat_messages(ex: TaskExample, reply: str | None = None) -> list[dict]:
    """The example as a conversation: the instruction, then `reply` (default: the answer)."""
    return [
        {"role": "user", "content": ex.instruction},
        {"role": "assistant", "content": ex.answer if reply is None else reply},
    ]


def preference_pair(ex: TaskExample) -> tuple[list[dict], str, str]:
    """(prompt messages, chosen reply, rejected reply): the correct answer against the wrong one."""
    return chat_messages(ex)[:-1], ex.answer, ex.wrong
