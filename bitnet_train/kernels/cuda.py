"""The CUDA door: the W2A8 kernels of kernels/cuda/w2a8.cu on CUDA torch tensors.

The library is plain CUDA C++ with a C ABI (no torch headers), built with nvcc on first use
by kernels/cuda/build.sh into `$BITNET_TRAIN_CACHE` (default ~/.cache/bitnet_train/), keyed by
a hash of its sources, and loaded with ctypes. Tensors cross as data pointers; every launch
runs on torch's current stream, so it orders with the surrounding torch work and never syncs.

    quantize_activations(x)                    -> int8 (M, Kpad), s (M,)
    ternary_matmul_int(a, qweight)             -> int32 (M, N) = a @ t^T, exact
    bitlinear(x, qweight, qscale, in_features) -> float32 (..., N)

the same signatures and results as bitnet_train.kernels.cpu, on CUDA tensors.

bitnet_train/kernels/cuda_reference.py is the same algorithm on the CPU; the tests compare both.
"""
import ctypes
import hashlib
import os
import shutil
import subprocess
from functools import lru_cache
from pathlib import Path

import torch

from bitnet_train.ternary_layout import packed_row_bytes, padded_features

SOURCE_DIR = Path(__file__).resolve().parents[2] / "kernels" / "cuda"
_SOURCES = ("w2a8.cu", "w2a8.cuh", "build.sh")
_ABI_VERSION = 2  # w2a8.cu kAbiVersion
FUSED_MAX_KPAD = 32768  # w2a8.cu kFusedMaxKpad: the fused decode kernel's activation tile
# Up to this many tokens the GEMV (each token row re-reads the weights, from L2) beats the GEMM,
# whose 64 x 128 tiles leave most of an H100 idle at small M (docs/bench_cuda.md).
GEMV_MAX_TOKENS = 4
_X_DTYPES = {torch.float32: 0, torch.bfloat16: 1}  # W2A8_DTYPE_*


class CudaKernelError(RuntimeError):
    """The W2A8 CUDA library could not be built, loaded or launched."""


def cache_dir() -> Path:
    return Path(os.environ.get("BITNET_TRAIN_CACHE", "~/.cache/bitnet_train")).expanduser()


def library_path() -> Path:
    """Where the build for the current sources lives (a new hash whenever a source changes)."""
    digest = hashlib.sha256()
    for name in _SOURCES:
        digest.update((SOURCE_DIR / name).read_bytes())
    return cache_dir() / f"libbitnet_w2a8-{digest.hexdigest()[:16]}.so"


def unavailable_reason() -> str | None:
    """Why the kernels cannot run here, or None when they can."""
    if not torch.cuda.is_available():
        return "torch sees no CUDA device (CPU-only torch build, or no GPU)"
    major, minor = torch.cuda.get_device_capability()
    if major < 8:
        return f"the GEMM uses int8 mma.m16n8k32, which needs sm_80 or newer; this GPU is sm_{major}{minor}"
    missing = [name for name in _SOURCES if not (SOURCE_DIR / name).exists()]
    if missing:
        return (f"kernel sources {missing} not found under {SOURCE_DIR}: this door needs a source "
                f"checkout of bitnet-train (pip install -e .)")
    nvcc = os.environ.get("NVCC", "nvcc")
    if not library_path().exists() and shutil.which(nvcc) is None:
        return f"no cached build at {library_path()} and `{nvcc}` is not on PATH to build one"
    return None


def is_available() -> bool:
    return unavailable_reason() is None


