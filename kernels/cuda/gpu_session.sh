#!/usr/bin/env bash
# One GPU-machine session for the W2A8 kernels: build, compile check, GPU tests, benchmark, a
# GEMV tile sweep, the engine's GPU test and (optional) a QAT train-step timing. Logs go to
# ${OUT:-/tmp/w2a8_session}. Run from the repository root, with PYTHONPATH set so that
# `bitnet_train` and its dependencies import:
#     PYTHONPATH=$PWD bash kernels/cuda/gpu_session.sh [steps...]
# steps (default: all): env compile tests bench engine sweep qat
set -uo pipefail
out=${OUT:-/tmp/w2a8_session}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 BITNET_TRAIN_CACHE=${BITNET_TRAIN_CACHE:-/tmp/bitnet_train_cache}
steps=${*:-env compile tests bench engine sweep qat}
py=${PYTHON:-python3}
has() { [[ " $steps " == *" $1 "* ]]; }
summary="$out/summary.log"
: >"$summary"
note() { echo "== $*" | tee -a "$summary"; }

if has env; then
    { nvidia-smi; nvcc --version; $py -c "import torch, sys; print(sys.version); print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(), torch.cuda.get_device_properties(0))"; } >"$out/env.log" 2>&1
    note "env rc=$? $(grep -m1 -o 'NVIDIA H[0-9A-Za-z ]*' "$out/env.log")"
fi
if has compile; then
    timeout 300 bash kernels/cuda/check_compile.sh >"$out/compile.log" 2>&1
    note "compile rc=$? $(grep -c 'registers' "$out/compile.log") ptxas reports"
    grep -E "Compiling entry|registers" "$out/compile.log" | grep -A1 "sm_90" | grep -v "^--" >>"$summary"
fi
if has tests; then
    timeout 400 $py -m pytest -m gpu tests/test_cuda_kernels.py -v -p no:cacheprovider -rfEs >"$out/pytest_cuda.log" 2>&1
    note "pytest cuda rc=$? $(tail -1 "$out/pytest_cuda.log")"
    grep -E "FAILED|ERROR" "$out/pytest_cuda.log" | head -20 >>"$summary"
fi
if has bench; then
    timeout 400 $py -m bitnet_train.bench.cuda_kernels --markdown --json "$out/bench.json" >"$out/bench.log" 2>&1
    note "bench rc=$?"
    cat "$out/bench.log" >>"$summary"
fi
if has sweep; then  # GEMV tile variants (decode only), each a separate build of the same source
    : >"$out/sweep.log"
    # "WARPS ROWS UNROLL MIN_BLOCKS" of the GEMV and the fused decode bitlinear (defaults:
    # 4 2 2 0). SWEEP_VARIANTS overrides the list, SWEEP_TOKENS the token counts, and
    # SWEEP_TESTS=1 also runs the GPU tests against each variant's build.
    read -r -a variants <<<"${SWEEP_VARIANTS:-4_2_2_0 8_1_2_0 4_2_2_8 8_1_2_4 8_1_1_0 4_4_2_0}"
    for v in "${variants[@]}"; do  # builds in parallel (one nvcc each), then times one by one
        IFS=_ read -r w r u b <<<"$v"
        NVCC_EXTRA="-DW2A8_GEMV_WARPS=$w -DW2A8_GEMV_ROWS=$r -DW2A8_GEMV_UNROLL=$u -DW2A8_GEMV_MIN_BLOCKS=$b" \
            timeout 180 bash kernels/cuda/build.sh "/tmp/w2a8_$v.so" >"/tmp/w2a8_$v.log" 2>&1 &
    done
    wait
    for v in "${variants[@]}"; do
        IFS=_ read -r w r u b <<<"$v"
        lib=/tmp/w2a8_$v.so
        if [ -f "$lib" ]; then
            echo "--- warps=$w rows=$r unroll=$u min_blocks=$b" >>"$out/sweep.log"
            timeout 150 $py -m bitnet_train.bench.cuda_kernels --lib "$lib" --tokens ${SWEEP_TOKENS:-1} \
                --iters 200 >>"$out/sweep.log" 2>&1
            if [ "${SWEEP_TESTS:-0}" = 1 ]; then
                NVCC_EXTRA="-DW2A8_GEMV_WARPS=$w -DW2A8_GEMV_ROWS=$r -DW2A8_GEMV_UNROLL=$u -DW2A8_GEMV_MIN_BLOCKS=$b" \
                    BITNET_TRAIN_CACHE=/tmp/cache_$v timeout 200 $py -m pytest -m gpu tests/test_cuda_kernels.py \
                    -q -p no:cacheprovider 2>&1 | tail -1 | sed "s/^/pytest $v: /" >>"$out/sweep.log"
            fi
        else
            echo "--- $v BUILD FAILED" >>"$out/sweep.log"; cat "/tmp/w2a8_$v.log" >>"$out/sweep.log"
        fi
    done
    note "sweep done"
    grep -E "^---|^(q_proj|k_proj|gate|down)|floor|^pytest" "$out/sweep.log" | sed 's/^device: .*graph node floor/floor/' >>"$summary"
fi
if has engine; then
    timeout 500 $py -m pytest -m gpu tests/test_engine.py -v -p no:cacheprovider -rfEs >"$out/pytest_engine.log" 2>&1
    note "pytest engine rc=$? $(tail -1 "$out/pytest_engine.log")"
    grep -E "FAILED|ERROR" "$out/pytest_engine.log" | head -20 >>"$summary"
fi
if has qat; then  # one AdamW step of the 700m config, bf16 autocast, quantize=true vs false
    timeout 300 $py - >"$out/qat.log" 2>&1 <<'PY'
import statistics, time, torch
from bitnet_train.model import BitNetTrainConfig, BitNetTrainForCausalLM
from bitnet_train.model_factory import named_model_config
vocab, batch, seq, reps = 128256, 8, 1024, 6
base = named_model_config("700m", vocab).to_dict()
ids = torch.randint(0, vocab, (batch, seq), device="cuda")
res = {}
for quantize in (True, False):
    torch.manual_seed(0)
    model = BitNetTrainForCausalLM(BitNetTrainConfig(**{**base, "quantize": quantize})).cuda().train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), fused=True)
    n = sum(p.numel() for p in model.parameters())
    times = []
    for rep in range(reps + 2):
        torch.cuda.synchronize(); t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(ids, labels=ids).loss
        loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if rep >= 2: times.append(time.perf_counter() - t0)
    res[quantize] = statistics.median(times)
    print(f"quantize={quantize}: {n/1e6:.0f}M params, batch {batch}x{seq}, median step {res[quantize]*1e3:.1f} ms "
          f"({batch*seq/res[quantize]:.0f} tok/s), peak mem {torch.cuda.max_memory_allocated()/2**30:.1f} GiB", flush=True)
    del model, opt; torch.cuda.empty_cache(); torch.cuda.reset_peak_memory_stats()
print(f"ternary / bf16 step time = {res[True]/res[False]:.2f}x")
PY
    note "qat rc=$?"
    cat "$out/qat.log" | tail -5 >>"$summary"
fi
cat "$summary"
