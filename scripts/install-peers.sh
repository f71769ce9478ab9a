#!/usr/bin/env bash
# Installs the real peers the end-to-end tests and benchmarks drive, when
# they are missing: qemu-io/qemu-img, nbdinfo/nbdcopy, fio (nbd engine),
# nbdkit, e2fsprogs, zstd, Chromium for the console test, iproute2 and
# iptables for the fault suite (network namespaces, loss, outages), rsync
# for the resync benchmark.
set -euo pipefail
need=()
check() { command -v "$1" >/dev/null 2>&1 || need+=("$2"); }
check qemu-io qemu-utils
check qemu-img qemu-utils
check nbdinfo libnbd-bin
check nbdcopy libnbd-bin
check fio fio
check nbdkit nbdkit
check e2fsck e2fsprogs
check zstd zstd
check chromium chromium
check ip iproute2
check iptables iptables
check rsync rsync
if [ ${#need[@]} -eq 0 ]; then
  exit 0
fi
sudo=""
[ "$(id -u)" = 0 ] || sudo="sudo"
echo "installing: ${need[*]}" >&2
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends $(printf '%s\n' "${need[@]}" | sort -u) >/dev/null
