#!/usr/bin/env bash
# Runs asr's benchmarks and prints their tables. Needs bin/asr (make build)
# and the peers (make peers). Usage: bench/run.sh [BENCHMARK]..., where
# BENCHMARK is one of initial splitter rpo points group pit storage resync
# azure capacity discovery failover initial-peers guest-write churn
# (default: initial splitter rpo initial-peers guest-write churn; the last
# three are issue 13's comparisons against the peers and take about 20 min).
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -gt 0 ] || set -- initial splitter rpo initial-peers guest-write churn
for b in "$@"; do
  echo "== $b =="
  go run ./bench/asrbench -asr bin/asr "$b"
  echo
done
echo "== go benchmarks (replication/localfs, agent/nbd, agent) =="
go test -run '^$' -bench . -benchtime 2s ./replication/localfs/ ./agent/nbd/ ./agent/ | grep -E '^(Benchmark|ok)'
