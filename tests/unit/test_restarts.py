"""devices/restarts.py: the one policy for replacing dead helpers (services, switches, the zygote)."""
from pyhv.devices.restarts import RestartPolicy


def test_restart_policy_spaces_attempts_and_gives_up_after_its_limit():
    now = [100.0]
    p = RestartPolicy(interval=1.0, limit=2, window=10.0, clock=lambda: now[0])
    assert p.due() and not p.exhausted()
    p.record()
    assert not p.due()
    now[0] += 1.0
    assert p.due()
    p.record()
    assert p.exhausted()                                 # two within ten seconds
    now[0] += 10.5
    assert not p.exhausted()                             # the first one has aged out
