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

.PHONY: all setup kernel agent probe rootfs guest build vmm-release release lint test unit-test e2e-test e2e-vm e2e-pods agent-test demo bench install uninstall deb clean

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

# Two groups of end-to-end test binaries run side by side (a microVM keeps about one core
# busy; the machine has two): the VMM and the agent on their own microVMs, and podvisord's
# pods. Every test that runs a podvisord is in the second group, one at a time: their
# no-leak checks look at every podvisor namespace and TAP on the host. Built first, so the
# two cargo runs only run tests.
E2E_VM   := --test vmm --test agent --test portforward --test images --test cni --test stream_interop
E2E_PODS := --test cri --test network --test snapshot --test conformance --test stream --test volumes --test node --test install

e2e-test: guest probe build
	$(CARGO) test -p podvisor-tests --tests --no-run
	$(MAKE) --no-print-directory -j2 e2e-vm e2e-pods

e2e-vm:
	$(CARGO) test -p podvisor-tests $(E2E_VM) -- --test-threads=2

e2e-pods:
	$(CARGO) test -p podvisor-tests $(E2E_PODS) -- --test-threads=1

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
