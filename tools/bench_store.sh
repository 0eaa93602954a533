#!/usr/bin/env bash
# Store benchmark in one command: dd direct-I/O baseline (and fio if installed) on the same disk,
# then kvloom-bench-store (raw io_uring baseline, store put/get, 1M-entry index, open time).
#   tools/bench_store.sh [DIR] [kvloom-bench-store flags...]     e.g. tools/bench_store.sh /mnt/nvme --gib 4
# Builds build-bench/ (store + tools only, no CUDA) when the binary is missing. On the GPU machine:
#   source .devdeps/device-deps.sh unpack && tools/bench_store.sh
# Writes at most ~max(3 x --gib, 4.2 GB) under DIR and removes it afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-bench-store-data}
[ $# -gt 0 ] && shift
BIN=build-bench/bin/kvloom-bench-store
if [ ! -x "$BIN" ]; then
    cmake -S . -B build-bench -DCMAKE_BUILD_TYPE=Release -DKVL_CUDA=OFF >build-bench.configure.log 2>&1 || {
        cat build-bench.configure.log; exit 1; }
    cmake --build build-bench -j"$(nproc)" --target kvloom-bench-store kvloom-admin >/dev/null
fi
mkdir -p "$DIR"
echo "== machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), kernel $(uname -r)"
echo "== git $(git rev-parse --short HEAD 2>/dev/null || echo '?'), $(date -u +%Y-%m-%dT%H:%M:%SZ)"
echo "== filesystem: $(df -hT "$DIR" | tail -1)"
echo "== dd baseline (1 GiB, bs=4M, O_DIRECT; single request in flight)"
dd if=/dev/zero of="$DIR/dd.bin" bs=4M count=256 oflag=direct conv=fdatasync 2>&1 | tail -1 | sed 's/^/   write: /'
dd if="$DIR/dd.bin" of=/dev/null bs=4M iflag=direct 2>&1 | tail -1 | sed 's/^/   read:  /'
rm -f "$DIR/dd.bin"
if command -v fio >/dev/null; then
    echo "== fio baseline (1 GiB, 1 MiB blocks, io_uring, iodepth 64, direct)"
    fio --name=w --filename="$DIR/fio.bin" --size=1G --bs=1M --rw=write --ioengine=io_uring --iodepth=64 \
        --direct=1 --end_fsync=1 | grep -E '^ +WRITE:' | sed 's/^ */   /'
    fio --name=r --filename="$DIR/fio.bin" --size=1G --bs=1M --rw=read --ioengine=io_uring --iodepth=64 \
        --direct=1 | grep -E '^ +READ:' | sed 's/^ */   /'
    rm -f "$DIR/fio.bin"
else
    echo "== fio not installed: the raw baseline is dd above and kvloom-bench-store's own io_uring loop"
fi
echo "== kvloom-bench-store --dir $DIR $*"
"$BIN" --dir "$DIR" "$@"
rmdir "$DIR" 2>/dev/null || true
