#!/usr/bin/env python3
"""Blend policies on facts13M: runs `kvloom blend-eval` over facts compositions and aggregates.

usage: blend_facts.py [--n 200] [--seeds 1] [--kinds cross,within] [--jobs 2] [--json OUT]
                      --config 'NAME=blend-eval args' [--config ...]

Compositions come from ../shared/tools/facts_compositions.py (question work_city; kind cross needs a link
across a chunk boundary, within does not). Each --config is run on every composition; its args may hold
a --ratio list (one result per ratio). Prints one markdown row per (config, ratio, kind): mean
KL(full||mode) at the answer position, answer accuracy of the mode and of full prefill, the budget spent
(cached token-layers recomputed / (cached tokens x layers); qkv-only token-layers counted whole, and
at their FLOP share), the ratio to naive reuse in the same chunk-cache mode (a config whose args
hold --chunk-prefix X is compared with the config named naive-X when present), overall and per seed,
and how often the naive guard fell back to naive reuse.
Python 3 standard library only.
"""
import argparse, concurrent.futures as cf, json, os, shlex, subprocess, sys, tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.environ.get("KVL_SHARED", os.path.join(ROOT, "..", "shared"))
KVLOOM = os.environ.get("KVLOOM", os.path.join(ROOT, "build", "bin", "kvloom"))
MODEL = os.path.join(SHARED, "models", "facts13M", "hf")


def make(outdir, kind, n, seed, shared=SHARED):
    """Writes n compositions of kind for seed under outdir; returns (chunk files, tail file, query length)
    of each. Also used by tests/blend/facts_acceptance.py."""
    d = os.path.join(outdir, "%s-%d" % (kind, seed))
    subprocess.run([sys.executable, os.path.join(shared, "tools", "facts_compositions.py"), d, str(n), "--kind", kind,
                    "--seed", str(seed)], check=True, capture_output=True)
    comps = []
    for k in sorted(os.listdir(d)):
        meta = json.load(open(os.path.join(d, k, "meta.json")))
        chunks = [os.path.join(d, k, "chunk%d.i32" % i) for i in range(meta["chunks"])]
        comps.append((chunks, os.path.join(d, k, "tail.i32"), meta["query_len"]))
    return comps


def run(comp, args):
    chunks, tail, q = comp
    cmd = [KVLOOM, "blend-eval", "--model", MODEL, "--chunks", ",".join(chunks), "--tail", tail, "--query-len", str(q)] + args
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError("blend-eval failed: %s\n%s" % (" ".join(cmd), p.stderr))
    return [json.loads(l) for l in p.stdout.splitlines() if l.strip()]


def prefix_of(args):
    a = shlex.split(args)
    return a[a.index("--chunk-prefix") + 1] if "--chunk-prefix" in a else "none"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--seeds", default="1")
    ap.add_argument("--kinds", default="cross,within")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--config", action="append", required=True)
    ap.add_argument("--json", default="")
    a = ap.parse_args()
    configs = [c.split("=", 1) for c in a.config]
    res = {}
    with tempfile.TemporaryDirectory() as tmp, cf.ThreadPoolExecutor(a.jobs) as ex:
        for kind in a.kinds.split(","):
            comps = [(s, c) for s in a.seeds.split(",") for c in make(tmp, kind, a.n, int(s))]
            for name, args in configs:
                rows = list(ex.map(lambda c: run(c[1], shlex.split(args)), comps))
                for j in range(len(rows[0])):
                    xs = [r[j] for r in rows]
                    m = lambda key: sum(x.get(key, 0) for x in xs) / len(xs)
                    seed_kl = {}
                    for (seed, _), x in zip(comps, xs):
                        seed_kl.setdefault(seed, []).append(x["mean_kl"])
                    res[(name, j, kind)] = {"config": name, "args": args, "kind": kind, "n": len(xs),
                                            "ratio": xs[0]["ratio"], "budget_asked": xs[0].get("budget", 0),
                                            "mean_kl": m("mean_kl"), "acc": m("target_acc_mode"),
                                            "acc_full": m("target_acc_full"), "budget": m("cached_fraction"),
                                            "budget_work": m("cached_work_fraction"), "fell_back": m("fell_back"),
                                            "seed_kl": {s: sum(v) / len(v) for s, v in seed_kl.items()},
                                            "prefix": prefix_of(args)}
    print("| config | budget asked | kind | n | mean KL | vs naive | vs naive per seed | acc | full acc | spent (qkv whole) | spent (FLOPs) | fell back |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for key, r in res.items():
        nv = res.get(("naive-" + r["prefix"], 0, r["kind"]))
        vs = "%.2f" % (r["mean_kl"] / nv["mean_kl"]) if nv and nv["mean_kl"] > 0 else "-"
        per = " / ".join("%.2f" % (v / nv["seed_kl"][s]) for s, v in r["seed_kl"].items()) if nv else "-"
        print("| %s | %s | %s | %d | %.4f | %s | %s | %.3f | %.3f | %.1f%% | %.1f%% | %.1f%% |" % (
            r["config"], "%g%%" % (100 * r["budget_asked"]) if r["budget_asked"] else "-", r["kind"], r["n"], r["mean_kl"], vs,
            per, r["acc"], r["acc_full"], 100 * r["budget"], 100 * r["budget_work"], 100 * r["fell_back"]))
    if a.json:
        json.dump(list(res.values()), open(a.json, "w"), indent=1)


if __name__ == "__main__":
    main()
