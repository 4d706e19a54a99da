"""Hardening: results never escape --out, damaged run folders never stop `run` or `report`, every user error
exits 2 with a message naming the value and the fix, nonsense never succeeds silently, one writer per run
folder."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from fcl_bench.store import RunRecord, read_json, run_dir


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


# -- containment --------------------------------------------------------------------------------------

def test_a_suite_named_dot_dot_writes_and_deletes_nothing_above_out(cli, tmp_path, smoke_opts):
    (tmp_path / "keep.txt").write_text("a file that was already there")
    for name, label in (("..", "fedavg"), ("ok", ".."), ("ok", "a/b"), ("/abs", "x")):
        suite = tmp_path / f"suite-{len(name)}-{len(label)}.json"
        suite.write_text(json.dumps({"name": name, "runs": [{"method": "fedavg", "label": label}]}))
        before = _tree(tmp_path)
        res = cli("run", "--suite", suite, "--out", tmp_path / "out", *smoke_opts)
        assert res.exit_code == 2, res.output
        assert "plain name" in res.output or "may hold only" in res.output
        assert _tree(tmp_path) == before and (tmp_path / "keep.txt").exists()


def test_a_swept_value_cannot_escape_through_the_label(cli, tmp_path, smoke_opts):
    suite = tmp_path / "s.json"
    suite.write_text(json.dumps({"name": "s", "runs": [{"method": "fedlscl", "label": "x{value}",
                                                        "sweep": {"key": "target", "values": ["/../../qv"]}}]}))
    res = cli("run", "--suite", suite, "--out", tmp_path / "out", *smoke_opts)
    assert res.exit_code == 2 and "plain name" in res.output and not (tmp_path / "out").exists()


def test_a_plugin_method_name_with_a_slash_is_refused(cli, tmp_path, smoke_opts):
    plugin = tmp_path / "p.py"
    plugin.write_text(textwrap.dedent('''
        from fcl_bench.methods.fedavg import FedAvg

        class Escape(FedAvg):
            name = "/tmp/escape"
    '''))
    res = cli("run", "--plugin", plugin, "--methods", "fedavg", "--out", tmp_path / "out", *smoke_opts)
    assert res.exit_code == 2 and "method name '/tmp/escape'" in res.output and "plain name" in res.output
    assert not Path("/tmp/escape").exists()


def test_a_suite_cannot_set_machine_paths(cli, tmp_path, smoke_opts):
    suite = tmp_path / "s.json"
    suite.write_text(json.dumps({"name": "s", "runs": [{"method": "fedavg",
                                                        "run_overrides": {"data_root": "../../../etc"}}]}))
    res = cli("run", "--suite", suite, "--out", tmp_path / "out", *smoke_opts)
    assert res.exit_code == 2 and "may not set data_root" in res.output and "--data-root" in res.output


def test_a_run_folder_that_resolves_outside_out_is_never_written(cli, tmp_path, smoke_opts):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious.txt").write_text("x")
    out = tmp_path / "out"
    (out / "smoke").mkdir(parents=True)
    os.symlink(outside, out / "smoke" / "fedavg")  # out/smoke/fedavg -> outside
    res = cli("run", "--methods", "fedavg", "--out", out, *smoke_opts)
    assert res.exit_code == 1 and "outside" in res.output
    assert _tree(outside) == {"precious.txt"}


def test_a_data_root_that_is_a_file_is_an_error_before_any_work(cli, tmp_path, smoke_opts):
    f = tmp_path / "data"
    f.write_text("not a folder")
    res = cli("run", "--methods", "fedavg", "--data-root", f, "--out", tmp_path / "out", *smoke_opts)
    assert res.exit_code == 2 and "is a file" in res.output and not (tmp_path / "out").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into any folder")
def test_a_read_only_data_root_is_an_error_when_generation_needs_it(cli, tmp_path, smoke_opts):
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o500)
    res = cli("run", "--methods", "fedavg", "--data-root", ro, "--out", tmp_path / "out", *smoke_opts)
    assert res.exit_code == 2 and "not a writable folder" in res.output


# -- damaged run folders ------------------------------------------------------------------------------

@pytest.mark.parametrize("name, content", [("metrics.json", '{"final_acc": 0.'), ("status.json", ""),
                                           ("config.json", "[1, 2]"), ("metrics.json", '"a string"')])
def test_a_damaged_run_file_is_named_redone_and_listed_by_report(cli, tmp_path, smoke_opts, name, content):
    out = tmp_path / "out"
    assert cli("run", "--methods", "fedavg,fedprox", "--out", out, *smoke_opts).exit_code == 0
    path = run_dir(out, "smoke", "fedavg", "synthetic", 42)
    (path / name).write_text(content)
    rep = cli("report", out / "smoke", "--out", tmp_path / "rep")
    assert rep.exit_code == 0 and rep.exception is None, rep.output
    assert "unreadable" in (tmp_path / "rep" / "report.md").read_text()
    res = cli("run", "--methods", "fedavg,fedprox", "--out", out, *smoke_opts)
    assert res.exit_code == 0, res.output
    assert res.output.count(f"unreadable {name}") <= 1 and "running it again" in res.output
    assert "skip fedprox" in res.output  # the rest of the plan is untouched
    assert RunRecord(path).is_complete() and read_json(path / "metrics.json")["final_acc"] >= 0


# -- user errors: status 2, a message, no traceback ----------------------------------------------------

@pytest.mark.parametrize("args, needle", [
    (["run", "--methods", "fedavg", "--threads", "100000000"], "--threads"),
    (["run", "--methods", "fedavg", "--seeds", "99999999999999999999"], "out of range"),
    (["run", "--methods", "fedavg", "--seeds", "-1"], "out of range"),
    (["run", "--methods", "fedavg", "--out", "/dev/null/x"], "/dev/null is a file"),
    (["scenario", "--preset", "smoke", "--json", "/dev/null/x"], "/dev/null is a file"),
    (["pretrain", "--device", "bogus"], "--device must be"),
    (["pretrain", "--device", "cuda:7"], "--device"),
    (["run", "--methods", ""], "names no method"),
    (["run", "--methods", " , "], "names no method"),
    (["run", "--methods", "fedavg", "--seeds", ","], "names no seed"),
    (["run", "--methods", "fedavg", "--out", ""], "--out is empty"),
    (["scenario", "--preset", "smoke", "-o", "fedavg.lr=1"], "run overrides only"),
    (["run", "--methods", "fedavg", "-o", "fedavg.lr=abc"], "not a valid float"),
])
def test_user_errors_exit_2_with_a_message(cli, args, needle):
    res = cli(*args)
    assert res.exit_code == 2, res.output
    assert needle in res.output and "Traceback" not in res.output
    assert res.exception is None or isinstance(res.exception, SystemExit)


def test_a_text_file_as_weights_is_a_clear_error(cli, tmp_path, smoke_opts):
    w = tmp_path / "weights.pt"
    w.write_text("hello")
    res = cli("run", "--methods", "fedvit", "--foundation-weights", w, "--out", tmp_path / "o", *smoke_opts)
    assert res.exit_code == 2 and "neither a safetensors file nor a torch state dict" in res.output
    assert not (tmp_path / "o").exists()


def test_a_dataset_name_in_other_case_is_the_same_results_tree(cli, tmp_path, smoke_opts):
    out = tmp_path / "out"
    assert cli("run", "--methods", "fedavg", "--out", out, *smoke_opts).exit_code == 0
    res = cli("run", "--methods", "fedavg", "--dataset", "SYNTHETIC", "--out", out, *smoke_opts)
    assert res.exit_code == 0 and "skip fedavg" in res.output
    assert sorted(p.name for p in (out / "smoke" / "fedavg").iterdir()) == ["synthetic"]


# -- one writer per run folder ------------------------------------------------------------------------

def _hold_lock(path: str, ready, release) -> None:
    rec = RunRecord(Path(path))
    assert rec.try_lock() is None
    ready.set()
    release.wait(30)


def test_a_locked_run_names_its_holder_and_a_dead_holders_lock_is_taken_over(tmp_path):
    path = tmp_path / "run"
    ctx = mp.get_context("spawn")
    ready, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold_lock, args=(str(path), ready, release))
    holder.start()
    assert ready.wait(60)
    rec = RunRecord(path)
    assert rec.try_lock() == holder.pid
    holder.kill()  # killed while holding it: the kernel drops the lock
    holder.join()
    assert rec.try_lock() is None
    rec.unlock()
    assert not (path / ".lock").exists()


def test_two_identical_commands_started_together_run_it_once(tmp_path, smoke_opts):
    script = Path(sys.executable).parent / "fcl-bench"
    cmd = [str(script), "run", "--methods", "fedlscl", "--out", str(tmp_path), *smoke_opts]
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    lock = run_dir(tmp_path, "smoke", "fedlscl", "synthetic", 42) / ".lock"
    t0 = time.time()
    while not lock.exists() and time.time() - t0 < 120:
        time.sleep(0.05)
    second = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    out1, err1 = first.communicate(timeout=300)
    assert first.returncode == 0 and second.returncode == 0, (out1, err1, second.stdout, second.stderr)
    assert f"running in pid {first.pid}" in second.stdout or "completed in" in second.stdout
    path = run_dir(tmp_path, "smoke", "fedlscl", "synthetic", 42)
    assert read_json(path / "status.json")["state"] == "completed"
    assert (path / "log.txt").read_text().count("== fedlscl (fedlscl)") == 1


def test_a_dataset_registered_under_an_unsafe_name_is_refused():
    from fcl_bench.datasets import DatasetEntry, DatasetError, register_dataset

    for name in ("../up", "a/b", "..", "Upper"):
        with pytest.raises(DatasetError, match="dataset name"):
            register_dataset(DatasetEntry(name, lambda *a: None, "x", needs_root=False, how_to_get=""))
