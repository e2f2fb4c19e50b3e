"""bitnet_train.kernels.cpu: compiled kernels (both backends, 1 and 2 threads) and fallback."""
import multiprocessing
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bitnet_train import quant, ternary_layout
from bitnet_train.kernels import cpu

ext = cpu._ext
CONFIGS = [(backend, threads) for backend in ("avx512", "avx2", "scalar") for threads in (1, 2)]


@pytest.fixture(params=CONFIGS, ids=[f"{b}-{t}thr" for b, t in CONFIGS])
def native(request):
    """Routes the door through one compiled backend on a given number of threads."""
    backend, threads = request.param
    if ext is None:
        pytest.skip("bitnet_train._cpu_kernels is not built")
    if backend not in ext.available_backends():
        pytest.skip(f"this CPU cannot run the {backend} backend")
    default_threads = ext.get_num_threads()
    ext.set_backend(backend)
    ext.set_num_threads(threads)
    if cpu.backend() != backend:
        pytest.skip(f"the door does not route to the compiled {backend} backend on this CPU")
    yield backend
    ext.set_backend("auto")
    ext.set_num_threads(default_threads)


@pytest.fixture
def needs_ext():
    """The door runs the compiled kernels (their argument checks are what is tested)."""
    if ext is None or "avx2" not in ext.available_backends():
        pytest.skip("the compiled AVX2 kernels are not available here")


def generator(seed):
    return torch.Generator().manual_seed(seed)


def random_qweight(n, k, seed=0):
    return ternary_layout.pack_ternary(torch.randint(-1, 2, (n, k), generator=generator(seed)))


def random_activations(m, kpad, seed=1):
    return torch.randint(-128, 128, (m, kpad), generator=generator(seed), dtype=torch.int8)


def assert_quantized_like_quant(x, q, s):
    q_ref, s_ref = quant.quantize_int8(x)
    k = x.shape[1]
    assert q.dtype == torch.int8 and q.shape == (x.shape[0], ternary_layout.padded_features(k))
    assert torch.equal(q[:, :k], q_ref.to(torch.int8))
    assert not q[:, k:].any(), "padding must be zero"
    assert torch.equal(s, s_ref.squeeze(-1))  # bitwise: same float32 operations


# ---------------------------------------------------------------- activation quantization


@pytest.mark.parametrize("m,k", [(1, 1), (1, 7), (17, 33), (3, 300), (2, 1000)])
def test_quantize_matches_quant_int8(native, m, k):
    x = torch.randn(m, k, generator=generator(m * k)) * 3
    assert_quantized_like_quant(x, *cpu.quantize_activations(x))


def test_quantize_scale_rounds_like_torch(native):
    """torch computes 127 / amax as reciprocal(amax) * 127: two roundings, not one division."""
    x = torch.rand(4096, 40, generator=generator(2)) * 10
    true_division = np.float32(127) / x.abs().amax(dim=1).clamp(min=quant.EPS).numpy()
    _, s = cpu.quantize_activations(x)
    assert (s.numpy() != true_division).any(), "inputs do not tell the two roundings apart"
    assert torch.equal(s, quant.activation_scale(x).squeeze(-1))


def rows_with_ties(amaxes):
    """Rows holding amax plus values x with x * s exactly k + 0.5 in float32, for many k."""
    rows, tie_masks = [], []
    halves = torch.arange(-126, 126) + 0.5
    for amax in amaxes:
        s = quant.activation_scale(torch.tensor([[amax]]))[0, 0]
        cands = torch.cat([halves / s, torch.nextafter(halves / s, halves.sign() * 1e9)])
        ties = cands[cands * s == torch.cat([halves, halves])]
        rows.append(torch.cat([torch.tensor([amax]), ties, torch.zeros(300 - 1 - len(ties))]))
        tie_masks.append(torch.arange(300).ge(1) & torch.arange(300).le(len(ties)))
    return torch.stack(rows), torch.stack(tie_masks)


def test_quantize_rounds_exact_halves_to_even(native):
    x, is_tie = rows_with_ties([127.0, 100.0, 3.0, 0.7, 12345.0])
    assert is_tie.sum() > 200, "too few exact ties constructed"
    q, s = cpu.quantize_activations(x)
    assert_quantized_like_quant(x, q, s)
    tie_codes = q[:, :300][is_tie]
    assert (tie_codes % 2 == 0).all(), "k + 0.5 must round to the even neighbour"
    floors = torch.floor(x[is_tie] * s.repeat_interleave(is_tie.sum(1)))
    assert (floors % 2).unique().numel() == 2, "ties between even and odd neighbours both needed"


