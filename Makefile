# podvisor: a Kubernetes CRI runtime where every pod is a KVM microVM.
#
#   make demo   boot a microVM with the guest agent and show its console
#   make test   everything the CI runs: setup, guest build, lint, all tests
#
# Both install what they need first (Debian 12, as root).

CARGO        ?= cargo
GUEST_DIR    := build/guest
TARGET       := x86_64-unknown-linux-gnu
STATIC_FLAGS := -C target-feature=+crt-static
AGENT_BIN    := target/$(TARGET)/release/podvisor-agent
PROBE_BIN    := target/$(TARGET)/release/guest-probe

.PHONY: all setup kernel agent probe rootfs guest build vmm-release release lint test unit-test e2e-build e2e-test e2e-vm e2e-conformance e2e-pods-a e2e-pods-b agent-test demo bench install uninstall deb clean

all: guest build

setup:
	@scripts/setup.sh

kernel: setup
	@images/build-kernel.sh $(GUEST_DIR)

# Static guest binaries: an explicit --target keeps them apart from host builds.
agent:
	RUSTFLAGS='$(STATIC_FLAGS)' $(CARGO) build --release --target $(TARGET) -p podvisor-agent

probe:
	RUSTFLAGS='$(STATIC_FLAGS)' $(CARGO) build --release --target $(TARGET) -p podvisor-guest-probe

rootfs: agent
	@images/build-rootfs.sh $(AGENT_BIN) $(GUEST_DIR)

guest: kernel rootfs

build:
	$(CARGO) build --workspace --all-targets

vmm-release:
	$(CARGO) build --release -p podvisor-vmm

# What the demo runs: the VMM, podvisord, podvisorctl and the image pusher.
release:
	$(CARGO) build --release -p podvisor-vmm -p podvisor-runtime
	$(CARGO) build --release -p podvisor-tests --bin push-busybox

lint:
	$(CARGO) fmt --all --check
	python3 scripts/module-cycles.py
	$(CARGO) clippy --workspace --all-targets -- -D warnings

unit-test: build
	$(CARGO) test --workspace --lib --bins

# End-to-end tests in two lanes side by side (a microVM keeps about one core busy; the
# machine has two). Every binary the tests run is built first, with the very cargo commands
# the tests use (tests/src/cri.rs, artifacts.rs), so nothing is compiled or linked while
# tests run; those commands then only find it fresh. cargo-deb (the install test's) too.
#
# conformance compares every podvisor network namespace on the host before and after, so it
# runs beside the VMM and agent tests only, which make none. Once it is done, the other
# podvisord tests run in two lanes (each lane one test at a time; their checks look at their
# own pods, bridges and directories): lane A after the VMM tests, lane B right away. stream
# is the longest test (6 to 19 min here, by what runs beside it), so lane A holds it and the
# short snapshot test; the rest (~17 min together) is lane B.
E2E_VM     := --test vmm --test agent --test portforward --test images --test cni --test stream_interop
E2E_PODS_A := --test stream --test snapshot
E2E_PODS_B := --test cri --test install --test network --test node --test volumes

# (Not `build`: its whole-workspace feature set gives other hashes than `-p podvisor-tests`,
# which would build every test binary twice.)
e2e-build: guest probe
	$(CARGO) test -p podvisor-tests --tests --no-run
	$(CARGO) build -p podvisor-runtime --bin podvisord
	$(CARGO) build -p podvisor-runtime --bin podvisorctl
	$(CARGO) build -p podvisor-vmm --bin podvisor-vmm
	scripts/cargo-deb.sh >/dev/null

e2e-test: e2e-build
	$(MAKE) --no-print-directory -j2 e2e-pods-a e2e-pods-b

e2e-vm:
	$(CARGO) test -p podvisor-tests $(E2E_VM) -- --test-threads=2

e2e-conformance:
	$(CARGO) test -p podvisor-tests --test conformance -- --test-threads=1

e2e-pods-a: e2e-vm e2e-conformance
	$(CARGO) test -p podvisor-tests $(E2E_PODS_A) -- --test-threads=1

e2e-pods-b: e2e-conformance
	$(CARGO) test -p podvisor-tests $(E2E_PODS_B) -- --test-threads=1

test: setup guest probe lint unit-test e2e-test

# The agent's end-to-end test alone (also part of e2e-test), with its progress shown.
agent-test: guest probe build
	$(CARGO) test -p podvisor-tests --test agent -- --nocapture

demo: setup guest release
	@scripts/demo.sh

bench: setup guest probe vmm-release
	$(CARGO) run --release -p podvisor-tests --bin boot-bench -- --runs 5
	$(CARGO) run --release -p podvisor-tests --bin agent-bench -- --runs 5
	$(CARGO) run --release -p podvisor-tests --bin snapshot-bench -- --restores 5
	$(CARGO) run --release -p podvisor-tests --bin cri-bench -- 3
	$(CARGO) run --release -p podvisor-tests --bin stream-bench -- 10
	$(CARGO) run --release -p podvisor-tests --bin fs-bench -- --mib 16 --files 200

# Installs podvisor on this node: the release binaries in $(PREFIX)/bin (PREFIX=/usr), the
# guest kernel and root image in $(PREFIX)/share/podvisor, podvisord.service, the podvisor
# user's sysusers.d file, and /etc/podvisor/config.toml unless there is one. DESTDIR=DIR
# lays the files out under DIR instead (scripts/install.sh says more).
install: guest release
	PREFIX='$(PREFIX)' DESTDIR='$(DESTDIR)' scripts/install.sh install

uninstall:
	PREFIX='$(PREFIX)' DESTDIR='$(DESTDIR)' scripts/install.sh uninstall

# The Debian package target/debian/podvisor_<version>-1_amd64.deb: the files of `make install`
# (PREFIX=/usr), the release binaries as they are. cargo-deb (pinned) is installed the first
# time into /var/cache/podvisor/tools (scripts/cargo-deb.sh).
deb: guest release
	"$$(scripts/cargo-deb.sh)" -p podvisor-runtime --no-build --no-strip -o target/debian/

clean:
	rm -rf build
	$(CARGO) clean
