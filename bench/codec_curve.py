#!/usr/bin/env python3
"""Runs `kvloom codec-eval` over the shared models' golden sequences and prints the averages
(bits/element, ratio vs int8, mean KL, top-1, confident top-1) per model and setting.

usage: bench/codec_curve.py [--models a,b] [--levels 1,2,3] [--scheme kvloom|lmcache]
                            [--profile none] [--seqs 4] [--peers] [--json]
Environment: KVLOOM (binary, default build/bin/kvloom), KVL_SHARED (default ../shared),
KVL_CODEC_TUNE / KVL_PROFILE_DIR are passed through to kvloom."""
import argparse, json, os, subprocess, sys

MODELS = {
    "stories260K": "models/stories260K/stories260K.bin",
    "llama2xs280K": "models/llama2xs280K/llama2xs_280K.bin",
    "aidreams260K": "models/aidreams260K/aidreams260K.bin",
    "facts13M": "models/facts13M/hf",
}

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--levels", default="2")
    ap.add_argument("--scheme", default="kvloom")
    ap.add_argument("--profile", default=None)
    ap.add_argument("--seqs", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--peers", action="store_true", help="also print int8 and fp16+zstd-19 rows")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    kvloom = os.environ.get("KVLOOM", "build/bin/kvloom")
    shared = os.environ.get("KVL_SHARED", os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared"))
    rows = []
    print(f"{'model':14s} {'scheme':8s} {'lvl':>3s} {'bits/el':>8s} {'x int8':>7s} {'x fp16':>7s} {'mean KL':>9s} {'top1':>6s} {'conf top1':>9s} {'enc MB/s':>8s} {'dec MB/s':>8s}")
    for model in a.models.split(","):
        for level in a.levels.split(","):
            res = []
            for i in range(a.seqs):
                cmd = [kvloom, "codec-eval", "--model", os.path.join(shared, MODELS[model]),
                       "--tokens", os.path.join(shared, "golden", model, f"seq{i:02d}.tokens.i32"),
                       "--level", level, "--scheme", a.scheme, "--threads", str(a.threads)]
                if a.profile: cmd += ["--profile", a.profile]
                out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
                res.append(json.loads(out.strip().splitlines()[-1]))
            def avg(f): return sum(f(r) for r in res) / len(res)
            bits = sum(r["encoded_bytes"] for r in res) * 8 / sum(r["elements"] for r in res)
            i8 = avg(lambda r: r["int8"]["bits_per_element"])
            row = dict(model=model, scheme=a.scheme, level=int(level), bits=bits, x_int8=i8 / bits, x_fp16=16 / bits,
                       kl=avg(lambda r: r["mean_kl"]), top1=avg(lambda r: r["top1_agreement"]),
                       conf=sum(r["confident_top1_agreement"] * r["confident_positions"] for r in res) / max(1, sum(r["confident_positions"] for r in res)),
                       enc=avg(lambda r: r["encode_MBps"]), dec=avg(lambda r: r["decode_MBps"]))
            rows.append(row)
            print(f"{model:14s} {a.scheme:8s} {level:>3s} {bits:8.3f} {row['x_int8']:7.2f} {row['x_fp16']:7.2f} {row['kl']:9.5f} {row['top1']:6.3f} {row['conf']:9.4f} {row['enc']:8.1f} {row['dec']:8.1f}", flush=True)
            if a.peers and level == a.levels.split(",")[0]:
                for name, key in (("int8", "int8"), ("fp16+zstd19", "fp16_zstd19")):
                    b = avg(lambda r: r[key]["bits_per_element"])
                    print(f"{model:14s} {name:8s} {'-':>3s} {b:8.3f} {i8 / b:7.2f} {16 / b:7.2f} {avg(lambda r: r[key]['mean_kl']):9.5f} {avg(lambda r: r[key]['top1_agreement']):6.3f}")
    if a.json:
        print(json.dumps(rows))

if __name__ == "__main__":
    main()
