#!/usr/bin/env bash
# make test's two test stages side by side: the unit stage (go test -race
# ./..., its output to bin/unit.log, shown when it ends) and the e2e stage
# (scripts/e2e.sh, streamed). Both mostly wait on servers, agents and
# guests: one after the other they kept CI's two cores about half busy
# (27 min of wall time for 26.5 CPU-minutes here), side by side they
# overlap. The end of the output repeats each stage's exit and what
# failed, as a CI summary shows the end.
set -uo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
GO="${GO:-go}"
: "${UNIT_TIMEOUT:=25m}"
: "${UNIT_PARALLEL:=4}"
: "${ASR_BIN:=$root/bin/asr}"
export ASR_BIN
mkdir -p bin
unitlog="$root/bin/unit.log"
began=$(date +%s)

(
  start=$(date +%s)
  echo "### $GO test -race -count=1 -parallel $UNIT_PARALLEL -timeout $UNIT_TIMEOUT ./..."
  "$GO" test -race -count=1 -parallel "$UNIT_PARALLEL" -timeout "$UNIT_TIMEOUT" ./... 2>&1
  st=$?
  echo "### unit: exit $st after $(( $(date +%s) - start )) s"
  exit $st
) >"$unitlog" 2>&1 &
unit=$!

echo "### the unit stage runs beside the e2e stage; its output is shown when it ends"
start=$(date +%s)
GO="$GO" ./scripts/e2e.sh
e2e=$?
e2eline="### e2e: exit $e2e after $(( $(date +%s) - start )) s"
echo "$e2eline"

wait $unit
unitst=$?
cat "$unitlog"

echo "### stages:"
tail -n 1 "$unitlog"
echo "$e2eline"
echo "### make test's two stages took $(( $(date +%s) - began )) s together"
if [ "$unitst" != 0 ]; then
  echo "### unit stage failed:"
  grep -E -A4 '^--- FAIL|^FAIL|^panic: |running tests:' "$unitlog" | grep -v '^goroutine' | head -60
fi
if [ "$e2e" != 0 ]; then
  echo "### e2e stage failed:"
  grep -E -A4 '^--- FAIL|^panic: test timed out|running tests:' bin/e2e.log | grep -v '^goroutine' | head -60
fi
[ "$unitst" = 0 ] && [ "$e2e" = 0 ]
