# ztgo — developer entry points. `make test` is what CI runs (through .ci/run).
GO       ?= go
BIN      := bin/ztgo
PKGS     := ./...
VERSION  ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
LDFLAGS  := -s -w -X github.com/ztgo/ztgo/runtime/buildinfo.Version=$(VERSION)
STATICCHECK_VERSION := v0.8.2

.PHONY: all build run demo demo-netns test test-privileged test-short bench bench-full bench-go bench-once fuzz lint vet staticcheck clean

all: build

build:
	$(GO) build -trimpath -ldflags '$(LDFLAGS)' -o $(BIN) ./cmd/ztgo

# Run one ztgo node on the embedded default config and an in-memory CA.
run: build
	./$(BIN) run

# Two ztgo nodes on loopback, an echo app on each, traffic through SOCKS5 -> HBONE mTLS.
demo: build
	$(GO) run ./cmd/ztgo-demo --ztgo ./$(BIN)

# Two ztgo nodes capturing pods in real network namespaces (root): an unmodified curl in one
# pod reaches an app in another through in-pod capture and mTLS HBONE.
demo-netns: build
	$(GO) run ./cmd/ztgo-demo-netns --ztgo ./$(BIN)

# Everything CI runs: vet, the race-enabled test suite (privileged tests run when root),
# and every benchmark once so none rots.
test: vet
	$(GO) test -race -count=1 -timeout 20m $(PKGS)
	$(MAKE) bench-once

test-short:
	$(GO) test -short -count=1 $(PKGS)

# Tests that need root (network namespaces, nftables); they skip with a message otherwise.
test-privileged:
	$(GO) test -race -count=1 -timeout 20m -run 'Privileged' $(PKGS)

bench-once:
	$(GO) test -run '^$$' -bench . -benchtime 1x $(PKGS)

# Go benchmarks with allocations.
bench-go:
	$(GO) test -run '^$$' -bench . -benchmem $(PKGS)

# meshbench's quick run (a minute or two): ztgo side by side with the direct path and the peers
# (stunnel4, installed by perf/install-peers.sh when missing and root); the report on stdout.
bench: build
	./perf/install-peers.sh
	$(GO) run ./perf/cmd/meshbench --ztgo ./$(BIN) --quick

# meshbench's full run (several minutes): the report also in perf/last-run.md, CPU and heap
# profiles in perf/profiles, then flame graphs of both nodes' CPU during 1-stream throughput.
bench-full: build
	./perf/install-peers.sh
	$(GO) run ./perf/cmd/meshbench --ztgo ./$(BIN) --profile-dir perf/profiles --out perf/last-run.md
	$(GO) run ./perf/cmd/flamegraph --title 'ztgo node a (client side): CPU profile, meshbench 1-stream throughput' \
		-o perf/profiles/flame-throughput-node-a.svg perf/profiles/throughput-node-a.pprof
	$(GO) run ./perf/cmd/flamegraph --title 'ztgo node b (server side): CPU profile, meshbench 1-stream throughput' \
		-o perf/profiles/flame-throughput-node-b.svg perf/profiles/throughput-node-b.pprof

fuzz:
	@for spec in \
		./tls/spiffe:FuzzParse \
		./stages/capture:FuzzHandshake \
		./stages/hbone:FuzzParseBaggage \
		./control/localfile:FuzzParse \
		./stages/identity:FuzzParseAuthority \
		./redirect/zds:FuzzDecode \
		./redirect/agent:FuzzParsePodSpec \
		./stages/dns:FuzzHandle \
		./control/xds:FuzzHandle \
		./stages/authz:FuzzPrincipalMatch \
		./perf/flamegraph:FuzzRead \
		./perf/flamegraph:FuzzRender ; do \
		pkg=$${spec%%:*}; fn=$${spec##*:}; \
		echo "== $$pkg $$fn"; \
		$(GO) test -run '^$$' -fuzz "^$$fn$$" -fuzztime $${FUZZTIME:-20s} $$pkg || exit 1; \
	done

vet:
	$(GO) vet $(PKGS)

staticcheck:
	$(GO) run honnef.co/go/tools/cmd/staticcheck@$(STATICCHECK_VERSION) $(PKGS)

lint: vet staticcheck
	@out=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi

clean:
	rm -rf bin
