# shellcheck shell=bash
# Sourced by guest.sh: the systemd guest. A debootstrap --variant=minbase bookworm root with
# systemd (cached in $CACHE/rootfs), made into a raw ext4 image booted read-write with
# snapshot=on (the image itself never changes), a tiny busybox initramfs that mounts it, and a
# read-only 9p share ($CACHE/sd-share) carrying this run's relay, units and systemd-cases.sh.
# A oneshot unit (kvmi-guest-tests.service) runs the cases and powers the guest off.

# The debootstrapped root, once (about a minute, from the apt mirror in sources.list); again when
# the package list changes (the done file holds the list it was made with).
# libxml2-utils: xmllint, for the libvirt hook's cases.
# libvirt-daemon, libvirt-daemon-driver-qemu, libvirt-clients, qemu-system-x86: a real libvirtd
# and its qemu driver calling the hook (the libvirtd-* cases); not libvirt-daemon-system (units,
# polkit, networks), which those cases do without. They make 181 packages instead of 96 and a
# root of 282 MiB instead of 165 (measured 2026-12-07: debootstrap 52-142 s instead of 38-92 s,
# the spread being the shared machine's load).
SD_INCLUDE=systemd,systemd-sysv,kmod,udev,libxml2-utils,libvirt-daemon,libvirt-daemon-driver-qemu,libvirt-clients,qemu-system-x86
systemd_root() {
    local r=$CACHE/rootfs
    [ "$(cat "$r/.kvmi-debootstrap-done" 2>/dev/null)" = "$SD_INCLUDE" ] && return 0
    need debootstrap
    local mirror
    mirror=$(sed -n 's/^URIs: *\(http[^ ]*debian\)$/\1/p' /etc/apt/sources.list.d/*.sources 2>/dev/null | head -1)
    mirror=${mirror:-http://deb.debian.org/debian}
    say "debootstrap minbase bookworm + systemd into $r (once; mirror $mirror)"
    rm -rf "$r.tmp"
    debootstrap --variant=minbase --include="$SD_INCLUDE" bookworm "$r.tmp" "$mirror" >"$CACHE/debootstrap.log" 2>&1 ||
        die "debootstrap failed: $(tail -3 "$CACHE/debootstrap.log")"
    rm -rf "$r.tmp"/usr/share/doc/* "$r.tmp"/usr/share/man/* "$r.tmp"/usr/share/locale/* \
        "$r.tmp"/var/cache/apt/archives/*.deb "$r.tmp"/var/lib/apt/lists/*
    echo "$SD_INCLUDE" >"$r.tmp/.kvmi-debootstrap-done"
    rm -rf "$r" && mv "$r.tmp" "$r"
}

SD_MODS="drivers/virtio/virtio_ring drivers/virtio/virtio drivers/virtio/virtio_pci_legacy_dev
 drivers/virtio/virtio_pci_modern_dev drivers/virtio/virtio_pci drivers/block/virtio_blk lib/crc16
 crypto/crc32c_generic fs/mbcache fs/jbd2/jbd2 fs/ext4/ext4"

# The image and its initramfs, rebuilt when this file or the kernel changes.
systemd_image() {
    local r=$CACHE/rootfs stamp
    stamp=$(cat "$HERE/systemd-image.sh" <(echo "$KVER") | sha256sum | cut -c1-16)
    if [ -f "$CACHE/rootfs.img" ] && [ "$(cat "$CACHE/rootfs.img.stamp" 2>/dev/null)" = "$stamp" ]; then
        return 0
    fi
    need mkfs.ext4 cpio gzip busybox
    say "building the systemd guest image (root file system + initramfs)"
    rm -rf "$r/lib/modules" && mkdir -p "$r/lib/modules/$KVER"
    (cd "$CACHE/kpkg/lib/modules/$KVER" && cp --parents -a modules.builtin modules.builtin.modinfo modules.order \
        kernel/net/vmw_vsock kernel/drivers/virtio kernel/fs/9p kernel/fs/netfs kernel/fs/fscache \
        kernel/net/9p/9pnet.ko kernel/net/9p/9pnet_virtio.ko "$r/lib/modules/$KVER/")
    chroot "$r" depmod -a "$KVER"
    echo vsock_loopback >"$r/etc/modules-load.d/vsock.conf"
    echo 9pnet_virtio >"$r/etc/modules-load.d/9p.conf"
    echo 'host /mnt/host 9p trans=virtio,version=9p2000.L,ro 0 0' >"$r/etc/fstab"
    mkdir -p "$r/mnt/host"
    # SuccessAction/FailureAction must sit in [Unit] (in [Service] they are ignored).
    cat >"$r/etc/systemd/system/kvmi-guest-tests.service" <<'EOF'
[Unit]
Description=kvmi-relay guest test cases (from the host's 9p share)
After=mnt-host.mount multi-user.target
Requires=mnt-host.mount
SuccessAction=poweroff-force
FailureAction=poweroff-force
[Service]
Type=oneshot
StandardOutput=tty
StandardError=tty
TTYPath=/dev/ttyS0
ExecStart=/bin/sh -c 'sh /mnt/host/systemd-cases.sh $(cat /mnt/host/cases); echo "GUEST_RC=$?"'
[Install]
WantedBy=multi-user.target
EOF
    chroot "$r" systemctl enable -q kvmi-guest-tests.service
    chroot "$r" systemctl mask -q serial-getty@ttyS0.service getty@tty1.service apt-daily.timer \
        apt-daily-upgrade.timer e2scrub_all.timer fstrim.timer systemd-timesyncd.service 2>/dev/null || true
    echo kvmi-guest >"$r/etc/hostname"
    local ird=$CACHE/ird-sd m
    rm -rf "$ird" && mkdir -p "$ird"/{bin,proc,sys,dev,newroot,lib/modules}
    cp "$(command -v busybox)" "$ird/bin/"
    for m in $SD_MODS; do cp "$KMOD/$m.ko" "$ird/lib/modules/"; done
    {
        echo '#!/bin/busybox sh'
        echo '/bin/busybox --install -s /bin; mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev'
        for m in $SD_MODS; do echo "insmod /lib/modules/${m##*/}.ko"; done
        echo 'for i in $(seq 100); do [ -b /dev/vda ] && break; sleep 0.1; done'
        echo 'mount -t ext4 /dev/vda /newroot || { echo GUEST_RC=98; echo o > /proc/sysrq-trigger; sleep 10; }'
        echo 'umount /proc /sys; mount --move /dev /newroot/dev; exec switch_root /newroot /sbin/init'
    } >"$ird/init"
    chmod +x "$ird/init"
    (cd "$ird" && find . | cpio -o -H newc --quiet | gzip -1) >"$CACHE/initrd-sd.gz"
    rm -f "$CACHE/rootfs.img"
    mkfs.ext4 -q -F -L root -d "$r" "$CACHE/rootfs.img" 1G
    echo "$stamp" >"$CACHE/rootfs.img.stamp"
}

