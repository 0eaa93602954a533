#!/usr/bin/env python3
"""Why partial recompute hurts with bare chunk caches: averages `kvloom blend-eval --diag 1` over facts13M
compositions for each chunk-cache mode.

usage: blend_diag.py [--n 100] [--kind cross] [--seed 1] [--ratio 0.3] [--modes none,bos] [--extra ARGS]

Per layer it prints the mean relative squared deviation of the placed chunk caches from what a full
prefill computes (chunk-initial tokens and the rest, K and V) and the share of the query's attention
on the BOS, on the chunk-initial tokens and on the tokens a blend at --ratio recomputes, in the full
prefill, in naive reuse and in the blend; plus the mean KL of naive and blend.
Python 3 standard library only.
"""
import argparse, json, os, shlex, subprocess, sys, tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.environ.get("KVL_SHARED", os.path.join(ROOT, "..", "shared"))
KVLOOM = os.environ.get("KVLOOM", os.path.join(ROOT, "build", "bin", "kvloom"))
MODEL = os.path.join(SHARED, "models", "facts13M", "hf")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--kind", default="cross")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--ratio", default="0.3")
    ap.add_argument("--modes", default="none,bos")
    ap.add_argument("--extra", default="")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, os.path.join(SHARED, "tools", "facts_compositions.py"), tmp, str(a.n), "--kind", a.kind,
                        "--seed", str(a.seed)], check=True, capture_output=True)
        for mode in a.modes.split(","):
            acc, kls, nkl = {}, [], []
            for k in sorted(os.listdir(tmp)):
                d = os.path.join(tmp, k)
                meta = json.load(open(os.path.join(d, "meta.json")))
                chunks = ",".join(os.path.join(d, "chunk%d.i32" % i) for i in range(meta["chunks"]))
                base = [KVLOOM, "blend-eval", "--model", MODEL, "--chunks", chunks, "--tail", os.path.join(d, "tail.i32"),
                        "--query-len", str(meta["query_len"]), "--chunk-prefix", mode]
                out = subprocess.run(base + ["--ratio", a.ratio, "--diag", "1"] + shlex.split(a.extra), capture_output=True,
                                     text=True, check=True).stdout.splitlines()
                dg, res = json.loads(out[0]), json.loads(out[1])
                kls.append(res["mean_kl"])
                nv = json.loads(subprocess.run(base + ["--mode", "naive"], capture_output=True, text=True, check=True).stdout)
                nkl.append(nv["mean_kl"])
                for key, v in dg.items():
                    if isinstance(v, list):
                        acc.setdefault(key, []).append(v)
            n = len(kls)
            print("## chunk caches: %s, %s compositions x %d, blend ratio %s: naive KL %.4f, blend KL %.4f" % (
                mode, a.kind, n, a.ratio, sum(nkl) / n, sum(kls) / n))
            L = len(next(iter(acc.values()))[0])
            print("| quantity | " + " | ".join("L%d" % l for l in range(L)) + " |")
            print("|---|" + "---|" * L)
            for key, rows in acc.items():
                print("| %s | " % key + " | ".join("%.3f" % (sum(r[l] for r in rows) / n) for l in range(L)) + " |")
            sys.stdout.flush()


if __name__ == "__main__":
    main()
