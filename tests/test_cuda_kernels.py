"""The W2A8 CUDA kernels: their CPU mirror (always), their compile check (with nvcc), and the
kernels themselves against the same references (with a GPU, marked `gpu`).

The integer results must be exact; only the final float scaling is compared with a tolerance,
and against the mirror even that is exact (both round float(dot) / (s_w * s_a) once, in IEEE).
"""
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from bitnet_train import quant
from bitnet_train.kernels import cuda_reference as ref
from bitnet_train.ternary_layout import pack_ternary, padded_features, unpack_ternary

REPO = Path(__file__).resolve().parents[1]

# (M, N, K): odd N, K not a multiple of 128, a K past the GEMV's 8192-byte activation tile,
# M = 1 (decode), 5, 64 and 70 (two GEMM row tiles, the second partial).
SHAPES = [(1, 7, 100), (1, 257, 1000), (5, 131, 300), (5, 9, 8300), (64, 300, 700),
          (70, 129, 256), (64, 1, 128)]


def random_case(m: int, n: int, k: int, seed: int = 0):
    """Ternary codes (N, K), their packed bytes and int8 activations (M, Kpad), zero-padded."""
    gen = torch.Generator().manual_seed(seed * 7919 + m * 131 + n * 17 + k)
    codes = torch.randint(-1, 2, (n, k), generator=gen)
    a = torch.zeros(m, padded_features(k), dtype=torch.int8)
    a[:, :k] = torch.randint(-128, 128, (m, k), generator=gen, dtype=torch.int8)
    return codes, pack_ternary(codes), a


def int64_reference(a: torch.Tensor, qweight: torch.Tensor, k: int) -> torch.Tensor:
    """dot(t, a) by a plain int64 matmul of the unpacked codes: no packing tricks, no tiling."""
    return a[:, :k].long() @ unpack_ternary(qweight, k, torch.int64).T


def row_sums(a: torch.Tensor) -> torch.Tensor:
    return a.sum(dim=1, dtype=torch.int32)


def fake_quant_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """quant.py's BitLinear forward in float64: F.linear of the fake-quantized x and W."""
    return F.linear(quant.quantize_activation(x.float()).double(), quant.quantize_weight(w).double())


def layer(n: int, k: int, seed: int = 0):
    """A random latent weight (N, K) and its packed form and scale, as the exporter writes them."""
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.02
    codes, s = quant.ternarize(w)
    return w, pack_ternary(codes), s.reshape(1).float()


def ties_input(k: int = 512) -> torch.Tensor:
    """One row whose x * s lands exactly on k + 0.5 for many elements, both signs.

    x holds 127.0 (the absmax, so s = rcp(127) * 127 ~ 1) and values t / s for half-integers t,
    kept only where float32 gives x * s == t exactly. The returned row has >= 100 such ties.
    """
    halves = (torch.arange(k - 1) % 254 - 126.5).float()  # -126.5 .. 126.5
    s = quant.activation_scale(torch.tensor([127.0]))
    x = (halves.double() / s.double()).float()
    tie = (x * s) == halves
    row = torch.cat([torch.tensor([127.0]), x[tie]])
    assert int(tie.sum()) >= 100, "the construction should produce many exact ties"
    return row[None]


# ---------------------------------------------------------------------------------------------
# CPU: the mirror of the kernels' integer algorithm
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("m,n,k", SHAPES)
def test_gemv_mirror_equals_int64_matmul(m, n, k):
    _, qweight, a = random_case(m, n, k)
    got = ref.gemv_dot(a, row_sums(a), qweight)
    assert got.dtype == torch.int32
    assert torch.equal(got.long(), int64_reference(a, qweight, k))


@pytest.mark.parametrize("m,n,k", SHAPES)
def test_gemm_mirror_equals_int64_matmul(m, n, k):
    _, qweight, a = random_case(m, n, k, seed=1)
    got = ref.gemm_dot(a, row_sums(a), qweight)
    assert got.dtype == torch.int32
    assert torch.equal(got.long(), int64_reference(a, qweight, k))


@pytest.mark.parametrize("product", [ref.gemv_dot, ref.gemm_dot])
def test_mirror_at_integer_extremes(product):
    # All codes -1 and all activations -128: the largest |dot| per K, and sum(a) = -128 K.
    k = 2560
    qweight = pack_ternary(-torch.ones(3, k, dtype=torch.int64))
    a = torch.full((2, k), -128, dtype=torch.int8)
    assert torch.equal(product(a, row_sums(a), qweight), torch.full((2, 3), 128 * k, dtype=torch.int32))


