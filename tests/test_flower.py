"""Real federated execution on Flower: the generic ServerApp/ClientApp run any method unchanged and give
the in-process run's metrics bit for bit, with the same bytes counted on the wire, under the simulation
runtime and through a localhost SuperLink with SuperNodes; a killed SuperNode fails the run cleanly."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from test_contract import deterministic

from fcl_bench.store import read_json, run_dir

pytest.importorskip("flwr")  # CI installs the extra: there these tests run

PLUGIN = Path(__file__).parent / "plugins" / "contract_plugin.py"
METHODS = ("fedavg", "fedlscl", "contract-protoavg")


def _run(cli_subprocess, smoke_opts, out: Path, *extra: str, env: dict[str, str] | None = None):
    done = cli_subprocess("run", "--methods", ",".join(METHODS), "--plugin", PLUGIN, "--out", out, *smoke_opts,
                          *extra, timeout=900, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    return out


def _path(out: Path, method: str) -> Path:
    return run_dir(out, "smoke", method, "synthetic", 42)


@pytest.fixture(scope="module")
def in_process(tmp_path_factory, cli_subprocess, smoke_opts):
    return _run(cli_subprocess, smoke_opts, tmp_path_factory.mktemp("in-process"))


@pytest.fixture(scope="module")
def sim_home(tmp_path_factory) -> Path:
    """The simulated runs' home folder: Flower's default state folder (~/.flwr) lives there."""
    return tmp_path_factory.mktemp("home")


@pytest.fixture(scope="module")
def simulated(tmp_path_factory, cli_subprocess, smoke_opts, sim_home):
    return _run(cli_subprocess, smoke_opts, tmp_path_factory.mktemp("flower-sim"), "--executor", "flower-sim",
                env={"HOME": str(sim_home)})


def test_the_simulation_writes_nothing_outside_the_output_folder_and_the_cache(simulated, sim_home):
    assert sorted(p.relative_to(sim_home).as_posix() for p in sim_home.rglob("*")) == []


def _check_equal(ref: Path, got: Path, method: str) -> dict:
    a, b = read_json(_path(ref, method) / "metrics.json"), read_json(_path(got, method) / "metrics.json")
    flower = b.pop("flower")
    assert "flower" not in a
    assert deterministic(b) == deterministic(a)  # bit for bit: accuracy matrices, bytes, FLOPs
    ra, rb = pd.read_csv(_path(ref, method) / "rounds.csv"), pd.read_csv(_path(got, method) / "rounds.csv")
    cols = ["task", "round", "client", "phase", "bytes_up", "bytes_down", "server_bytes_sent", "flops"]
    pd.testing.assert_frame_equal(ra[cols], rb[cols])
    # the payloads Flower carried are the wire's safetensors bytes, counted once each
    assert flower["payload_bytes_up"] == a["bytes_up"] and flower["payload_bytes_down"] == a["bytes_down"]
    # Flower's own messages carry them plus framing: more bytes, but not many more
    assert flower["message_bytes_up"] > flower["payload_bytes_up"]
    assert flower["message_bytes_down"] > flower["payload_bytes_down"]
    assert 0 < flower["framing_overhead"] < 0.2
    return flower


@pytest.mark.parametrize("method", METHODS)
def test_the_simulation_runtime_equals_the_in_process_run(in_process, simulated, method):
    flower = _check_equal(in_process, simulated, method)
    # per task: start + rounds + end for every client (smoke: 2 clients, 2 tasks, 2 rounds), and receives
    assert flower["messages"] % 2 == 0 and flower["messages"] >= 2 * 2 * (1 + 2 + 1) * 2
    log = (_path(simulated, method) / "log.txt").read_text()
    assert "Flower: 2 clients on nodes" in log


# -- the deployment runtime: a SuperLink and SuperNodes as processes on 127.0.0.1 ------------------------
# one method: the transport is what differs from the simulation (which runs all three), and Fed-LSCL's
# payloads (generators, feature sets, per-task downloads) are the richest; each deployed run costs minutes
DEPLOYED = ("fedlscl",)


@pytest.fixture(scope="module")
def deployed(tmp_path_factory, cli_subprocess, smoke_opts):
    from fcl_bench.flower.deploy import LocalFederation, group_alive

    out = tmp_path_factory.mktemp("flower-deployed")
    with LocalFederation(2, home=tmp_path_factory.mktemp("flwr-home")) as fed:
        groups = fed.pgids()
        done = cli_subprocess("run", "--methods", ",".join(DEPLOYED), "--out", out, *smoke_opts, "--executor",
                              "flower", "--superlink", fed.address, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    assert not any(group_alive(g) for g in groups)  # everything started is stopped
    return out


@pytest.mark.parametrize("method", DEPLOYED)
def test_a_localhost_superlink_with_two_supernodes_equals_the_in_process_run(in_process, deployed, method):
    _check_equal(in_process, deployed, method)
    assert "Flower: 2 clients on nodes" in (_path(deployed, method) / "flower.log").read_text()


def test_insecure_mode_is_refused_off_loopback(cli):
    res = cli("run", "--methods", "fedavg", "--preset", "smoke", "--executor", "flower", "--superlink",
              "192.0.2.7:9093", "--out", "/tmp/never-written")
    assert res.exit_code != 0
    assert "insecure mode is only for loopback addresses" in res.output and "--root-certificates" in res.output


def test_killing_a_supernode_mid_run_fails_the_run_naming_the_client(tmp_path, smoke_opts):
    import os
    import subprocess
    import sys
    import time

    from fcl_bench.flower.deploy import LocalFederation, group_alive

    out = tmp_path / "results"
    path = run_dir(out, "smoke", "fedavg", "synthetic", 42)
    script = Path(sys.executable).parent / "fcl-bench"
    with LocalFederation(2, home=tmp_path / "flwr-home") as fed:
        groups = fed.pgids()
        proc = subprocess.Popen([str(script), "run", "--methods", "fedavg", "--out", str(out), *smoke_opts,
                                 "--executor", "flower", "--superlink", fed.address, "--flower-timeout", "30"],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
        flog = path / "flower.log"
        for _ in range(600):  # the clients are set up and the first task has begun
            if flog.exists() and "Flower: 2 clients on nodes" in flog.read_text(errors="replace"):
                break
            time.sleep(0.5)
        fed.kill_node(1)
        output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 1, output
    status = read_json(path / "status.json")
    assert status["state"] == "failed"
    assert "client 1" in status["reason"], status["reason"]
    assert not (path / "metrics.json").exists() and not (path / "rounds.csv").exists()  # nothing corrupted
    assert not any(group_alive(g) for g in groups)  # no orphan SuperNode, SuperExec or ClientApp
