"""Guest addresses to kernel symbols, from a System.map: for `hvctl stats --symbols` (where is each vCPU?)."""
import bisect

from pyhv.proto.errors import UserError


class SymbolError(UserError):
    """The file is not a System.map (one line per symbol: ADDRESS TYPE NAME)."""


class SymbolMap:
    def __init__(self, path):
        entries = []
        try:
            with open(path, errors="replace") as f:
                for line in f:
                    parts = line.split()
                    if len(parts) >= 3 and parts[1] in "tTwW":
                        try:
                            entries.append((int(parts[0], 16), parts[2]))
                        except ValueError:
                            continue
        except OSError as e:
            raise SymbolError(f"--symbols: cannot read {path}: {e.strerror}") from None
        if not entries:
            raise SymbolError(f"--symbols: {path} has no text symbols (is it a System.map?)")
        entries.sort()
        self.addrs = [a for a, _ in entries]
        self.names = [n for _, n in entries]

    def lookup(self, addr):
        """'name+0xoff' for the text symbol at or below `addr`, or None below the first one."""
        i = bisect.bisect_right(self.addrs, addr) - 1
        if i < 0:
            return None
        return f"{self.names[i]}+0x{addr - self.addrs[i]:x}"