def test_mirror_uses_row_sum_correction():
    # Codes u = t + 1 multiply the activations; a wrong sum(a) must show in every output.
    _, qweight, a = random_case(2, 5, 300)
    right = ref.gemm_dot(a, row_sums(a), qweight)
    assert torch.equal(ref.gemm_dot(a, row_sums(a) + 1, qweight), right - 1)


def test_mirror_activation_quantization_matches_quant():
    x = torch.randn(64, 2560, generator=torch.Generator().manual_seed(3)) * 3
    x[1] *= 1e-7  # absmax below EPS: the clamp decides the scale
    x[2] = 0.0
    q, s, row_sum = ref.quantize_activations(x)
    want_q, want_s = quant.quantize_int8(x)
    assert q.shape == (64, padded_features(2560)) and q.dtype == torch.int8
    assert torch.equal(s, want_s[:, 0])  # bitwise: rcp-then-multiply, like torch's 127.0 / t
    assert torch.equal(q.float(), want_q)
    assert torch.equal(row_sum, want_q.sum(dim=1).int())


def test_mirror_activation_quantization_pads_with_zeros_bf16():
    x = torch.randn(3, 300, generator=torch.Generator().manual_seed(4)).bfloat16()
    q, s, _ = ref.quantize_activations(x)
    want_q, want_s = quant.quantize_int8(x)
    assert q.shape == (3, 384)
    assert torch.equal(q[:, :300].float(), want_q) and torch.equal(s, want_s[:, 0])
    assert not q[:, 300:].any()


def test_mirror_activation_quantization_rounds_ties_to_even():
    x = ties_input()
    q, _, _ = ref.quantize_activations(x)
    want_q, s = quant.quantize_int8(x)
    assert torch.equal(q[:, :x.shape[1]].float(), want_q)
    # Half to even, not half away from zero: 2.5 -> 2, -0.5 -> 0, 1.5 -> 2.
    v = (x * s)[0]
    ties = (v - v.floor()) == 0.5
    assert ties.sum() >= 100
    assert (q[0, :x.shape[1]][ties].long() % 2 == 0).all()


def test_mirror_bitlinear_matches_fake_quant():
    w, qweight, s_w = layer(300, 700)
    x = torch.randn(2, 3, 700, generator=torch.Generator().manual_seed(5))
    y = ref.bitlinear(x, qweight, s_w, 700)
    want = fake_quant_linear(x, w)
    assert y.shape == (2, 3, 300)
    torch.testing.assert_close(y.double(), want, rtol=1e-3, atol=1e-3 * want.abs().max().item())


def test_mirror_bitlinear_equals_cpu_door():
    # Same integers, same single float32 rounding: the CUDA path and the CPU door must agree
    # bit for bit, so callers cannot tell which backend ran.
    from bitnet_train.kernels import cpu

    _, qweight, s_w = layer(131, 300, seed=8)
    x = torch.randn(5, 300, generator=torch.Generator().manual_seed(9))
    assert torch.equal(ref.bitlinear(x, qweight, s_w, 300), cpu.bitlinear(x, qweight, s_w, 300))


