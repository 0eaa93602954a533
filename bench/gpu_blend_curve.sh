#!/usr/bin/env bash
# CacheBlend quality on the GPU against the CPU: the same random compositions go through
# `kvloom blend-eval` on both backends (KVL_GPU=0 selects the CUDA backend, float32 weights) and the
# curves are printed side by side.
#   bench/gpu_blend_curve.sh [OUTDIR]     (N=compositions per model, MODELS=..., RATIOS=...)
set -euo pipefail
cd "$(dirname "$0")/.."
OUTDIR=${1:-gpu-blend-out}
N=${N:-20}
MODELS=${MODELS:-stories260K,aidreams260K}
RATIOS=${RATIOS:-0,0.05,0.15,0.30,0.50,1.0}
mkdir -p "$OUTDIR"
run() { # backend
    if [ "$1" = gpu ]; then export KVL_GPU=0; else unset KVL_GPU; fi
    python3 tools/blend_quality.py --models "$MODELS" --n "$N" --metrics kv --ratios "$RATIOS" \
        --json "$OUTDIR/blend_$1.json" > "$OUTDIR/blend_$1.txt"
}
run cpu & cpu_pid=$!
run gpu
wait $cpu_pid
python3 - "$OUTDIR" <<'PY'
import json, sys
d = sys.argv[1]
cpu, gpu = (json.load(open(f"{d}/blend_{b}.json")) for b in ("cpu", "gpu"))
worst = 0.0
print("| model | ratio | CPU mean KL | GPU mean KL | GPU/CPU | CPU top-1 | GPU top-1 |")
print("|---|---|---|---|---|---|---|")
for m in cpu:
    c, g = cpu[m], gpu[m]
    rows = [("naive", c["naive"], g["naive"])] + [
        ("%g%%" % (100 * a["ratio"]), a, b) for a, b in zip(c["blend"]["kv"], g["blend"]["kv"])]
    for name, a, b in rows:
        r = b["mean_kl"] / a["mean_kl"] if a["mean_kl"] > 0 else float("nan")
        if a["mean_kl"] > 1e-6:
            worst = max(worst, abs(r - 1))
        print(f"| {m} | {name} | {a['mean_kl']:.6f} | {b['mean_kl']:.6f} | {r:.4f} | {a['top1']:.4f} | {b['top1']:.4f} |")
print(f"largest relative difference of mean KL (where CPU KL > 1e-6): {worst:.2e}")
PY
