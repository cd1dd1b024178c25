#!/usr/bin/env bash
# Everything the serving issue measures on one H200, in one run (the machine is lent by the minute):
#   1. FlashInfer vs torch_native greedy agreement on a tiny bf16 model, eager and in CUDA graphs (pytest);
#   2. bench_one_batch on a Llama-3-8B-shaped dummy model: our decode vs HF transformers vs the HBM roofline;
#   3. bench_serving against a server of that model at concurrency 1 and 32;
#   4. bench_one_batch without CUDA graphs, to show what they buy.
# Usage, from the repo root after `source .device/env.sh`:  OUT=<dir> benchmark/serving/run_h200_session.sh
# Results: $OUT/*.json (benchmark/results/ keeps the published ones). About 8 minutes on a fresh machine, of which
# FlashInfer's JIT compilation (first pytest test) and four 8B model starts take most.
set -u
OUT=${OUT:?set OUT to the directory that receives the results}
MODEL=/tmp/llama3-8b-shape
PORT=30000
COMMON=(--model-path "$MODEL" --load-format dummy --dtype bfloat16)
log() { echo "=== $(date +%T) $*"; }

nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem --format=csv
python benchmark/serving/make_llama3_8b_dummy.py "$MODEL"

log "1. pytest test/srt/test_flashinfer_backend.py"
SGLANG_FLASHINFER_REPORT="$OUT/agreement.json" timeout 420 \
    python -m pytest -q -s -p no:cacheprovider test/srt/test_flashinfer_backend.py

log "2. bench_one_batch (CUDA graphs, HF baseline, profile)"
timeout 360 python -m sglang.bench_one_batch "${COMMON[@]}" --batch-size 1 32 --input-len 512 --output-len 64 \
    --profile --result-filename "$OUT/bench_one_batch.json" >/dev/null

log "3. server + bench_serving"
python -m sglang.launch_server "${COMMON[@]}" --port $PORT >/tmp/server.log 2>&1 &
SERVER=$!
for _ in $(seq 300); do curl -sf localhost:$PORT/health >/dev/null && break; kill -0 $SERVER || break; sleep 1; done
grep -E "CUDA graphs|KV cache|loaded weights" /tmp/server.log
for c in 1 32; do
    n=$((c == 1 ? 16 : 256))
    timeout 240 python -m sglang.bench_serving --port $PORT --num-prompts $n --random-input-len 512 \
        --random-output-len 128 --max-concurrency $c --output-file "$OUT/bench_serving_c$c.json" >/dev/null
done
kill -INT $SERVER
for _ in $(seq 30); do kill -0 $SERVER 2>/dev/null || break; sleep 1; done
tail -n 5 /tmp/server.log

log "4. bench_one_batch without CUDA graphs"
timeout 200 python -m sglang.bench_one_batch "${COMMON[@]}" --disable-cuda-graph --skip-hf --batch-size 1 32 \
    --input-len 512 --output-len 16 --result-filename "$OUT/bench_one_batch_eager.json" >/dev/null

ls -la "$OUT"
python benchmark/serving/summarize_results.py "$OUT"/*.json
log done
