"""devices/loop.py: callbacks on fds and ZeroMQ sockets, timers, pause that parks, stop from any thread, errors seen."""
import os
import threading
import time

import pytest
import zmq

from pyhv.devices.loop import EventLoop


def until(pred, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.005)


@pytest.fixture
def loop():
    lp = EventLoop("test")
    yield lp
    lp.stop()
    lp.close()


def test_fd_callbacks_timers_and_stop(loop):
    fd = os.eventfd(0, os.EFD_NONBLOCK)
    got, ticks, once = [], [], []
    loop.add(fd, lambda: got.append(os.eventfd_read(fd)))
    loop.every(0.02, lambda: ticks.append(1))
    loop.call_at(time.monotonic() + 0.05, lambda: once.append(1))
    t = loop.start()
    os.eventfd_write(fd, 3)
    until(lambda: got == [3])
    until(lambda: len(ticks) >= 3 and once == [1])
    time.sleep(0.1)
    assert once == [1]                                  # one-shot
    loop.stop()
    t.join(2)
    assert not t.is_alive()
    os.close(fd)


def test_pause_parks_after_the_current_callback_and_holds_only_what_is_not_during_pause(loop):
    a, b = os.eventfd(0, os.EFD_NONBLOCK), os.eventfd(0, os.EFD_NONBLOCK)
    inside, got_a, got_b = threading.Event(), [], []

    def slow():
        inside.set()
        time.sleep(0.2)
        got_a.append(os.eventfd_read(a))
    loop.add(a, slow)
    loop.add(b, lambda: got_b.append(os.eventfd_read(b)), during_pause=True)
    loop.start()
    os.eventfd_write(a, 1)
    inside.wait(2)
    assert loop.pause(2.0)                               # returns only once slow() has finished
    assert got_a == [1]
    os.eventfd_write(a, 5)
    os.eventfd_write(b, 7)
    until(lambda: got_b == [7])                          # during_pause handlers still run
    time.sleep(0.1)
    assert got_a == [1]                                  # the held one waits in its eventfd
    loop.resume()
    until(lambda: got_a == [1, 5])
    os.close(a), os.close(b)


def test_a_paused_loop_does_not_spin_on_a_readable_fd_it_holds(loop):
    fd = os.eventfd(0, os.EFD_NONBLOCK)
    loop.add(fd, lambda: os.eventfd_read(fd))
    t = loop.start()
    loop.pause(2)
    os.eventfd_write(fd, 1)                              # readable, and nobody may read it
    cpu0 = os.times().user
    time.sleep(0.3)
    assert os.times().user - cpu0 < 0.2
    assert t.is_alive()
    os.close(fd)


def test_zeromq_sockets_are_drained_whatever_the_edge(loop):
    ctx = zmq.Context()
    a = ctx.socket(zmq.PAIR)
    a.bind("inproc://loop-test")
    b = ctx.socket(zmq.PAIR)
    b.connect("inproc://loop-test")
    got = []
    loop.add_socket(a, lambda: got.append(a.recv()))
    loop.start()
    for i in range(500):
        b.send(b"%d" % i)
    until(lambda: len(got) == 500)
    assert got == [b"%d" % i for i in range(500)]
    loop.stop()
    a.close(), b.close()
    ctx.term()


def test_a_callback_that_raises_is_reported_and_the_loop_goes_on():
    errors = []
    lp = EventLoop("test", on_error=errors.append)
    fd = os.eventfd(0, os.EFD_NONBLOCK)
    calls = []

    def bad():
        calls.append(os.eventfd_read(fd))
        raise RuntimeError("boom")
    lp.add(fd, bad)
    lp.start()
    os.eventfd_write(fd, 1)
    until(lambda: errors)
    os.eventfd_write(fd, 1)
    until(lambda: len(calls) == 2)
    assert isinstance(errors[0], RuntimeError) and len(errors) == 2
    lp.stop()
    lp.close()
    os.close(fd)


def test_call_soon_runs_on_the_loop_thread(loop):
    where = []
    t = loop.start()
    loop.call_soon(lambda: where.append(threading.current_thread()))
    until(lambda: where)
    assert where == [t]



def test_a_callback_may_close_its_socket_and_open_another_that_reuses_its_fd(loop):
    """The supervisor's worker calls: a reply's callback closes that DEALER and sends the next request on a new
    one, whose fd number is often the closed one's.  Every reply must be seen (the drain once removed the new
    socket while cleaning up after the old, and the second request of `hvctl stats` timed out half the time)."""
    ctx = zmq.Context()
    server = ctx.socket(zmq.ROUTER)
    server.bind("inproc://echo")

    def echo():
        while True:
            frames = server.recv_multipart()
            if frames[-1] == b"quit":
                return
            server.send_multipart(frames)
    t = threading.Thread(target=echo, daemon=True)
    t.start()
    replies, fds = [], set()

    def call(n):
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect("inproc://echo")
        fds.add(sock.getsockopt(zmq.FD))

        def on_reply():
            try:
                frame = sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            replies.append(frame)
            loop.remove(sock)
            sock.close()
            if n < 60:
                call(n + 1)
        sock.send(b"%d" % n)
        loop.add_socket(sock, on_reply)
    loop.call_soon(lambda: call(1))
    loop.start()
    until(lambda: len(replies) == 60, timeout=10)
    assert replies == [b"%d" % n for n in range(1, 61)]
    assert len(fds) < 60                    # fd numbers were reused: the case this is about
    loop.stop()
    quitter = ctx.socket(zmq.DEALER)
    quitter.connect("inproc://echo")
    quitter.send(b"quit")
    t.join(5)
    quitter.close(), server.close()
    ctx.term()
