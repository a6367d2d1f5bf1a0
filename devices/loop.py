"""One event loop for every thread that waits on file descriptors: fd -> callback, timers, stop and pause from any thread.

The device threads, device services, net ports and switch, the worker and
the supervisor all wait the same way: `add(fd, callback)` for plain fds
(eventfds, pipes, pidfds, sockets), `add_socket(sock, callback)` for ZeroMQ
sockets (polled through their ZMQ_FD, and drained while ZMQ_EVENTS says a
message is there, as ZeroMQ's edge-triggered fd requires), `every(seconds,
callback)` for periodic work.  A callback takes no arguments and must not
block.

A callback that raises is a bug, but never a silent death: the loop hands the
exception to `on_error` (default: the traceback on stderr) and goes on.
`stop()` and `pause()` work from any thread; `pause()` returns only once the
loop thread has finished the callback it was in and parked, so whoever paused
it knows no callback runs until `resume()` (a device's data path stops
touching guest memory).  Handlers added with `during_pause=True` still run
while paused (a service's control socket, a lifeline).
"""
import collections
import os
import select
import threading
import time

_READ = select.POLLIN | select.POLLPRI | select.POLLHUP | select.POLLERR
_SOCKET_BURST = 64          # messages taken from one ZeroMQ socket per turn, so one peer cannot starve the rest


