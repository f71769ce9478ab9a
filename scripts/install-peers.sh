#!/usr/bin/env bash
# Installs the real peers the end-to-end tests and benchmarks drive, when
# they are missing: qemu-io/qemu-img, nbdinfo/nbdcopy, fio (nbd engine),
# nbdkit, e2fsprogs, zstd, Chromium for the console test, iproute2 and
# iptables for the fault suite (network namespaces, loss, outages), rsync
# for the resync benchmark, OpenSSH's server (sshd, ssh-keygen) for the push
# install tests, QEMU's system emulator, a Linux kernel, static busybox,
# syslinux and mtools for the drill tests (server/drill, bootdisk),
# Prometheus and promtool for the metrics test, Azurite (npm, into bin/npm)
# for the Azure target's tests, and mailpit (a real SMTP server with an HTTP
# API; go install, into bin/) for the alert e-mail test.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
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
check cpio cpio
check npm npm
# sshd lives in /usr/sbin, outside a non-root PATH: check the file.
[ -x /usr/sbin/sshd ] || need+=(openssh-server)
check ssh-keygen openssh-client
# Verified drills: server/drill boots images server/drill/bootdisk makes.
check qemu-system-x86_64 qemu-system-x86
# The drill disks boot the host's packaged kernel: check the file.
compgen -G '/boot/vmlinuz-*' >/dev/null || need+=(linux-image-cloud-amd64)
# The initramfs has no libraries: busybox must be the static build.
{ [ -x /bin/busybox ] && ! ldd /bin/busybox >/dev/null 2>&1; } || need+=(busybox-static)
check syslinux syslinux
[ -f /usr/lib/syslinux/mbr/mbr.bin ] || need+=(syslinux-common)
check mformat mtools
check mcopy mtools
# The metrics test: promtool checks a scrape, a real Prometheus scrapes.
check prometheus prometheus
check promtool prometheus
if [ ${#need[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo"
  echo "installing: ${need[*]}" >&2
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends $(printf '%s\n' "${need[@]}" | sort -u) >/dev/null
fi
# Azurite, the Azure Storage emulator, goes into the git-ignored bin/ so that
# azure/azuritetest finds it at a fixed place.
if [ ! -x "$root/bin/npm/node_modules/.bin/azurite-blob" ]; then
  echo "installing: azurite (npm, into bin/npm)" >&2
  npm install --prefix "$root/bin/npm" --no-audit --no-fund --silent azurite@3
fi
# mailpit, an SMTP server with an HTTP API, for e2e/alerts_test.go: into the
# git-ignored bin/, where the test looks when it is not on the PATH.
if ! command -v mailpit >/dev/null 2>&1 && [ ! -x "$root/bin/mailpit" ]; then
  echo "installing: mailpit (go install, into bin/)" >&2
  GOBIN="$root/bin" go install github.com/axllent/mailpit@v1.33.1
fi
