#!/usr/bin/env bash
# Runs asr's benchmarks and prints their tables. Needs bin/asr (make build)
# and the peers (make peers). Usage: bench/run.sh [BENCHMARK]..., where
# BENCHMARK is one of initial splitter rpo points group pit storage resync
# azure capacity discovery failover (default: initial splitter rpo).
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -gt 0 ] || set -- initial splitter rpo
for b in "$@"; do
  echo "== $b =="
  go run ./bench/asrbench -asr bin/asr "$b"
  echo
done
echo "== go benchmarks (replication/localfs, agent/nbd, agent) =="
go test -run '^$' -bench . -benchtime 2s ./replication/localfs/ ./agent/nbd/ ./agent/ | grep -E '^(Benchmark|ok)'
