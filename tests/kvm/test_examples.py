"""The SMP guest experiments in examples/experiments/ run, and their guests' own correctness checks hold.

Each experiment runs once with small parameters; every guest run has an
hvctl --timeout and a subprocess timeout.  The assertions are about
correctness (exact counters, every layout reported, every round trip
completed, the ring the code ran in), never about timing.
"""
import csv
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from hv import REPO
RUN_PY = REPO / "examples" / "experiments" / "run.py"

_spec = importlib.util.spec_from_file_location("experiments_run", RUN_PY)
run = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(run)


def test_spinlock_counter_is_exact_for_every_vcpu_count():
    # 4 vCPUs oversubscribe the 2-core machines on purpose: the lock must still exclude.
    iters, trials, warmup = 5000, 3, 100
    rows = run.spinlock(vcpus=(1, 2, 4), iters=iters, trials=trials, warmup=warmup, timeout=60, log=None)
    assert [r["vcpus"] for r in rows] == [1, 2, 4]
    for r in rows:
        assert r["counter"] == r["expected"] == r["vcpus"] * (warmup + trials * iters)
        assert len(r["trial_cycles_per_acq"]) == trials
        assert r["acq_per_s"] is not None and r["ns_per_acq"] is not None   # the TSC frequency came in RDX


def test_false_sharing_reports_both_layouts_with_exact_counters():
    rows = run.false_sharing(vcpus=(2,), iters=20_000, trials=3, timeout=60, log=None)
    assert {(r["op"], r["layout"]) for r in rows} == {
        (op, layout) for op in ("plain", "locked") for layout in ("same_line", "padded64", "padded128")}
    assert {r["stride"] for r in rows if r["layout"] == "same_line"} == {8}
    for r in rows:
        assert r["counts_ok"] and r["trials"] == 3 and r["vcpus"] == 2
        assert r["ns_per_inc"] is not None


def test_ipi_round_trips_complete():
    rows = run.ipi(rounds=5, trials=2, flag_rounds=500, flag_trials=3, flag_ring0_rounds=5, flag_ring0_trials=2,
                   timeout=60, log=None)
    by_kind = {(r["kind"], r["mode"], r.get("wait")): r for r in rows}
    assert set(by_kind) == {("ipi", "raw64", "hlt"), ("ipi", "raw64", "spin"),
                            ("flag_pingpong", "raw64", None), ("flag_pingpong", "user64", None)}
    for r in rows:
        assert r["ok"], r
        assert r["completed"] == r["round_trips"] == r["rounds_per_trial"] * r["trials"]
        assert r["guest"]["ring"] == (3 if r["mode"] == "user64" else 0)
    for wait in ("hlt", "spin"):
        r = by_kind[("ipi", "raw64", wait)]
        assert r["pings"] == r["pongs"] >= r["round_trips"]          # warm-up round trips come on top
        assert r["stray"] == 0
        assert (r["apic_id0"], r["apic_id1"]) == (0, 1)


def test_runner_cli_says_where_the_code_ran_and_writes_results(tmp_path):
    have_matplotlib = importlib.util.find_spec("matplotlib") is not None
    r = subprocess.run([sys.executable, str(RUN_PY), "spinlock", "--vcpus", "2", "--iters", "1000", "--trials", "2",
                        "--timeout", "60", "--out", str(tmp_path), "--trace", str(tmp_path / "traces")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "ring 3" in r.stdout and "user64" in r.stdout and "rdtsc" in r.stdout and "RDX" in r.stdout
    assert "(verified)" in r.stdout and "result: OK" in r.stdout
    doc = json.loads((tmp_path / "spinlock.json").read_text())
    assert doc["experiment"] == "spinlock" and [row["vcpus"] for row in doc["results"]] == [2]
    assert doc["results"][0]["counter"] == doc["results"][0]["expected"] == 2 * (1000 + 2 * 1000)
    assert any("(verified)" in line for line in doc["notes"])
    rows = list(csv.DictReader((tmp_path / "spinlock.csv").open()))
    assert len(rows) == 1 and rows[0]["counter"] == str(doc["results"][0]["counter"])
    (trace,) = doc["traces"]                   # one guest run, traced: its exits are the console lines and the end
    assert trace["lost"] == 0 and trace["by_address"]["0xfebff000"] == 1 and set(trace["by_vcpu"]) == {"0", "1"}
    assert (tmp_path / "spinlock.png").exists() == have_matplotlib
    if not have_matplotlib:
        assert "pip install 'pyhv[plot]'" in r.stdout


def test_runner_plot_without_matplotlib_is_refused_before_running(tmp_path):
    hide = tmp_path / "hide"
    (hide / "matplotlib").mkdir(parents=True)
    (hide / "matplotlib" / "__init__.py").write_text("raise ImportError('hidden by the test')\n")
    r = subprocess.run([sys.executable, str(RUN_PY), "spinlock", "--out", str(tmp_path / "out"), "--plot",
                        str(tmp_path / "p.png")], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "PYTHONPATH": str(hide)})
    assert r.returncode != 0 and r.stdout == ""
    assert len(r.stderr.strip().splitlines()) == 1 and "pip install 'pyhv[plot]'" in r.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "p.png").exists()


def test_runner_plot_with_matplotlib_draws_it(tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "fs.png"
    r = subprocess.run([sys.executable, str(RUN_PY), "false_sharing", "--iters", "2000", "--trials", "2",
                        "--timeout", "60", "--out", str(tmp_path), "--plot", str(png)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert png.read_bytes()[:4] == b"\x89PNG" and (tmp_path / "false_sharing.csv").exists()


def test_runner_cli_ipi_says_ring0_is_emulated(tmp_path):
    r = subprocess.run([sys.executable, str(RUN_PY), "ipi", "--rounds", "3", "--flag-rounds", "200", "--trials", "2",
                        "--flag-ring0-rounds", "3", "--timeout", "60", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr
    assert "EMULATED" in r.stdout and "RING 0" in r.stdout and "native" in r.stdout
    assert len(json.loads((tmp_path / "ipi.json").read_text())["results"]) == 4


def test_a_wrong_counter_fails_loudly(monkeypatch):
    # What the runner does if the lock did not exclude: the guest exits with 1 and prints the short count.
    out = ("spinlock ring=3 vcpus=2 iters=10 trials=1 warmup=0 tsc_khz=1000 counter=19 expected=20\n"
           "spinlock_trial trial=0 span=100 busy=150\n")
    monkeypatch.setattr(run, "run_guest", lambda *a, **k: (1, out, ""))
    with pytest.raises(run.ExperimentError, match="correctness check failed"):
        run.spinlock(vcpus=(2,), iters=10, trials=1, warmup=0, log=None)
    # ... and if a guest claimed success with a short counter all the same
    monkeypatch.setattr(run, "run_guest", lambda *a, **k: (102, out, ""))
    with pytest.raises(run.ExperimentError, match="did not exclude"):
        run.spinlock(vcpus=(2,), iters=10, trials=1, warmup=0, log=None)


def test_code_claimed_to_run_in_ring3_must_report_ring3(monkeypatch):
    out = ("spinlock ring=0 vcpus=1 iters=10 trials=1 warmup=0 tsc_khz=1000 counter=10 expected=10\n"
           "spinlock_trial trial=0 span=100 busy=100\n")
    monkeypatch.setattr(run, "run_guest", lambda *a, **k: (101, out, ""))
    with pytest.raises(run.ExperimentError, match="ring 0"):
        run.spinlock(vcpus=(1,), iters=10, trials=1, warmup=0, log=None)
