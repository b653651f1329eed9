#!/bin/busybox sh
# Stage 1 of a `make test-kernels` guest: the initramfs's /init. It loads
# what reaching the host's files needs (virtio, 9p: modules in Debian's
# kernels), mounts the host's root read-only and the run's directory
# writable at /run/rr, and switches into the host's root, where guest.sh
# runs the tests with the host's own tools. switch_root, not chroot: the
# kernel's module autoload must run the host's modprobe, not this busybox.
/bin/busybox --install -s /bin
export PATH=/bin

fail() {
	echo "init: $*"
	poweroff -f
}

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
while read -r m; do
	insmod "/modules/$m" || fail "insmod $m failed"
done </modules/order

opts=trans=virtio,version=9p2000.L,msize=262144
mount -t 9p -o "$opts,ro,cache=loose" hostroot /newroot || fail "cannot mount the host's root (9p tag hostroot)"
mount -t tmpfs -o mode=0755 tmpfs /newroot/run || fail "cannot mount a tmpfs on /run"
mkdir /newroot/run/rr
mount -t 9p -o "$opts" out /newroot/run/rr || fail "cannot mount the run's directory (9p tag out)"
# GUEST: guest.sh's path in the host's root, from the runner.
. /newroot/run/rr/env || fail "no /run/rr/env"
umount /proc /sys /dev 2>/dev/null
exec switch_root /newroot /bin/sh "$GUEST"
