#!/usr/bin/env bash
# kvloom-admin end to end on the store test_store_basic leaves behind (st_basic).
set -euo pipefail
A=$1
S=st_basic
$A --store $S stat >/dev/null
n=$($A --store $S --json ls | python3 -c 'import json,sys; print(len(json.load(sys.stdin)))')
[ "$n" -gt 0 ] || { echo "ls listed nothing"; exit 1; }
$A --store $S audit >/dev/null
$A --store $S --json verify | grep -q '"ok": true'
rm -f admin.export && rm -rf st_admin_copy
$A --store $S export admin.export >/dev/null
$A --store st_admin_copy --create import admin.export >/dev/null
m=$($A --store st_admin_copy --json ls | python3 -c 'import json,sys; print(len(json.load(sys.stdin)))')
[ "$m" = "$n" ] || { echo "import gave $m entries, export had $n"; exit 1; }
$A --store st_admin_copy audit >/dev/null
key=$($A --store st_admin_copy --json ls --limit 1 | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["key"])')
$A --store st_admin_copy --json evict --key "$key" | grep -q "$key"
$A --store st_admin_copy --json evict --target 0 | grep -q '"evicted"'
$A --store st_admin_copy set-quota team-a 1M >/dev/null
$A --store st_admin_copy compact --keep-log 5 >/dev/null
[ "$($A --store st_admin_copy --json log --n 0 | python3 -c 'import json,sys; print(len(json.load(sys.stdin)))')" -le 7 ]
# usage errors exit 2, a missing store exits 1
set +e
$A --store $S frobnicate 2>/dev/null; [ $? = 2 ] || { echo "bad command did not exit 2"; exit 1; }
$A --store does-not-exist stat 2>/dev/null; [ $? = 1 ] || { echo "missing store did not exit 1"; exit 1; }
$A --store $S verify nothex 2>/dev/null; [ $? = 2 ] || { echo "bad key did not exit 2"; exit 1; }
echo "admin cli ok"
