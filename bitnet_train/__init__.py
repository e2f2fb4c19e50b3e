"""bitnet-train: training, export and evaluation of native ternary BitNet b1.58 models."""
from .model import BitNetTrainConfig, BitNetTrainForCausalLM  # noqa: F401  (registers the Auto classes)

__version__ = "0.1.0"
