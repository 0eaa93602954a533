#!/usr/bin/env bash
# Builds one codec fuzz target with clang (libFuzzer + ASan + UBSan) and runs it for a bounded
# time over the committed seed corpus.
#   tests/codec/fuzz.sh decode|profile OUTDIR [SECONDS]     (default 20 s; exit 77 without clang)
set -euo pipefail
target=$1
out=$2
secs=${3:-${KVL_FUZZ_SECONDS:-20}}
[ -n "$secs" ] || secs=20
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
CLANG=$(command -v clang || command -v clang-14 || true)
if [ -z "$CLANG" ]; then
    echo "skipped: clang not found (tools/dev.sh deps installs it)"
    exit 77
fi
mkdir -p "$out"
bin=$out/fuzz_codec_$target
# shellcheck disable=SC2046
"$CLANG" -std=c11 -g -O1 -D_GNU_SOURCE -DFUZZING_BUILD_MODE_UNSAFE_FOR_PRODUCTION -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined \
    -I"$root/api" -I"$root/codec" -I"$here" \
    "$here/fuzz_codec_$target.c" "$root"/codec/*.c "$root/api/kvl_status.c" "$root/api/kvl_half.c" \
    $(pkg-config --cflags --libs libzstd libxxhash) -lpthread -lm -o "$bin"
# the committed seeds stay read-only: new inputs go to a scratch corpus
work=$out/corpus_$target
mkdir -p "$work"
"$bin" -max_total_time="$secs" -rss_limit_mb=2048 -max_len=65536 -timeout=10 -print_final_stats=1 \
    "$work" "$here/corpus/$target" 2>&1 | tail -n 15
