#!/usr/bin/env bash
# Runs the end-to-end tests (build tag e2e) one package at a time, so that
# go test streams each test's lines as they happen (with several packages
# in one go test, a package's output is held until it ends: a hung test
# would leave the log empty). Each package has its own timeout, all of them
# together well inside CI's 90 minutes: a hung test ends its package with
# go test's panic, which names the running tests and shows where they wait.
# The whole output goes to bin/e2e.log; the terminal gets the test lines.
set -uo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
GO="${GO:-go}"
: "${ASR_BIN:=$root/bin/asr}"
export ASR_BIN
log="$root/bin/e2e.log"
: >"$log"
# package  timeout (an idle run takes about a fifth of it)
pkgs=(
  "./e2e/ 35m"
  "./azure/... 8m"
  "./vmware/... 8m"
  "./server/drill/... 12m"
)
rc=0
for p in "${pkgs[@]}"; do
  set -- $p
  start=$(date +%s)
  echo "### go test -tags e2e $1 (timeout $2)" | tee -a "$log"
  "$GO" test -tags e2e -count=1 -timeout "$2" -v "$1" 2>&1 | tee -a "$log" |
    grep --line-buffered -E '^(=== RUN|--- |PASS|FAIL|ok|panic)|_test.go:|^\s+Test[A-Za-z0-9_/]+ \(' 
  st=${PIPESTATUS[0]}
  echo "### $1: exit $st after $(( $(date +%s) - start )) s" | tee -a "$log"
  [ "$st" = 0 ] || rc=$st
done
# The end of the output is what a CI summary shows: repeat what failed.
if [ "$rc" != 0 ]; then
  echo "### failed:"
  grep -E -A4 '^--- FAIL|^panic: test timed out|running tests:' "$log" | grep -v '^goroutine' | head -60
fi
exit $rc
