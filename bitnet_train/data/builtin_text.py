"""The built-in pretraining corpus: the Python documentation text that ships with CPython.

`pydoc_data.topics` holds about 460 KB of real English prose and code samples, so the
quickstart needs no download. Topics are cut at paragraph boundaries into documents of about
2 KB, so a deterministic every-Nth split gives a validation set that resembles training.
"""
import pydoc_data.topics

DOC_CHARS = 2000


def builtin_documents() -> list[str]:
    docs = []
    for key in sorted(pydoc_data.topics.topics):
        current = ""
        for paragraph in pydoc_data.topics.topics[key].split("\n\n"):
            if current and len(current) + len(paragraph) > DOC_CHARS:
                docs.append(current.strip())
                current = ""
            current += paragraph + "\n\n"
        if current.strip():
            docs.append(current.strip())
    return docs


def held_out_every(fraction: float) -> int:
    """The deterministic validation split holds out every n-th item; this is n."""
    return max(2, round(1 / fraction))


def split_every_nth(items: list, fraction: float) -> tuple[list, list]:
    """Deterministic train/validation split: every held_out_every(fraction)-th item is held out."""
    every = held_out_every(fraction)
    train = [x for i, x in enumerate(items) if i % every != every - 1]
    val = [x for i, x in enumerate(items) if i % every == every - 1]
    return train, val
