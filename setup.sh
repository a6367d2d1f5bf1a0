#!/usr/bin/env bash
# Sets up pyhv on a fresh machine and runs the demo guest.  A virtual
# environment in .venv (HV_VENV names another) gets the project, editable, with
# its test extras (this builds the cffi KVM extension), so Debian's own python3
# works too (PEP 668: nothing is pip-installed outside the venv).  Then:
# bytecode, the Debian packages the tests' vhost-user back ends come in, the
# Linux guest artefacts (cached in ${HV_ARTEFACTS:-/var/cache/pyhv}: minutes
# the first time, instant after), the example guest built from source and
# booted.  hvctl is $VENV/bin/hvctl; the last line says how to reach it.
set -euo pipefail
cd "$(dirname "$0")"
VENV=${HV_VENV:-.venv}
PY=${PYTHON:-python3}

if [ ! -x "$VENV/bin/python" ]; then
	if ! "$PY" -m venv "$VENV" >/dev/null 2>&1; then
		rm -rf "$VENV"                  # Debian ships venv's ensurepip in python3-venv
		if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
			apt-get install -y -qq python3-venv >/dev/null
		fi
		"$PY" -m venv "$VENV"
	fi
fi
# compat: the editable install is the repository root on sys.path, which bin/hvctl adds for free;
# the default (an import hook) costs hvctl ~20 ms of imports at every start.
"$VENV/bin/python" -m pip install -q -e '.[test]' --config-settings editable_mode=compat
# Bytecode now: hvctl run starts in ~100 ms only if it need not compile itself
# (and PYTHONDONTWRITEBYTECODE may be set, so it would compile every time).
"$VENV/bin/python" -m compileall -q -j 0 pyhv supervisor vcpu_worker devices proto >/dev/null
# The vhost-user tests' real back ends and disk tools, only if missing: Debian's qemu-system-common has
# qemu-storage-daemon and /usr/lib/qemu/virtiofsd, qemu-utils has qemu-img and qemu-io.
qemu=()
command -v qemu-storage-daemon >/dev/null && [ -x /usr/lib/qemu/virtiofsd ] || qemu+=(qemu-system-common)
command -v qemu-img >/dev/null && command -v qemu-io >/dev/null || qemu+=(qemu-utils)
if [ ${#qemu[@]} -gt 0 ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
	echo "setup.sh: apt-get install ${qemu[*]} (vhost-user back ends for the tests)"
	apt-get update -qq >/dev/null
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${qemu[@]}" >/dev/null
fi
"$VENV/bin/hvctl" guests fetch
# Debian's gdb drives the GDB stub's tests (tests/kvm/test_gdb.py); installed only where it is missing.
if ! command -v gdb >/dev/null && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
	apt-get install -y -qq gdb >/dev/null || { apt-get update -qq && apt-get install -y -qq gdb >/dev/null; }
fi
make -s -C examples
"$VENV/bin/hvctl" run --boot raw64 --kernel examples/build/hello.bin

hvctl=$(cd "$VENV/bin" && pwd)/hvctl
case ":$PATH:" in
*":$HOME/.local/bin:"*)
	if [ ! -e "$HOME/.local/bin/hvctl" ] || [ -L "$HOME/.local/bin/hvctl" ]; then
		ln -sfn "$hvctl" "$HOME/.local/bin/hvctl"
		echo "setup.sh: hvctl is on your PATH ($HOME/.local/bin/hvctl -> $hvctl)"
	else
		echo "setup.sh: $HOME/.local/bin/hvctl is another program; run $hvctl"
	fi ;;
*)	echo "setup.sh: hvctl is $hvctl; to type just hvctl: export PATH=\"$(dirname "$hvctl"):\$PATH\"" ;;
esac
