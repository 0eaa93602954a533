#!/usr/bin/env bash
# GPU benchmark: kvloom's CUDA backend against Hugging Face transformers (torch SDPA, bf16) on the
# same Llama-3-8B shape with random bf16 weights, in one run on the device:
#   full prefill at 8192 and 32768 tokens (time, model FLOP utilisation), kvloom's selective
#   recompute of 15% of the tokens plus a 64-token query, decode tokens/s at an 8k context, memory.
# usage: bench/gpu_prefill.sh BUILD_DIR [extra kvloom gpu-bench args...]
# Environment: TOKENS (default 8192,32768), LAYERS (32), REPS (3), SKIP_HF=1 to run kvloom only,
# ATTN_MODES="mma wg1" to also time kvloom's other attention kernels.
set -euo pipefail
B=${1:?usage: bench/gpu_prefill.sh BUILD_DIR}
shift
TOKENS=${TOKENS:-8192,32768}
LAYERS=${LAYERS:-32}
REPS=${REPS:-3}
HERE=$(cd "$(dirname "$0")" && pwd)
echo "== $(date -u +%FT%TZ) $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -1)"
echo "== kvloom gpu-bench"
"$B/bin/kvloom" gpu-bench --tokens "$TOKENS" --layers "$LAYERS" --reps "$REPS" "$@"
if [ -n "${ATTN_MODES:-}" ]; then # other attention kernels, prefill only (e.g. ATTN_MODES="mma wg1")
    for a in $ATTN_MODES; do
        echo "== kvloom gpu-bench, KVL_CUDA_ATTN=$a"
        KVL_CUDA_ATTN=$a "$B/bin/kvloom" gpu-bench --tokens "$TOKENS" --layers "$LAYERS" --reps 1 --decode-steps 0 \
            | grep -E "^prefill"
    done
fi
if [ "${SKIP_HF:-0}" != 1 ]; then
    echo "== transformers"
    PYTHONUNBUFFERED=1 python3 "$HERE/hf_prefill.py" --tokens "$TOKENS" --layers "$LAYERS" --reps "$REPS"
fi
