#!/usr/bin/env bash
# One GPU-machine session. Run from the repository root, with PYTHONPATH set so that
# `bitnet_train` and its dependencies import (kernels/cuda/gpu_packages.sh builds the folder of
# packages the lent machine lacks):
#     PYTHONPATH=$PWD:$PWD/.gpu_pkgs bash kernels/cuda/gpu_session.sh [steps...]
# Default steps (issue 18: QAT speed; under 8 minutes in all, BUDGET_S caps the sum):
#   env      nvidia-smi, versions                                            -> env.log
#   triton   the Triton kernels' tests (BitLinear, W2A8), compiled on the GPU -> pytest_triton.log
#   train    bitnet-train bench train-gpu (700m, 2b4t; bf16, fused and torch
#            QAT, torchao, onebitllms)                                       -> train_gpu.log, .json
#   gemm     W2A8 GEMMs (CUDA mma.sync, Triton wgmma) vs cuBLAS bf16 at M = 16
#            and 512, the 2B4T shapes                                        -> gemm.log
#   dist     one FSDP2 and one ZeRO-3 run of the 700m pipeline, world size 1  -> distributed.log
#   train2   bench train-gpu --compile --chunked-ce, 700m, bf16 and fused QAT -> train_gpu.log,
#            train_compiled.json (last: the budget cuts it first)
# Other steps, by name: compile (nvcc check), tests (W2A8 GPU tests), bench (the whole W2A8
# benchmark), engine (the engine's GPU test), sweep (GEMV tile variants).
# Everything lands in ${OUT:-/tmp/gpu_session}, at most 8 files (what the lent machine returns).
set -uo pipefail
out=${OUT:-/tmp/gpu_session}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 BITNET_TRAIN_CACHE=${BITNET_TRAIN_CACHE:-/tmp/bitnet_train_cache}
steps=${*:-env triton train gemm dist train2}
py=${PYTHON:-python3}
has() { [[ " $steps " == *" $1 "* ]]; }
summary="$out/summary.log"
: >"$summary"
note() { echo "== $* (${SECONDS}s)" | tee -a "$summary"; }
deadline=$((SECONDS + ${BUDGET_S:-470}))
# A step's time limit: its own, or what is left of the budget if less (at least 10 s).
limit() { local left=$((deadline - SECONDS)); ((left < 10)) && left=10; echo $(($1 < left ? $1 : left)); }

