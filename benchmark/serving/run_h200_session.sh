#!/usr/bin/env bash
# What the serving issue measures on one H200, in one run (the machine is lent by the minute):
#   0. FlashInfer JIT warm-up: attention, norm, RoPE and SiLU*mul modules in one parallel build;
#   1. the fused kernels against the torch path, and FlashInfer vs torch_native greedy agreement on a tiny bf16 model,
#      eager and in CUDA graphs, with both decode kernel families and with 16-slot KV pages (pytest);
#   2. bench_one_batch on a Llama-3-8B-shaped dummy model (the defaults: fused kernels, CUDA graphs, tensor-core
#      decode, page size 1): decode vs HF transformers vs the HBM roofline, with a kernel profile;
#   3. batch-1 decode with SGLANG_DISABLE_FUSED_KERNELS=1 (the unfused torch elementwise path), profiled;
#   4. batch 1 and 32 with FlashInfer's CUDA-core decode kernels (SGLANG_FLASHINFER_DECODE_TENSOR_CORES=0);
#   5. batch 1 and 32 with --page-size 16;
#   6. host cost of a decode step through the real Scheduler on the tiny model of step 1 (CUDA graphs, same
#      kernels), with the model and with a null model, so the scheduler's share of the step is known;
#   7. a server of the step-2 model (its defaults) and bench_serving at concurrency 1 (16 prompts) and 32 (256),
#      512 tokens in, 128 out: what a client sees, next to step 2's decode step;
#   8. test_cuda_engine.py (float32 greedy vs HF on CUDA, the 8B-shaped model generating through the Engine).
# Usage, from the repo root after `source .device/env.sh`:  OUT=<dir> [STEPS="0 1 2"] bash benchmark/serving/run_h200_session.sh
# Results: $OUT/*.json and $OUT/*.log (benchmark/results/ keeps the published ones). Every step has its own timeout;
# steps 0-6 together stay under 9 min 30 s (100 + 140 + 170 + 70 + 70 + 70 s, plus seconds for the model config);
# 7 and 8 take up to 200 and 120 s more, so pick steps to fit one 10-minute call.
set -u
OUT=${OUT:?set OUT to the directory that receives the results}
STEPS=" ${STEPS:-0 1 2 3 4 5 6} "
MODEL=/tmp/llama3-8b-shape
COMMON=(--model-path "$MODEL" --load-format dummy --dtype bfloat16)
SHAPE=(--input-len 512 --output-len 64)
log() { echo "=== $(date +%T) $*"; }
want() { [[ "$STEPS" == *" $1 "* ]] && log "$@"; }

nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem --format=csv
python benchmark/serving/make_llama3_8b_dummy.py "$MODEL"

if want 0 FlashInfer JIT warm-up; then
    MAX_JOBS=${MAX_JOBS:-16} timeout 100 python -m sglang.srt.layers.attention.kernel_build --model-path "$MODEL" 2>&1 | tail -n 3
fi

if want 1 pytest test_fused_kernels.py test_flashinfer_backend.py; then
    SGLANG_FLASHINFER_REPORT="$OUT/agreement.json" timeout 140 \
        python -m pytest -q -s -p no:cacheprovider test/srt/test_fused_kernels.py test/srt/test_flashinfer_backend.py \
        2>&1 | tee "$OUT/pytest.log" | tail -n 25
fi

if want 2 bench_one_batch, defaults, HF baseline, profile; then
    timeout 170 python -m sglang.bench_one_batch "${COMMON[@]}" --batch-size 1 32 "${SHAPE[@]}" --profile \
        --result-filename "$OUT/bench_one_batch.json" 2>"$OUT/bench_one_batch.log" >/dev/null
    grep -E "elementwise kernels|CUDA graphs" "$OUT/bench_one_batch.log"
fi

if want 3 bench_one_batch, unfused elementwise kernels, profile; then
    SGLANG_DISABLE_FUSED_KERNELS=1 timeout 70 python -m sglang.bench_one_batch "${COMMON[@]}" --batch-size 1 \
        "${SHAPE[@]}" --profile --skip-hf --result-filename "$OUT/bench_one_batch_unfused.json" \
        2>"$OUT/bench_one_batch_unfused.log" >/dev/null
fi

if want 4 bench_one_batch, CUDA-core decode kernels; then
    SGLANG_FLASHINFER_DECODE_TENSOR_CORES=0 timeout 70 python -m sglang.bench_one_batch "${COMMON[@]}" \
        --batch-size 1 32 "${SHAPE[@]}" --skip-hf --result-filename "$OUT/bench_one_batch_cuda_core_decode.json" \
        2>"$OUT/bench_one_batch_cuda_core_decode.log" >/dev/null
fi

if want 5 bench_one_batch, page size 16; then
    timeout 70 python -m sglang.bench_one_batch "${COMMON[@]}" --page-size 16 --batch-size 1 32 "${SHAPE[@]}" \
        --skip-hf --result-filename "$OUT/bench_one_batch_page16.json" 2>"$OUT/bench_one_batch_page16.log" >/dev/null
fi

if want 6 host cost of a decode step, Scheduler, model vs null model; then
    TINY=$(python -c "from sglang.test.test_utils import TINY_BF16_LLAMA as T, tiny_model; print(tiny_model('llama', **T))" \
        2>/dev/null | tail -n 1)
    timeout 40 python benchmark/serving/profile_decode_host.py --model-path "$TINY" --device cuda --dtype bfloat16 \
        --batch-size 1 32 --input-len 512 --steps 100 --output "$OUT/decode_host.json" 2>"$OUT/decode_host.log" \
        | tail -n 20
fi

if want 7 server + bench_serving at concurrency 1 and 32; then
    PORT=30000
    python -m sglang.launch_server "${COMMON[@]}" --port $PORT >"$OUT/server.log" 2>&1 &
    SERVER=$!
    for _ in $(seq 120); do curl -sf localhost:$PORT/health >/dev/null && break; kill -0 $SERVER || break; sleep 1; done
    for c in 1 32; do
        n=$((c == 1 ? 16 : 256))
        timeout 80 python -m sglang.bench_serving --backend sglang-oai --port $PORT --num-prompts $n --random-input-len 512 \
            --random-output-len 128 --max-concurrency $c --output-file "$OUT/bench_serving_c$c.json" >/dev/null
    done
    kill -INT $SERVER
    for _ in $(seq 30); do kill -0 $SERVER 2>/dev/null || break; sleep 1; done
fi

if want 8 pytest test_cuda_engine.py; then
    timeout 120 python -m pytest -q -p no:cacheprovider test/srt/test_cuda_engine.py test/srt/test_decode_batch.py \
        2>&1 | tail -n 5
fi

ls -la "$OUT"
python benchmark/serving/summarize_results.py "$OUT"/bench*.json "$OUT"/agreement.json 2>/dev/null
log done