def build(path: Path) -> Path:
    """Compile the library to `path` with kernels/cuda/build.sh (the one list of nvcc flags)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.so")
    proc = subprocess.run(["bash", str(SOURCE_DIR / "build.sh"), str(tmp)], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise CudaKernelError(f"building {path} failed (nvcc exit {proc.returncode}); run "
                              f"kernels/cuda/check_compile.sh to reproduce:\n{proc.stderr[-4000:]}")
    os.replace(tmp, path)  # atomic, so concurrent ranks never load a half-written library
    return path


_PTR, _I64 = ctypes.c_void_p, ctypes.c_int64
_PRODUCT_ARGS = [_PTR, _PTR, _PTR, _PTR, _PTR, _I64, _I64, _I64, _PTR, _PTR, _PTR]


@lru_cache(maxsize=None)
def _lib() -> ctypes.CDLL:
    reason = unavailable_reason()
    if reason is not None:
        raise CudaKernelError(f"the W2A8 CUDA kernels are unavailable: {reason}")
    path = library_path()
    if not path.exists():
        build(path)
    return load(path)


def load(path: Path) -> ctypes.CDLL:
    """Open a built library and declare its C signatures (no GPU needed for this step)."""
    lib = ctypes.CDLL(str(path))
    lib.w2a8_abi_version.restype = ctypes.c_int
    if lib.w2a8_abi_version() != _ABI_VERSION:
        raise CudaKernelError(f"{path} has ABI {lib.w2a8_abi_version()}, this module expects "
                              f"{_ABI_VERSION}: delete it to rebuild")
    lib.w2a8_error_string.restype = ctypes.c_char_p
    lib.w2a8_error_string.argtypes = [ctypes.c_int]
    lib.w2a8_quantize_activations.restype = ctypes.c_int
    lib.w2a8_quantize_activations.argtypes = [_PTR, ctypes.c_int, _I64, _I64, _I64, _PTR, _PTR,
                                              _PTR, _PTR]
    for name in ("w2a8_gemv", "w2a8_gemm"):
        getattr(lib, name).restype = ctypes.c_int
        getattr(lib, name).argtypes = _PRODUCT_ARGS
    lib.w2a8_bitlinear_gemv.restype = ctypes.c_int
    lib.w2a8_bitlinear_gemv.argtypes = [_PTR, ctypes.c_int, _I64, _I64, _I64, _PTR, _PTR, _I64,
                                        _PTR, _PTR]
    return lib


def _check_launch(err: int, what: str) -> None:
    if err != 0:
        msg = _lib().w2a8_error_string(err).decode()
        raise CudaKernelError(f"{what}: CUDA error {err} ({msg})")


def _require(t: torch.Tensor, name: str, dtypes: tuple, dim: int | None = None) -> None:
    if not isinstance(t, torch.Tensor) or not t.is_cuda:
        where = t.device if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{name} must be a CUDA tensor, got {where}; on the CPU use "
                         f"bitnet_train.kernels.cuda_reference")
    if t.dtype not in dtypes:
        raise ValueError(f"{name} must be {' or '.join(map(str, dtypes))}, got {t.dtype}")
    if dim is not None and t.dim() != dim:
        raise ValueError(f"{name} must be {dim}-D, got shape {tuple(t.shape)}")


def _stream(t: torch.Tensor) -> ctypes.c_void_p:
    return ctypes.c_void_p(torch.cuda.current_stream(t.device).cuda_stream)


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 codes (M, Kpad), zero padded, and per-token multipliers s (M,) of x (..., K).

    Bit-identical to quant.quantize_int8 (x ~ q / s), for float32 or bf16 x.
    """
    q, s, _ = _quantize(x)
    return q, s


def _quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The quantizer kernel's three outputs: q, s and row_sum int32 (M,) = sum(q)."""
    _require(x, "x", tuple(_X_DTYPES))
    k = x.shape[-1]
    x2 = x.reshape(-1, k).contiguous()
    m, kpad = x2.shape[0], padded_features(k)
    q = torch.empty(m, kpad, dtype=torch.int8, device=x.device)
    scale = torch.empty(m, dtype=torch.float32, device=x.device)
    row_sum = torch.empty(m, dtype=torch.int32, device=x.device)
    if m and k:
        with torch.cuda.device(x.device):
            _check_launch(_lib().w2a8_quantize_activations(
                x2.data_ptr(), _X_DTYPES[x.dtype], m, k, kpad, q.data_ptr(), scale.data_ptr(),
                row_sum.data_ptr(), _stream(x)), f"w2a8_quantize_activations(M={m}, K={k})")
    return q, scale, row_sum


def _product(q, row_sum, a_scale, qweight, w_scale, y, dot, kernel=None) -> None:
    """Launch the GEMV for up to GEMV_MAX_TOKENS tokens (decode), the tensor-core GEMM otherwise."""
    m, kpad = q.shape
    n = qweight.shape[0]
    if m == 0 or n == 0:
        return
    name = "w2a8_" + (kernel or ("gemv" if m <= GEMV_MAX_TOKENS else "gemm"))
    ptr = lambda t: None if t is None else t.data_ptr()  # noqa: E731
    with torch.cuda.device(q.device):
        _check_launch(getattr(_lib(), name)(
            ptr(q), ptr(row_sum), ptr(a_scale), ptr(qweight), ptr(w_scale), m, n, kpad, ptr(y),
            ptr(dot), _stream(q)), f"{name}(M={m}, N={n}, Kpad={kpad})")