def test_quantize_all_zero_row(native):
    x = torch.zeros(2, 50)
    x[1, 3] = -2.0
    assert_quantized_like_quant(x, *cpu.quantize_activations(x))


# ---------------------------------------------------------------- integer matmul


@pytest.mark.parametrize("m", [1, 3, 17, 64])
@pytest.mark.parametrize("k,n", [(1, 1), (100, 5), (129, 33), (300, 67), (513, 8), (2100, 9)])
def test_matmul_int_equals_reference(native, m, k, n):
    qweight = random_qweight(n, k, seed=k + n)
    a = random_activations(m, ternary_layout.padded_features(k), seed=m)
    out = cpu.ternary_matmul_int(a, qweight)
    assert out.dtype == torch.int32 and out.shape == (m, n)
    assert torch.equal(out, cpu.reference_matmul_int(a, qweight))


@pytest.mark.parametrize("m", [1, 3])
@pytest.mark.parametrize("a_value,t", [(-128, 1), (127, 1), (-128, -1), (127, -1), (-128, 0)])
def test_matmul_int_is_exact_at_int16_extremes(native, m, a_value, t):
    """Constant rows drive every int16 partial sum to its bound; K spans several flushes."""
    k, n = 128 * 40, 5
    a = torch.full((m, k), a_value, dtype=torch.int8)
    qweight = ternary_layout.pack_ternary(torch.full((n, k), t))
    assert torch.equal(cpu.ternary_matmul_int(a, qweight), torch.full((m, n), a_value * t * k, dtype=torch.int32))


@pytest.mark.parametrize("a_value,t", [(-128, 1), (127, 1), (-128, -1), (127, -1)])
def test_grouped_gemv_is_exact_at_int16_extremes(native, a_value, t):
    """The decode GEMV (one row, grouped weights) keeps its sums to their bound too: AVX2's int16 sums of
    4 u products, AVX-512's int32 sums of fields scaled by up to 64."""
    k, n = 128 * 40, 6
    a = torch.full((1, k), a_value, dtype=torch.int8)
    grouped = ext.group_rows(ternary_layout.pack_ternary(torch.full((n, k), t)).numpy())
    got = torch.from_numpy(ext.ternary_gemm_int(a.numpy(), grouped, rows=n))
    assert torch.equal(got, torch.full((1, n), a_value * t * k, dtype=torch.int32))


@pytest.mark.parametrize("a_value,t", [(-128, 1), (127, -1)])
def test_grouped_gemv_is_exact_past_an_accumulator_flush(native, a_value, t):
    """K past the AVX-512 GEMV's 16384-block flush (kVnniFlushBlocks): the scaled field sums restart exactly."""
    k, n = 128 * (16384 + 3), 4
    a = torch.full((1, k), a_value, dtype=torch.int8)
    grouped = ext.group_rows(ternary_layout.pack_ternary(torch.full((n, k), t, dtype=torch.int8)).numpy())
    got = torch.from_numpy(ext.ternary_gemm_int(a.numpy(), grouped, rows=n))
    assert torch.equal(got, torch.full((1, n), a_value * t * k, dtype=torch.int32))


# ---------------------------------------------------------------- bitlinear


def ternary_layer(n, k, seed=3):
    w = torch.randn(n, k, generator=generator(seed))
    codes, s = quant.ternarize(w)
    return w, ternary_layout.pack_ternary(codes), s


@pytest.mark.parametrize("shape", [(1, 300), (5, 300), (2, 3, 300)])
def test_bitlinear_matches_fake_quantized_linear(native, shape):
    w, qweight, s = ternary_layer(67, 300)
    x = torch.randn(shape, generator=generator(4))
    y = cpu.bitlinear(x, qweight, s, 300)
    expected = F.linear(quant.quantize_activation(x), quant.quantize_weight(w))
    assert y.shape == expected.shape
    assert ((y - expected).norm() / expected.norm()).item() < 1e-5


@pytest.mark.parametrize("m", [1, 17])
def test_bitlinear_equals_reference_bitwise(native, m):
    _, qweight, s = ternary_layer(40, 700)
    x = torch.randn(m, 700, generator=generator(5))
    assert torch.equal(cpu.bitlinear(x, qweight, s, 700), cpu.reference_bitlinear(x, qweight, s, 700))


