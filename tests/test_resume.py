"""Checkpoints and resume: a run killed between tasks or inside a task resumes from its last task-boundary
checkpoint, and with the same seed its final metrics.json equals an uninterrupted run's (timings aside)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from test_contract import deterministic

from fcl_bench import state as S
from fcl_bench.executor import CHECKPOINT
from fcl_bench.store import read_json, run_dir

PLUGIN = Path(__file__).parent / "plugins" / "killer.py"
# 3 tasks x 2 rounds, so a kill can fall between tasks and inside one
OPTS = ("--plugin", PLUGIN, "--methods", "killable", "-o", "tasks=3", "-o", "classes_per_task=2", "-o", "private=4",
        "-o", "public=2", "-o", "rounds_per_task=2", "-o", "killable.buffer_per_class=3")


def _run(cli_subprocess, smoke_opts, out: Path, kill: str | None = None, *extra: str):
    env_before = os.environ.get("FCL_TEST_KILL")
    if kill:
        os.environ["FCL_TEST_KILL"] = kill
    try:
        return cli_subprocess("run", *OPTS, "--out", out, *smoke_opts, *extra)
    finally:
        if env_before is None:
            os.environ.pop("FCL_TEST_KILL", None)
        else:
            os.environ["FCL_TEST_KILL"] = env_before


def _path(out: Path) -> Path:
    return run_dir(out, "smoke", "killable", "synthetic", 42)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, cli_subprocess, smoke_opts):
    out = tmp_path_factory.mktemp("whole")
    done = _run(cli_subprocess, smoke_opts, out)
    assert done.returncode == 0, done.stdout + done.stderr
    assert not (_path(out) / CHECKPOINT).exists()  # checkpoints go away when the run completes
    return read_json(_path(out) / "metrics.json")


@pytest.mark.parametrize("kill, resumed_after", [("start:1", 1), ("start:2", 2), ("round:2:1:1", 2),
                                                 ("round:1:0:0", 1)])
def test_a_killed_run_resumes_and_ends_as_an_uninterrupted_one(uninterrupted, tmp_path, cli_subprocess,
                                                               smoke_opts, kill, resumed_after):
    killed = _run(cli_subprocess, smoke_opts, tmp_path, kill)
    assert killed.returncode == 137, killed.stdout + killed.stderr
    path = _path(tmp_path)
    assert read_json(path / "status.json")["state"] == "running"  # killed: never marked complete
    assert S.load(path / CHECKPOINT)["next_task"] == resumed_after
    done = _run(cli_subprocess, smoke_opts, tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    log = (path / "log.txt").read_text()
    assert f"resumed from the checkpoint after task {resumed_after}/3" in log
    assert read_json(path / "status.json")["state"] == "completed"
    assert deterministic(read_json(path / "metrics.json")) == deterministic(uninterrupted)
    assert not (path / CHECKPOINT).exists()
    assert log.count("task 1/3: acc") == 1 + (resumed_after < 1)  # the tasks before the checkpoint ran once


def test_a_checkpoint_of_another_configuration_is_not_resumed(tmp_path, cli_subprocess, smoke_opts):
    killed = _run(cli_subprocess, smoke_opts, tmp_path, "start:1")
    assert killed.returncode == 137
    done = _run(cli_subprocess, smoke_opts, tmp_path, None, "-o", "killable.lambda_e=2")
    assert done.returncode == 0, done.stdout + done.stderr
    log = (_path(tmp_path) / "log.txt").read_text()
    assert "made by another configuration; restarting" in log
    assert "resumed" not in log


def test_keep_checkpoints_keeps_the_final_state(tmp_path, cli_subprocess, smoke_opts):
    done = _run(cli_subprocess, smoke_opts, tmp_path, None, "--keep-checkpoints")
    assert done.returncode == 0, done.stdout + done.stderr
    st = S.load(_path(tmp_path) / CHECKPOINT)
    assert st["next_task"] == 3 and set(st["clients"]) == {0, 1}
    assert {"theta", "phi", "head", "buffers", "old"} <= set(st["clients"][0])
