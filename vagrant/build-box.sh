#!/usr/bin/env bash
# Build the test VM's Vagrant box from Debian's packages only (as root, once): no Vagrant Cloud,
# no image registry. Prints the box file's path on its last line.
#
#   sudo vagrant/build-box.sh            # about 2 minutes the first time, then instant
#
# mmdebstrap makes a Debian 12 root file system (the cloud kernel, systemd, sshd, sudo, rsync,
# and what the namespace tests and the demo need offline: iproute2, nftables, iptables,
# python3-venv, curl, openssl, ...), box/customize.sh adds the `vagrant` user with the insecure
# key Debian's vagrant package ships, `mkfs.ext4 -d` and `qemu-img convert` make the qcow2,
# and the box is a libvirt box (metadata.json, box.img, and the kernel and initrd of a direct
# kernel boot, which box/Vagrantfile points at).
#
# The box is cached in AZWI_VAGRANT_CACHE (/var/lib/azwi-netproxy-test/vagrant), named by a
# hash of everything that goes into it (this script, box/, the key, the mirror), so a rerun with
# the same inputs reuses it; older boxes there are removed. `azwi-netproxy-bookworm.box` there
# is a link to the current one: the Vagrantfile's box_url.
#
# Behind a TLS-intercepting proxy: apt (which mmdebstrap runs outside the chroot) reads the CA
# bundle AZWI_BUILD_CA (the host's /etc/ssl/certs/ca-certificates.crt) in place, read-only, for
# https mirrors; nothing of it goes into the box, whose bundle is Debian's own.
set -euo pipefail
umask 022

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CACHE="${AZWI_VAGRANT_CACHE:-/var/lib/azwi-netproxy-test/vagrant}"
CA="${AZWI_BUILD_CA:-/etc/ssl/certs/ca-certificates.crt}"
MIRROR="${AZWI_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
SECURITY_MIRROR="${AZWI_DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}"
# Debian's vagrant package's insecure public key (the private half ships with Vagrant itself).
pubs=(/usr/share/rubygems-integration/all/gems/vagrant-*/keys/vagrant.pub)
VAGRANT_PUB="${AZWI_VAGRANT_PUB:-${pubs[-1]}}"
DISK_SIZE=6G
PACKAGES=(
    # boot, log in, be driven by Vagrant (rsync for the synced folder)
    linux-image-cloud-amd64 systemd-sysv udev dbus kmod e2fsprogs openssh-server sudo rsync netbase
    # the namespace and netfilter tests, and the demo
    iproute2 nftables iptables python3 python3-venv python3-pip curl openssl ca-certificates procps util-linux
)

if [[ $(id -u) -ne 0 ]]; then
    echo "build-box: run as root (mmdebstrap needs it)" >&2
    exit 2
fi
for tool in mmdebstrap mkfs.ext4 qemu-img; do
    command -v "$tool" >/dev/null || { echo "build-box: $tool is missing (apt-get install mmdebstrap e2fsprogs qemu-utils)" >&2; exit 2; }
done
if [[ ! -r "$VAGRANT_PUB" ]]; then
    echo "build-box: no vagrant.pub (apt-get install vagrant, or set AZWI_VAGRANT_PUB)" >&2
    exit 2
fi

key="$({ cat "$0" "$HERE"/box/* "$VAGRANT_PUB"; echo "$MIRROR $SECURITY_MIRROR"; } | sha256sum | cut -c1-16)"
box="$CACHE/azwi-netproxy-bookworm-$key.box"
link="$CACHE/azwi-netproxy-bookworm.box"
mkdir -p "$CACHE"
# One build at a time; a second caller waits and then finds the box.
exec 9>"$CACHE/.lock"
flock 9
if [[ -s "$box" ]]; then
    ln -sfn "$(basename "$box")" "$link"
    echo "build-box: cached" >&2
    echo "$box"
    exit 0
fi

work="$(mktemp -d "$CACHE/build.XXXXXX")"
trap 'rm -rf "$work"' EXIT
started=$SECONDS
rootfs="$work/rootfs"
aptopts=()
if [[ -r "$CA" ]]; then
    aptopts+=(--aptopt="Acquire::https::CAInfo \"$CA\";")
fi
include="$(IFS=,; echo "${PACKAGES[*]}")"
echo "build-box: mmdebstrap bookworm ($include)" >&2
AZWI_VAGRANT_PUB="$VAGRANT_PUB" mmdebstrap --quiet --variant=minbase --include="$include" \
    "${aptopts[@]}" \
    --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/locale/*' \
    --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    --customize-hook="$HERE/box/customize.sh" \
    bookworm "$rootfs" \
    "deb $MIRROR bookworm main" "deb $MIRROR bookworm-updates main" \
    "deb $SECURITY_MIRROR bookworm-security main"

mkdir "$work/box"
cp "$rootfs"/boot/vmlinuz-* "$work/box/vmlinuz"
cp "$rootfs"/boot/initrd.img-* "$work/box/initrd.img"
cp "$HERE/box/Vagrantfile" "$work/box/Vagrantfile"
echo "build-box: mkfs.ext4 -d, qemu-img convert" >&2
mkfs.ext4 -q -F -L azwi-root -d "$rootfs" "$work/root.raw" "$DISK_SIZE" >&2
rm -rf "$rootfs"
qemu-img convert -c -f raw -O qcow2 "$work/root.raw" "$work/box/box.img"
rm -f "$work/root.raw"
cat >"$work/box/metadata.json" <<JSON
{"provider": "libvirt", "format": "qcow2", "virtual_size": ${DISK_SIZE%G}}
JSON
tar -C "$work/box" -cf "$work/box.tar" metadata.json Vagrantfile box.img vmlinuz initrd.img
mv "$work/box.tar" "$box"
ln -sfn "$(basename "$box")" "$link"
find "$CACHE" -maxdepth 1 -name 'azwi-netproxy-bookworm-*.box' ! -name "$(basename "$box")" -delete
echo "build-box: built in $((SECONDS - started)) s, $(du -m "$box" | cut -f1) MB" >&2
echo "$box"
