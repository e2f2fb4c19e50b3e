"""Compile the fused BitLinear's Triton kernels for a GPU, on a machine without one.

    python -m bitnet_train.kernels.triton_compile_check [--arch 90 80] [--all-tiles]

Triton compiles ahead of time for a named target with the ptxas it bundles; no driver is needed.
This checks what the CPU interpreter (tests/test_triton_bitlinear.py) cannot: that Triton's
compiler accepts the kernels, that the int8 product runs on tensor cores (`wgmma ... s8.s8` on
sm_90, `mma ... s8.s8` on sm_80), that the round-half-even addition of 1.5 * 2^23 survives into
the PTX (a compiler that reassociated or fused it would change the codes), and that ptxas
reports no register spills. Must run without TRITON_INTERPRET (which swaps the kernels for the
interpreter's). Exits non-zero on any failed check.
"""
import argparse
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

MAGIC = "0f4B400000"  # 1.5 * 2^23 as a PTX float literal


@dataclass(frozen=True)
class Build:
    name: str
    kernel: object
    signature: dict
    constexprs: dict
    num_warps: int
    num_stages: int = 3


def builds(all_tiles: bool) -> list[Build]:
    from . import triton_bitlinear as tb, triton_w2a8

    tiles = [(c.kwargs, c.num_warps, c.num_stages) for c in tb._gpu_configs()]
    matmul_sig = {"a_ptr": "*i8", "b_ptr": "*i8", "sa_ptr": "*fp32", "sb_ptr": "*fp32", "y_ptr": "*bf16",
                  "M": "i32", "N": "i32", "K": "i32"}
    matmuls = [Build(f"int8_matmul {kw['BLOCK_M']}x{kw['BLOCK_N']}x{kw['BLOCK_K']}", tb._int8_matmul_kernel,
                     {**matmul_sig, **{k: "constexpr" for k in (*kw, "TO_BF16")}}, {**kw, "TO_BF16": True}, warps, stages)
               for kw, warps, stages in (tiles if all_tiles else tiles[:1])]
    rows_sig = {"x_ptr": "*bf16", "q_ptr": "*i8", "s_ptr": "*fp32", "K": "i32", "stride_x": "i32",
                "EPS": "constexpr", "BLOCK_K": "constexpr"}
    return [  # rows of 2B4T's inputs: K = 2560 and 6912, in blocks of 4096 and 8192 (quantize_rows' warps)
        *[Build(f"quantize_rows (K <= {block})", tb._quantize_rows, rows_sig, {"EPS": 1e-5, "BLOCK_K": block}, block // 512)
          for block in (4096, 8192)],
        Build("ternarize", tb._ternarize, {"w_ptr": "*fp32", "c_ptr": "*i8", "s_ptr": "*fp32", "numel": "i32",
                                           "BLOCK": "constexpr"}, {"BLOCK": 1024}, 4),
        Build("dequantize (per row, bf16)", tb._dequantize,
              {"q_ptr": "*i8", "s_ptr": "*fp32", "y_ptr": "*bf16", "K": "i32", "numel": "i32", "PER_ROW": "constexpr",
               "TO_BF16": "constexpr", "BLOCK": "constexpr"}, {"PER_ROW": True, "TO_BF16": True, "BLOCK": 1024}, 4),
        *matmuls,
        *w2a8_builds(triton_w2a8, all_tiles),
    ]


def w2a8_builds(module, all_tiles: bool) -> list[Build]:
    sig = {"a_ptr": "*i8", "w_ptr": "*u8", "y_ptr": "*i32", "M": "i32", "N": "i32", "KPAD": "i32"}
    configs = module._gpu_configs()
    return [Build(f"w2a8 {c.kwargs['BLOCK_M']}x{c.kwargs['BLOCK_N']} split-K {c.kwargs['SPLIT_K']}", module._w2a8_kernel,
                  {**sig, **{k: "constexpr" for k in c.kwargs}}, c.kwargs, c.num_warps, c.num_stages)
            for c in (configs if all_tiles else configs[:1])]


def ptxas_report(ptx: str, arch: int) -> str:
    from triton.backends.nvidia.compiler import get_ptxas

    gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.ptx"
        path.write_text(ptx)
        done = subprocess.run([get_ptxas(arch).path, "-v", f"--gpu-name={gpu}", str(path), "-o", str(Path(tmp) / "k.o")],
                              capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"ptxas failed: {done.stderr.strip()}")
    return done.stderr


def check(build: Build, arch: int) -> list[str]:
    """Compile one kernel; the failed checks (empty: all passed)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    # What the launcher tells the compiler at a training shape: every pointer 16-byte aligned (torch's
    # allocations) and every integer a multiple of 16 (token counts and 2B4T's feature sizes), so
    # loads vectorise; without it each thread would hold a 64-bit address per element.
    aligned = {(i,): [["tt.divisibility", 16]] for i, kind in enumerate(build.signature.values()) if kind != "constexpr"}
    src = ASTSource(fn=build.kernel, signature=build.signature, constexprs=build.constexprs, attrs=aligned)
    ptx = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                         options={"num_warps": build.num_warps, "num_stages": build.num_stages}).asm["ptx"]
    report = ptxas_report(ptx, arch)
    regs = re.search(r"Used (\d+) registers", report)
    spills = [int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", report)]
    print(f"sm_{arch} {build.name}: {regs.group(1) if regs else '?'} registers, spills {sum(spills)} bytes")
    failed = []
    if any(spills):
        failed.append("register spills")
    if build.name.startswith(("int8_matmul", "w2a8")):
        mma = r"wgmma\.mma_async\S*\.s32\.s8\.s8" if arch >= 90 else r"mma\.sync\S*\.s32\.s8\.s8"
        if not re.search(mma, ptx):
            failed.append(f"no int8 tensor-core instruction ({mma}) in the PTX")
    if build.name.startswith(("quantize_rows", "ternarize")):
        if MAGIC not in ptx:
            failed.append("the round-half-even constant 1.5 * 2^23 was folded away")
        if re.search(rf"fma\.\S+ [^;]*{MAGIC}", ptx):
            failed.append("the rounding addition was fused into an FMA")
    return [f"sm_{arch} {build.name}: {f}" for f in failed]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m bitnet_train.kernels.triton_compile_check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", type=int, nargs="+", default=[90], help="compute capabilities (90: H100/H200)")
    p.add_argument("--all-tiles", action="store_true", help="every autotuned GEMM tile, not only the first")
    args = p.parse_args(argv)
    from .triton_support import interpreting

    if interpreting():
        raise SystemExit("triton_compile_check: unset TRITON_INTERPRET (the interpreter's kernels cannot be compiled)")
    failed = [f for arch in args.arch for build in builds(args.all_tiles) for f in check(build, arch)]
    for f in failed:
        print(f"FAILED {f}", file=sys.stderr)
    if failed:
        raise SystemExit(1)
    print("triton_compile_check: OK")


if __name__ == "__main__":
    main()
