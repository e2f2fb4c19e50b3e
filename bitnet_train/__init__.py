"""bitnet-train: training, export and evaluation of native ternary BitNet b1.58 models.

Importing the package is cheap: the model (torch and transformers, seconds of start-up) loads on
first use of `bitnet_train.BitNetTrainForCausalLM` / `BitNetTrainConfig`, or with
`import bitnet_train.model`, which also registers them with transformers' Auto classes, so that
`AutoModelForCausalLM.from_pretrained` loads our checkpoints. The command line reports a bad
config key before paying for those imports.
"""
__version__ = "0.1.0"

MODEL_NAMES = ("BitNetTrainConfig", "BitNetTrainForCausalLM")


def __getattr__(name: str):
    if name in MODEL_NAMES:
        from . import model

        return getattr(model, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
