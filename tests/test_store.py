"""Results store: atomic writes, skip / force / restart of runs, loading runs as a DataFrame."""

from __future__ import annotations

import json
import os

import pandas as pd
import pytest

from fcl_bench.store import RunRecord, atomic_write, find_runs, load_runs, read_json, run_dir, write_json


def test_atomic_write_replaces_the_file_and_leaves_no_temporary_files(tmp_path):
    path = tmp_path / "deep" / "metrics.json"
    write_json(path, {"a": 1})
    write_json(path, {"a": 2})
    atomic_write(tmp_path / "deep" / "blob.bin", b"\x00\x01")
    assert read_json(path) == {"a": 2}
    assert sorted(p.name for p in path.parent.iterdir()) == ["blob.bin", "metrics.json"]
    # like any file the user writes: the umask decides, not a private 0600 temporary file
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "status.json"
    write_json(path, {"state": "completed"})

    class Unserialisable:
        def __str__(self):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        write_json(path, {"x": Unserialisable()})
    with pytest.raises(TypeError):
        atomic_write(path, 12345)  # neither str nor bytes: fails inside the write
    assert read_json(path) == {"state": "completed"}
    assert [p.name for p in tmp_path.iterdir()] == ["status.json"]


def test_run_record_lifecycle(tmp_path):
    rec = RunRecord(run_dir(tmp_path, "suite", "fedavg", "synthetic", 7))
    assert rec.path == tmp_path / "suite" / "fedavg" / "synthetic" / "seed7"
    assert rec.status is None and not rec.is_complete()
    rec.start()
    rec.log("hello")
    assert rec.status["state"] == "running" and not rec.is_complete()
    rec.finish({"final_acc": 0.5}, pd.DataFrame({"task": [0], "bytes_up": [10]}), seconds=1.0)
    assert rec.is_complete() and rec.status["state"] == "completed"
    assert pd.read_csv(rec.path / "rounds.csv").bytes_up.tolist() == [10]
    rec.start()  # a restart removes everything of the previous attempt
    assert sorted(p.name for p in rec.path.iterdir()) == ["status.json"]
    rec.fail("ValueError: bad", seconds=0.1)
    assert rec.status == {**rec.status, "state": "failed", "reason": "ValueError: bad"} and not rec.is_complete()


def test_completed_needs_metrics_and_a_corrupt_status_is_not_completed(tmp_path):
    rec = RunRecord(tmp_path / "run")
    rec.path.mkdir()
    write_json(rec.path / "status.json", {"state": "completed"})
    assert not rec.is_complete()  # no metrics.json
    (rec.path / "status.json").write_text('{"state": "compl')  # a torn write by a foreign tool
    assert rec.status is None and not rec.is_complete()


def test_load_runs_on_an_empty_store_has_the_identity_columns(tmp_path):
    df = load_runs(tmp_path)
    assert len(df) == 0 and {"method", "state", "seed", "dataset"} <= set(df.columns)


# -- through the CLI, sharing the suite run of conftest -------------------------------------------------

def _status(out, method):
    return read_json(run_dir(out, "smoke", method, "synthetic", 42) / "status.json")


def test_a_completed_run_is_skipped_and_forced_reruns_run_again(suite_run, cli, smoke_opts, monkeypatch):
    from fcl_bench import workspace

    out, first = suite_run
    before = _status(out, "fedavg")
    assert before["state"] == "completed", first.output
    calls = []
    real_create = workspace.Workspace.create
    monkeypatch.setattr(workspace.Workspace, "create", lambda *a, **k: calls.append(1) or real_create(*a, **k))
    res = cli("run", "--methods", "fedavg", "--out", out, *smoke_opts)
    assert res.exit_code == 0, res.output
    assert "skip fedavg seed 42" in res.output and "--force" in res.output
    assert calls == []  # a skip loads no data and trains nothing: it is fast by construction
    assert _status(out, "fedavg") == before  # untouched
    res = cli("run", "--methods", "fedavg", "--out", out, "--force", *smoke_opts)
    assert res.exit_code == 0, res.output
    after = _status(out, "fedavg")
    assert after["state"] == "completed" and after["finished"] > before["finished"]
    assert "skip" not in res.output and calls == [1]


def test_a_run_killed_midway_is_restarted_cleanly(suite_run, cli, smoke_opts):
    out, _ = suite_run
    path = run_dir(out, "smoke", "fedprox", "synthetic", 42)
    path.mkdir(parents=True)
    write_json(path / "status.json", {"state": "running", "pid": 999999})
    (path / "stale.txt").write_text("left over by the killed run")
    (path / ".metrics.json.123.tmp").write_text("{half")
    (path / "log.txt").write_text("old log line\n")
    res = cli("run", "--methods", "fedprox", "--out", out, *smoke_opts)
    assert res.exit_code == 0, res.output
    assert _status(out, "fedprox")["state"] == "completed"
    names = {p.name for p in path.iterdir()}
    assert names == {"config.json", "scenario.json", "metrics.json", "rounds.csv", "log.txt", "status.json"}
    assert "old log line" not in (path / "log.txt").read_text()
    assert not list(out.rglob("*.tmp"))


def test_load_runs_has_one_row_per_run(suite_run):
    out, _ = suite_run
    df = load_runs(out)
    assert len(df) == len(find_runs(out)) >= 3
    assert df.path.is_unique
    by_method = df.set_index("method")
    fedavg = by_method.loc["fedavg"]
    assert fedavg.state == "completed" and fedavg.dataset == "synthetic" and fedavg.seed == 42
    assert fedavg.final_acc == pytest.approx(fedavg.metrics["final_acc"]) and fedavg.bytes_up > 0
    assert fedavg.run_config["small_models"] == ["test_resnet"]
    assert by_method.loc["boom"].state == "failed" and "boom from the plugin" in by_method.loc["boom"].reason
    completed = load_runs(out, include_failed=False)
    assert set(completed.state) == {"completed"} and "boom" not in set(completed.method)
    json.dumps(fedavg.metrics)  # the full metrics stay JSON-ready