def _check_weight(qweight: torch.Tensor, kpad: int, device: torch.device) -> None:
    _require(qweight, "qweight", (torch.uint8,), dim=2)
    if qweight.shape[1] * 4 != kpad:
        raise ValueError(f"qweight has {qweight.shape[1]} bytes per row; activations with Kpad="
                         f"{kpad} need {kpad // 4} (docs/formats.md)")
    if qweight.device != device or not qweight.is_contiguous():
        raise ValueError(f"qweight must be contiguous on {device}, got {qweight.device}"
                         f"{'' if qweight.is_contiguous() else ', non-contiguous'}")


def ternary_matmul_int(a_int8: torch.Tensor, qweight: torch.Tensor,
                       row_sum: torch.Tensor | None = None, kernel: str | None = None) -> torch.Tensor:
    """Exact int32 product dot(t, a) (M, N) of int8 activations (M, Kpad) and packed weights.

    Kpad is a multiple of 128 and the activations are zero past the real K (as
    quantize_activations leaves them). row_sum = a.sum(1) is computed here when not given.
    kernel: "gemv" or "gemm" forces one (tests, benchmarks); by default GEMV for M <= 4.
    """
    if kernel not in (None, "gemv", "gemm"):
        raise ValueError(f"kernel must be None, 'gemv' or 'gemm', got {kernel!r}")
    _require(a_int8, "a_int8", (torch.int8,), dim=2)
    if a_int8.shape[1] % 128:
        raise ValueError(f"a_int8 has {a_int8.shape[1]} columns; pad K to a multiple of 128")
    _check_weight(qweight, a_int8.shape[1], a_int8.device)
    a = a_int8.contiguous()
    if row_sum is None:
        row_sum = a.sum(dim=1, dtype=torch.int32)
    elif row_sum.shape != (a.shape[0],):
        raise ValueError(f"row_sum must have shape ({a.shape[0]},), got {tuple(row_sum.shape)}")
    row_sum = row_sum.to(device=a.device, dtype=torch.int32).contiguous()
    dot = torch.empty(a.shape[0], qweight.shape[0], dtype=torch.int32, device=a.device)
    _product(a, row_sum, None, qweight, None, None, dot, kernel)
    return dot


def bitlinear(x: torch.Tensor, qweight: torch.Tensor, qscale, in_features: int,
              fused: bool | None = None) -> torch.Tensor:
    """BitLinear's inference forward, float32 (..., N), for x (..., in_features) on the GPU.

    Equals F.linear(quant.quantize_activation(x), quant.quantize_weight(W)) up to float32
    rounding, for qweight = ternary_layout.pack_ternary(codes) and qscale = s of quant.ternarize(W)
    (a float, or a one-element tensor; keep it on the GPU to avoid a copy per call).
    Up to GEMV_MAX_TOKENS tokens (decode) run as one fused launch (quantize + GEMV), more as the
    quantizer and the GEMM; both give the same bits. fused: force (True) or refuse (False) the
    fused kernel.
    """
    if x.shape[-1] != in_features:
        raise ValueError(f"x has {x.shape[-1]} features, the layer has in_features={in_features}")
    _require(x, "x", tuple(_X_DTYPES))
    kpad = padded_features(in_features)
    _check_weight(qweight, kpad, x.device)
    if qweight.shape[1] != packed_row_bytes(in_features):
        raise ValueError(f"qweight rows have {qweight.shape[1]} bytes, in_features={in_features} "
                         f"needs {packed_row_bytes(in_features)}")
    w_scale = torch.as_tensor(qscale, dtype=torch.float32, device=x.device).reshape(1)
    x2 = x.reshape(-1, in_features)
    m, n = x2.shape[0], qweight.shape[0]
    if fused is None:
        fused = m <= GEMV_MAX_TOKENS and kpad <= FUSED_MAX_KPAD
    y = torch.empty(m, n, dtype=torch.float32, device=x.device)
    if m and n and fused:
        x2 = x2.contiguous()
        with torch.cuda.device(x.device):
            _check_launch(_lib().w2a8_bitlinear_gemv(
                x2.data_ptr(), _X_DTYPES[x.dtype], m, in_features, kpad, qweight.data_ptr(),
                w_scale.data_ptr(), n, y.data_ptr(), _stream(x)),
                f"w2a8_bitlinear_gemv(M={m}, N={n}, K={in_features})")
    elif m and n:
        q, a_scale, row_sum = _quantize(x2)
        _product(q, row_sum, a_scale, qweight, w_scale, y, None)
    return y.reshape(*x.shape[:-1], n)
