SHELL := /bin/bash
# asr — make test runs everything CI runs: unit and in-process integration
# tests, then the end-to-end tests against real peers (installed here if
# missing). make bench runs the benchmark scripts.

GO ?= go
# The go test timeouts are safety nets for a hung test binary, never a pace
# to keep: every wait in the tests is for a state or an event and ends a
# hung run by itself first (e2e: hungAfter). A loaded machine (other builds,
# a CPU hog) may take several times as long as an idle one, and must pass.
# CI has 90 minutes in all: a hung test must end its run well before that,
# with go test's panic naming it (scripts/e2e.sh has the e2e packages' own).
UNIT_TIMEOUT ?= 45m
# Tests that call t.Parallel run this many at a time in a package (go
# test's default is GOMAXPROCS, 2 in CI): most of the server package's
# tests wait on their servers and agents more than they compute.
UNIT_PARALLEL ?= 4
# The unit stage's race detector and Go runtime settings (BENCHMARKS.md,
# "Test suite length: the race detector's shadow memory"). The race
# runtime clears the shadow of a new allocation by mapping it anew once
# that shadow passes 64 KiB (clear_shadow_mmap_threshold; an object of
# 32 KiB and up), so each big buffer's first use
# faulted its shadow back in page by page, two faults and a TLB shootdown
# a page; it now clears it in place. Its shadow may use huge pages
# (no_huge_pages_for_shadow=0), and the runtime gives heap pages back
# with MADV_FREE (madvdontneed=0), which the next allocation reuses
# without a fault. Detection is the same: these change how memory is
# zeroed and returned, not what is checked. What you set in GORACE or
# GODEBUG comes last and wins.
UNIT_GORACE ?= clear_shadow_mmap_threshold=1073741824 no_huge_pages_for_shadow=0
UNIT_GODEBUG ?= madvdontneed=0

.PHONY: test unit e2e peers build bench generate vet fuzz

# The unit stage runs beside the rest (scripts/test.sh): the peers'
# install (mostly network) beside vet and the build, then the e2e stage.
# They mostly wait, and one after the other they kept CI's two cores half
# idle.
# make unit and make e2e run one stage alone.
test:
	GO=$(GO) MAKE=$(MAKE) UNIT_TIMEOUT=$(UNIT_TIMEOUT) UNIT_PARALLEL=$(UNIT_PARALLEL) \
		UNIT_GORACE="$(UNIT_GORACE)" UNIT_GODEBUG="$(UNIT_GODEBUG)" ./scripts/test.sh

# vet, build and the e2e stage compile with the same settings (no cgo,
# -trimpath: the static binary's), so each package is compiled once for
# all three; the unit stage's -race needs cgo and compiles its own.
vet:
	CGO_ENABLED=0 $(GO) vet -trimpath ./...
	@test -z "$$(gofmt -l $$(git ls-files '*.go'))" || { echo "gofmt needed:"; gofmt -l $$(git ls-files '*.go'); exit 1; }
	./scripts/check-tracked.sh

unit:
	GORACE="$(UNIT_GORACE) $$GORACE" GODEBUG="$(UNIT_GODEBUG)$${GODEBUG:+,$$GODEBUG}" \
		$(GO) test -race -count=1 -parallel $(UNIT_PARALLEL) -timeout $(UNIT_TIMEOUT) ./...

e2e: build
	GO=$(GO) ASR_BIN=$(CURDIR)/bin/asr ./scripts/e2e.sh

build:
	mkdir -p bin
	CGO_ENABLED=0 $(GO) build -trimpath -o bin/asr .

peers:
	./scripts/install-peers.sh

generate:
	$(GO) tool templ generate

bench: build peers
	./bench/run.sh

# Every fuzz target for FUZZTIME (default 60s) each, one at a time;
# make fuzz FUZZ=Segment runs those matching a pattern.
fuzz:
	./scripts/fuzz.sh $(FUZZ)
