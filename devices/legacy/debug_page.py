"""The debug page at guest-physical 0xFEBFF000: an exit port and a console reachable from ring 3.

Port I/O faults in ring 3 on the nested machines (IOPL is not honoured), so
user64 guests end the VM and print through this MMIO page instead.
"""

DEBUG_PAGE_ADDR = 0xFEBFF000
DEBUG_PAGE_SIZE = 0x1000
OFFSET_EXIT = 0
OFFSET_CONSOLE = 1


class DebugPage:
    def __init__(self, exit_vm, console_out):
        self._exit_vm = exit_vm          # exit_vm(status) ends the VM with that status
        self._console_out = console_out
        self.writes = 0

    def read(self, offset, size):
        return b"\xff" * size

    def write(self, offset, data):
        self.writes += 1
        if offset == OFFSET_EXIT:
            self._exit_vm(data[0])
        elif offset == OFFSET_CONSOLE:
            self._console_out(data[:1])

    def counters(self):
        return {"writes": self.writes}

    def snapshot(self):
        return {"writes": self.writes}          # no registers: writing is all it does

    def restore(self, state):
        self.writes = int(state["writes"])