# This run's share: the case script, the static relay (for the cases that need no units) and its
# tools (the test peers), and
# `make install DESTDIR=stage PREFIX=/usr` when the project has units and an install target.
systemd_share() {
    local s=$CACHE/sd-share
    rm -rf "$s" && mkdir -p "$s"
    cp "$HERE/systemd-cases.sh" "$s/"
    cp "$RELAY" "$s/kvmi-relay"
    cp "$TOOLS" "$s/kvmi-relay-tools"
    if [ -f "$ROOT/systemd/kvmi-relay@.service" ] && grep -q '^install:' "$ROOT/Makefile"; then
        say "make install DESTDIR=$s/stage PREFIX=/usr (the project's own install)"
        # `make install` takes target/dist/kvmi-relay as it is when present (it never runs cargo,
        # for `sudo make install`): build it from this tree first, or a stale binary is staged.
        make -C "$ROOT" --no-print-directory build CARGO="$CARGO" >"$CACHE/make-build.log" 2>&1 ||
            die "make build failed: $(tail -5 "$CACHE/make-build.log")"
        make -C "$ROOT" --no-print-directory install DESTDIR="$s/stage" PREFIX=/usr >"$CACHE/make-install.log" 2>&1 ||
            die "make install failed: $(tail -5 "$CACHE/make-install.log")"
        # The Debian package (`make deb`, cargo-deb) for the deb-* cases.
        make -C "$ROOT" --no-print-directory deb CARGO="$CARGO" >"$CACHE/make-deb.log" 2>&1 ||
            die "make deb failed: $(tail -5 "$CACHE/make-deb.log")"
        cp "$(ls -t "$ROOT"/target/debian/kvmi-relay_*_amd64.deb | head -1)" "$s/kvmi-relay.deb"
    else
        say "NOTE: no systemd/kvmi-relay@.service or no 'install' target: the unit cases will report NOTRUN"
    fi
}

systemd() {
    need qemu-system-x86_64 busybox cpio gzip readelf strip mkfs.ext4
    kernel
    relay_static
    systemd_root
    systemd_image
    systemd_share
    local want=("$@")
    [ ${#want[@]} -gt 0 ] || mapfile -t want < <(expected_cases systemd-cases.txt)
    echo "$*" >"$CACHE/sd-share/cases"
    local t0=$SECONDS
    boot systemd "$CACHE/console-systemd.log" "$CACHE/initrd-sd.gz" \
        'console=ttyS0 quiet panic=-1 systemd.show_status=0 loglevel=4' \
        -drive file="$CACHE/rootfs.img",format=raw,if=virtio,cache=unsafe,snapshot=on \
        -virtfs local,path="$CACHE/sd-share",mount_tag=host,security_model=none,readonly=on
    say "systemd guest ran for $((SECONDS - t0))s"
    judge systemd "$CACHE/console-systemd.log" "${want[@]}"
}
