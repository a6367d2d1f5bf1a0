"""`hvctl run`: one guest in this process, console on stdout, stdin to COM1, exit with its status.

No supervisor and no ZeroMQ: the guest's RAM is a memfd made here, and the
vCPU threads belong to this process.  Kept free of heavy imports so the
first guest byte appears within milliseconds of exec.
"""
import os
import sys
import threading

from pyhv.devices.guest_memory import create_memfd
from pyhv.vcpu_worker.vcpu import STATUS_TIMEOUT, Outcome


def _write_all(fd, data):
    try:
        while data:
            data = data[os.write(fd, data):]
    except OSError:
        pass  # the reader went away; the guest keeps running


def _pump_stdin(machine):
    try:
        while True:
            data = os.read(0, 4096)
            if not data:
                return
            machine.feed_console(data)
    except OSError:
        return


def _write_stats(machine, outcome, path):
    import json
    stats = machine.stats()
    stats["outcome"] = {"status": outcome.status, "reason": outcome.reason}
    with open(path, "w") as f:
        json.dump(stats, f, indent=2)


def run_foreground(config, stats_path=None):
    """Boot `config` and return the exit status; the one-line reason for a failure goes to stderr."""
    from pyhv.vcpu_worker.machine import Machine, MachineError

    mem_fd = create_memfd(config.mem_bytes, f"guest-ram-{config.name or 'run'}")
    try:
        machine = Machine(config, mem_fd, lambda data: _write_all(1, data))
    except MachineError as e:
        print(f"hvctl: {e}", file=sys.stderr)
        return e.status
    threading.Thread(target=_pump_stdin, args=(machine,), name="stdin", daemon=True).start()
    machine.start()
    outcome = machine.wait(config.timeout)
    if outcome is None:
        machine.finish(Outcome(STATUS_TIMEOUT, f"timed out after {config.timeout:g} s"))
        outcome = machine.outcome
    machine.join()
    if stats_path:
        _write_stats(machine, outcome, stats_path)
    if outcome.status == 70:
        print(f"hvctl: VM failed: {outcome.reason}", file=sys.stderr)
    return outcome.status
