"""A small stress run (bench/stress.py): many guests at once, some workers SIGKILLed, every other guest exact.

No timing thresholds: the figures are bench/stress.py's business.  The
scenario itself checks every guest's state, exit status and console output,
that the supervisor still serves after the kills, and that nothing outlives
the supervisor; each guest has --timeout.
"""
import argparse
import os
import sys

import pytest

from hv import needs_kvm

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)
from bench import stress  # noqa: E402

pytestmark = needs_kvm


@pytest.mark.parametrize("mode, n, kill, kill_zygote", [("zygote", 12, 2, False), ("zygote", 12, 2, True),
                                                     ("direct", 4, 1, False)])
def test_stress_with_killed_workers(mode, n, kill, kill_zygote):
    """kill_zygote: the zygote is SIGKILLed halfway through the Start burst; its starts fall back."""
    args = argparse.Namespace(hvctl=f"{sys.executable} {os.path.join(REPO, 'bin', 'hvctl')}")
    res = stress.scenario(args, mode, n, "32M", kill=kill, say=print, guest_timeout=120, up_timeout=120,
                          kill_zygote=kill_zygote)
    assert res["failures"] == [], "\n".join(res["failures"]) + f"\n(runtime dir kept: {res['dir']})"
    assert res["completed_ok"] == res["expected_ok"] == n - kill
    assert res["max_running"] == n
    if mode == "zygote" and not kill_zygote:
        assert res["workers_from_zygote"] == n
