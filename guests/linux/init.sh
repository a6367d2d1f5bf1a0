#!/bin/sh
# pyhv default /init for busybox initramfs images (guests/initramfs.py).
#
# Kernel command line options read here (from /proc/cmdline: the kernel does
# not hand dotted parameters to init):
#   pyhv.run=CMD        run CMD (a shell command line, in a subshell) instead
#                       of an interactive shell;
#   pyhv.run="A B C"    the quoted form allows spaces (no '"' inside);
#   pyhv.kmsg           send init's output through /dev/kmsg (printk), for a
#                       console whose UART transmit interrupt does not work;
#   pyhv.status         end the VM with CMD's exit status (written to the
#                       hypervisor's debug page, 0xFEBFF000) instead of 0.
# Afterwards the VM is rebooted (`reboot -f`, which syncs first), which pyhv
# reports as exit status 0.  Ctrl-Alt-Del (`hvctl shutdown`) does the same at
# any time.  For that this script ends by exec'ing busybox init (still PID 1):
# it turns the kernel's immediate reboot off, runs ::ctrlaltdel on the signal
# the kernel sends instead, and starts the command with default signals (a
# background job of this script would ignore SIGINT, and so Ctrl-C).
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
export HOME=/root TERM=vt100

# Every fork and exec costs page faults handled by emulated kernel code
# (milliseconds each here): this script uses shell builtins where it can.
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null

read -r cmdline </proc/cmdline
has() { case " $cmdline " in *" $1 "*) return 0;; esac; return 1; }

# Kernel modules the image carries (initramfs.py --modules), dependencies first.
if [ -s /etc/pyhv-modules ]; then
	while read -r m; do
		insmod "$m" || echo "pyhv-init: insmod $m failed"
	done </etc/pyhv-modules
	echo "pyhv-init: modules loaded"
fi

if has pyhv.kmsg && [ -w /dev/kmsg ]; then
	exec >/dev/kmsg 2>&1
fi

cpus=0
for c in /sys/devices/system/cpu/cpu[0-9]*; do
	[ -d "$c" ] && cpus=$((cpus + 1))
done
[ "$cpus" -gt 0 ] || cpus=$(nproc)
echo "pyhv-init: $cpus cpus"

run=
case "$cmdline" in
*'pyhv.run="'*)
	run=${cmdline#*pyhv.run=\"}
	run=${run%%\"*}
	;;
*pyhv.run=*)
	run=${cmdline#*pyhv.run=}
	run=${run%% *}
	;;
esac

# What busybox init runs: the command (its text in /etc/pyhv-run) or a shell, then the VM's end.
mkdir -p /etc
[ -n "$run" ] && printf '%s\n' "$run" > /etc/pyhv-run
has pyhv.status && : > /etc/pyhv-status
cat > /etc/pyhv-main <<'MAIN'
if [ -s /etc/pyhv-run ]; then
	echo "pyhv-init: running: $(cat /etc/pyhv-run)"
	sh /etc/pyhv-run
	status=$?
	echo "pyhv-init: exit status $status"
else
	echo "pyhv-init: no pyhv.run= given, starting a shell (exit it to end the VM)"
	setsid cttyhack sh -l
	status=$?
fi
[ -e /etc/pyhv-status ] && devmem 0xFEBFF000 8 "$status"
reboot -f
MAIN
out=/dev/console
has pyhv.kmsg && [ -w /dev/kmsg ] && out=/dev/kmsg
cat > /etc/inittab <<TAB
::once:/bin/sh -c 'exec /bin/sh /etc/pyhv-main >$out 2>&1 </dev/console'
::ctrlaltdel:/bin/sh -c 'echo "pyhv-init: Ctrl-Alt-Del: syncing and rebooting" >$out; sync; reboot -f'
TAB
exec /bin/init
