"""Whether the Triton training kernels can run here, asked without importing triton.

`model.bitlinear_kernel=triton` is checked at start-up (pipeline.validate_run): a run must not
fail at its first forward after the data and the model were prepared. Triton runs on a CUDA
GPU, or on the CPU through its interpreter (TRITON_INTERPRET=1: slow, for tests only).
"""
import importlib.util
import os

import torch

TRITON_PIN = "triton==3.7.1"  # the version torch 2.13's CUDA wheels require (constraints.txt)


def interpreting() -> bool:
    """TRITON_INTERPRET=1: Triton kernels run in numpy on CPU tensors (triton reads it at import)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def triton_unavailable_reason() -> str | None:
    """None if the Triton kernels can run; otherwise what is missing and how to fix it."""
    if importlib.util.find_spec("triton") is None:
        return f"the triton package is not installed (pip install {TRITON_PIN})"
    if not interpreting() and not torch.cuda.is_available():
        return ("Triton kernels need a CUDA GPU and none is visible "
                "(on the CPU use model.bitlinear_kernel=torch, or TRITON_INTERPRET=1 for tests)")
    return None


def require_triton(what: str) -> None:
    reason = triton_unavailable_reason()
    if reason is not None:
        raise RuntimeError(f"{what}: {reason}")
