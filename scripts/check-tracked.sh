#!/usr/bin/env bash
# Fails if a file git tracks (or has staged) is binary: build outputs are
# ignored (.gitignore), never committed. The templ output (web/*_templ.go)
# and the vendored htmx are text; a binary file that must be committed is
# listed in ALLOWED. Run by make vet.
set -euo pipefail
cd "$(dirname "$0")/.."
ALLOWED='^$' # extended regexp of paths allowed to be binary
empty=$(git hash-object -t tree /dev/null)
# git's numstat shows "-" for the lines of a file it takes for binary.
bad=$(git diff --cached --numstat "$empty" | awk -F'\t' '$1 == "-" { print $3 }' | grep -Ev "$ALLOWED" || true)
if [ -n "$bad" ]; then
	echo "binary files tracked (build outputs belong in .gitignore):" >&2
	echo "$bad" >&2
	exit 1
fi