@pytest.mark.parametrize("m,k,n", [(1, 2560, 7), (1, 300, 1), (3, 700, 13), (5, 128, 4), (1, 6912, 10)])
def test_grouped_rows_give_the_same_integers(native, m, k, n):
    """The decoder's streaming layout (group_rows) holds the same codes: the products are exact."""
    qweight = random_qweight(n, k)
    a = random_activations(m, ternary_layout.padded_features(k))
    grouped = ext.group_rows(qweight.numpy())
    assert grouped.shape == (-(-n // 4), 4 * qweight.shape[1])
    got = torch.from_numpy(ext.ternary_gemm_int(a.numpy(), grouped, rows=n))
    assert torch.equal(got, cpu.reference_matmul_int(a, qweight))


def test_grouped_rows_of_the_wrong_shape_are_named(needs_ext):
    grouped = ext.group_rows(random_qweight(8, 256).numpy())  # 8 rows: 2 groups
    with pytest.raises(ValueError, match=r"grouped qweight of 9 rows must be \(3, 256\)"):
        ext.ternary_gemm_int(random_activations(1, 256).numpy(), grouped, rows=9)


# ---------------------------------------------------------------- int8-weight head


def int8_head(n, k, seed=7):
    weight = torch.randint(-127, 128, (n, k), generator=generator(seed), dtype=torch.int8)
    return weight, torch.rand(n, generator=generator(seed + 1)) * 0.01 + 1e-4


@pytest.mark.parametrize("m,k,n", [(1, 16, 4), (1, 2565, 301), (3, 2560, 7), (6, 9000, 13), (1, 5, 3)])
def test_int8_weight_linear_equals_reference_bitwise(native, m, k, n):
    """k = 9000 crosses the kernel's int32 chunk (4096 values) into its int64 total."""
    weight, scale = int8_head(n, k)
    x = torch.randn(m, k, generator=generator(m + k)) * 4
    assert torch.equal(cpu.int8_weight_linear(x, weight, scale), cpu.reference_int8_weight_linear(x, weight, scale))


@pytest.mark.parametrize("m,k,n", [(1, 16, 4), (1, 2565, 301), (3, 2560, 7), (6, 9000, 13), (1, 5, 3), (2, 33, 9)])
def test_int8_weight_linear_on_grouped_rows_equals_reference_bitwise(native, m, k, n):
    """The grouped layout (4 rows interleaved in 16-value blocks, zero padded) gives the same numbers:
    rows that do not fill the last group, K not a multiple of 16, a GEMM's 2-row tiles."""
    weight, scale = int8_head(n, k)
    x = torch.randn(m, k, generator=generator(m + k)) * 4
    got = cpu.int8_weight_linear(x, cpu.int8_group_rows(weight), scale, rows=n)
    assert torch.equal(got, cpu.reference_int8_weight_linear(x, weight, scale))


def test_int8_group_rows_round_trips(needs_ext):
    weight, _ = int8_head(13, 70)
    grouped = cpu.int8_group_rows(weight)
    assert grouped.shape == (4, 4 * 80)
    assert torch.equal(cpu.int8_ungroup_rows(grouped, 13, 70), weight)
    assert torch.equal(grouped.view(4, 5, 4, 16)[1, 0, 2], weight[6, :16])  # row 6: group 1, slot 2


def test_int8_grouped_weight_of_the_wrong_shape_is_named(needs_ext):
    weight, scale = int8_head(8, 64)
    with pytest.raises(ValueError, match="grouped weight of 9 rows"):
        cpu.int8_weight_linear(torch.randn(1, 64), cpu.int8_group_rows(weight), torch.ones(9), rows=9)


def test_int8_weight_linear_is_the_dequantized_product(native):
    """Rounding x to int16 per token costs under 1e-4 relative against float64 maths."""
    weight, scale = int8_head(50, 1000)
    x = torch.randn(2, 1000, generator=generator(9))
    exact = x.double() @ (weight.double() * scale.double()[:, None]).T
    got = cpu.int8_weight_linear(x, weight, scale)
    assert ((got.double() - exact).norm() / exact.norm()).item() < 1e-4


def test_int8_weight_linear_rejects_mismatched_shapes(needs_ext):
    weight, scale = int8_head(4, 64)
    with pytest.raises(ValueError, match="64 columns"):
        cpu.int8_weight_linear(torch.randn(1, 63), weight, scale)
    with pytest.raises(ValueError, match="one scale per weight row"):
        cpu.int8_weight_linear(torch.randn(1, 64), weight, scale[:3])


def test_group_rows_reference_is_the_kernels_layout(needs_ext):
    qweight = random_qweight(13, 700)
    grouped = cpu.reference_group_rows(qweight)
    assert torch.equal(grouped, torch.from_numpy(ext.group_rows(qweight.numpy())))
    assert torch.equal(cpu.ungroup_rows(grouped, 13), qweight)


@pytest.mark.parametrize("m,k,n", [(1, 2560, 9), (3, 300, 13)])
def test_bitlinear_with_row_scales_on_grouped_rows_equals_reference(native, m, k, n):
    """The ternary head: one s_w per row, weights in the streaming layout; bit for bit."""
    qweight = random_qweight(n, k)
    row_scales = torch.rand(n, generator=generator(2)) * 50 + 10
    x = torch.randn(m, k, generator=generator(3))
    got = cpu.bitlinear(x, cpu.group_rows(qweight), row_scales, k, rows=n)
    assert torch.equal(got, cpu.reference_bitlinear(x, qweight, row_scales, k))


def test_bitlinear_names_a_wrong_number_of_scales(needs_ext):
    _, qweight, _ = ternary_layer(8, 300)
    with pytest.raises(ValueError, match=r"one per row \(8\), got 3"):
        cpu.bitlinear(torch.randn(2, 300), qweight, torch.ones(3), 300)


# ---------------------------------------------------------------- base-3 (1.6-bit) GEMV


def every_base3_byte() -> torch.Tensor:
    """Ternary codes (9, 400) whose base-3 packing holds each of the 243 bytes 0 .. 242 at least once."""
    digits = torch.tensor([[(b // 3**i) % 3 for i in range(5)] for b in range(243)]) - 1  # (243, 5)
    codes = torch.cat([digits, digits.roll(81, 0), digits.roll(162, 0)], dim=1)  # (243, 15)
    return codes.reshape(-1, 405)[:, :400].clone()


@pytest.mark.parametrize("m,k,n", [(1, 2560, 9), (1, 6912, 5), (3, 300, 13), (1, 7, 4), (2, 160, 1)])
def test_base3_gemm_equals_the_integer_reference(native, m, k, n):
    codes = torch.randint(-1, 2, (n, k), generator=generator(k))
    weight = ext.base3_layout(ternary_layout.pack_ternary_base3(codes).numpy(), k)
    a = random_activations(m, -(-k // 160) * 160)
    a[:, k:] = 0
    got = torch.from_numpy(ext.base3_gemm_int(a.numpy(), weight, n))
    assert torch.equal(got.long(), a[:, :k].long() @ codes.long().T)


def test_base3_digits_are_exact_for_every_byte(native):
    """The pre-scaled byte ceil(b * 256 / 243) gives back all five digits of every b in 0 .. 242."""
    codes = every_base3_byte()
    packed = ternary_layout.pack_ternary_base3(codes)
    assert set(packed.unique().tolist()) == set(range(243))
    weight = ext.base3_layout(packed.numpy(), 400)
    a = random_activations(4, 480)
    a[:, 400:] = 0
    got = torch.from_numpy(ext.base3_gemm_int(a.numpy(), weight, len(codes)))
    assert torch.equal(got.long(), a[:, :400].long() @ codes.long().T)


def test_base3_layout_names_bytes_that_are_not_five_codes(needs_ext):
    packed = ternary_layout.pack_ternary_base3(torch.zeros(2, 10, dtype=torch.int8))
    packed[1, 1] = 243
    with pytest.raises(ValueError, match="byte > 242"):
        ext.base3_layout(packed.numpy(), 10)
    with pytest.raises(ValueError, match="needs 3 base-3 bytes per row"):
        ext.base3_layout(packed.numpy(), 11)


# ---------------------------------------------------------------- 4-bit head


def test_int4_packing_round_trips_q4_0_codes():
    """The largest-magnitude value of each group of 128 maps to code -8; the rest round to -8..7
    (within half a step, or one step where +8 is clamped to 7)."""
    w = torch.randn(6, 300, generator=generator(11))
    packed, scales = cpu.pack_int4(w)
    assert packed.shape == (2, 3, 4, 64) and scales.shape == (2, 3, 4)
    codes, group_scales = cpu.unpack_int4(packed, scales, 6)
    assert codes.shape == (6, 384) and int(codes.min()) >= -8 and int(codes.max()) <= 7
    assert not codes[:, 300:].any()  # padding: zero weights
    dequantized = (codes.view(6, 3, 128).float() * group_scales[..., None]).view(6, -1)[:, :300]
    step = group_scales.abs().repeat_interleave(128, dim=1)[:, :300]
    error = (dequantized - w).abs()
    assert (error <= step + 1e-6).all() and (error <= step / 2 + 1e-6).float().mean() > 0.99
    peak = w.abs().view(6, -1).amax(dim=1)
    assert torch.allclose(dequantized.abs().amax(dim=1), peak)


@pytest.mark.parametrize("m,k,n", [(1, 2560, 9), (3, 300, 13), (1, 64, 4), (5, 1000, 130)])
def test_int4_weight_linear_equals_reference(native, m, k, n):
    """Exact integer group products; only the float sum over groups may round differently."""
    packed, scales = cpu.pack_int4(torch.randn(n, k, generator=generator(k)))
    x = torch.randn(m, k, generator=generator(m))
    got, ref = cpu.int4_weight_linear(x, packed, scales, n), cpu.reference_int4_weight_linear(x, packed, scales, n)
    assert got.shape == (m, n)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


def test_int4_weight_linear_rejects_a_layout_of_other_rows(needs_ext):
    packed, scales = cpu.pack_int4(torch.randn(8, 256))
    with pytest.raises(ValueError, match=r"9 rows of 256 features need weight \(3, 2, 4, 64\)"):
        cpu.int4_weight_linear(torch.randn(1, 256), packed, scales, 9)


# ---------------------------------------------------------------- fallback and errors


def fallback_case():
    _, qweight, s = ternary_layer(33, 200)
    return torch.randn(4, 200, generator=generator(6)), qweight, s


def test_missing_extension_warns_once_and_gives_same_numbers(monkeypatch):
    x, qweight, s = fallback_case()
    expected = cpu.bitlinear(x, qweight, s, 200), cpu.quantize_activations(x)
    monkeypatch.setattr(cpu, "_ext", None)
    monkeypatch.setattr(cpu, "_warned", False)
    with pytest.warns(RuntimeWarning, match=r"missing.*pip install -e \."):
        y = cpu.bitlinear(x, qweight, s, 200)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        q = cpu.quantize_activations(x)
        assert cpu.backend() == "torch"
    assert torch.equal(y, expected[0])
    assert all(torch.equal(got, want) for got, want in zip(q, expected[1]))


def test_cpu_without_avx2_runs_the_scalar_kernels(monkeypatch, needs_ext):
    x, qweight, s = fallback_case()
    expected = cpu.bitlinear(x, qweight, s, 200)
    monkeypatch.setattr(ext, "available_backends", lambda: ["scalar"])
    monkeypatch.setattr(cpu, "_warned", False)
    ext.set_backend("scalar")  # what "auto" picks on such a CPU
    try:
        with pytest.warns(RuntimeWarning, match="lacks AVX2.*scalar"):
            assert cpu.backend() == "scalar"
        assert torch.equal(cpu.bitlinear(x, qweight, s, 200), expected)
    finally:
        ext.set_backend("auto")


@pytest.mark.parametrize(
    "a,qweight,message",
    [
        (torch.zeros(2, 128), torch.zeros(3, 32, dtype=torch.uint8), "dtype int8"),
        (torch.zeros(2, 128, dtype=torch.int8), torch.zeros(3, 32, dtype=torch.int8), "dtype uint8"),
        (torch.zeros(2, 100, dtype=torch.int8), torch.zeros(3, 25, dtype=torch.uint8), "multiple of 128"),
        (torch.zeros(2, 256, dtype=torch.int8), torch.zeros(3, 32, dtype=torch.uint8), "bytes per row"),
        (torch.zeros(256, dtype=torch.int8), torch.zeros(3, 64, dtype=torch.uint8), "2-D"),
    ],
)
def test_matmul_int_rejects_bad_arguments(needs_ext, a, qweight, message):
    with pytest.raises(ValueError, match=message):
        cpu.ternary_matmul_int(a, qweight)


def test_extension_rejects_non_contiguous_arrays(needs_ext):
    a = np.zeros((256, 2), dtype=np.int8).T
    with pytest.raises(ValueError, match="C-contiguous"):
        ext.ternary_gemm_int(a, np.zeros((3, 64), dtype=np.uint8))


def test_bitlinear_rejects_mismatched_features(needs_ext):
    _, qweight, s = ternary_layer(8, 300)
    with pytest.raises(ValueError, match="in_features"):
        cpu.bitlinear(torch.randn(2, 299), qweight, s, 300)
    with pytest.raises(ValueError, match="bytes per row"):
        cpu.bitlinear(torch.randn(2, 100), qweight, s, 100)
    with pytest.raises(ValueError, match="qscale"):
        cpu.bitlinear(torch.randn(2, 300), qweight, 0.0, 300)


def test_settings_reject_unknown_values(needs_ext):
    with pytest.raises(ValueError, match="unknown backend"):
        ext.set_backend("gpu")
    with pytest.raises(ValueError, match="at least 1"):
        ext.set_num_threads(0)
    assert "scalar" in ext.available_backends()


# ---------------------------------------------------------------- threading


def test_concurrent_calls_from_python_threads(needs_ext):
    """Kernels release the GIL; two callers sharing the worker pool still get exact results."""
    qweight, a = random_qweight(300, 1000), random_activations(5, ternary_layout.padded_features(1000))
    expected = cpu.reference_matmul_int(a, qweight)
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: cpu.ternary_matmul_int(a, qweight), range(64)))
    assert all(torch.equal(r, expected) for r in results)


def _matmul_in_child(a, qweight, queue):
    queue.put(cpu.ternary_matmul_int(a, qweight).numpy())  # numpy pickles by value


def test_forked_child_runs_kernels_after_parent_used_threads(needs_ext):
    """A fork()ed child (e.g. a DataLoader worker) has no pool workers and must not wait on them."""
    qweight, a = random_qweight(64, 500), random_activations(3, ternary_layout.padded_features(500))
    expected = cpu.ternary_matmul_int(a, qweight)  # starts the parent's workers
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_matmul_in_child, args=(a, qweight, queue))
    child.start()
    result = queue.get(timeout=60)
    child.join(timeout=60)
    assert child.exitcode == 0 and torch.equal(torch.from_numpy(result), expected)


# ---------------------------------------------------------------- memory for streamed weights


def transparent_huge_pages() -> bool:
    """Whether this kernel gives huge pages to memory that asks (THP mode `always` or `madvise`)."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return "[never]" not in f.read()
    except OSError:
        return False


def test_on_huge_pages_is_a_copy_with_the_same_values(needs_ext):
    for t in (torch.randn(300, 70), torch.randint(-127, 128, (1000, 33), dtype=torch.int8),
              torch.randn(5, 64).to(torch.bfloat16)):
        copy = cpu.on_huge_pages(t)
        assert copy.dtype == t.dtype and copy.shape == t.shape and torch.equal(copy, t)
        assert copy.data_ptr() % 64 == 0 and copy.data_ptr() != t.data_ptr()
    zeros = cpu.huge_page_zeros(3, 1000, 7)
    assert zeros.shape == (3, 1000, 7) and zeros.dtype == torch.float32 and not zeros.any()


@pytest.mark.skipif(not transparent_huge_pages(), reason="this kernel has transparent huge pages off")
def test_streamed_weights_are_on_huge_pages(needs_ext):
    """Where the kernel gives huge pages on request (THP `madvise` mode too), the buffers get them."""
    copy = cpu.on_huge_pages(torch.ones(6 << 20, dtype=torch.uint8))
    assert cpu._ext.huge_page_bytes(copy.numpy()) >= 4 << 20  # at least the two whole 2 MB pages inside


def test_stream_xor_reads_every_word(needs_ext):
    """The read-bandwidth probe (bench engine's reference) must read the whole buffer, not skip any."""
    data = np.random.default_rng(0).integers(0, 256, (1 << 20) + 96, dtype=np.uint8)
    assert cpu._ext.stream_xor(data) == np.bitwise_xor.reduce(data.view(np.uint64))
    data[-1] ^= 0x80  # the last 32-byte step counts too
    assert cpu._ext.stream_xor(data) == np.bitwise_xor.reduce(data.view(np.uint64))
