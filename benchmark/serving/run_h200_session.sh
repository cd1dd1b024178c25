#!/usr/bin/env bash
# What the serving issue measures on one H200, in one run (the machine is lent by the minute):
#   0. FlashInfer JIT warm-up: attention, norm, RoPE and SiLU*mul modules in one parallel build;
#   1. the fused kernels against the torch path, and FlashInfer vs torch_native greedy agreement on a tiny bf16 model,
#      eager and in CUDA graphs (pytest);
#   2. bench_one_batch on a Llama-3-8B-shaped dummy model with fused kernels: decode vs HF transformers vs the HBM
#      roofline, with a kernel profile;
#   3. batch-1 decode again with SGLANG_DISABLE_FUSED_KERNELS=1 (the unfused torch elementwise path), profiled;
#      3b. batch 1 and 32 with FlashInfer's tensor-core decode kernels instead of its CUDA-core ones, profiled;
#   4. host cost of a decode step through the real Scheduler on the tiny model of step 1 (CUDA graphs, same
#      kernels), with the model and with a null model, so the scheduler's share of the step is known.
# Usage, from the repo root after `source .device/env.sh`:  OUT=<dir> bash benchmark/serving/run_h200_session.sh
# Results: $OUT/*.json and $OUT/*.log (benchmark/results/ keeps the published ones). Every step has its own timeout
# and the timeouts add up to 9 min 50 s (100 + 140 + 170 + 70 + 70 + 40 s, plus seconds for the dummy model's config).
set -u
OUT=${OUT:?set OUT to the directory that receives the results}
MODEL=/tmp/llama3-8b-shape
COMMON=(--model-path "$MODEL" --load-format dummy --dtype bfloat16)
SHAPE=(--input-len 512 --output-len 64)
log() { echo "=== $(date +%T) $*"; }

nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem --format=csv
git log --oneline -1
python benchmark/serving/make_llama3_8b_dummy.py "$MODEL"

log "0. FlashInfer JIT warm-up"
MAX_JOBS=${MAX_JOBS:-16} timeout 100 python -m sglang.srt.layers.fused_kernels 2>&1 | tail -n 3

log "1. pytest test_fused_kernels.py test_flashinfer_backend.py"
SGLANG_FLASHINFER_REPORT="$OUT/agreement.json" timeout 140 \
    python -m pytest -q -s -p no:cacheprovider test/srt/test_fused_kernels.py test/srt/test_flashinfer_backend.py \
    2>&1 | tee "$OUT/pytest.log" | tail -n 25

log "2. bench_one_batch, fused kernels (CUDA graphs, HF baseline, profile)"
timeout 170 python -m sglang.bench_one_batch "${COMMON[@]}" --batch-size 1 32 "${SHAPE[@]}" --profile \
    --result-filename "$OUT/bench_one_batch.json" 2>"$OUT/bench_one_batch.log" >/dev/null
grep -E "elementwise kernels|CUDA graphs" "$OUT/bench_one_batch.log"

log "3. bench_one_batch, unfused (SGLANG_DISABLE_FUSED_KERNELS=1), profile, no HF"
SGLANG_DISABLE_FUSED_KERNELS=1 timeout 70 python -m sglang.bench_one_batch "${COMMON[@]}" --batch-size 1 \
    "${SHAPE[@]}" --profile --skip-hf --result-filename "$OUT/bench_one_batch_unfused.json" \
    2>"$OUT/bench_one_batch_unfused.log" >/dev/null
grep -E "elementwise kernels" "$OUT/bench_one_batch_unfused.log"

log "3b. bench_one_batch, tensor-core decode kernels (SGLANG_FLASHINFER_DECODE_TENSOR_CORES=1), profile, no HF"
SGLANG_FLASHINFER_DECODE_TENSOR_CORES=1 timeout 70 python -m sglang.bench_one_batch "${COMMON[@]}" --batch-size 1 32 \
    "${SHAPE[@]}" --profile --skip-hf --result-filename "$OUT/bench_one_batch_tc_decode.json" \
    2>"$OUT/bench_one_batch_tc_decode.log" >/dev/null

log "4. host cost of a decode step (Scheduler, model vs null model)"
TINY=$(python -c "from sglang.test.test_utils import TINY_BF16_LLAMA as T, tiny_model; print(tiny_model('llama', **T))" \
    2>/dev/null | tail -n 1)
timeout 40 python benchmark/serving/profile_decode_host.py --model-path "$TINY" --device cuda --dtype bfloat16 \
    --batch-size 1 32 --input-len 512 --steps 100 --output "$OUT/decode_host.json" 2>"$OUT/decode_host.log" \
    | tail -n 20

ls -la "$OUT"
python benchmark/serving/summarize_results.py "$OUT"/*.json
log done