def test_gemv_shared_memory_loads_are_conflict_free():
    # An LDS.128 is served in 4 phases of 8 lanes; a phase is conflict-free when its 8 lanes
    # touch 8 different 16-byte bank groups (address / 16 mod 8).
    lane = torch.arange(32)
    for t in range(4):
        group = (ref.gemv_act_offset(lane, ref.gemv_shift(t, lane)) // 16) % 8
        for phase in group.view(4, 8):
            assert len(set(phase.tolist())) == 8, f"step {t}: bank groups {phase.tolist()}"


def test_gemm_fragment_loads_are_conflict_free():
    a, b = ref.gemm_smem_offsets()
    for matrix in a.view(4, 8):  # ldmatrix: 8 rows of 16 bytes per phase, 8 bank groups
        assert len(set(((matrix // 16) % 8).tolist())) == 8
    for words in b:  # one 32-bit load per lane: 32 lanes, 32 different banks
        assert len(set(((words // 4) % 32).tolist())) == 32


# ---------------------------------------------------------------------------------------------
# The Python door without a GPU
# ---------------------------------------------------------------------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU answer")
def test_door_reports_why_it_is_unavailable():
    from bitnet_train.kernels import cuda

    assert not cuda.is_available()
    assert "CUDA device" in cuda.unavailable_reason()
    with pytest.raises(ValueError, match="must be a CUDA tensor"):
        cuda.quantize_activations(torch.randn(2, 128))


# ---------------------------------------------------------------------------------------------
# Compile check (needs nvcc, not a GPU); deselect with -m "not nvcc"
# ---------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.nvcc
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH")
def test_kernels_compile_for_sm80_and_sm90():
    proc = subprocess.run(["bash", str(REPO / "kernels/cuda/check_compile.sh")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = proc.stdout + proc.stderr
    for kernel in ("quantize_rows_kernel", "w2a8_gemv_kernel", "w2a8_gemm_kernel"):
        for arch in ("sm_80", "sm_90"):
            assert any(kernel in line and arch in line for line in log.splitlines()), (kernel, arch)


@pytest.mark.slow
@pytest.mark.nvcc
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH")
def test_launchers_reject_bad_arguments_before_touching_the_device(tmp_path):
    # The library loads without a GPU; its guards answer before any CUDA runtime call.
    from bitnet_train.kernels import cuda

    lib = cuda.load(cuda.build(tmp_path / "lib.so"))
    invalid, misaligned = 1, 716  # cudaErrorInvalidValue, cudaErrorMisalignedAddress
    assert lib.w2a8_error_string(invalid) == b"invalid argument"
    p, q = 1 << 20, (1 << 20) + 4  # fake device addresses, 16-byte aligned and not
    for launcher in (lib.w2a8_gemv, lib.w2a8_gemm):
        ok = dict(q=p, rs=p, sa=p, w=p, ws=p, m=1, n=8, kpad=128, y=p, dot=None)
        call = lambda **kw: launcher(*{**ok, **kw}.values(), None)  # noqa: E731
        assert call(kpad=100) == invalid  # not whole 128-value blocks
        assert call(m=0) == invalid
        assert call(y=None, dot=None) == invalid  # nothing to write
        assert call(sa=None) == invalid  # y needs the activation scales
        assert call(w=q) == misaligned  # 16-byte loads of packed weights
    fused = lib.w2a8_bitlinear_gemv  # x, dtype, M, K, Kpad, qweight, w_scale, N, y, stream
    assert fused(p, 0, 1, 300, 256, p, p, 8, p, None) == invalid  # Kpad < K
    assert fused(p, 0, 1, 40000, 40064, p, p, 8, p, None) == invalid  # past the shared tile
    assert fused(p, 2, 1, 300, 384, p, p, 8, p, None) == invalid  # unknown dtype
    assert fused(p, 0, 1, 300, 384, q, p, 8, p, None) == misaligned
    assert fused(p, 0, 1, 300, 384, p, None, 8, p, None) == invalid
    quantize = lib.w2a8_quantize_activations
    assert quantize(p, 0, 2, 300, 256, p, p, p, None) == invalid  # Kpad < K
    assert quantize(p, 2, 2, 300, 384, p, p, p, None) == invalid  # unknown dtype
    assert quantize(p, 0, 2, 300, 384, q, p, p, None) == misaligned


# ---------------------------------------------------------------------------------------------
# GPU: the kernels themselves
# ---------------------------------------------------------------------------------------------
gpu = pytest.mark.gpu
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def cuda_door():
    from bitnet_train.kernels import cuda

    if not cuda.is_available():
        pytest.skip(f"W2A8 CUDA kernels unavailable: {cuda.unavailable_reason()}")
    return cuda


@gpu
@needs_gpu
@pytest.mark.parametrize("kernel", ["gemv", "gemm"])
@pytest.mark.parametrize("m,n,k", SHAPES + [(1, 2560, 2560), (64, 6912, 2560), (5, 2560, 6912)])
def test_gpu_products_are_exact(cuda_door, kernel, m, n, k):
    _, qweight, a = random_case(m, n, k, seed=2)
    got = cuda_door.ternary_matmul_int(a.cuda(), qweight.cuda(), kernel=kernel)
    assert torch.equal(got.cpu().long(), int64_reference(a, qweight, k))


@gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_activation_quantization_matches_quant(cuda_door, dtype):
    x = torch.randn(64, 2560, generator=torch.Generator().manual_seed(6)).to(dtype)
    x[1] *= 1e-7
    x[2] = 0.0
    q, s, row_sum = (t.cpu() for t in cuda_door._quantize(x.cuda()))
    want_q, want_s = quant.quantize_int8(x)
    assert torch.equal(s, want_s[:, 0])
    assert torch.equal(q[:, :2560].float(), want_q)
    assert torch.equal(row_sum, want_q.sum(dim=1).int())  # the correction the products subtract


@gpu
@needs_gpu
def test_gpu_activation_quantization_rounds_ties_to_even(cuda_door):
    x = ties_input()
    q, _ = cuda_door.quantize_activations(x.cuda())
    assert torch.equal(q.cpu()[:, :x.shape[1]].float(), quant.quantize_int8(x)[0])
    assert not q.cpu()[:, x.shape[1]:].any()


@gpu
@needs_gpu
@pytest.mark.parametrize("m", [1, 4, 5, 64])
@pytest.mark.parametrize("n,k", [(300, 700), (2560, 2560), (640, 2560), (2560, 6912)])
def test_gpu_bitlinear_matches_fake_quant_and_mirror(cuda_door, m, n, k):
    w, qweight, s_w = layer(n, k, seed=m)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(7))
    y = cuda_door.bitlinear(x.cuda(), qweight.cuda(), s_w.cuda(), k).cpu()
    want = fake_quant_linear(x, w)
    torch.testing.assert_close(y.double(), want, rtol=1e-3, atol=1e-3 * want.abs().max().item())
    assert torch.equal(y, ref.bitlinear(x, qweight, s_w, k))  # same integers, same rounding


@gpu
@needs_gpu
@pytest.mark.parametrize("kernel", ["gemv", "gemm"])
@pytest.mark.parametrize("m,n,k", [(1, 257, 1000), (5, 131, 300), (70, 129, 256), (3, 2560, 6912)])
def test_gpu_products_write_every_output(cuda_door, kernel, m, n, k):
    # Outputs poisoned first, so an unwritten element cannot pass by holding a stale right answer
    # (the caching allocator hands back the block a previous test filled with the same result).
    _, qweight, a = random_case(m, n, k, seed=3)
    w, s = (torch.rand(1) + 0.5), torch.rand(m) + 0.5
    a, qweight = a.cuda(), qweight.cuda()
    dot = torch.full((m, n), -0x2152411, dtype=torch.int32, device="cuda")
    y = torch.full((m, n), float("nan"), device="cuda")
    cuda_door._product(a, row_sums(a), s.cuda(), qweight, w.cuda(), y, dot, kernel)
    want = int64_reference(a.cpu(), qweight.cpu(), k)
    assert torch.equal(dot.cpu().long(), want)
    assert torch.equal(y.cpu(), (want.float() / (w * s[:, None])))


@gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m,n,k", [(1, 7, 100), (1, 257, 1000), (1, 2560, 2560), (1, 640, 2560),
                                   (1, 6912, 2560), (1, 2560, 6912), (1, 33, 9000), (3, 131, 300),
                                   (4, 2560, 6912)])
def test_gpu_fused_decode_bitlinear_equals_two_launches(cuda_door, dtype, m, n, k):
    # One launch (every block quantizes the row itself) must give the bits of quantizer + GEMV.
    w, qweight, s_w = layer(n, k, seed=n + k)
    x = (torch.randn(m, k, generator=torch.Generator().manual_seed(k)) * 3).to(dtype).cuda()
    qweight, s_w = qweight.cuda(), s_w.cuda()
    fused = cuda_door.bitlinear(x, qweight, s_w, k, fused=True)
    assert torch.equal(fused, cuda_door.bitlinear(x, qweight, s_w, k, fused=False))
    assert torch.equal(fused.cpu(), ref.bitlinear(x.cpu(), qweight.cpu(), s_w.cpu(), k))


@gpu
@needs_gpu
def test_gpu_fused_decode_bitlinear_writes_every_output(cuda_door):
    _, qweight, s_w = layer(2565, 2560, seed=4)
    x = torch.randn(1, 2560, generator=torch.Generator().manual_seed(4)).cuda()
    y = torch.full((1, 2565), float("nan"), device="cuda")
    lib = cuda_door._lib()
    qweight, s_w = qweight.cuda(), s_w.cuda()
    err = lib.w2a8_bitlinear_gemv(x.data_ptr(), 0, 1, 2560, 2560, qweight.data_ptr(), s_w.data_ptr(),
                                  2565, y.data_ptr(), cuda_door._stream(x))
    assert err == 0
    assert torch.equal(y.cpu(), ref.bitlinear(x.cpu(), qweight.cpu(), s_w.cpu(), 2560))
