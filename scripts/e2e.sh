#!/usr/bin/env bash
# Runs the end-to-end tests (build tag e2e): in each package that has
# e2e-tagged test files, only the tests those files define (-run): the
# package's other tests are the unit stage's (make unit), run there already.
#
# Two lanes at once, as the tests mostly wait (on agents, intervals, guests
# booting): ./e2e/ (most of the time; its independent tests run in
# parallel, E2E_PARALLEL at a time, default 3) streams its lines to the
# terminal as they happen; the other packages run one after the other in
# the second lane, each test's lines shown when that lane ends. One
# package per go test, so that its output streams to its log (with several
# packages in one go test, a package's output is held until it ends: a
# hung test would leave the log empty). Each package has its own timeout,
# all of them together well inside CI's 90 minutes: a hung test ends its
# package with go test's panic, which names the running tests and shows
# where they wait. Each package's output goes to bin/e2e-NAME.log, all of
# them to bin/e2e.log at the end; the terminal gets the test lines.
set -uo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
GO="${GO:-go}"
: "${ASR_BIN:=$root/bin/asr}"
: "${E2E_PARALLEL:=3}"
export ASR_BIN
# Compiled as bin/asr and make vet are (no cgo, -trimpath), sharing their
# compiled packages: cold, that saves several CPU-minutes of CI's budget.
# The go builds the tests run themselves inherit it.
export CGO_ENABLED=0
export GOFLAGS="-trimpath${GOFLAGS:+ $GOFLAGS}"
log="$root/bin/e2e.log"
mkdir -p "$root/bin"
: >"$log"
lines='^(=== RUN|--- |PASS|FAIL|ok|panic)|_test.go:|^\s+Test[A-Za-z0-9_/]+ \('

# e2eTests DIR: the -run pattern of the tests DIR's e2e-tagged files define.
e2eTests() {
  local files
  files=$(grep -l '^//go:build e2e' "$1"/*_test.go 2>/dev/null) || return 1
  # shellcheck disable=SC2086
  printf '^(%s)$' "$(sed -n 's/^func \(Test[A-Za-z0-9_]*\)(.*/\1/p' $files | grep -vx TestMain | paste -sd'|')"
}

# runPkg DIR TIMEOUT [go test flags]: one package's e2e tests; its output
# to bin/e2e-NAME.log, and its test lines to the terminal if stream=1;
# returns go test's exit status.
stream=0
runPkg() {
  local dir=$1 timeout=$2
  shift 2
  local run plog start st
  run=$(e2eTests "$dir") || { echo "### $dir: no e2e-tagged test file" >&2; return 1; }
  plog="$root/bin/e2e-$(echo "$dir" | tr / -).log"
  start=$(date +%s)
  echo "### go test -tags e2e ./$dir/ (timeout $timeout) $*" | tee "$plog"
  if [ "$stream" = 1 ]; then
    "$GO" test -tags e2e -count=1 -timeout "$timeout" -v -run "$run" "$@" "./$dir/" 2>&1 | tee -a "$plog" |
      grep --line-buffered -E "$lines"
    st=${PIPESTATUS[0]}
  else
    "$GO" test -tags e2e -count=1 -timeout "$timeout" -v -run "$run" "$@" "./$dir/" >>"$plog" 2>&1
    st=$?
  fi
  echo "### ./$dir/: exit $st after $(( $(date +%s) - start )) s" | tee -a "$plog"
  return $st
}

# The second lane: package timeouts (an idle run takes about a fifth; the
# azure package, whose TestAzurite runs the targets' conformance suite
# against Azurite, took 471 s beside ./e2e/ on a machine at a load of 35).
# Together well inside CI's 90 minutes with the unit stage's 25.
others=(
  "azure 15m"
  "azure/azuritetest 3m"
  "vmware/push 8m"
  "server/drill 12m"
  "server/drill/bootdisk 3m"
)
# Every directory of these trees with an e2e-tagged test file must be in
# the list: a new one is not left out silently.
for d in $(grep -rl --include='*_test.go' '^//go:build e2e' azure vmware server/drill | xargs -n1 dirname | sort -u); do
  case " ${others[*]} " in *" $d "*) ;; *) echo "scripts/e2e.sh: $d has e2e tests but is not in its list" >&2; exit 1 ;; esac
done

rc=0
(
  st=0
  for p in "${others[@]}"; do
    set -- $p
    runPkg "$1" "$2" >/dev/null || st=1 # shown when the lane ends
  done
  exit $st
) &
lane=$!

# The first lane, streamed.
stream=1 runPkg e2e 35m -parallel "$E2E_PARALLEL" || rc=1

wait $lane || rc=1
for p in "e2e 35m" "${others[@]}"; do
  set -- $p
  plog="$root/bin/e2e-$(echo "$1" | tr / -).log"
  cat "$plog" >>"$log"
  [ "$1" = e2e ] && continue
  grep -E "$lines|^### " "$plog"
done
grep -E '^### .*: exit' "$log"
# The end of the output is what a CI summary shows: repeat what failed.
if [ "$rc" != 0 ]; then
  echo "### failed:"
  grep -E -A4 '^--- FAIL|^panic: test timed out|running tests:' "$log" | grep -v '^goroutine' | head -60
fi
exit $rc
