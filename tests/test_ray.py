"""The Ray executor (``--executor ray``): the same metrics as in-process, retries of dead workers, failures
recorded, Ctrl-C, and the message when the extra is missing.

One local Ray (2 CPUs, a 128 MB object store, no dashboard) is shared by the tests of this module: the
in-process CLI calls find it initialised and submit to it. The Ctrl-C test runs the CLI as a subprocess,
which starts (and stops) a local Ray of its own, as a user's command does.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_contract import deterministic

from fcl_bench.store import RunRecord, read_json, run_dir

PLUGINS = Path(__file__).parent / "plugins"
FAULTY = PLUGINS / "ray_faults.py"
KILLER = PLUGINS / "killer.py"
# 3 tasks x 2 rounds, so a worker can die after the first task's checkpoint
SHORT = ("-o", "tasks=3", "-o", "classes_per_task=2", "-o", "private=4", "-o", "public=2", "-o", "rounds_per_task=2")
TABLE2 = ("fedlscl", "fedlscl-fedavg-agg", "fedlscl-no-cf", "fedlscl-no-cf-fedavg-agg", "fedlscl-no-collab")


def test_without_the_extra_the_ray_executor_names_it(cli, smoke_opts, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError, as when not installed
    res = cli("run", "--methods", "fedavg", "--out", tmp_path, *smoke_opts, "--executor", "ray")
    assert res.exit_code == 2, res.output
    assert res.output.strip().splitlines() == [
        "Error: --executor ray needs Ray, an optional extra: pip install 'fcl-bench[ray]'"]
    assert not any(tmp_path.iterdir())  # stopped before anything ran


def test_ray_options_need_the_ray_executor(cli, smoke_opts, tmp_path):
    res = cli("run", "--methods", "fedavg", "--out", tmp_path, *smoke_opts, "--cpus-per-run", "2")
    assert res.exit_code == 2
    assert "--cpus-per-run only apply with --executor ray" in res.output


@pytest.fixture(scope="module")
def ray_session():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, object_store_memory=128 * 2**20, include_dashboard=False)
    yield ray
    ray.shutdown()


def _metrics(out: Path, suite: str, label: str, seed: int = 42) -> dict:
    return deterministic(read_json(run_dir(out, suite, label, "synthetic", seed) / "metrics.json"))


def test_table2_on_ray_equals_in_process_bit_for_bit(ray_session, cli, smoke_opts, tmp_path):
    local, remote = tmp_path / "in-process", tmp_path / "ray"
    res = cli("run", "--suite", "table2", "--out", local, *smoke_opts)
    assert res.exit_code == 0, res.output
    res = cli("run", "--suite", "table2", "--out", remote, *smoke_opts, "--executor", "ray")
    assert res.exit_code == 0, res.output
    assert "ray: 5 runs submitted (1 CPU, 0 GPU each)" in res.output
    for label in TABLE2:
        assert f"done {label} seed 42: final_acc" in res.output
        assert _metrics(remote, "table2", label) == _metrics(local, "table2", label), label
    assert res.output.count("completed") == 5  # the summary table
    # the store is the source of truth: a second call submits nothing and skips every run
    again = cli("run", "--suite", "table2", "--out", remote, *smoke_opts, "--executor", "ray")
    assert again.exit_code == 0, again.output
    assert again.output.count("skip ") == 5 and "submitted" not in again.output


def test_a_killed_worker_is_retried_and_its_run_resumes(ray_session, cli, smoke_opts, tmp_path, monkeypatch):
    marker = tmp_path / "died"
    plain = cli("run", "--plugin", FAULTY, "--methods", "faulty", "--out", tmp_path / "plain", *SHORT, *smoke_opts)
    assert plain.exit_code == 0, plain.output
    monkeypatch.setenv("FCL_TEST_DIE_ONCE", str(marker))  # reaches the workers with the driver's FCL_* variables
    out = tmp_path / "ray"
    res = cli("run", "--plugin", FAULTY, "--methods", "faulty,fedavg", "--out", out, *SHORT, *smoke_opts,
              "--executor", "ray")
    print(res.output)
    assert res.exit_code == 0, res.output
    assert marker.exists()  # a worker did die
    path = run_dir(out, "smoke", "faulty", "synthetic", 42)
    log = (path / "log.txt").read_text()
    print(log)
    assert "resumed from the checkpoint after task 1/3" in log  # Ray ran the task again; run_one resumed it
    for label in ("faulty", "fedavg"):
        assert RunRecord(run_dir(out, "smoke", label, "synthetic", 42)).is_complete(), label
    assert _metrics(out, "smoke", "faulty") == _metrics(tmp_path / "plain", "smoke", "faulty")


def test_a_run_whose_worker_always_dies_is_recorded_failed_and_the_rest_go_on(ray_session, cli, smoke_opts,
                                                                            tmp_path, monkeypatch):
    monkeypatch.setenv("FCL_TEST_KILL", "start:1")  # killer.py: dies at the same point on every try
    res = cli("run", "--plugin", KILLER, "--methods", "killable,fedavg", "--out", tmp_path, *SHORT, *smoke_opts,
              "--executor", "ray")
    print(res.output)
    assert res.exit_code == 1, res.output
    status = read_json(run_dir(tmp_path, "smoke", "killable", "synthetic", 42) / "status.json")
    assert status["state"] == "failed"
    assert status["reason"].startswith("the Ray worker died 3 times")
    assert RunRecord(run_dir(tmp_path, "smoke", "fedavg", "synthetic", 42)).is_complete()
    assert "1 of 2 runs failed: killable seed 42: the Ray worker died 3 times" in res.output


def test_ctrl_c_cancels_the_plan_and_marks_no_run_complete(smoke_opts, tmp_path):
    """The CLI in its own session (a terminal's process group) starts its local Ray; Ctrl-C (SIGINT to the
    group) lands while one run sleeps inside task 1 and two more wait."""
    pytest.importorskip("ray")
    hang, out = tmp_path / "hanging", tmp_path / "out"
    script = Path(sys.executable).parent / "fcl-bench"
    env = {**os.environ, "FCL_TEST_HANG": str(hang)}
    proc = subprocess.Popen([str(script), "run", "--plugin", str(FAULTY), "--methods", "faulty", "--seeds", "1,2,3",
                             "--out", str(out), *SHORT, *smoke_opts, "--executor", "ray", "--cpus-per-run", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    try:
        while not hang.exists() and proc.poll() is None:
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGINT)
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    print(output)
    assert proc.returncode != 0, output
    assert "ray: cancelling 3 unfinished runs" in output
    states = {}
    for seed in (1, 2, 3):
        rec = RunRecord(run_dir(out, "smoke", "faulty", "synthetic", seed))
        states[seed] = (rec.status or {}).get("state")
        assert not rec.is_complete()
        assert not (rec.path / "metrics.json").exists()
    assert sorted(states.values(), key=lambda v: (v is None, str(v))) == ["failed", None, None], states
    seed = next(s for s, v in states.items() if v == "failed")
    status = read_json(run_dir(out, "smoke", "faulty", "synthetic", seed) / "status.json")
    assert status["reason"] == "interrupted", status
    assert "interrupted" in (run_dir(out, "smoke", "faulty", "synthetic", seed) / "log.txt").read_text()


def test_the_driver_copies_a_run_it_does_not_see_into_its_store(tmp_path):
    """``--out`` not shared with a worker's node: the files the task returned land in the driver's store,
    status last; the same files (one machine) are left alone."""
    from fcl_bench import config as C
    from fcl_bench.executor import RunSpec
    from fcl_bench.ray_executor import _mirror

    spec = RunSpec(method="fedavg", label="fedavg", run=C.preset("smoke"), out=str(tmp_path), suite="smoke")
    files = {"metrics.json": b'{"final_acc": 0.5}', "log.txt": b"a log\n",
             "status.json": b'{"state": "completed"}'}
    _mirror(spec, files)
    assert RunRecord(spec.path).is_complete() and (spec.path / "log.txt").read_bytes() == b"a log\n"
    assert not (spec.path / ".lock").exists()
    (spec.path / "log.txt").write_text("kept")
    _mirror(spec, files)  # status.json is the same: nothing is rewritten
    assert (spec.path / "log.txt").read_text() == "kept"
