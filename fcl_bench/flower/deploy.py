"""The deployment runtime: a SuperLink and SuperNodes as real processes, runs submitted with ``flwr run``.

:class:`LocalFederation` starts a SuperLink and K SuperNodes on 127.0.0.1 (``fcl-bench flower up
--clients K``), each SuperNode told its client id (``--node-config "partition-id=c"``), each in its own
process group so that stopping it also stops the ClientApp processes it spawned; everything is stopped
on exit, on Ctrl-C and on SIGTERM. Insecure (plain HTTP) connections are refused unless every address is
a loopback address.

:func:`submit` (``fcl-bench run --executor flower --superlink HOST:PORT``) writes the run spec into the
run folder, ships the Flower App (``fcl_bench/flower/app``) with ``flwr run`` and waits; the ServerApp
(:func:`serve_spec`, on the SuperLink's machine) runs the schedule over the grid and writes the result
into the run folder, which the submitting process records in the store like any other run.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

APP_DIR = Path(__file__).parent / "app"
SPEC_FILE, RESULT_FILE = "flower-spec.json", "flower-result.json"


class InsecureAddress(ValueError):
    """Plain HTTP to a non-loopback address."""


def is_loopback(address: str) -> bool:
    host = address.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_insecure(address: str, root_certificates: str | None) -> None:
    if root_certificates is None and not is_loopback(address):
        raise InsecureAddress(
            f"refusing an insecure (unencrypted) connection to {address}: insecure mode is only for "
            "loopback addresses (127.0.0.1, ::1, localhost). For a real federation start the SuperLink "
            "with --ssl-certfile/--ssl-keyfile/--ssl-ca-certfile and pass --root-certificates CA.pem")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(home: Path) -> dict:
    bin_dir = str(Path(sys.executable).parent)  # flower-superlink spawns flower-superexec by name
    return {**os.environ, "FLWR_HOME": str(home), "PATH": bin_dir + os.pathsep + os.environ.get("PATH", "")}


def _wait_port(port: int, proc: subprocess.Popen, what: str, log: Path, timeout: float = 60.0) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode}; see {log}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    raise RuntimeError(f"{what} did not listen on port {port} within {timeout:.0f} s; see {log}")


class LocalFederation:
    """A SuperLink and ``clients`` SuperNodes on 127.0.0.1 (insecure: loopback only). A context manager:
    ``with LocalFederation(2) as fed: ... fed.address``; :meth:`stop` kills every process group started."""

    def __init__(self, clients: int, port: int | None = None, home: Path | None = None):
        if clients < 1:
            raise ValueError("--clients must be at least 1")
        self.clients, self.port = clients, port or free_port()
        self.home = Path(home or tempfile.mkdtemp(prefix="fcl-flower-"))
        self.procs: dict[str, subprocess.Popen] = {}

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _spawn(self, name: str, cmd: list[str]) -> subprocess.Popen:
        log = self.home / f"{name}.log"
        p = subprocess.Popen(cmd, stdout=open(log, "wb"), stderr=subprocess.STDOUT, env=_env(self.home),
                             start_new_session=True, cwd=self.home)
        self.procs[name] = p
        return p

    def start(self) -> LocalFederation:
        self.home.mkdir(parents=True, exist_ok=True)
        try:
            link = self._spawn("superlink", ["flower-superlink", "--insecure", "--host", "127.0.0.1", "--port",
                                             str(self.port), "--disable-runtime-dependency-installation"])
            _wait_port(self.port, link, "the SuperLink", self.home / "superlink.log")
            for c in range(self.clients):
                port = free_port()
                node = self._spawn(f"supernode-{c}", [
                    "flower-supernode", "--insecure", "--superlink", self.address, "--host", "127.0.0.1",
                    "--port", str(port), "--node-config", f"partition-id={c}"])
                _wait_port(port, node, f"SuperNode {c}", self.home / f"supernode-{c}.log")
        except BaseException:
            self.stop()
            raise
        return self

    def kill_node(self, c: int) -> None:
        """Kill SuperNode ``c`` and its ClientApp processes at once (a crashed client machine)."""
        _killpg(self.procs[f"supernode-{c}"], signal.SIGKILL)

    def pgids(self) -> list[int]:
        return [p.pid for p in self.procs.values()]

    def stop(self) -> None:
        for p in reversed(list(self.procs.values())):
            _killpg(p, signal.SIGTERM)
        t0 = time.monotonic()
        for p in self.procs.values():
            try:
                p.wait(timeout=max(0.1, 10 - (time.monotonic() - t0)))
            except subprocess.TimeoutExpired:
                pass
        for p in self.procs.values():  # whatever is left of each group (ClientApp, SuperExec processes)
            _killpg(p, signal.SIGKILL)
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass

    def __enter__(self) -> LocalFederation:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _killpg(p: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(p.pid, sig)  # start_new_session: the group id is the leader's pid
    except (ProcessLookupError, PermissionError):
        pass


def group_alive(pgid: int) -> bool:
    """Whether any process of group ``pgid`` still runs (zombies excluded)."""
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


# -- submitting a run ----------------------------------------------------------------------------------
def submit(spec, method_cfg, run_path: Path, log) -> Any:
    """Run ``spec`` through the SuperLink at ``spec.superlink`` with ``flwr run``; returns a RunResult."""
    import pandas as pd

    from fcl_bench.federation import RunResult
    from fcl_bench.flower.server import DEFAULT_TIMEOUT

    address, certs = spec.superlink, spec.root_certificates
    if not address:
        raise ValueError("--executor flower needs --superlink HOST:PORT (e.g. from `fcl-bench flower up`)")
    check_insecure(address, certs)
    result_path = (run_path / RESULT_FILE).resolve()
    result_path.unlink(missing_ok=True)
    (run_path / SPEC_FILE).write_text(json.dumps({"spec": _spec_dict(spec), "result": str(result_path),
                                                  "timeout": spec.flower_timeout or DEFAULT_TIMEOUT}))
    home = Path(tempfile.mkdtemp(prefix="fcl-flwr-cli-"))
    conn = {"address": address} | ({"root-certificates": str(Path(certs).resolve())} if certs else {"insecure": True})
    lines = ["[superlink]", 'default = "fcl"', "", "[superlink.fcl]"] + [
        f"{k} = {json.dumps(v)}" for k, v in conn.items()]
    (home / "config.toml").write_text("\n".join(lines) + "\n")
    t0 = time.perf_counter()
    cmd = [str(Path(sys.executable).parent / "flwr"), "run", str(APP_DIR), "fcl", "--stream",
           "--run-config", f"spec={json.dumps(str((run_path / SPEC_FILE).resolve()))}"]
    log(f"   flwr run on {address}")
    with open(run_path / "flower.log", "wb") as out:
        try:
            proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=_env(home), cwd=home)
        except KeyboardInterrupt:  # stop the run on the SuperLink too, not only our flwr client
            m = re.search(r"started run (\d+)", (run_path / "flower.log").read_text(errors="replace"))
            if m:
                subprocess.run([cmd[0], "stop", m.group(1), "fcl"], env=_env(home), cwd=home,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=30)
            raise
    shutil.rmtree(home, ignore_errors=True)  # the flwr client's config, written for this run only
    if not result_path.exists():
        tail = (run_path / "flower.log").read_text(errors="replace")[-2000:]
        raise RuntimeError(f"the Flower run wrote no result (flwr run exited {proc.returncode}); "
                           f"flower.log ends: {tail}")
    res = json.loads(result_path.read_text())
    result_path.unlink()
    if "error" in res:
        raise RuntimeError(res["error"])
    rounds = pd.read_json(run_path / "flower-rounds.json", orient="records")
    (run_path / "flower-rounds.json").unlink()
    log(f"   Flower run took {time.perf_counter() - t0:.1f} s end to end")
    return RunResult(metrics=res["metrics"], rounds=rounds, seconds=res["seconds"], method_config=method_cfg)


def _spec_dict(spec) -> dict:
    d = dataclasses.asdict(spec)
    d["plugins"] = [str(Path(p).resolve()) for p in spec.plugins]
    return d


def serve_spec(grid, spec_path: Path) -> None:
    """On the SuperLink's machine: run the spec over ``grid`` and write the result (or the failure)."""
    from fcl_bench import config as C
    from fcl_bench import registry
    from fcl_bench.executor import RunSpec, workspace_for
    from fcl_bench.flower.server import FlowerFederation, describe_spec

    job = json.loads(spec_path.read_text())
    out = Path(job["result"])
    try:
        d = job["spec"]
        d["run"] = C.RunConfig(**d["run"])
        d["plugins"] = tuple(d["plugins"])
        spec = RunSpec(**d)
        for p in spec.plugins:
            registry.load_plugin_file(p)
        cls = registry.get_method(spec.method)
        mcfg = C.apply_overrides(cls.Config(), spec.method_overrides, cls.name)
        ws = workspace_for(spec.run, progress=False)
        fed = FlowerFederation(cls, mcfg, ws, spec.run, log=lambda line: print(line, flush=True), progress=False,
                               flops=spec.flops, setup=describe_spec(spec), timeout=float(job["timeout"]))
        fed.connect(grid, (spec_path.parent / "scenario.json").read_text(encoding="ascii"))
        res = fed.run()
        res.rounds.to_json(out.parent / "flower-rounds.json", orient="records")
        out.write_text(json.dumps({"metrics": res.metrics, "seconds": res.seconds}, default=_num))
    except BaseException as e:
        out.write_text(json.dumps({"error": f"{type(e).__name__}: {e}"}))
        raise


def _num(x):
    import numpy as np

    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    raise TypeError(type(x).__name__)
