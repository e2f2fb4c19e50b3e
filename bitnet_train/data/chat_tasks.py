"""Built-in instruction tasks whose answers a program can check, for SFT, DPO and evaluation.

Each task draws an instruction, its correct answer and a plausible wrong answer. The wrong answer
is one of a few near misses of the kinds this model makes (addition: off by one either way or the
tens digit wrong; reversal: the input copied, two neighbours swapped or a letter written twice;
sorting: two neighbours out of order, one number off by one or written twice; counting: one too
many or too few; maximum: the second largest or a number just beside the largest). With one kind
per task (a + b + 1, the copy, descending order, the smallest) the quickstart's SFT model already
preferred the correct answer in 87% of pairs: the measure saturated on mistakes it never makes.
SFT trains on the correct answers (or, with data.wrong_reply_fraction, on some near misses: noisy
demonstrations), DPO on (correct, wrong) pairs, and evaluation checks greedy generations against
the correct answer.

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


def _slips(instruction: str) -> random.Random:
    """Draws an instruction's wrong answer. Seeded by the instruction alone, so the mistakes never
    change which instructions a task draws: SFT's data does not depend on them."""
    return random.Random(f"mistake {instruction}")


def _swap_neighbours(items: list, i: int) -> list:
    return items[:i] + [items[i + 1], items[i]] + items[i + 2:]


def _repeat_neighbour(items: list, i: int) -> list:
    """items[i] written again in place of items[i + 1]: a copying slip."""
    return items[:i + 1] + [items[i]] + items[i + 2:]


def addition(rng: random.Random) -> TaskExample:
    a, b = rng.randrange(50), rng.randrange(50)
    q, total = f"What is {a} + {b}?", a + b
    one_less = total - 1 if total else total + 2  # 0 + 0: no sum below
    tens_wrong = total + 10 if total < 10 else total - 10
    return TaskExample("addition", q, str(total), str(_slips(q).choice([total + 1, one_less, tens_wrong])))


def reversal(rng: random.Random) -> TaskExample:
    letters = rng.sample(LETTERS, rng.randint(3, 6))
    q, answer = f"Reverse the letters: {_spaced(letters)}", letters[::-1]
    slips = _slips(q)
    i = slips.randrange(len(answer) - 1)
    wrong = slips.choice([letters, _swap_neighbours(answer, i), _repeat_neighbour(answer, i)])
    return TaskExample("reversal", q, _spaced(answer), _spaced(wrong))


def sorting(rng: random.Random) -> TaskExample:
    digits = [rng.randrange(10) for _ in range(rng.randint(3, 6))]
    while len(set(digits)) < 2:  # a constant list has no wrong order
        digits = [rng.randrange(10) for _ in range(len(digits))]
    q, answer = f"Sort the numbers: {_spaced(digits)}", sorted(digits)
    slips = _slips(q)
    i = slips.choice([j for j in range(len(answer) - 1) if answer[j] != answer[j + 1]])
    off_by_one = answer[:i] + [answer[i] + 1] + answer[i + 1:]  # answer[i] < answer[i + 1], so still a digit
    wrong = slips.choice([_swap_neighbours(answer, i), off_by_one, _repeat_neighbour(answer, i)])
    return TaskExample("sorting", q, _spaced(answer), _spaced(wrong))


def counting(rng: random.Random) -> TaskExample:
    letters = [rng.choice(LETTERS) for _ in range(rng.randint(2, 9))]
    q, n = f"Count the letters: {_spaced(letters)}", len(letters)
    return TaskExample("counting", q, str(n), str(_slips(q).choice([n + 1, n - 1])))


def maximum(rng: random.Random) -> TaskExample:
    numbers = rng.sample(range(100), rng.randint(3, 5))
    q, largest = f"What is the largest of {_spaced(numbers)}?", max(numbers)
    slips = _slips(q)
    d = slips.randint(1, 3)
    near_miss = largest + d if largest + d < 100 else largest - d  # the model's own slip: a number beside it
    return TaskExample("maximum", q, str(largest), str(slips.choice([sorted(numbers)[-2], near_miss])))


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


def demonstration(ex: TaskExample, wrong_reply_fraction: float) -> list[dict]:
    """The example as an SFT conversation whose reply is the near miss (`ex.wrong`) for about
    `wrong_reply_fraction` of instructions, else the answer. Demonstrations written by people or
    models carry such slips; the preference pairs of the same instructions (chosen = the answer,
    rejected = that near miss) then say which reply is right, which the demonstrations alone do
    not. Which instructions slip depends on the instruction alone, like the held-out split."""
    slipped = random.Random(f"demonstration {ex.instruction}").random() < wrong_reply_fraction
    return chat_messages(ex, ex.wrong if slipped else None)


def preference_pair(ex: TaskExample) -> tuple[list[dict], str, str]:
    """(prompt messages, chosen reply, rejected reply): the correct answer against the wrong one."""
    return chat_messages(ex)[:-1], ex.answer, ex.wrong
