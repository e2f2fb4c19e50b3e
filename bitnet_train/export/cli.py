"""bitnet-train export CHECKPOINT --out DIR [--formats own,own-1.6,hf,gguf-tq2,gguf-tq1]"""
import argparse

from ..checkpoint import CheckpointError
from . import FORMATS, export
from .sizes import format_2b4t_estimate, format_reports


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="bitnet-train export",
        description="Pack a training checkpoint (a stage's final/ or checkpoints/step_N/) for serving.",
    )
    parser.add_argument("checkpoint", help="a stage's final/ directory or a checkpoints/step_N/ directory")
    parser.add_argument("--out", required=True, help="output directory; each format goes to OUT/FORMAT/")
    parser.add_argument("--formats", default=",".join(FORMATS), help=f"comma-separated, from: {', '.join(FORMATS)}")
    parser.add_argument("--tokenizer", help="tokenizer directory, if the checkpoint's is missing")
    args = parser.parse_args(argv)
    try:
        reports = export(args.checkpoint, args.out, args.formats, args.tokenizer)
    except (CheckpointError, ValueError) as e:
        raise SystemExit(f"bitnet-train export: {e}") from e
    print(format_reports(reports))
    print(format_2b4t_estimate())
