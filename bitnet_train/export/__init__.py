"""`bitnet-train export`: a training checkpoint -> packed checkpoints that can be served.

    export(checkpoint, out_dir, ["own", "hf", "gguf-tq2"]) -> one SizeReport per format

Each format is written to `out_dir/<format>/` through checkpoint.atomic_directory (a temporary
name, a SHA-256 manifest, then a rename), after every requested format's shape checks have passed,
so a failure leaves nothing half-written. The codes of every format come from one place:
source.ternary_weights, i.e. quant.ternarize, the training forward's quantizer.
"""
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from ..checkpoint import atomic_directory
from . import gguf_format, hf_format, own_format
from .sizes import SizeReport, file_report
from .source import TernaryCheckpoint, read_checkpoint


@dataclass(frozen=True)
class Format:
    write: Callable[[TernaryCheckpoint, Path], Path]  # fills a directory, returns the weights file
    check: Callable[[TernaryCheckpoint], None] = lambda ckpt: None  # raises before anything is written


FORMATS = {
    # Our engine runs every architecture the training model has (2B4T and converted Llama / Qwen2).
    "own": Format(partial(own_format.write, layout="2bit")),
    "own-1.6": Format(partial(own_format.write, layout="base3")),
    "hf": Format(hf_format.write, hf_format.check),
    **{
        f"gguf-{key}": Format(partial(gguf_format.write, qtype=qtype), partial(gguf_format.check, qtype=qtype))
        for key, qtype in gguf_format.QTYPES.items()
    },
}


def parse_formats(names: str | list[str]) -> list[str]:
    names = [n.strip() for n in names.split(",")] if isinstance(names, str) else list(names)
    unknown = [n for n in names if n not in FORMATS]
    if unknown or not names:
        raise ValueError(f"unknown export format(s) {unknown or names}; choose from {', '.join(FORMATS)}")
    return list(dict.fromkeys(names))


def export(
    checkpoint: str | Path, out_dir: str | Path, formats: str | list[str], tokenizer: str | Path | None = None
) -> list[SizeReport]:
    names = parse_formats(formats)
    ckpt = read_checkpoint(checkpoint, tokenizer)
    for name in names:
        FORMATS[name].check(ckpt)
    reports = []
    for name in names:
        target = Path(out_dir) / name
        written = []
        atomic_directory(target, lambda tmp: written.append(FORMATS[name].write(ckpt, tmp)))
        reports.append(file_report(name, target / written[0].name, ckpt))
    return reports
