#!/usr/bin/env python3
"""CacheBlend quality over random compositions: runs `kvloom blend-eval` and aggregates.

usage: blend_quality.py [--models stories260K,llama2xs280K,aidreams260K] [--n 100] [--seed 1]
                        [--metrics k,v,kv] [--ratios 0,0.05,...,1] [--extra "ARGS"] [--chunk-prefix none|bos]
                        [--json OUT]

A composition (the blend issue's protocol): 4 chunks cut at random offsets from 4 different golden
sequences (../shared/golden/<model>/seqNN.tokens.i32) in random order, then a 48-token tail = a
16-token query + 32 continuation tokens, cut from the source sequence of the last chunk right after it
(so the query continues the text). aidreams260K (128-token context): 3 chunks of 24 and a 16 + 24 tail.
blend-eval prefills each chunk alone, places the caches behind a BOS and compares each mode with a full
prefill at the positions that predict the continuation. Prints, per model and selection metric, the mean
KL(full||mode) and top-1 agreement for naive reuse and blend at each ratio, and ratio naive/blend.
Python 3 standard library only.
"""
import argparse, json, os, random, shlex, struct, subprocess, sys, tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.environ.get("KVL_SHARED", os.path.join(ROOT, "..", "shared"))
KVLOOM = os.environ.get("KVLOOM", os.path.join(ROOT, "build", "bin", "kvloom"))

# model -> (model path, chunks, chunk length, query length, continuation length)
PROTOCOL = {
    "stories260K": ("models/stories260K/stories260K.bin", 4, 64, 16, 32),
    "llama2xs280K": ("models/llama2xs280K/llama2xs_280K.bin", 4, 48, 16, 32),
    "aidreams260K": ("models/aidreams260K/aidreams260K.bin", 3, 24, 16, 24),
}


def read_i32(path):
    b = open(path, "rb").read()
    return list(struct.unpack("<%di" % (len(b) // 4), b))


def write_i32(path, toks):
    open(path, "wb").write(struct.pack("<%di" % len(toks), *toks))


def compositions(model, n, seed, outdir, chunks=None, chunk_len=None):
    _, nch, clen, q, cont = PROTOCOL[model]
    nch, clen = chunks or nch, chunk_len or clen
    gdir = os.path.join(SHARED, "golden", model)
    seqs = [read_i32(os.path.join(gdir, f)) for f in sorted(os.listdir(gdir)) if f.endswith(".tokens.i32")]
    r = random.Random(seed)
    out = []
    for k in range(n):
        src = r.sample(range(len(seqs)), nch)
        d = os.path.join(outdir, model, "%04d" % k)
        os.makedirs(d, exist_ok=True)
        paths = []
        for i, s in enumerate(src):
            seq = seqs[s]
            last = i == nch - 1
            need = clen + (q + cont if last else 0)
            off = r.randrange(1, len(seq) - need + 1)  # skip the golden BOS
            p = os.path.join(d, "chunk%d.i32" % i)
            write_i32(p, seq[off:off + clen])
            paths.append(p)
            if last:
                write_i32(os.path.join(d, "tail.i32"), seq[off + clen:off + clen + q + cont])
        out.append((paths, os.path.join(d, "tail.i32"), q))
    return out


def run(model_path, comp, args_list):
    paths, tail, q = comp
    cmd = [KVLOOM, "blend-eval", "--model", model_path, "--chunks", ",".join(paths), "--tail", tail,
           "--query-len", str(q)] + args_list
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit("blend-eval failed: %s\n%s" % (" ".join(cmd), p.stderr))
    return [json.loads(l) for l in p.stdout.splitlines() if l.strip()]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="stories260K,llama2xs280K,aidreams260K")
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--metrics", default="k,v,kv")
    ap.add_argument("--ratios", default="0,0.05,0.10,0.15,0.20,0.30,0.50,1.0")
    ap.add_argument("--budgets", default="", help="run --budget B1,B2,... (the budget policy) instead of --ratio")
    ap.add_argument("--extra", default="", help="more blend-eval arguments for the blend runs")
    ap.add_argument("--chunks", type=int, default=0, help="override the number of chunks")
    ap.add_argument("--chunk-len", type=int, default=0, help="override the chunk length")
    ap.add_argument("--chunk-prefix", default="none", help="chunk-cache mode for every run (none, bos)")
    ap.add_argument("--codec-level", type=int, default=-1, help="pass chunk caches through the codec at this level")
    ap.add_argument("--json", default="", help="write the aggregated results here")
    a = ap.parse_args()
    if a.budgets:
        a.ratios = a.budgets
    ratios = [float(x) for x in a.ratios.split(",")]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for model in a.models.split(","):
            mpath = os.path.join(SHARED, PROTOCOL[model][0])
            comps = compositions(model, a.n, a.seed, tmp, a.chunks or None, a.chunk_len or None)
            cp = ["--chunk-prefix", a.chunk_prefix] + (["--codec-level", str(a.codec_level)] if a.codec_level >= 0 else [])
            naive = [run(mpath, c, ["--mode", "naive"] + cp)[0] for c in comps]
            res = {"naive": {"mean_kl": sum(x["mean_kl"] for x in naive) / len(naive),
                             "top1": sum(x["top1_agreement"] for x in naive) / len(naive)},
                   "n": len(comps), "total_tokens": naive[0]["total_tokens"], "blend": {}}
            for metric in a.metrics.split(","):
                rows = [run(mpath, c, ["--mode", "blend", "--metric", metric, "--budget" if a.budgets else "--ratio", a.ratios] + cp + shlex.split(a.extra)) for c in comps]
                curve = []
                for j, r in enumerate(ratios):
                    xs = [row[j] for row in rows]
                    curve.append({"ratio": r, "budget_spent": sum(x["cached_fraction"] for x in xs) / len(xs), "mean_kl": sum(x["mean_kl"] for x in xs) / len(xs),
                                  "top1": sum(x["top1_agreement"] for x in xs) / len(xs),
                                  "compute_fraction": sum(x["compute_fraction"] for x in xs) / len(xs),
                                  "mode_ms": sum(x["mode_ms"] for x in xs) / len(xs),
                                  "full_ms": sum(x["full_ms"] for x in xs) / len(xs)})
                res["blend"][metric] = curve
            results[model] = res
            print("## %s: %d compositions, %d tokens each; naive mean KL %.6f, top-1 %.4f" % (
                model, res["n"], res["total_tokens"], res["naive"]["mean_kl"], res["naive"]["top1"]))
            print("| metric | " + " | ".join(("b=%g%%" if a.budgets else "r=%g%%") % (100 * r) for r in ratios) + " |")
            print("|---|" + "---|" * len(ratios))
            for metric, curve in res["blend"].items():
                print("| %s KL | " % metric + " | ".join("%.6f" % c["mean_kl"] for c in curve) + " |")
                print("| %s top-1 | " % metric + " | ".join("%.4f" % c["top1"] for c in curve) + " |")
                print("| %s naive/blend | " % metric + " | ".join(
                    ("%.2fx" % (res["naive"]["mean_kl"] / c["mean_kl"]) if c["mean_kl"] > 0 else "exact") for c in curve) + " |")
                print("| %s token-layers | " % metric + " | ".join("%.1f%%" % (100 * c["compute_fraction"]) for c in curve) + " |")
                print("| %s cached budget spent | " % metric + " | ".join("%.1f%%" % (100 * c["budget_spent"]) for c in curve) + " |")
            sys.stdout.flush()
    if a.json:
        json.dump(results, open(a.json, "w"), indent=1)


if __name__ == "__main__":
    main()
