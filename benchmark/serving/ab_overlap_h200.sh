#!/usr/bin/env bash
# Issue 18 on one H200: an old tree against this one, alternating, in one call (machines differ, so baselines are
# measured beside the new numbers):
#   1. bench_one_batch at batch 1 and 32: the decode step against the HBM roofline it computes (old, new);
#   2. the decode step as the server runs it, through the real Scheduler (profile_decode_host.py with the model):
#      old and new with overlap scheduling (alternating child runs), then new with --disable-overlap-schedule;
#   3. a server of each tree and bench_serving (one client for both) at concurrency 32, 256 prompts, 512 in, 128 out
#      (the command of benchmark/results/bench_serving_llama3_8b_h200_c32.json): output throughput, median and
#      p99 ITL (new, then old).
# Usage, from the repo root after `source .device/env.sh`, with the old tree unpacked beside it, e.g.
#   git archive c252d8d python | tar -x -C .scratch/old   (here, before the call; carry .scratch/old)
#   OUT=$OUT OLD=.scratch/old [STEPS="1 2 3"] bash benchmark/serving/ab_overlap_h200.sh
# Steps 1+2 take about 5 min, step 3 about 4: run them as two calls (STEPS="1 2", then STEPS="3").
set -u
OUT=${OUT:?set OUT to the directory that receives the results}
OLD=$(cd "${OLD:?set OLD to a tree whose python/ holds the old sglang}" && pwd)
STEPS=" ${STEPS:-1 2 3} "
MODEL=/tmp/llama3-8b-shape
COMMON=(--model-path "$MODEL" --load-format dummy --dtype bfloat16)
SITE=${PYTHONPATH#*:}  # what env.sh put after ./python (the device bundle)
OLD_PATH="$OLD/python:$SITE"
NEW_PATH="$PWD/python:$SITE"
log() { echo "=== $(date +%T) $*"; }
want() { [[ "$STEPS" == *" $1 "* ]] && log "$@"; }

nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python benchmark/serving/make_llama3_8b_dummy.py "$MODEL" >/dev/null

if want 1 bench_one_batch batch 1 and 32, old then new; then
    for tree in old new; do
        path=$([ $tree = old ] && echo "$OLD_PATH" || echo "$NEW_PATH")
        PYTHONPATH=$path timeout 100 python -m sglang.bench_one_batch "${COMMON[@]}" --batch-size 1 32 \
            --input-len 512 --output-len 64 --skip-hf --result-filename "$OUT/bench_one_batch_$tree.json" \
            2>"$OUT/bench_one_batch_$tree.log" >/dev/null || echo "bench_one_batch $tree failed (see its log)"
    done
fi

if want 2 decode step through the Scheduler, old vs new with overlap, then new without; then
    PROFILE=(benchmark/serving/profile_decode_host.py "${COMMON[@]}" --device cuda --batch-size 1 32
        --input-len 512 --steps 100 --forward model)
    PYTHONPATH=$NEW_PATH timeout 200 python "${PROFILE[@]}" --baseline-python "$OLD/python" --rounds 1 \
        --output "$OUT/decode_host_overlap_vs_old.json" 2>"$OUT/decode_host_overlap_vs_old.log" | tail -n 22
    PYTHONPATH=$NEW_PATH timeout 100 python "${PROFILE[@]}" --disable-overlap-schedule \
        --output "$OUT/decode_host_no_overlap.json" 2>"$OUT/decode_host_no_overlap.log" | tail -n 12
fi

if want 3 server + bench_serving c32, new then old; then
    PORT=30000
    for tree in new old; do
        path=$([ $tree = old ] && echo "$OLD_PATH" || echo "$NEW_PATH")
        PYTHONPATH=$path python -m sglang.launch_server "${COMMON[@]}" --port $PORT >"$OUT/server_$tree.log" 2>&1 &
        SERVER=$!
        for _ in $(seq 150); do curl -sf localhost:$PORT/health >/dev/null && break; kill -0 $SERVER || break; sleep 1; done
        PYTHONPATH=$NEW_PATH timeout 90 python -m sglang.bench_serving --port $PORT --num-prompts 256 \
            --random-input-len 512 --random-output-len 128 --max-concurrency 32 \
            --output-file "$OUT/bench_serving_c32_$tree.json" >/dev/null || echo "bench_serving $tree failed"
        kill -INT $SERVER
        for _ in $(seq 30); do kill -0 $SERVER 2>/dev/null || break; sleep 1; done
        kill -9 $SERVER 2>/dev/null
    done
fi

ls -la "$OUT"
python benchmark/serving/summarize_results.py "$OUT"/bench*.json 2>/dev/null
log done