if has env; then
    { nvidia-smi; nvcc --version; $py -c "import torch, sys; print(sys.version); print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(), torch.cuda.get_device_properties(0))"
       $py -c "import importlib.metadata as m
for p in ('triton', 'transformers', 'accelerate', 'torchao', 'onebitllms', 'deepspeed', 'hydra-core', 'datasets'):
    try: print(p, m.version(p))
    except m.PackageNotFoundError: print(p, 'MISSING')"; } >"$out/env.log" 2>&1
    note "env rc=$? $(grep -m1 -o 'NVIDIA H[0-9A-Za-z ]*' "$out/env.log")"
fi
if has compile; then
    timeout $(limit 120) bash kernels/cuda/check_compile.sh >"$out/compile.log" 2>&1
    note "compile rc=$? $(grep -c 'registers' "$out/compile.log") ptxas reports"
    grep -E "Compiling entry|registers" "$out/compile.log" | grep -A1 "sm_90" | grep -v "^--" >>"$summary"
fi
if has tests; then
    timeout $(limit 400) $py -m pytest -m gpu tests/test_cuda_kernels.py -v -p no:cacheprovider -rfEs >"$out/pytest_cuda.log" 2>&1
    note "pytest cuda rc=$? $(tail -1 "$out/pytest_cuda.log")"
    grep -E "FAILED|ERROR" "$out/pytest_cuda.log" | head -20 >>"$summary"
fi
if has bench; then
    timeout $(limit 400) $py -m bitnet_train.bench.cuda_kernels --markdown --json "$out/bench.json" >"$out/bench.log" 2>&1
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
    timeout $(limit 500) $py -m pytest -m gpu tests/test_engine.py -v -p no:cacheprovider -rfEs >"$out/pytest_engine.log" 2>&1
    note "pytest engine rc=$? $(tail -1 "$out/pytest_engine.log")"
    grep -E "FAILED|ERROR" "$out/pytest_engine.log" | head -20 >>"$summary"
fi
if has triton; then  # compiled here, not interpreted: tests/test_triton_bitlinear.py picks the GPU
    timeout $(limit 150) $py -m pytest tests/test_triton_bitlinear.py tests/test_triton_w2a8.py -v -p no:cacheprovider -rfEs \
        >"$out/pytest_triton.log" 2>&1
    note "pytest triton rc=$? $(tail -1 "$out/pytest_triton.log")"
    grep -E "FAILED|ERROR" "$out/pytest_triton.log" | head -20 >>"$summary"
fi
run_train() {  # json name, time limit, then bench train-gpu's options
    local name=$1 seconds=$2; shift 2
    local log="$out/train_gpu.log" from
    from=$(($(cat "$log" 2>/dev/null | wc -l) + 1))
    timeout $(limit "$seconds") $py -m bitnet_train.cli bench train-gpu --json "$out/$name.json" "$@" >>"$log" 2>&1
    note "bench train-gpu $* rc=$?"
    tail -n +"$from" "$log" | grep -E "^\| |GiB, torch|needs a CUDA|^host syncs" >>"$summary"
}
if has train; then
    run_train train_gpu 300 ${TRAIN_ARGS:-}
fi
if has gemm; then  # the prefill shapes of issue 18: M = 16 and 512
    timeout $(limit 100) $py -m bitnet_train.bench.cuda_kernels --tokens 16 512 --markdown --triton >"$out/gemm.log" 2>&1
    note "W2A8 GEMM rc=$?"
    grep -E "^\|" "$out/gemm.log" >>"$summary"
fi
if has dist; then  # the real pipeline (accelerate launch), 700m, 3 bf16 steps with the fused BitLinear
    log="$out/distributed.log"
    : >"$log"
    run_pipeline() {  # launch-config name, then overrides
        local config=$1; shift
        rm -rf "/tmp/dist_$config"
        local start=$SECONDS
        timeout $(limit 150) $py -m accelerate.commands.launch --config_file "launch/accelerate/$config.yaml" \
            --num_processes 1 -m bitnet_train.cli model=700m pipeline=[pretrain] \
            stages.pretrain.max_steps=3 stages.pretrain.precision=bf16 stages.pretrain.micro_batch_size=8 \
            stages.pretrain.data.seq_len=1024 stages.pretrain.eval_every=1000 stages.pretrain.eval_batches=1 \
            stages.pretrain.save_every=1000 logging.wandb=disabled logging.plot=false logging.progress_bar=false \
            logging.log_every=1 output_dir="/tmp/dist_$config" "$@" >>"$log" 2>&1
        local rc=$?
        note "$config rc=$rc in $((SECONDS - start)) s (start-up, 3 steps, final save)"
        cat "/tmp/dist_$config/pretrain/metrics.jsonl" 2>/dev/null | tee -a "$log" >>"$summary"
        grep -E "^bitnet-train:|Error:" "$log" | head -3 >>"$summary"  # our one-line errors first
    }
    echo "---- FSDP2 (launch/accelerate/fsdp.yaml)" >>"$log"
    run_pipeline fsdp model.bitlinear_kernel=triton
    echo "---- DeepSpeed ZeRO-3 (launch/accelerate/deepspeed_zero3.yaml)" >>"$log"
    if $py -c "import deepspeed" >/dev/null 2>&1; then
        run_pipeline deepspeed_zero3
    else  # distributed.configure_deepspeed refuses ZeRO-3 at start-up in any case
        note "deepspeed_zero3 not run: deepspeed is not installed here" | tee -a "$log"
    fi
fi
if has train2; then  # what torch.compile and the chunked loss add, 700m: bf16 vs the fused QAT
    run_train train_compiled 150 --models 700m --variants bf16 qat-triton --compile --chunked-ce
fi
cat "$summary"
