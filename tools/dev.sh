#!/usr/bin/env bash
# kvloom set-up and jobs on a fresh Debian/Ubuntu machine.
#   tools/dev.sh run          install packages, build, start the main job: kvloomd on 127.0.0.1:8080
#                             (admin 127.0.0.1:8081) with ../shared/models/stories260K, store in ./data
#   tools/dev.sh run ARGS...  the same set-up, then build/bin/kvloom ARGS (e.g. run generate ...)
#   tools/dev.sh test         install packages, build, run every test (normal build + ASan/UBSan build)
#   tools/dev.sh deps|build   the individual steps
# Environment: KVL_SHARED (default ../shared), KVL_LONG=1 for the long test mode, JOBS for build jobs,
# KVL_MODEL / KVL_STORE / KVL_PORT / KVL_ADMIN_PORT / KVL_LOAD_CONTROLLER (on|off) / KVL_LOAD_COSTS
# (kvloomd --load-costs) for the main job.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
SHARED=${KVL_SHARED:-$ROOT/../shared}
JOBS=${JOBS:-$(nproc)}

PKGS="build-essential cmake pkg-config libjansson-dev libssl-dev libzstd-dev libxxhash-dev \
librocksdb-dev liburing-dev libmicrohttpd-dev clang python3 python3-yaml python3-jsonschema curl"

deps() {
    local missing=""
    for p in $PKGS; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
    done
    if [ -n "$missing" ]; then
        echo "kvloom: installing Debian packages:$missing"
        local SUDO=""
        [ "$(id -u)" -eq 0 ] || SUDO=sudo
        $SUDO apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $missing >/dev/null
    fi
}

build_dir() { # DIR [cmake -D args...] [--target T]
    local dir=$1; shift
    local cfg=() tgt=()
    while [ $# -gt 0 ]; do
        if [ "$1" = --target ]; then tgt=(--target "$2"); shift 2; else cfg+=("$1"); shift; fi
    done
    cmake -S "$ROOT" -B "$dir" -DKVL_SHARED_DIR="$SHARED" "${cfg[@]}" >"$dir.configure.log" 2>&1 || {
        cat "$dir.configure.log"; exit 1; }
    cmake --build "$dir" -j"$JOBS" "${tgt[@]}"
}

case "${1:-}" in
deps) deps ;;
build) deps; build_dir build -DKVL_CUDA="${KVL_CUDA:-AUTO}" ;;
run)
    shift
    deps
    build_dir build
    if [ $# -gt 0 ]; then
        exec build/bin/kvloom "$@"
    fi
    MODEL=${KVL_MODEL:-$SHARED/models/stories260K/stories260K.bin}
    STORE=${KVL_STORE:-$ROOT/data}
    PORT=${KVL_PORT:-8080}
    APORT=${KVL_ADMIN_PORT:-8081}
    API=http://127.0.0.1:$PORT
    cat <<EXAMPLE
kvloom: starting kvloomd (model $MODEL, store $STORE); Ctrl-C stops it.
  API   $API      (POST /v1/documents, /v1/generate, /v1/context; docs/openapi.yaml)
  admin http://127.0.0.1:$APORT  (/metrics, /admin/stats, /admin/tenants, /healthz, /readyz)
Once it logs "ready", try from another shell:
  curl -s $API/v1/documents -H 'Content-Type: application/json' \
       -d '{"doc_id": "lily", "chunk_tokens": 32, "text": "Once upon a time, there was a little girl named Lily. She loved to play outside in the park. One day she saw a big red ball."}'
  curl -s $API/v1/generate -H 'Content-Type: application/json' \
       -d '{"documents": ["lily"], "query": "Lily", "max_tokens": 40}'
  build/bin/kvloom ask --server $API --doc lily "Lily"
EXAMPLE
    CTL=()
    [ -z "${KVL_LOAD_CONTROLLER:-}" ] || CTL+=(--load-controller "$KVL_LOAD_CONTROLLER")
    [ -z "${KVL_LOAD_COSTS:-}" ] || CTL+=(--load-costs "$KVL_LOAD_COSTS")
    exec build/bin/kvloomd --model "$MODEL" --store "$STORE" --listen "127.0.0.1:$PORT" --admin-listen "127.0.0.1:$APORT" \
        "${CTL[@]}"
    ;;
test)
    deps
    echo "== normal build (CUDA backend compiled where nvcc exists)"
    build_dir build -DKVL_CUDA="${KVL_CUDA:-AUTO}"
    ctest --test-dir build --output-on-failure -j"$JOBS"
    echo "== libFuzzer targets (clang, ${KVL_FUZZ_SECONDS:-20} s each)"
    build_dir build-fuzz -DCMAKE_C_COMPILER=clang -DKVL_FUZZ=ON -DKVL_CUDA=OFF -DKVL_NATIVE=OFF \
        -DKVL_FUZZ_SECONDS="${KVL_FUZZ_SECONDS:-20}" --target kvl_fuzz_all
    ctest --test-dir build-fuzz --output-on-failure -R '^fuzz_'
    echo "== ASan + UBSan build"
    # the CUDA backend is compiled (and its host code tested) in the normal build; the sanitizer
    # build checks the C code paths
    build_dir build-asan -DCMAKE_BUILD_TYPE=Debug -DKVL_SANITIZE=ON -DKVL_CUDA=OFF -DKVL_NATIVE=OFF
    ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1 \
        ctest --test-dir build-asan --output-on-failure -j"$JOBS"
    ;;
*)
    sed -n '2,8p' "$0"
    exit 2
    ;;
esac
