# kvmi-relay: `make demo` runs the main job end to end; `make quick` is the day-to-day check;
# `make test` runs every check.
CARGO ?= cargo
# The workspace's two packages: the daemon (`kvmi-relay`, what `make install` ships) and its
# companion (`kvmi-relay-tools` in tools/: test peers, fake KVMi peers, demo, man page).
PACKAGES := -p kvmi-relay -p kvmi-relay-tools
# The shipped binary (profile dist: fat LTO, see Cargo.toml); tests build their own (release).
BIN := target/dist/kvmi-relay
# Its companion for tests, benches, the demo and the man page (never installed).
TOOLS := target/dist/kvmi-relay-tools
export CARGO_TERM_COLOR ?= never

.PHONY: all build demo quick test deps fmt clippy unit fuzz man install uninstall deb lintian bench bench-pinned bench-loaded bench-tls bench-fleet bench-quick bench-lint

all: build

build:
	$(CARGO) build --profile dist --locked $(PACKAGES)

# Debian packages the tests need (idempotent; skipped when already present).
# systemd: systemd-analyze verify/security for tests/systemd_units.rs.
# fonts-dejavu-core: the labels of the bench plot (bench-quick runs in `make test`).
# prometheus: `promtool check metrics` on the `--kvmi` Prometheus output (tests/relay_kvmi.rs).
# openssl: the TLS interop test's standard client and server (tests/relay_tls.rs).
# libxml2-utils: xmllint, which the libvirt hook parses the domain XML with (tests/libvirt_hook.rs);
# curl: the control socket's HTTP GET /metrics (tests/relay_stats.rs).
# stunnel4: a TLS contender of the bench's chain (bench-quick runs every contender).
DEB_PACKAGES := socat iproute2 procps systemd fonts-dejavu-core prometheus openssl libxml2-utils curl stunnel4
deps:
	@missing=""; for p in $(DEB_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

demo: build
	$(TOOLS) demo

# Every package: the workspace's two, the bench harness and the fuzz targets (packages of their own).
fmt:
	$(CARGO) fmt --all --check
	$(CARGO) fmt --check --manifest-path benches/harness/Cargo.toml
	$(CARGO) fmt --check --manifest-path fuzz/Cargo.toml

clippy:
	$(CARGO) clippy --release --locked $(PACKAGES) --all-targets -- -D warnings
	$(HARNESS_CLIPPY)

# Unit and integration tests. The integration tests run the daemon and the tools binary beside
# it (target/release/): both are built first.
unit:
	$(CARGO) build --release --locked $(PACKAGES)
	$(CARGO) test --release --locked $(PACKAGES)

# The day-to-day check: formatting, lints and the tests; no guests, no benches (a few minutes).
# `make quick` and `make test` run their steps through tests/make-test.sh: the output goes to the
# terminal as it happens and to target/test-logs/, and the last line says what ran, how many
# passed and failed, how long.
QUICK_STEPS := fmt clippy unit
quick:
	@MAKE="$(MAKE)" tests/make-test.sh "make quick" $(QUICK_STEPS)

# Every check: installs what they need, then the quick steps, the fuzzers' bounded run, the
# benches' quick run and both test guests.
TEST_STEPS := deps $(QUICK_STEPS) fuzz bench-quick guest-test
test:
	@MAKE="$(MAKE)" tests/make-test.sh "make test" $(TEST_STEPS)

# Every parser that takes outside input, fuzzed (fuzz/, its own package and lock file, so the
# relay's dependency tree is unchanged): cargo-fuzz's libFuzzer without a sanitizer, which builds
# on the stable toolchain; cargo-fuzz is installed from crates.io the first time. Each target
# runs FUZZ_SECONDS (20) from its seeds in fuzz/corpus/ and fails on a crash or a failed
# property, with the input saved under target/fuzz/artifacts/. About 4 minutes with the build.
FUZZ_SECONDS ?= 20
fuzz:
	@FUZZ_SECONDS=$(FUZZ_SECONDS) CARGO=$(CARGO) fuzz/run.sh $(FUZZ_TARGETS)

# Benchmarks (docs/BENCHMARKS.md): direct, kvmi-relay, socat and systemd-socket-proxyd
# interleaved in one run. The harness is its own package under benches/harness, so that its
# plotting and JSON crates stay out of the relay's lock file; it drives $(BIN).
BENCH_CARGO = $(CARGO) run --release --locked --quiet --manifest-path benches/harness/Cargo.toml --target-dir target/bench-harness --
# socat, stunnel4 and systemd-socket-proxyd are contenders; the plot's labels use DejaVu Sans.
BENCH_PACKAGES := socat stunnel4 systemd fonts-dejavu-core
bench: build
	@$(MAKE) --no-print-directory deps DEB_PACKAGES="$(BENCH_PACKAGES)"
	$(BENCH_CARGO) --relay $(BIN)

# The same with every process pinned (docs/BENCHMARKS.md, "Why latency is bimodal"): unix-tcp
# and chain, 20 rounds, once with everything on CPU 0 and once with the hops on CPU 1. Output in
# target/bench/pin-one-cpu/ and target/bench/pin-hops-apart/. About 4 minutes; needs 2 CPUs.
bench-pinned: build
	@$(MAKE) --no-print-directory deps DEB_PACKAGES="$(BENCH_PACKAGES)"
	for p in one-cpu hops-apart; do \
	  $(BENCH_CARGO) --relay $(BIN) --pin $$p --rounds 20 --topology unix-tcp --topology chain --out target/bench/pin-$$p || exit 1; \
	done

# The latency workloads on a loaded machine (docs/BENCHMARKS.md, "The poll window on a busy
# machine"): one busy process per CPU for the whole run, the way guests' vCPUs load a KVM host.
# Output in target/bench/loaded/. About a minute.
bench-loaded: build
	@$(MAKE) --no-print-directory deps DEB_PACKAGES="$(BENCH_PACKAGES)"
	$(BENCH_CARGO) --relay $(BIN) --load $$(nproc) --rounds 20 --workload pingpong-64B --workload passive-vmi \
	  --workload active-vmi --contender direct --contender kvmi-relay --contender 'kvmi-relay pw=0' --contender socat \
	  --out target/bench/loaded

# The network flavor with mutual TLS (docs/BENCHMARKS.md, "Mutual TLS between the relays"):
# the chain only, kvmi-relay's TLS chain beside its plain chain, socat's OPENSSL chain and
# stunnel4 (verification on in each), plain socat and the direct path, interleaved; the
# session set-up table shows the handshakes. Output in target/bench/tls/. About a minute.
bench-tls: build
	@$(MAKE) --no-print-directory deps DEB_PACKAGES="$(BENCH_PACKAGES)"
	$(BENCH_CARGO) --relay $(BIN) --topology chain --contender direct --contender kvmi-relay \
	  --contender 'kvmi-relay tls' --contender socat --contender 'socat nodelay' --contender 'socat openssl' \
	  --contender stunnel --out target/bench/tls

# Many instances at once (docs/BENCHMARKS.md, "Many instances"): N = 1, 32 and 128 relays, as
# many socats and the direct path, UNIX → TCP; each N idle for 10 s, then 3 rounds of N
# passive-VMI sessions at once. Output in target/bench/fleet/. About a minute.
bench-fleet: build
	@$(MAKE) --no-print-directory deps DEB_PACKAGES="$(BENCH_PACKAGES)"
	$(BENCH_CARGO) --relay $(BIN) --fleet 1 --fleet 32 --fleet 128 --out target/bench/fleet

# Seconds, not minutes: every contender, topology and workload with small counts, so the
# harness cannot rot. Its numbers are not for judging, so its tables go to
# $(QUICK_OUT)/results.md (the whole output in bench.log there) and it prints one line.
QUICK_OUT := target/bench/quick
bench-quick: build bench-lint
	@mkdir -p $(QUICK_OUT) $(QUICK_OUT)-pinned $(QUICK_OUT)-fleet; t0=$$(date +%s); \
	quick() { out=$$1; shift; $(BENCH_CARGO) --quick --relay $(BIN) --out $$out "$$@" >$$out/bench.log 2>&1 || \
	  { tail -20 $$out/bench.log; echo "bench-quick: FAILED (whole output: $$out/bench.log)"; exit 1; }; }; \
	quick $(QUICK_OUT); quick $(QUICK_OUT)-fleet --fleet 2; \
	if [ "$$(nproc)" -ge 2 ]; then quick $(QUICK_OUT)-pinned --pin hops-apart --topology chain; \
	  pinned="then the chain again with --pin hops-apart ($(QUICK_OUT)-pinned)"; \
	else pinned="SKIP --pin hops-apart: needs 2 CPUs, this machine has $$(nproc)"; fi; \
	rows=$$(awk -F, 'NR > 1 {r++; s += $$4} END {printf "%d rows, %d sessions", r, s}' $(QUICK_OUT)/results.csv); \
	echo "bench-quick: ok in $$(( $$(date +%s) - t0 )) s: $$rows, every contender, topology and workload, a fleet of 2; $$pinned; tables in $(QUICK_OUT)/results.md (not for judging)"

# The harness's own tests start it against $(BIN).
HARNESS_CLIPPY = $(CARGO) clippy --release --locked --quiet --manifest-path benches/harness/Cargo.toml --target-dir target/bench-harness --all-targets -- -D warnings
bench-lint: build
	$(CARGO) fmt --check --manifest-path benches/harness/Cargo.toml
	$(HARNESS_CLIPPY)
	BENCH_RELAY_BIN=$(abspath $(BIN)) $(CARGO) test --release --locked --quiet --manifest-path benches/harness/Cargo.toml --target-dir target/bench-harness

# Install layout (GNU-style; DESTDIR for staging). systemd looks for units under
# /usr/local/lib/systemd/system too, so the default PREFIX works as it is.
PREFIX ?= /usr/local
BINDIR ?= $(PREFIX)/bin
UNITDIR ?= $(PREFIX)/lib/systemd/system
MANDIR ?= $(PREFIX)/share/man
SYSUSERSDIR ?= $(PREFIX)/lib/sysusers.d
DOCDIR ?= $(PREFIX)/share/doc/kvmi-relay
# The configuration writer both hooks use (libvirt/write-conf).
LIBEXECDIR ?= $(PREFIX)/lib/kvmi-relay
# libvirt reads its hooks from its own /etc, whatever the PREFIX: the hook goes there.
LIBVIRT_HOOKDIR ?= /etc/libvirt/hooks/qemu.d
# kvmi-relay(1), generated from the relay's clap definition by kvmi-relay-tools (never edited by hand).
MAN ?= target/man/kvmi-relay.1
EXAMPLES := $(sort $(wildcard docs/examples/*.conf))
# Exactly what `make install` creates, and `make uninstall` removes.
INSTALLED = $(BINDIR)/kvmi-relay $(UNITDIR)/kvmi-relay@.service $(UNITDIR)/kvmi-relay@.socket \
	$(SYSUSERSDIR)/kvmi-relay.conf $(LIBEXECDIR)/write-conf $(LIBVIRT_HOOKDIR)/kvmi-relay \
	$(MANDIR)/man1/kvmi-relay.1 $(addprefix $(DOCDIR)/examples/,$(notdir $(EXAMPLES)))

# Built only when missing, so that `sudo make install` after `make` does not run cargo as root.
$(BIN) $(TOOLS):
	$(CARGO) build --profile dist --locked $(PACKAGES)

man: $(MAN)

$(MAN): $(TOOLS)
	@mkdir -p $(dir $@)
	$(TOOLS) man > $@.tmp && mv $@.tmp $@

# The units, the writer and the hook name /usr/bin/kvmi-relay (and the hook
# /usr/lib/kvmi-relay/write-conf); installed, they name $(BINDIR)/kvmi-relay and $(LIBEXECDIR).
INSTALL_PATHS = sed -e 's|/usr/bin/kvmi-relay|$(BINDIR)/kvmi-relay|g' -e 's|/usr/lib/kvmi-relay/|$(LIBEXECDIR)/|g'
install: $(BIN) $(MAN)
	install -D -m 0755 $(BIN) $(DESTDIR)$(BINDIR)/kvmi-relay
	install -d -m 0755 $(DESTDIR)$(UNITDIR) $(DESTDIR)$(MANDIR)/man1 $(DESTDIR)$(DOCDIR)/examples
	sed 's|/usr/bin/kvmi-relay|$(BINDIR)/kvmi-relay|g' systemd/kvmi-relay@.service > $(DESTDIR)$(UNITDIR)/kvmi-relay@.service
	chmod 0644 $(DESTDIR)$(UNITDIR)/kvmi-relay@.service
	install -m 0644 systemd/kvmi-relay@.socket $(DESTDIR)$(UNITDIR)/kvmi-relay@.socket
	install -D -m 0644 systemd/kvmi-relay.sysusers $(DESTDIR)$(SYSUSERSDIR)/kvmi-relay.conf
	install -m 0644 $(MAN) $(DESTDIR)$(MANDIR)/man1/kvmi-relay.1
	install -m 0644 $(EXAMPLES) $(DESTDIR)$(DOCDIR)/examples/
	install -d -m 0755 $(DESTDIR)$(LIBEXECDIR) $(DESTDIR)$(LIBVIRT_HOOKDIR)
	$(INSTALL_PATHS) libvirt/write-conf > $(DESTDIR)$(LIBEXECDIR)/write-conf
	chmod 0755 $(DESTDIR)$(LIBEXECDIR)/write-conf
	$(INSTALL_PATHS) libvirt/kvmi-relay > $(DESTDIR)$(LIBVIRT_HOOKDIR)/kvmi-relay
	chmod 0755 $(DESTDIR)$(LIBVIRT_HOOKDIR)/kvmi-relay
	@echo "installed; on a live system run: systemd-sysusers && systemctl daemon-reload"

uninstall:
	rm -f $(addprefix $(DESTDIR),$(INSTALLED))
	-rmdir $(DESTDIR)$(DOCDIR)/examples $(DESTDIR)$(DOCDIR) $(DESTDIR)$(LIBEXECDIR) 2>/dev/null

# The Debian package (docs/deployment.md, "Debian package"): cargo-deb, installed from the crate
# registry the first time (pinned, --locked), builds the dist binary and packs what
# [package.metadata.deb] in Cargo.toml lists. Output: target/debian/kvmi-relay_<version>_amd64.deb.
CARGO_DEB_VERSION := 3.8.0
DEB_DIR := target/debian
# Unlike `make install` it builds (never run it with sudo) and regenerates the man page, so the
# package never holds a stale one.
deb: build
	@command -v cargo-deb >/dev/null 2>&1 || $(CARGO) install --locked --version $(CARGO_DEB_VERSION) cargo-deb
	@mkdir -p $(dir $(MAN))
	$(TOOLS) man > $(MAN).tmp && mv $(MAN).tmp $(MAN)
	$(CARGO) deb --locked --profile dist --output $(DEB_DIR)/
	@ls $(DEB_DIR)/*.deb

# lintian on the package; the tags it still reports are explained in docs/deployment.md.
lintian: deb
	@$(MAKE) --no-print-directory deps DEB_PACKAGES=lintian
	lintian --info $(DEB_DIR)/kvmi-relay_*_amd64.deb

# The test guests (tests/guest/, docs/testing-guest.md): real vsock (CID 1 loopback) in a busybox
# QEMU/TCG guest and real systemd in a debootstrap guest; kernel, root and image cached in
# target/guest-cache. One case: tests/guest/guest.sh vsock <case> (or systemd <case>).
DEB_PACKAGES += qemu-system-x86 busybox-static cpio gzip debootstrap e2fsprogs binutils
.PHONY: guest-test guest-vsock guest-systemd
guest-test:
	tests/guest/guest.sh all
guest-vsock:
	tests/guest/guest.sh vsock
guest-systemd:
	tests/guest/guest.sh systemd