class EventLoop:
    def __init__(self, name="loop", on_error=None):
        self.name = name
        self.on_error = on_error or self._print_error
        self._poll = select.poll()
        self._fds = {}              # fd -> (callback, during_pause, poll events)
        self._sockets = {}          # ZMQ_FD -> (socket, callback, during_pause)
        self._timers = []           # [due, interval, callback]
        self._wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._poll.register(self._wake, select.POLLIN)
        self._cond = threading.Condition()
        self._stop = False
        self._pause_wanted = False
        self._parked = False
        self._thread = None         # the thread inside run()
        self._soon = collections.deque()
        self._zmq = None

    # -- registration (from the loop's own thread, or before run()) --------------------
    def add(self, fd, callback, during_pause=False, events=_READ):
        fd = fd if isinstance(fd, int) else fd.fileno()
        self._fds[fd] = (callback, during_pause, events)
        if during_pause or not self._parked:
            self._poll.register(fd, events)

    def add_socket(self, sock, callback, during_pause=False):
        """A ZeroMQ socket: `callback()` is called once per message waiting on it."""
        if self._zmq is None:
            import zmq
            self._zmq = zmq
        fd = sock.getsockopt(self._zmq.FD)
        self._sockets[fd] = (sock, callback, during_pause)
        if during_pause or not self._parked:
            self._poll.register(fd, select.POLLIN)
        # A new socket's first message may never make its fd readable (ZeroMQ signals the fd when a pipe turns
        # readable, and a new pipe starts out so): the next turn must drain it before the loop sleeps in poll.
        self._kick()

    def remove(self, fd_or_socket):
        """Stop watching an fd or socket (before closing it)."""
        if isinstance(fd_or_socket, int):
            fd = fd_or_socket
        elif self._zmq is not None and isinstance(fd_or_socket, self._zmq.Socket):
            fd = next((f for f, (s, _, _) in self._sockets.items() if s is fd_or_socket), None)
        else:
            fd = fd_or_socket.fileno()
        if fd is None:
            return
        self._fds.pop(fd, None)
        self._sockets.pop(fd, None)
        try:
            self._poll.unregister(fd)
        except (KeyError, ValueError):
            pass

    def every(self, interval, callback, first=0.0):
        """Call `callback()` every `interval` seconds (the first time after `first`); returns the timer."""
        timer = [time.monotonic() + first, interval, callback]
        self._timers.append(timer)
        return timer

    def call_at(self, when, callback):
        """Call `callback()` once at monotonic time `when`; returns the timer (for cancel())."""
        timer = [when, None, callback]
        self._timers.append(timer)
        return timer

    def cancel(self, timer):
        if timer in self._timers:
            self._timers.remove(timer)

    def modify(self, fd, events):
        """Change what an added fd is polled for (select.POLLIN, POLLOUT...), from the loop's thread."""
        callback, during, _ = self._fds[fd]
        self._fds[fd] = (callback, during, events)
        if during or not self._parked:
            self._poll.register(fd, events)

    # -- control (any thread) ----------------------------------------------------------
    def call_soon(self, callback):
        """Run `callback()` on the loop's thread at its next turn (how other threads change registrations)."""
        self._soon.append(callback)
        self._kick()

    def stop(self):
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._kick()

    @property
    def stopped(self):
        return self._stop

    def pause(self, timeout=None):
        """Hold every callback but the during_pause ones; returns once the loop has parked (True), or False on timeout."""
        with self._cond:
            self._pause_wanted = True
            self._kick()
            if self._thread is None or self._thread is threading.current_thread():
                return True
            return self._cond.wait_for(lambda: self._parked or self._stop or self._thread is None, timeout)

    def resume(self):
        with self._cond:
            self._pause_wanted = False
            self._cond.notify_all()
        self._kick()

    @property
    def paused(self):
        return self._pause_wanted

    def _kick(self):
        try:
            os.eventfd_write(self._wake, 1)
        except OSError:
            pass                    # closed: the loop is gone

    # -- the loop ----------------------------------------------------------------------
    def run(self):
        """Serve until stop(); returns in the calling thread."""
        self._thread = threading.current_thread()
        try:
            while not self._stop:
                self._turn()
        finally:
            with self._cond:
                self._thread = None
                self._parked = False
                self._cond.notify_all()

    def start(self, daemon=True):
        """run() on a thread of its own; returns the thread."""
        t = threading.Thread(target=self.run, name=self.name, daemon=daemon)
        t.start()
        return t

    def _turn(self):
        with self._cond:
            if self._pause_wanted != self._parked:
                self._park(self._pause_wanted)
                self._cond.notify_all()
        paused = self._parked
        while self._soon:
            self._call(self._soon.popleft())
        more = self._drain_sockets(paused)
        timeout = 0 if more else self._timeout()
        for fd, events in self._poll.poll(timeout):
            if fd == self._wake:
                try:
                    os.eventfd_read(self._wake)
                except BlockingIOError:
                    pass
                continue
            if self._stop or self._pause_wanted and not paused:
                return              # a stop or pause arrived: honour it before the next callback
            entry = self._fds.get(fd)
            if entry is not None:
                self._call(entry[0])
        if not paused and not self._stop:
            self._run_timers()

    def _park(self, parked):
        """Take the paused handlers out of the poll set (a readable fd nobody serves would spin the loop), or back."""
        self._parked = parked
        held = [(fd, events) for fd, (_, during, events) in self._fds.items() if not during]
        held += [(fd, select.POLLIN) for fd, (_, _, during) in self._sockets.items() if not during]
        for fd, events in held:
            if parked:
                self._poll.unregister(fd)
            else:
                self._poll.register(fd, events)

    def _drain_sockets(self, paused):
        """Messages already queued on the ZeroMQ sockets (their fd will not fire for them); True if any are left."""
        if not self._sockets:
            return False
        zmq = self._zmq
        more = False
        for fd, (sock, callback, during_pause) in list(self._sockets.items()):
            if paused and not during_pause:
                continue
            for _ in range(_SOCKET_BURST):
                if self._stop:
                    return False
                if self._sockets.get(fd, (None,))[0] is not sock:
                    break           # removed by a callback, maybe closed, and the fd number maybe another socket's
                try:
                    if not sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                        break
                except zmq.ZMQError:            # closed under us by a callback that did not remove it
                    self.remove(fd)
                    break
                self._call(callback)
            else:
                more = True
        return more

    def _timeout(self):
        """Milliseconds until the next timer is due (None: no timers)."""
        if not self._timers:
            return None
        return max(0, int((min(t[0] for t in self._timers) - time.monotonic()) * 1000) + 1)

    def _run_timers(self):
        now = time.monotonic()
        for timer in list(self._timers):
            if now >= timer[0]:
                if timer[1] is None:
                    self._timers.remove(timer)
                else:
                    timer[0] = now + timer[1]
                self._call(timer[2])

    def _call(self, callback):
        try:
            callback()
        except Exception as e:
            self.on_error(e)

    def _print_error(self, e):
        import sys
        import traceback
        print(f"{self.name}: callback failed:", file=sys.stderr)
        traceback.print_exception(e, file=sys.stderr)

    def close(self):
        """Release the loop's own fd (after run() has returned)."""
        if self._wake is not None:
            os.close(self._wake)
            self._wake = None
