# kvmi-relay: `make demo` runs the main job end to end; `make test` runs every check.
CARGO ?= cargo
BIN := target/release/kvmi-relay
export CARGO_TERM_COLOR ?= never

.PHONY: all build demo test deps fmt clippy unit

all: build

build:
	$(CARGO) build --release --locked

# Debian packages the tests need (idempotent; skipped when already present).
DEB_PACKAGES := socat iproute2 procps
deps:
	@missing=""; for p in $(DEB_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

demo: build
	$(BIN) demo

fmt:
	$(CARGO) fmt --check

clippy:
	$(CARGO) clippy --release --locked --all-targets -- -D warnings

unit:
	$(CARGO) test --release --locked

test: deps fmt clippy unit
