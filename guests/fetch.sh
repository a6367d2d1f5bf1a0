#!/usr/bin/env bash
# guests/fetch.sh: fetch and build the Linux guest artefacts into a cache
# outside the checkout, ${HV_ARTEFACTS:-/var/cache/pyhv}:
#
#   stock/vmlinuz       Debian's cloud kernel (linux-image-cloud-amd64's real package)
#   stock/config, stock/VERSION (Debian ships its real System.map in a -dbg package)
#   busybox             a static busybox (busybox-static)
#   own/vmlinux         our kernel (ELF; what the hypervisor boots directly)
#   own/bzImage         the same kernel as a bzImage
#   own/config          its final .config; own/KEY the hash it was built from
#   initramfs.cpio      uncompressed newc: busybox + guests/linux/init.sh as /init
#   stock-initramfs.cpio the same plus the stock kernel's own virtio modules
#                       (virtio_pci, virtio_blk, virtio_net, virtio_console,
#                       virtio_rng and what they depend on), loaded by init
#
# Our kernel is Debian's linux-source-6.1 as it comes, no patch of ours,
# configured as `make tinyconfig` + guests/linux/pyhv.config (on nested hosts
# the VMM makes its system calls work: vcpu_worker/syscall_hook.py).  Every
# step prints one line and is skipped when its outputs exist; the kernel is
# keyed on a hash of the source version and the config fragment, so changing
# either rebuilds it.  Needs root for apt-get (installs only missing
# build tools).  Environment: HV_ARTEFACTS, HV_JOBS (default nproc + 1),
# HV_FETCH_FORCE=1 (rebuild our kernel and the initramfs).
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive LC_ALL=C

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
A=${HV_ARTEFACTS:-/var/cache/pyhv}
JOBS=${HV_JOBS:-$(( $(nproc) + 1 ))}
FRAGMENT=$HERE/linux/pyhv.config
INIT=$HERE/linux/init.sh
STOCK_MODULES="virtio_pci virtio_blk virtio_net virtio_console virtio_rng"
PY=${PYTHON:-python3}
T0=$(date +%s)
FROM_SCRATCH_UNITS=1340     # kbuild lines of a build from scratch (tinyconfig + pyhv.config), for progress

step() { printf 'fetch.sh: %s\n' "$*"; }
die() { printf 'fetch.sh: error: %s\n' "$*" >&2; exit 1; }
elapsed() { echo "$(( $(date +%s) - T0 ))s"; }

mkdir -p "$A" "$A/debs"
exec 9>"$A/.lock"
flock 9 || die "cannot lock $A/.lock"

# --- build tools (only what is missing) ----------------------------------------
apt_updated=
apt_update() {
	if [ -z "$apt_updated" ]; then
		step "apt-get update"
		apt-get update -qq >/dev/null || die "apt-get update failed"
		apt_updated=1
	fi
}
missing=()
for tool in gcc:build-essential make:build-essential flex:flex bison:bison bc:bc \
            cpio:cpio xz:xz-utils perl:perl python3:python3 patch:patch; do
	command -v "${tool%%:*}" >/dev/null || missing+=("${tool#*:}")
