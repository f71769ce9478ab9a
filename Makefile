SHELL := /bin/bash
# asr — make test runs everything CI runs: unit and in-process integration
# tests, then the end-to-end tests against real peers (installed here if
# missing). make bench runs the benchmark scripts.

GO ?= go
# The go test timeouts are safety nets for a hung test binary, never a pace
# to keep: every wait in the tests is for a state or an event and ends a
# hung run by itself first (e2e: hungAfter). A loaded machine (other builds,
# a CPU hog) may take several times as long as an idle one, and must pass.
UNIT_TIMEOUT ?= 60m
E2E_TIMEOUT ?= 90m

.PHONY: test unit e2e peers build bench generate vet fuzz

test: peers vet unit e2e

vet:
	$(GO) vet ./...
	@test -z "$$(gofmt -l $$(git ls-files '*.go'))" || { echo "gofmt needed:"; gofmt -l $$(git ls-files '*.go'); exit 1; }
	./scripts/check-tracked.sh

unit:
	$(GO) test -race -count=1 -timeout $(UNIT_TIMEOUT) ./...

e2e: build
	ASR_BIN=$(CURDIR)/bin/asr $(GO) test -tags e2e -count=1 -timeout $(E2E_TIMEOUT) -v ./e2e/ ./azure/... ./vmware/... ./server/drill/... 2>&1 | tee bin/e2e.log | grep -E '^(=== RUN|--- |PASS|FAIL|ok|panic)|_test.go:' ; exit $${PIPESTATUS[0]}

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
