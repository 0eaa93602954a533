#!/usr/bin/env bash
# End-to-end time to first token of the GPU load path (issue 8), Llama-3-8B shape with random bf16
# weights, in one run on the device:
#   kvloom (test_gpu_load ttft): for each context of N tokens in 512-token chunks + a 64-token
#   query: full prefill, the recompute alone, the disk's raw O_DIRECT read bandwidth (the floor);
#   then for codec off (raw bf16) and level 2: blend cold from disk (a store without DRAM tier,
#   O_DIRECT reads) and from the DRAM tier, each serially (kvl_gpu_load + a masked kvl_forward: the
#   breakdown) and pipelined (kvl_gpu_blend: streaming reads, decode and recompute overlapped;
#   median of 3), and a prefix hit (query only). Recompute = 15% of the context tokens (a fixed
#   even selection, chunk 0 excluded) + the query. The chunk caches are ingested into a store in
#   the current directory (put it on the disk to be measured) before the timings.
#   transformers (bench/hf_prefill.py): full prefill of N + 64 tokens, torch SDPA.
# usage: bench/gpu_ttft.sh BUILD_DIR   (env: TOKENS=4096,8192,16384,32768, SKIP_HF=1, REPS=3;
#        KVL_GPU_TTFT_LEVELS=raw,2, KVL_GPU_TTFT_GROUP=most layers per decode step,
#        KVL_GPU_TTFT_PICK=1: also the controller's codec-level choice between levels 2 and 4)
#   Each length also runs the controller (kvl_load_decide per chunk, kvl_load_recompute_ratio) on the
#   measured rates: chunks slower to load than to prefill are recomputed in the pass.
# Run python with `env -u LD_LIBRARY_PATH` where the C build's extra libraries sit on it (the device).
set -euo pipefail
B=$(cd "${1:?usage: bench/gpu_ttft.sh BUILD_DIR}" && pwd)
TOKENS=${TOKENS:-4096,8192,16384,32768}
HERE=$(cd "$(dirname "$0")" && pwd)
echo "== $(date -u +%FT%TZ) $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -1)"
echo "== kvloom load path (store in $PWD: $(df -h . | tail -1 | awk '{print $1}'))"
KVL_GPU_TTFT="$TOKENS" "$B/bin/test_gpu_load" ttft
if [ "${SKIP_HF:-0}" != 1 ]; then
    echo "== transformers, full prefill of N + 64 tokens"
    HF_TOKENS=$(echo "$TOKENS" | tr ',' '\n' | awk '{printf "%s%d", (NR>1?",":""), $1 + 64}')
    PYTHONUNBUFFERED=1 env -u LD_LIBRARY_PATH python3 "$HERE/hf_prefill.py" --tokens "$HF_TOKENS" --reps "${REPS:-3}" \
        --decode-steps 0
fi
