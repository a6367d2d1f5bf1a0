"""RestartPolicy: how often a helper process that died may be replaced (device services, switches, the zygote).

Two limits, either optional: a minimum interval between attempts (a helper
that dies at once is not restarted in a tight loop), and at most `limit`
restarts within `window` seconds (after that its owner gives up and says so).
"""
import collections
import time


class RestartPolicy:
    def __init__(self, interval=0.0, limit=None, window=60.0, clock=time.monotonic):
        self.interval, self.limit, self.window, self.clock = interval, limit, window, clock
        self._times = collections.deque()

    def due(self):
        """May a restart be attempted now (the interval has passed since the last one)?"""
        return not self._times or self.clock() - self._times[-1] >= self.interval

    def exhausted(self):
        """Have `limit` restarts happened within the last `window` seconds?"""
        now = self.clock()
        while self._times and now - self._times[0] > self.window:
            self._times.popleft()
        return self.limit is not None and len(self._times) >= self.limit

    def record(self):
        """A restart is being attempted now."""
        self._times.append(self.clock())
