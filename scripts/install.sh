#!/usr/bin/env bash
# Installs podvisor on this node (what `make install` and `make uninstall` run), or lays it
# out under DESTDIR for a package or a test. The .deb (`make deb`, runtime/Cargo.toml's
# [package.metadata.deb]) holds the same files as an install with PREFIX=/usr.
#
#   scripts/install.sh install     the files below; the config only when there is none yet
#   scripts/install.sh uninstall   removes them; the config only when it is as installed
#   scripts/install.sh list        prints the installed paths (DESTDIR left out), one a line
#
# Environment (the Makefile passes its variables of the same names):
#   PREFIX=/usr      binaries in PREFIX/bin; kernel and root image in PREFIX/share/podvisor;
#                    the unit in PREFIX/lib/systemd/system, the podvisor user's
#                    sysusers.d file in PREFIX/lib/sysusers.d, docs in PREFIX/share/doc/podvisor
#   DESTDIR=         a staging root: nothing is run on this host, files only
#   BIN_DIR=target/release    where podvisord, podvisorctl and podvisor-vmm are taken from
#   KERNEL=build/guest/vmlinux  ROOTFS=build/guest/rootfs.ext4   (`make guest`)
#
# The configuration always goes to /etc/podvisor/config.toml (where the unit's ExecStart and
# podvisord's default point). It is written from packaging/config.toml with the paths under
# /usr moved to PREFIX, and never overwritten: an existing one is kept as it is.
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
action=${1:?usage: install.sh install|uninstall|list}
prefix=${PREFIX:-/usr}
destdir=${DESTDIR:-}
bin_dir=${BIN_DIR:-$here/target/release}
kernel=${KERNEL:-$here/build/guest/vmlinux}
rootfs=${ROOTFS:-$here/build/guest/rootfs.ext4}

case "$prefix" in
    /*) prefix=${prefix%/} ;;
    *) echo "[install] PREFIX must be an absolute path, not $prefix" >&2; exit 1 ;;
esac
[ -n "$prefix" ] || { echo "[install] PREFIX=/ is not supported (use /usr)" >&2; exit 1; }

bins=(podvisord podvisorctl podvisor-vmm)
share=$prefix/share/podvisor
doc=$prefix/share/doc/podvisor
unit_dir=$prefix/lib/systemd/system
sysusers_dir=$prefix/lib/sysusers.d
config=/etc/podvisor/config.toml

log() { printf '[install] %s\n' "$*" >&2; }

# packaging/ files whose /usr paths name installed files: moved to PREFIX.
relocate() {
    sed -e "s|/usr/bin/|$prefix/bin/|g" \
        -e "s|/usr/share/podvisor/|$share/|g" \
        -e "s|/usr/share/doc/podvisor/|$doc/|g" "$1"
}

list() {
    for b in "${bins[@]}"; do echo "$prefix/bin/$b"; done
    echo "$share/vmlinux"
    echo "$share/rootfs.ext4"
    echo "$doc/copyright"
    echo "$doc/kubernetes.md"
    echo "$unit_dir/podvisord.service"
    echo "$sysusers_dir/podvisor.conf"
    echo "$config"
}

# Whether systemd runs this host (and DESTDIR is not a staging root).
live_systemd() {
    [ -z "$destdir" ] && [ -d /run/systemd/system ] && command -v systemctl >/dev/null
}

do_install() {
    local missing=0 f
    for f in "${bins[@]/#/$bin_dir/}" "$kernel" "$rootfs"; do
        [ -f "$f" ] || { log "missing $f (make release, make guest)"; missing=1; }
    done
    [ "$missing" = 0 ] || exit 1

    for b in "${bins[@]}"; do
        install -D -m 0755 "$bin_dir/$b" "$destdir$prefix/bin/$b"
    done
    # `install` copies what a symlink points at (build/guest/vmlinux is one, into the cache).
    install -D -m 0644 "$kernel" "$destdir$share/vmlinux"
    install -D -m 0644 "$rootfs" "$destdir$share/rootfs.ext4"
    install -D -m 0644 "$here/packaging/copyright" "$destdir$doc/copyright"
    install -D -m 0644 "$here/docs/kubernetes.md" "$destdir$doc/kubernetes.md"
    install -d -m 0755 "$destdir$unit_dir" "$destdir$sysusers_dir"
    relocate "$here/packaging/podvisord.service" > "$destdir$unit_dir/podvisord.service"
    chmod 0644 "$destdir$unit_dir/podvisord.service"
    install -m 0644 "$here/packaging/podvisor.sysusers" "$destdir$sysusers_dir/podvisor.conf"

    if [ -e "$destdir$config" ]; then
        log "kept $destdir$config (not overwritten; the shipped one is packaging/config.toml)"
    else
        install -d -m 0755 "$destdir/etc/podvisor"
        relocate "$here/packaging/config.toml" > "$destdir$config.new"
        chmod 0644 "$destdir$config.new"
        mv "$destdir$config.new" "$destdir$config"
    fi

    if [ -z "$destdir" ]; then
        # The VMMs' user, as the package's postinst makes it.
        if command -v systemd-sysusers >/dev/null; then
            systemd-sysusers "$sysusers_dir/podvisor.conf"
        elif ! getent passwd podvisor >/dev/null; then
            useradd --system --user-group --no-create-home --home-dir /nonexistent \
                --shell /usr/sbin/nologin podvisor
        fi
    fi
    if live_systemd; then
        systemctl daemon-reload
        log "installed; start it with: systemctl enable --now podvisord.service"
    else
        log "installed under ${destdir:-/} (PREFIX=$prefix)"
    fi
}

do_uninstall() {
    if live_systemd && systemctl is-active --quiet podvisord.service; then
        # Pods keep running (KillMode=process); a later podvisord finds them again.
        systemctl stop podvisord.service
    fi
    if live_systemd; then
        systemctl disable podvisord.service >/dev/null 2>&1 || true
    fi
    local p
    for p in $(list); do
        [ "$p" = "$config" ] && continue
        rm -f "$destdir$p"
    done
    if [ -f "$destdir$config" ]; then
        if cmp -s <(relocate "$here/packaging/config.toml") "$destdir$config"; then
            rm -f "$destdir$config"
        else
            log "kept $destdir$config: it was changed after the install"
        fi
    fi
    rmdir --ignore-fail-on-non-empty "$destdir$share" "$destdir$doc" "$destdir/etc/podvisor" \
        2>/dev/null || true
    if live_systemd; then
        systemctl daemon-reload
    fi
    # The podvisor user, /var/lib/podvisor (images) and /run/podvisor stay, as with a package
    # that is removed but not purged.
    log "uninstalled from ${destdir:-/} (PREFIX=$prefix)"
}

case "$action" in
    install) do_install ;;
    uninstall) do_uninstall ;;
    list) list ;;
    *) echo "usage: install.sh install|uninstall|list" >&2; exit 1 ;;
esac
