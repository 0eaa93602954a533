#!/usr/bin/env bash
# kvloom codec-profile / codec-eval end to end on stories260K: a profile with a (short) bin
# search, evaluation with it, without it (per-chunk tables), lossless and the LMCache scheme;
# usage errors exit 2, a profile of another model is refused.
#   tests/codec/cli_test.sh KVLOOM SHARED WORKDIR
set -euo pipefail
kvloom=$1
shared=$2
work=$3
model=$shared/models/stories260K/stories260K.bin
other=$shared/models/llama2xs280K/llama2xs_280K.bin
tokens=$shared/golden/stories260K/seq00.tokens.i32
mkdir -p "$work"
fail() { echo "FAIL: $*"; exit 1; }

"$kvloom" codec-profile --model "$model" --seqs 2 --search-seqs 1 --out "$work/p.kvlp" >"$work/profile.json" 2>"$work/profile.err" ||
    { cat "$work/profile.err"; fail "codec-profile"; }
grep -q '"calib_tokens"' "$work/profile.json" || fail "codec-profile output"
grep -q 'level 2 bins' "$work/profile.err" || fail "codec-profile did not report its bins"

check() { # JSON-LINE MAX_BITS MAX_KL
    python3 - "$1" "$2" "$3" <<'PY'
import json, sys
r = json.loads(sys.argv[1])
for k in ("bits_per_element", "ratio_vs_fp16", "ratio_vs_int8", "mean_kl", "top1_agreement",
          "confident_top1_agreement", "encode_MBps", "decode_MBps", "int8", "fp16_zstd19"):
    assert k in r, k
assert 0 < r["bits_per_element"] <= float(sys.argv[2]), r["bits_per_element"]
assert 0 <= r["mean_kl"] <= float(sys.argv[3]), r["mean_kl"]
assert r["int8"]["mean_kl"] < 0.01 and r["int8"]["bits_per_element"] == 8.5
PY
}
out=$("$kvloom" codec-eval --model "$model" --tokens "$tokens" --profile "$work/p.kvlp") || fail "codec-eval with profile"
check "$out" 6 0.05 || fail "codec-eval with profile: $out"
echo "$out" | grep -q '"profile":true' || fail "profile not used"
out=$("$kvloom" codec-eval --model "$model" --tokens "$tokens" --profile none --threads 2) || fail "codec-eval without profile"
check "$out" 8 0.05 || fail "codec-eval without profile: $out"
out=$("$kvloom" codec-eval --model "$model" --tokens "$tokens" --level 0) || fail "codec-eval lossless"
check "$out" 32 0 || fail "lossless must be exact: $out"
out=$("$kvloom" codec-eval --model "$model" --tokens "$tokens" --scheme lmcache) || fail "codec-eval lmcache"
check "$out" 10 0.1 || fail "lmcache: $out"

set +e
"$kvloom" codec-eval --model "$model" --tokens "$tokens" --level 9 2>/dev/null; [ $? -eq 2 ] || fail "bad level must exit 2"
"$kvloom" codec-eval --model "$model" 2>/dev/null; [ $? -eq 2 ] || fail "missing --tokens must exit 2"
"$kvloom" codec-eval --model "$other" --tokens "$shared/golden/llama2xs280K/seq00.tokens.i32" --profile "$work/p.kvlp" 2>"$work/err"
[ $? -eq 1 ] && grep -q KVL_ERR_FINGERPRINT "$work/err" || fail "a profile of another model must be refused"
set -e
echo "all checks passed"
