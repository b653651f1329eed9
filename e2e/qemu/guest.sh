#!/bin/sh
# Stage 2 of a `make test-kernels` guest, PID 1 in the host's root (shared
# read-only over 9p; init.sh switched into it): mount what a system has,
# let the kernel load its own modules from the unpacked package, run the
# end-to-end test binary, and power off. Everything it writes goes to
# tmpfs, or to /run/rr, the run's directory on the host: test.log, and
# status (the test binary's exit code).
#
# /run/rr/env (written by the runner, e2e/qemu) sets KVER, KDIR (the
# unpacked package, with lib/modules/$KVER), BIN (rerouted and
# worldclient), TESTBIN, WORKDIR (the e2e package's directory), SRC (the
# checkout) and CACHE (the kernel cache: KDIR and BIN are in it), RUN (a
# -test.run regex, or empty), TIMEOUT, MODULES (loaded first), AUTOLOAD
# (false: the kernel's own loading fails, as in a chroot without the
# kernel's modules) and ECHO (1: every daemon's lines as they come).
# The modules loaded at the end are listed in
# /run/rr/modules.
. /run/rr/env
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
mount -t cgroup2 cgroup2 /sys/fs/cgroup

# The checkout and the kernel cache may be under a directory the tmpfs
# mounts below hide (a checkout in /root or /tmp): keep a bind mount of
# each first, and put it back at its own path afterwards, so that every
# path the runner wrote into /run/rr/env is valid here.
mkdir -p /run/keep/src /run/keep/cache
mount --bind "$SRC" /run/keep/src || echo "guest: cannot bind $SRC" >>/run/rr/test.log
mount --bind "$CACHE" /run/keep/cache || echo "guest: cannot bind $CACHE" >>/run/rr/test.log
for d in /tmp /var/tmp /root /var/log; do
	[ -d "$d" ] && mount -t tmpfs -o mode=0755 tmpfs "$d"
done
chmod 1777 /tmp /var/tmp
for kept in "src:$SRC" "cache:$CACHE"; do
	name=${kept%%:*} path=${kept#*:}
	[ -d "$path" ] && [ "$(stat -c %d:%i "$path")" = "$(stat -c %d:%i "/run/keep/$name")" ] && continue
	mkdir -p "$path" && mount --bind "/run/keep/$name" "$path" ||
		echo "guest: cannot put $path back" >>/run/rr/test.log
done

tests() {
	echo "guest: kernel $(uname -r), $(nproc) CPUs"

	# Module autoload as on an installed system, from this kernel's package.
	printf '#!/bin/sh\nexec /sbin/modprobe -d %s "$@"\n' "$KDIR" >/run/modprobe
	chmod 0755 /run/modprobe
	[ "$AUTOLOAD" = false ] || echo /run/modprobe >/proc/sys/kernel/modprobe
	# What the tests use, loaded up front: under TCG a module takes a
	# while to load, which a test's first daemon would otherwise wait for.
	# (A module this kernel lacks is named in the log, and left to fail
	# where it is used.)
	for m in $MODULES; do
		/run/modprobe "$m" || echo "guest: no module $m"
	done
	ip link set lo up

	# No exit: this shell is PID 1, and its exit is a kernel panic.
	if ! cd "$WORKDIR"; then
		echo "guest: cannot cd to $WORKDIR: no tests ran"
		return
	fi
	start=$(date +%s)
	set --
	[ -n "$RUN" ] && set -- -test.run="$RUN"
	env -i PATH="$PATH" HOME=/root TMPDIR=/tmp REROUTED_REQUIRE_E2E=1 REROUTED_E2E_GUEST=1 REROUTED_E2E_BIN="$BIN" \
		REROUTED_E2E_ECHO="$ECHO" \
		"$TESTBIN" -test.v -test.count=1 -test.timeout="$TIMEOUT" "$@" 2>&1
	echo $? >/run/rr/status
	echo "guest: tests took $(($(date +%s) - start)) s"
	cut -d' ' -f1 /proc/modules | sort >/run/rr/modules
}
tests >>/run/rr/test.log 2>&1

# Power off, and from then on exec nothing: the kernel shuts the 9p
# devices down while it powers off, so an external command (a sleep)
# could fail to start (exit 126), this shell would end, and the kernel
# would panic on init's exit. The shell waits instead on a FIFO in the
# tmpfs that nobody opens for writing, with its own builtins, which the
# read below has run once before.
mkfifo /run/hold
read -r _ </dev/null
sync
echo o >/proc/sysrq-trigger
while :; do read -r _ </run/hold; done
