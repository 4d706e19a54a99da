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


def _run(cli_subprocess, smoke_opts, out: Path, *extra: str):
    done = cli_subprocess("run", "--methods", ",".join(METHODS), "--plugin", PLUGIN, "--out", out, *smoke_opts,
                          *extra, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    return out


def _path(out: Path, method: str) -> Path:
    return run_dir(out, "smoke", method, "synthetic", 42)


@pytest.fixture(scope="module")
def in_process(tmp_path_factory, cli_subprocess, smoke_opts):
    return _run(cli_subprocess, smoke_opts, tmp_path_factory.mktemp("in-process"))


@pytest.fixture(scope="module")
def simulated(tmp_path_factory, cli_subprocess, smoke_opts):
    return _run(cli_subprocess, smoke_opts, tmp_path_factory.mktemp("flower-sim"), "--executor", "flower-sim")


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
