#!/usr/bin/env bash
# Runs every fuzz target (or those whose name matches the regexp $1) for
# FUZZTIME each (default 60s), one at a time, and prints each target's
# executions per second and the 3-second windows in which it reported none.
#
# Minimization of a new input is capped at FUZZMINIMIZE executions (default
# 2000x): Go minimizes every input that adds coverage before it fuzzes on,
# trying cuts of the input until a minute has passed, and counts none of
# those runs; on targets whose inputs stay interesting under most cuts the
# workers then report 0 execs/s for most of the run.
#
# A target fails on a written failing input (testdata/fuzz/<target>/) or
# any failure but one: go1.26 fails a run that found nothing with a bare
# "context deadline exceeded" when a worker is busy as -fuzztime ends
# (go.dev/issue/75804, fixed in go1.27), which is reported as a flake.
set -uo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
fuzztime=${FUZZTIME:-60s}
minimize=${FUZZMINIMIZE:-2000x}
pattern=${1:-.}
seconds=""
case $fuzztime in
*m) seconds=$((${fuzztime%m} * 60)) ;;
*s) seconds=${fuzztime%s} ;;
esac

failed=0
printf '%-22s %-16s %10s %9s %6s  %s\n' target package execs 'execs/s' idle result
while read -r file name; do
	[[ $name =~ $pattern ]] || continue
	pkg=./$(dirname "$file")
	corpus=$pkg/testdata/fuzz/$name
	before=$(find "$corpus" -type f 2>/dev/null | wc -l)
	log=$(mktemp)
	go test -run '^$' -fuzz "^$name\$" -fuzztime "$fuzztime" -fuzzminimizetime "$minimize" "$pkg" >"$log" 2>&1
	rc=$?
	after=$(find "$corpus" -type f 2>/dev/null | wc -l)
	execs=$(grep -o 'execs: [0-9]*' "$log" | tail -1 | awk '{print $2}')
	execs=${execs:-0}
	rate=-
	[[ -n $seconds && $seconds -gt 0 ]] && rate=$((execs / seconds))
	# The last progress line always reads 0/sec: the run has stopped.
	idle=$(($(grep -c '(0/sec)' "$log") - 1))
	((idle < 0)) && idle=0
	result=ok
	if ((rc != 0)); then
		if ((after == before)) && grep -q 'context deadline exceeded' "$log" &&
			! grep -q -e 'Failing input written' -e 'panic:' -e '_test.go:[0-9]*:' "$log"; then
			result="flake (go.dev/issue/75804)"
		else
			result=FAIL
			failed=1
			sed 's/^/    /' "$log"
		fi
	fi
	printf '%-22s %-16s %10s %9s %6s  %s\n' "$name" "${pkg#./}" "$execs" "$rate" "$((idle * 3))s" "$result"
	rm -f "$log"
done < <(grep -r --include='*_test.go' -o '^func Fuzz[A-Za-z0-9_]*' . | sed 's|^\./||; s|:func | |' | sort)
exit $failed
