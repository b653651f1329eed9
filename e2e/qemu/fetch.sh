#!/bin/sh
# fetch.sh CACHE ENTRY...: make sure each of Debian's stock kernels ENTRY is
# downloaded and unpacked under CACHE, with an initramfs for the test guest,
# and print "ENTRY VERSION DIRECTORY" for each.
#
# ENTRY is a suite of Debian's archive (bullseye, bookworm, trixie,
# bookworm-backports, ...), which stands for the kernel its linux-image-amd64
# depends on, or a package name, linux-image-VERSION-amd64, found in any of
# the suites in $KERNEL_SUITES. Packages come through apt-get with a sources
# list, lists and cache of their own under CACHE/apt: the machine's apt
# configuration and state are left alone. What is unpacked stays: delete CACHE
# (make kernels-clean) to take the newest kernel of a suite again.
set -eu

cache=$1
shift
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
suites=${KERNEL_SUITES:-bullseye bookworm trixie}
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$cache"
cache=$(cd "$cache" && pwd)
apt=$cache/apt

log() { echo "fetch.sh: $*" >&2; }
die() { log "$*"; exit 1; }

for tool in apt-get dpkg-deb depmod modprobe cpio xz; do
	command -v $tool >/dev/null || die "$tool is missing (make deps-kernels installs it)"
done
# The initramfs runs busybox before any library is reachable.
busybox=$(command -v busybox) || die "busybox is missing (make deps-kernels installs busybox-static)"
if ldd "$busybox" >/dev/null 2>&1; then
	die "$busybox is linked dynamically: install busybox-static (make deps-kernels)"
fi

aptopts() {
	echo "-qq -o Dir::Etc::SourceList=$apt/sources.list -o Dir::Etc::SourceParts=$apt/sources.list.d" \
		"-o Dir::State=$apt/state -o Dir::State::Status=$apt/state/status -o Dir::Cache=$apt/cache" \
		"-o APT::Architecture=amd64 -o APT::Sandbox::User=root -o Acquire::Languages=none" \
		"-o Acquire::IndexTargets::deb::DEP-11::DefaultEnabled=false" \
		"-o Acquire::IndexTargets::deb::DEP-11-icons::DefaultEnabled=false" \
		"-o Acquire::IndexTargets::deb::DEP-11-icons-small::DefaultEnabled=false"
}

updated=
update() {
	[ -z "$updated" ] || return 0
	local all=$suites x
	for x in "$@"; do
		case $x in linux-image-*) ;; *) case " $all " in *" $x "*) ;; *) all="$all $x" ;; esac ;; esac
	done
	mkdir -p "$apt/sources.list.d" "$apt/state/lists/partial" "$apt/cache/archives/partial" "$cache/debs"
	: >"$apt/state/status"
	for x in $all; do
		echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $mirror $x main"
	done >"$apt/sources.list"
	log "apt-get update ($mirror: $all)"
	# shellcheck disable=SC2046
	apt-get $(aptopts) update >&2 || die "apt-get update failed"
	updated=1
}

# unpack DEB DIR VERSION: the kernel, its modules (where this kmod finds
# them, with depmod's indexes) and the guest's initramfs.
unpack() {
	local deb=$1 dir=$2 ver=$3 ird ko name m
	rm -rf "$dir.tmp"
	mkdir -p "$dir.tmp"
	dpkg-deb -x "$deb" "$dir.tmp"
	if [ -d "$dir.tmp/usr/lib/modules" ]; then # merged /usr (trixie on)
		mkdir -p "$dir.tmp/lib"
		mv "$dir.tmp/usr/lib/modules" "$dir.tmp/lib/modules"
	fi
	[ -f "$dir.tmp/boot/vmlinuz-$ver" ] || die "$deb has no boot/vmlinuz-$ver"
	depmod -b "$dir.tmp" "$ver"

	# The initramfs: busybox, init.sh, and what mounting the host's root
	# over virtio 9p needs (virtio_rng too: getrandom() must not wait),
	# uncompressed and in dependency order.
	ird=$dir.tmp/initramfs
	mkdir -p "$ird/bin" "$ird/dev" "$ird/proc" "$ird/sys" "$ird/newroot" "$ird/modules"
	cp "$busybox" "$ird/bin/busybox"
	cp "$here/init.sh" "$ird/init"
	chmod 0755 "$ird/init"
	mknod -m 0600 "$ird/dev/console" c 5 1
	for m in virtio_pci virtio_rng 9pnet_virtio 9p; do
		modprobe -d "$dir.tmp" -S "$ver" --show-depends "$m" >>"$ird/deps" || die "$ver: no module $m"
	done
	for ko in $(awk '$1 == "insmod" && !seen[$2]++ { print $2 }' "$ird/deps"); do
		name=$(basename "$ko")
		case $name in
		*.ko.xz) name=${name%.xz} && xz -dc "$ko" >"$ird/modules/$name" ;;
		*.ko.zst) name=${name%.zst} && zstd -qdc "$ko" >"$ird/modules/$name" ;;
		*) cp "$ko" "$ird/modules/$name" ;;
		esac
		echo "$name" >>"$ird/modules/order"
	done
	rm "$ird/deps"
	(cd "$ird" && find . | cpio -o -H newc --quiet) | gzip -1 >"$dir.tmp/initrd.img"
	rm -rf "$ird"
	rm -rf "$dir"
	mv "$dir.tmp" "$dir"
}

# The package each entry stands for.
mkdir -p "$cache/entries"
for e in "$@"; do
	[ -s "$cache/entries/$e" ] && continue
	case $e in
	linux-image-*) pkg=$e ;;
	*)
		update "$@"
		# shellcheck disable=SC2046
		pkg=$(apt-cache $(aptopts) show "linux-image-amd64/$e" 2>/dev/null |
			sed -n 's/^Depends: \(linux-image-[^ ,]*\).*/\1/p' | head -n1)
		[ -n "$pkg" ] || die "suite $e has no linux-image-amd64 in $mirror"
		;;
	esac
	echo "$pkg" >"$cache/entries/$e"
done

for e in "$@"; do
	pkg=$(cat "$cache/entries/$e")
	ver=${pkg#linux-image-}
	dir=$cache/$ver
	if [ ! -f "$dir/initrd.img" ]; then
		deb=$(ls "$cache/debs/${pkg}_"*.deb 2>/dev/null | head -n1 || true)
		if [ -z "$deb" ]; then
			update "$@"
			log "apt-get download $pkg"
			# shellcheck disable=SC2046
			(cd "$cache/debs" && apt-get $(aptopts) download "$pkg" >&2) || die "apt-get download $pkg failed"
			deb=$(ls "$cache/debs/${pkg}_"*.deb | head -n1)
		fi
		log "unpack $deb"
		unpack "$deb" "$dir" "$ver"
	fi
	echo "$e $ver $dir"
done
