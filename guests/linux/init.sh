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
# any time: the kernel's immediate reboot is turned off, so it signals init.
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
export HOME=/root TERM=vt100

# Every fork and exec costs page faults handled by emulated kernel code
# (milliseconds each here): this script uses shell builtins where it can.
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null

# The command runs in the background and init waits for it: a trap runs only between commands.
echo 0 > /proc/sys/kernel/ctrl-alt-del 2>/dev/null
trap 'echo "pyhv-init: Ctrl-Alt-Del: syncing and rebooting"; sync; reboot -f' INT

read -r cmdline </proc/cmdline
has() { case " $cmdline " in *" $1 "*) return 0;; esac; return 1; }

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

status=0
if [ -n "$run" ]; then
	echo "pyhv-init: running: $run"
	exec 3<&0                           # a background list's stdin would be /dev/null
	(eval "$run") <&3 3<&- &
	wait $!
	status=$?
	echo "pyhv-init: exit status $status"
else
	echo "pyhv-init: no pyhv.run= given, starting a shell (exit it to end the VM)"
	setsid cttyhack sh -l &             # cttyhack gives it the console as its terminal
	wait $!
fi

if has pyhv.status; then
	devmem 0xFEBFF000 8 "$status"
fi
reboot -f
# Not reached unless reboot failed; never let init exit (that panics).
while :; do sleep 3600; done
