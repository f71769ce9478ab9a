#!/usr/bin/env bash
# make test: the unit stage (go test -race ./..., which needs no peer) runs
# beside the rest: the peers' install (apt-get, npm, go install: mostly
# network) beside make vet and make build, then the e2e stage
# (scripts/e2e.sh, streamed). One after the other they kept CI's two
# cores about half busy (27 min of wall time for 26.5 CPU-minutes on this
# machine, warm); side by side they overlap. The unit stage's output goes
# to bin/unit.log and is shown when the rest ends, the peers' to
# bin/peers.log, shown when vet and the build are done. The end of the
# output repeats each stage's exit and time and what failed, as a CI
# summary shows the end.
set -uo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
GO="${GO:-go}"
MAKE="${MAKE:-make}"
: "${UNIT_TIMEOUT:=45m}"
: "${UNIT_PARALLEL:=4}"
# The race detector's and the runtime's memory settings for the unit stage
# (the Makefile says why); GORACE and GODEBUG from the caller come last.
: "${UNIT_GORACE=clear_shadow_mmap_threshold=1073741824 no_huge_pages_for_shadow=0}"
: "${UNIT_GODEBUG=madvdontneed=0}"
unitgorace="$UNIT_GORACE ${GORACE:-}"
unitgodebug="$UNIT_GODEBUG${GODEBUG:+,$GODEBUG}"
mkdir -p bin
rm -f bin/e2e.log # a stage that did not run this time shows no old failures
unitlog="$root/bin/unit.log"
began=$(date +%s)

(
  start=$(date +%s)
  # -vet=off: make vet, beside it, vets the same packages and files (no
  # file has a cgo or race build tag); go test's own vet ran a second
  # vet of every package on the same two cores.
  echo "### GORACE='$unitgorace' GODEBUG='$unitgodebug' $GO test -race -vet=off -count=1 -parallel $UNIT_PARALLEL -timeout $UNIT_TIMEOUT ./..."
  GORACE="$unitgorace" GODEBUG="$unitgodebug" "$GO" test -race -vet=off -count=1 -parallel "$UNIT_PARALLEL" -timeout "$UNIT_TIMEOUT" ./... 2>&1
  st=$?
  echo "### unit: exit $st after $(( $(date +%s) - start )) s"
  exit $st
) >"$unitlog" 2>&1 &
unit=$!
echo "### the unit stage runs beside the others; its output is shown when they end"

# stage NAME CMD...: runs one of the other stages, timed.
lines=()
stage() {
  local name=$1 start st
  shift
  start=$(date +%s)
  "$@"
  st=$?
  lines+=("### $name: exit $st after $(( $(date +%s) - start )) s")
  echo "${lines[-1]}"
  return $st
}
# The peers' install (apt-get and npm: mostly waiting on the network)
# runs beside vet and the build (the compiler: CPU), which need none of
# it; its output goes to bin/peers.log, shown when it ends. The e2e stage
# starts when all three are done.
peerslog="$root/bin/peers.log"
(
  start=$(date +%s)
  "$MAKE" --no-print-directory peers
  st=$?
  echo "### peers: exit $st after $(( $(date +%s) - start )) s"
  exit $st
) >"$peerslog" 2>&1 &
peers=$!
echo "### the peers' install runs beside vet and the build; its output is shown when it ends"
rest=0
stage vet "$MAKE" --no-print-directory vet &&
  stage build "$MAKE" --no-print-directory build || rest=1
wait $peers
peersst=$?
cat "$peerslog"
lines=("$(tail -n 1 "$peerslog")" "${lines[@]}")
if [ "$peersst" != 0 ]; then
  rest=1
fi
if [ "$rest" = 0 ]; then
  stage e2e env GO="$GO" ASR_BIN="$root/bin/asr" ./scripts/e2e.sh || rest=1
fi

wait $unit
unitst=$?
cat "$unitlog"

echo "### stages:"
for l in "${lines[@]}"; do echo "$l"; done
tail -n 1 "$unitlog"
echo "### make test took $(( $(date +%s) - began )) s"
if [ "$unitst" != 0 ]; then
  echo "### unit stage failed:"
  grep -E -A4 '^--- FAIL|^FAIL|^panic: |running tests:' "$unitlog" | grep -v '^goroutine' | head -60
fi
if [ "$rest" != 0 ] && [ -s bin/e2e.log ] && grep -q '^--- FAIL\|^panic: ' bin/e2e.log; then
  echo "### e2e stage failed:"
  grep -E -A4 '^--- FAIL|^panic: test timed out|running tests:' bin/e2e.log | grep -v '^goroutine' | head -60
fi
[ "$unitst" = 0 ] && [ "$rest" = 0 ]
