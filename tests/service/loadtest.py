#!/usr/bin/env python3
"""Load test and soak of kvloomd on loopback: mixed ingest and generate over keep-alive connections.

usage: loadtest.py --bin build/bin/kvloomd --model MODEL --work DIR [--seconds S] [--clients C]
                   [--ingest-share F] [--soak]
Starts the real daemon, ingests a few seed documents, then C client threads each loop: with
probability F ingest a new document, else generate over 1-3 random documents. Prints a final table:
requests/s and latency p50/p99 per operation. --soak also samples the daemon's RSS every 10 s and
fails when memory grows (second-half mean more than 10% + 8 MiB above the first-half mean after warm-up);
its ingests cycle through a fixed pool of 64 documents so that the stored data stops growing.

Without KVL_LONG=1 it exits 77 (skipped): the load test and the soak are the long test mode.
"""
import argparse
import http.client
import json
import os
import random
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kvlsvc import Daemon  # noqa: E402

WORDS = ("the cat dog girl boy sun tree ball park happy big little red ran jumped played saw liked went home "
         "mom dad friend bird fish river boat rain sky garden bone morning day night toy").split()


def text(rng, n_words):
    return " ".join(rng.choice(WORDS) for _ in range(n_words)).capitalize() + "."


def pct(xs, p):
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--ingest-share", type=float, default=0.2)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--mode", default="full")
    ap.add_argument("--soak", action="store_true")
    ap.add_argument("--workers", type=int, default=2)
    a = ap.parse_args()
    if os.environ.get("KVL_LONG") != "1":
        print("skipped: load test and soak run with KVL_LONG=1")
        sys.exit(77)
    os.makedirs(a.work, exist_ok=True)
    store = os.path.join(a.work, "load-soak" if a.soak else "load")
    import shutil
    shutil.rmtree(store, ignore_errors=True)
    d = Daemon(a.bin, a.model, store, extra=["--workers", str(a.workers), "--max-concurrent", "256"]).start()
    rng0 = random.Random(1)
    docs = []
    for i in range(8):
        r = d.request("POST", "/v1/documents", {"text": text(rng0, 60), "chunk_tokens": 32, "doc_id": f"seed{i}"},
                      validate=False)
        assert r.status == 201, r
        docs.append(f"seed{i}")
    lat = {"ingest": [], "generate": []}
    errors = {}
    lock = threading.Lock()
    stop_at = time.time() + a.seconds

    def client(cid):
        rng = random.Random(100 + cid)
        conn = http.client.HTTPConnection("127.0.0.1", d.port, timeout=60)
        n = 0
        while time.time() < stop_at:
            if rng.random() < a.ingest_share:
                op = "ingest"
                if a.soak:
                    # a fixed pool of documents: after warm-up the stored data stops growing, so any
                    # growth in memory is the service's, not the data's
                    k = rng.randrange(64)
                    body = {"text": text(random.Random(k), 40 + k), "chunk_tokens": 32, "doc_id": f"pool{k}"}
                else:
                    body = {"text": text(rng, rng.randint(40, 120)), "chunk_tokens": 32, "doc_id": f"c{cid}-{n}"}
                path = "/v1/documents"
            else:
                op = "generate"
                body = {"documents": rng.sample(docs, rng.randint(1, 3)), "query": text(rng, 4),
                        "max_tokens": a.max_tokens, "mode": a.mode}
                path = "/v1/generate"
            n += 1
            t0 = time.perf_counter()
            try:
                conn.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
                resp = conn.getresponse()
                resp.read()
                status = resp.status
            except (OSError, http.client.HTTPException) as e:
                status = type(e).__name__
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", d.port, timeout=60)
            ms = (time.perf_counter() - t0) * 1e3
            with lock:
                if status in (200, 201):
                    lat[op].append(ms)
                else:
                    errors[(op, status)] = errors.get((op, status), 0) + 1
        conn.close()

    rss = []
    ts = [threading.Thread(target=client, args=(i,)) for i in range(a.clients)]
    t_start = time.time()
    [t.start() for t in ts]
    while any(t.is_alive() for t in ts):
        time.sleep(10 if a.soak else 0.5)
        if a.soak:
            rss.append((time.time() - t_start, rss_kib(d.proc.pid)))
            print(f"  t={rss[-1][0]:.0f}s rss={rss[-1][1] / 1024:.1f} MiB "
                  f"generate={len(lat['generate'])} ingest={len(lat['ingest'])}", flush=True)
    [t.join() for t in ts]
    elapsed = time.time() - t_start
    d.stop()
    total = sum(len(v) for v in lat.values())
    print(f"\nkvloomd load test: {a.clients} clients, {elapsed:.1f} s, {a.workers} workers, mode {a.mode}, "
          f"max_tokens {a.max_tokens}, ingest share {a.ingest_share}")
    print(f"{'operation':<10} {'ok':>7} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8}")
    for op, v in lat.items():
        print(f"{op:<10} {len(v):>7} {len(v) / elapsed:>8.1f} {pct(v, 50):>8.1f} {pct(v, 99):>8.1f}")
    print(f"{'all':<10} {total:>7} {total / elapsed:>8.1f}")
    print(f"errors: {errors or 'none'}")
    fails = sum(errors.values())
    if a.soak and len(rss) >= 4:
        warm = [r for t, r in rss if t > 30] or [r for _, r in rss]
        h = len(warm) // 2
        first, second = sum(warm[:h]) / max(h, 1), sum(warm[h:]) / max(len(warm) - h, 1)
        flat = second <= first * 1.10 + 8192
        print(f"soak RSS: first half mean {first / 1024:.1f} MiB, second half mean {second / 1024:.1f} MiB, "
              f"max {max(warm) / 1024:.1f} MiB -> {'flat' if flat else 'GROWING'}")
        fails += 0 if flat else 1
    sys.exit(1 if fails else 0)


if __name__ == "__main__":
    main()