done
[ -e /usr/include/gelf.h ] || missing+=(libelf-dev)
[ -e /usr/include/openssl/opensslv.h ] || missing+=(libssl-dev)
if [ ${#missing[@]} -gt 0 ]; then
	apt_update
	mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
	step "apt-get install ${missing[*]}"
	apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null || die "apt-get install failed"
else
	step "build tools present"
fi

# download PACKAGE: its .deb into $A/debs (kept there as the cache); prints
# the path on stdout (progress lines go to stderr: callers capture stdout).
download() {
	local pkg=$1 deb
	deb=$(find "$A/debs" -maxdepth 1 -name "${pkg}_*.deb" | sort -V | tail -n 1)
	if [ -z "$deb" ]; then
		apt-cache show "$pkg" >/dev/null 2>&1 || apt_update >&2
		"$PY" "$HERE/progress.py" download "$pkg" "$A/debs" >/dev/null || die "downloading $pkg failed"
		deb=$(find "$A/debs" -maxdepth 1 -name "${pkg}_*.deb" | sort -V | tail -n 1)
		[ -n "$deb" ] || die "apt-get download $pkg left no ${pkg}_*.deb in $A/debs"
	fi
	printf '%s\n' "$deb"
}

# --- stock kernel ---------------------------------------------------------------------
if [ -s "$A/stock/vmlinuz" ]; then
	step "stock kernel: cached ($(cat "$A/stock/VERSION" 2>/dev/null || echo '?'))"
else
	apt-cache show linux-image-cloud-amd64 >/dev/null 2>&1 || apt_update
	real=$(apt-cache depends linux-image-cloud-amd64 | awk '$1 == "Depends:" && $2 ~ /^linux-image-6\.1\..*-cloud-amd64$/ { print $2; exit }')
	[ -n "$real" ] || die "cannot resolve linux-image-cloud-amd64 to a linux-image-6.1.*-cloud-amd64 package"
	deb=$(download "$real")
	step "stock kernel: extracting $(basename "$deb")"
	tmp=$(mktemp -d "$A/.stock.XXXXXX")
	dpkg-deb -x "$deb" "$tmp"
	vmlinuz=$(find "$tmp/boot" -name 'vmlinuz-*' | head -n 1)
	[ -n "$vmlinuz" ] || die "no boot/vmlinuz-* in $deb"
	mkdir -p "$tmp/out"
	cp "$vmlinuz" "$tmp/out/vmlinuz"
	cp "$tmp"/boot/config-* "$tmp/out/config" 2>/dev/null || true
	echo "$real $(dpkg-deb -f "$deb" Version)" > "$tmp/out/VERSION"
	# The modules tree is not kept: the virtio modules go into
	# stock-initramfs.cpio (below), straight from the package.
	rm -rf "$A/stock"
	mv "$tmp/out" "$A/stock"
	rm -rf "$tmp"
fi

# --- busybox -----------------------------------------------------------------------------
if [ -x "$A/busybox" ]; then
	step "busybox: cached"
else
	deb=$(download busybox-static)
	step "busybox: extracting $(basename "$deb")"
	tmp=$(mktemp -d "$A/.busybox.XXXXXX")
	dpkg-deb -x "$deb" "$tmp"
	[ -x "$tmp/bin/busybox" ] || die "no bin/busybox in $deb"
	cp "$tmp/bin/busybox" "$A/busybox.tmp"
	mv "$A/busybox.tmp" "$A/busybox"
	rm -rf "$tmp"
fi

# --- our kernel --------------------------------------------------------------------------------
# check_config FRAGMENT CONFIG: every CONFIG_X=V in FRAGMENT must be in CONFIG
# with the same value, every "# CONFIG_X is not set" must be unset there.
check_config() {
	awk '
		function key(line) { return substr(line, 1, index(line, "=") - 1) }
		FNR == NR {
			if ($0 ~ /^CONFIG_[A-Za-z0-9_]+=/) want[key($0)] = substr($0, index($0, "=") + 1)
			else if ($0 ~ /^# CONFIG_[A-Za-z0-9_]+ is not set/) want[$2] = "n"
			next
		}
		$0 ~ /^CONFIG_[A-Za-z0-9_]+=/ { have[key($0)] = substr($0, index($0, "=") + 1) }
		END {
			bad = 0
			for (k in want) {
				h = (k in have) ? have[k] : "n"
				if (h != want[k]) {
					printf "fetch.sh: config: %s is %s, the fragment asks for %s\n", k, h, want[k] > "/dev/stderr"
					bad = 1
				}
			}
			exit bad
		}' "$1" "$2"
}

src_deb=$(download linux-source-6.1)
src_ver=$(dpkg-deb -f "$src_deb" Version)
key=$(cat <(echo "linux-source-6.1 $src_ver unpatched") "$FRAGMENT" | sha256sum | cut -c1-16)
if [ -z "${HV_FETCH_FORCE:-}" ] && [ "$(cat "$A/own/KEY" 2>/dev/null)" = "$key" ] \
		&& [ -s "$A/own/vmlinux" ] && [ -s "$A/own/bzImage" ]; then
	step "own kernel: cached (linux-source-6.1 $src_ver, key $key)"
else
	# One unpacked tree per source version, reused across config changes.  A
	# tree that still carries a patch from an older fetch.sh (kept beside it as
	# applied.patch) gets it reverted: our kernel is Debian's source as it comes.
	tree=$A/linux/$src_ver
	if [ ! -e "$tree/.pyhv-unpacked" ]; then
		rm -rf "$A/linux"
		mkdir -p "$tree"
		step "own kernel: unpacking linux-source-6.1 $src_ver"
		dpkg-deb --fsys-tarfile "$src_deb" | tar -xO --wildcards './usr/src/linux-source-6.1.tar.*' \
			| tar -xJ -C "$tree"
		[ -d "$tree/linux-source-6.1" ] || die "linux-source-6.1.tar.xz did not unpack to linux-source-6.1/"
		mv "$tree/linux-source-6.1" "$tree/src"
		touch "$tree/.pyhv-unpacked"
	fi
	if [ -e "$tree/applied.patch" ]; then
		step "own kernel: reverting the patch an older fetch.sh applied"
		patch -d "$tree/src" -p1 -R --batch --quiet < "$tree/applied.patch" \
			|| { rm -rf "$A/linux"; die "could not revert $tree/applied.patch; removed the tree, run again"; }
		rm -f "$tree/applied.patch" "$tree/patch.log"
	fi
	build=$tree/build
	mkdir -p "$build"
	log=$build/pyhv-build.log
	kmake() {
		make -C "$tree/src" O="$build" ARCH=x86_64 KBUILD_BUILD_TIMESTAMP=1970-01-01 \
			KBUILD_BUILD_USER=pyhv KBUILD_BUILD_HOST=pyhv "$@"
	}
	step "own kernel: configuring (tinyconfig + $(basename "$FRAGMENT"))"
	{
		kmake tinyconfig
		(cd "$tree/src" && ARCH=x86_64 scripts/kconfig/merge_config.sh -n -O "$build" "$build/.config" "$FRAGMENT")
	} > "$log" 2>&1 || { tail -n 30 "$log" >&2; die "configuring the kernel failed (log: $log)"; }
	check_config "$FRAGMENT" "$build/.config" || die "an option of $FRAGMENT did not survive Kconfig (unmet dependency?)"
	step "own kernel: building vmlinux and bzImage with $JOBS jobs (a few minutes on 2 cores)"
	b0=$(date +%s)
	# Progress is the share of kbuild units done against the last build's count (or a from-scratch one).
	expected=$(cat "$build/pyhv-units" 2>/dev/null || echo "$FROM_SCRATCH_UNITS")
	kmake -j"$JOBS" vmlinux bzImage 2>&1 | "$PY" "$HERE/progress.py" build "$log" "$expected" > "$build/pyhv-units.new" \
		|| { grep -E 'error|Error' "$log" | tail -n 20 >&2; die "the kernel build failed (log: $log)"; }
	mv "$build/pyhv-units.new" "$build/pyhv-units"
	mkdir -p "$A/own"
	for f in vmlinux:vmlinux arch/x86/boot/bzImage:bzImage .config:config System.map:System.map; do
		cp "$build/${f%%:*}" "$A/own/${f#*:}.tmp"
		mv "$A/own/${f#*:}.tmp" "$A/own/${f#*:}"
	done
	echo "$key" > "$A/own/KEY"
	step "own kernel: built in $(( $(date +%s) - b0 ))s: $A/own/vmlinux ($(stat -c %s "$A/own/vmlinux") bytes)"
fi

# --- default initramfs -----------------------------------------------------------------------------
ikey=$(cat "$HERE/initramfs.py" "$INIT" "$A/busybox" | sha256sum | cut -c1-16)
if [ -z "${HV_FETCH_FORCE:-}" ] && [ "$(cat "$A/initramfs.KEY" 2>/dev/null)" = "$ikey" ] && [ -s "$A/initramfs.cpio" ]; then
	step "initramfs: cached"
else
	step "initramfs: $("$PY" "$HERE/initramfs.py" "$A/initramfs.cpio" --busybox "$A/busybox" --init "$INIT")"
	echo "$ikey" > "$A/initramfs.KEY"
fi

# --- the stock kernel's initramfs: the same, plus its own virtio modules ----------------------------------
stock_deb=$(download "$(cut -d' ' -f1 "$A/stock/VERSION")")
skey=$(cat "$HERE/initramfs.py" "$INIT" "$A/busybox" <(echo "$(basename "$stock_deb") $STOCK_MODULES") \
	| sha256sum | cut -c1-16)
if [ -z "${HV_FETCH_FORCE:-}" ] && [ "$(cat "$A/stock-initramfs.KEY" 2>/dev/null)" = "$skey" ] \
		&& [ -s "$A/stock-initramfs.cpio" ]; then
	step "stock initramfs: cached"
else
	tmp=$(mktemp -d "$A/.stockmod.XXXXXX")
	dpkg-deb --fsys-tarfile "$stock_deb" | tar -x -C "$tmp" --wildcards './lib/modules/*' \
		|| die "no lib/modules in $stock_deb"
	tree=$(find "$tmp/lib/modules" -mindepth 1 -maxdepth 1 -type d | head -n 1)
	[ -n "$tree" ] || die "no lib/modules/RELEASE in $stock_deb"
	margs=()
	for m in $STOCK_MODULES; do margs+=(--module "$m"); done
	step "stock initramfs: $("$PY" "$HERE/initramfs.py" "$A/stock-initramfs.cpio" --busybox "$A/busybox" \
		--init "$INIT" --modules "$tree" "${margs[@]}")" || die "building the stock initramfs failed"
	rm -rf "$tmp"
	echo "$skey" > "$A/stock-initramfs.KEY"
fi

step "done in $(elapsed): artefacts in $A"
