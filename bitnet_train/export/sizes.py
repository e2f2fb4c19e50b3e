"""How big each export is, and what our format gives for 2B4T without building it.

The 2B4T report (arXiv 2504.12285, Table 1) gives 0.4 GB of non-embedding memory: its ~2.08 B
ternary weights at close to log2(3) = 1.585 bits each. Our 2-bit layout lands at 2 bits, the
base-3 layout at 1.6.
"""
import json
import math
from dataclasses import dataclass
from pathlib import Path

import gguf
import torch
from omegaconf import OmegaConf

from ..model import BitNetTrainConfig, BitNetTrainForCausalLM
from ..model_factory import named_model_config
from ..ternary_layout import base3_row_bytes, packed_row_bytes
from ..quant import BitLinear
from .gguf_format import gguf_name
from .source import EMBEDDING_NAMES, TernaryCheckpoint

EMBEDDING_TENSORS = {*EMBEDDING_NAMES, *map(gguf_name, EMBEDDING_NAMES)}  # our / HF names and GGUF's

PAPER_2B4T_NON_EMBEDDING_GB = 0.4
LLAMA3_VOCAB = 128256  # 2B4T's tokenizer, LLaMA 3's (2B4T report section 2.1)
# bytes of one packed row of `in_features` ternary values
ROW_BYTES = {
    "own (2-bit)": packed_row_bytes,
    "own-1.6 (base 3)": base3_row_bytes,
    "log2(3) limit": lambda n: n * math.log2(3) / 8,
}


@dataclass(frozen=True)
class SizeReport:
    label: str
    path: Path
    bytes: int  # the whole file
    params: int
    non_embedding_bytes: int  # tensor data other than the embedding / lm_head: no headers, no tokenizer
    non_embedding_params: int

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.bytes / self.params

    @property
    def non_embedding_bits_per_weight(self) -> float:
        return 8 * self.non_embedding_bytes / self.non_embedding_params


def tensor_nbytes(path: Path) -> dict[str, int]:
    """Bytes of each tensor's data in a safetensors or GGUF file, read from its header."""
    if path.suffix == ".gguf":
        return {t.name: int(t.n_bytes) for t in gguf.GGUFReader(path).tensors}
    with open(path, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    return {k: v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__"}


def file_report(label: str, path: Path, ckpt: TernaryCheckpoint) -> SizeReport:
    non_embedding = sum(n for name, n in tensor_nbytes(path).items() if name not in EMBEDDING_TENSORS)
    return SizeReport(
        label, path, path.stat().st_size, ckpt.num_params, non_embedding, ckpt.num_params - ckpt.embedding_params
    )


def format_reports(reports: list[SizeReport]) -> str:
    lines = [f"{'format':10} {'file bytes':>12} {'bits/weight':>11} {'non-embedding bytes':>20} {'bits/weight':>11}  file"]
    for r in reports:
        lines.append(
            f"{r.label:10} {r.bytes:>12,} {r.bits_per_weight:>11.3f} {r.non_embedding_bytes:>20,} "
            f"{r.non_embedding_bits_per_weight:>11.3f}  {r.path}"
        )
    return "\n".join(lines)


def meta_model(config: BitNetTrainConfig) -> BitNetTrainForCausalLM:
    """The model's structure without its memory: parameters on the meta device."""
    with torch.device("meta"):
        return BitNetTrainForCausalLM(config)


def ternary_shapes(config: BitNetTrainConfig) -> list[tuple[int, int]]:
    """(out, in) of every BitLinear."""
    return [tuple(m.weight.shape) for m in meta_model(config).modules() if isinstance(m, BitLinear)]


def non_embedding_bytes(config: BitNetTrainConfig, row_bytes) -> float:
    """Packed codes and a float32 scale per BitLinear, every other non-embedding parameter (the
    RMSNorms) in float32: what our format stores, counted off the model's structure."""
    model = meta_model(config)
    ternary = {id(m.weight): tuple(m.weight.shape) for m in model.modules() if isinstance(m, BitLinear)}
    packed = sum(out * row_bytes(n) + 4 for out, n in ternary.values())
    rest = sum(p.numel() for n, p in model.named_parameters() if id(p) not in ternary and n not in EMBEDDING_NAMES)
    return packed + 4 * rest


def format_2b4t_estimate() -> str:
    config = named_model_config("2b4t", LLAMA3_VOCAB)
    n = sum(o * i for o, i in ternary_shapes(config))
    sizes = ", ".join(f"{label} {non_embedding_bytes(config, rb) / 1e9:.3f} GB" for label, rb in ROW_BYTES.items())
    return (
        f"2B4T ({n / 1e9:.2f} B ternary weights, configs/model/2b4t.yaml): non-embedding size {sizes}; "
        f"the paper reports {PAPER_2B4T_NON_EMBEDDING_GB} GB"
    )
