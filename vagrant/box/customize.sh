#!/usr/bin/env bash
# mmdebstrap's customize hook for the test VM's box (vagrant/build-box.sh): $1 is the root file
# system. Runs on the host, as root, after every package is installed.
set -euo pipefail
root="$1"

echo azwi-netproxy-test >"$root/etc/hostname"
printf '127.0.0.1\tlocalhost\n127.0.1.1\tazwi-netproxy-test\n::1\tlocalhost ip6-localhost ip6-loopback\n' >"$root/etc/hosts"
echo 'LABEL=azwi-root / ext4 defaults,errors=remount-ro 0 1' >"$root/etc/fstab"

# The one NIC (QEMU user networking, or the provider's NAT) gets its address by DHCP.
cat >"$root/etc/systemd/network/80-dhcp.network" <<'NET'
[Match]
Name=e*

[Network]
DHCP=ipv4
NET
chroot "$root" systemctl enable --quiet systemd-networkd
# Nothing waits for a network the tests never use, and no timer competes with them for an
# emulated CPU.
chroot "$root" systemctl mask --quiet systemd-networkd-wait-online.service apt-daily.timer \
    apt-daily-upgrade.timer e2scrub_all.timer e2scrub_reap.service fstrim.timer

# Vagrant's user: its insecure key (Vagrant swaps in a key of its own at the first `up`) and
# sudo without a password, as every Vagrant box has.
chroot "$root" useradd --create-home --shell /bin/bash --user-group vagrant
install -d -m 700 -o 1000 -g 1000 "$root/home/vagrant/.ssh"
install -m 600 -o 1000 -g 1000 "$AZWI_VAGRANT_PUB" "$root/home/vagrant/.ssh/authorized_keys"
[[ $(chroot "$root" id -u vagrant) == 1000 ]]
echo 'vagrant ALL=(ALL) NOPASSWD: ALL' >"$root/etc/sudoers.d/vagrant"
chmod 440 "$root/etc/sudoers.d/vagrant"
# The tests run clients as uid 1000: Debian's `useradd` gave it to vagrant, which is fine (the
# tests only need a uid other than root's and the proxy's 1501).

# Every VM made from the box gets a host key and a machine id of its own at its first boot: one
# ed25519 key (RSA's would take about 20 s of an emulated CPU).
rm -f "$root"/etc/ssh/ssh_host_*
echo 'HostKey /etc/ssh/ssh_host_ed25519_key' >"$root/etc/ssh/sshd_config.d/azwi-host-key.conf"
cat >"$root/etc/systemd/system/azwi-ssh-host-key.service" <<'UNIT'
[Unit]
Description=Generate this VM's SSH host key
Before=ssh.service
ConditionPathExists=!/etc/ssh/ssh_host_ed25519_key

[Service]
Type=oneshot
ExecStart=/usr/bin/ssh-keygen -q -t ed25519 -N "" -f /etc/ssh/ssh_host_ed25519_key

[Install]
WantedBy=ssh.service
UNIT
chroot "$root" systemctl enable --quiet azwi-ssh-host-key.service
: >"$root/etc/machine-id"
rm -f "$root/var/lib/dbus/machine-id"

# The build's apt options (the host's CA path, for https mirrors) stay out of the box.
rm -f "$root/etc/apt/apt.conf.d/99mmdebstrap"
