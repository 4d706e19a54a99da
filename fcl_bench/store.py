"""Results store: ``<out>/<suite>/<method>/<dataset>/seed<k>/`` with ``config.json``, ``scenario.json``,
``metrics.json``, ``rounds.csv``, ``log.txt`` and ``status.json``.

Every file is written atomically (temporary file + ``os.replace``). ``status.json`` says ``running``,
``completed`` or ``failed`` (with the reason). A completed run is skipped on re-run unless forced; a run
found ``running`` or ``failed`` (killed midway, crashed) resumes from its checkpoint when the executor
finds a matching one, else restarts from scratch: its old files are removed first so nothing stale mixes
with the new run.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import pandas as pd


def atomic_write(path: Path, data: str | bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and ``os.replace``: readers see
    the old file or the new one, never half of it; a failed write leaves no temporary file behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp"
    # os.open with 0666 lets the umask decide the mode, as for any file (mkstemp would force 0600)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb" if isinstance(data, bytes) else "w") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_json(path: Path, obj: Any) -> None:
    atomic_write(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def run_dir(out: Path, suite: str, method: str, dataset: str, seed: int) -> Path:
    return Path(out) / suite / method / dataset / f"seed{seed}"


class RunRecord:
    """One run's folder."""

    def __init__(self, path: Path):
        self.path = Path(path)

    @property
    def status(self) -> dict | None:
        p = self.path / "status.json"
        if not p.exists():
            return None
        try:
            return read_json(p)
        except json.JSONDecodeError:
            return None

    def is_complete(self) -> bool:
        s = self.status
        return bool(s) and s.get("state") == "completed" and (self.path / "metrics.json").exists()

    def start(self, keep: tuple[str, ...] = ()) -> None:
        """Begin (or restart cleanly): old files go, except those named in ``keep`` (a resumable checkpoint
        and its log), and status becomes ``running``."""
        if self.path.exists():
            for p in self.path.iterdir():
                if p.name in keep:
                    continue
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p)
                else:
                    p.unlink()
        self.path.mkdir(parents=True, exist_ok=True)
        write_json(self.path / "status.json", {"state": "running", "started": time.time(), "pid": os.getpid()})

    def log(self, line: str) -> None:
        with open(self.path / "log.txt", "a") as f:
            f.write(line.rstrip("\n") + "\n")

    def finish(self, metrics: dict, rounds: pd.DataFrame, seconds: float) -> None:
        atomic_write(self.path / "rounds.csv", rounds.to_csv(index=False))
        write_json(self.path / "metrics.json", metrics)
        write_json(self.path / "status.json", {"state": "completed", "finished": time.time(), "seconds": seconds})

    def fail(self, reason: str, seconds: float, rounds: pd.DataFrame | None = None) -> None:
        if rounds is not None and len(rounds):
            atomic_write(self.path / "rounds.csv", rounds.to_csv(index=False))
        write_json(self.path / "status.json", {"state": "failed", "reason": reason, "finished": time.time(),
                                               "seconds": seconds})


def find_runs(root: Path) -> list[RunRecord]:
    """Every run folder (one holding a ``status.json``) under ``root``, sorted by path."""
    return [RunRecord(p.parent) for p in sorted(Path(root).rglob("status.json"))]


_ID_COLUMNS = ("path", "state", "reason", "suite", "method", "label", "dataset", "seed")


def load_runs(root: Path, include_failed: bool = True) -> pd.DataFrame:
    """Every run under ``root`` as one DataFrame row: identity, status, config and summary metrics
    (``metrics_client`` and ``metrics_global`` columns hold the full per-space dicts)."""
    rows = []
    for rec in find_runs(root):
        status = rec.status or {}
        row: dict[str, Any] = {"path": str(rec.path), "state": status.get("state"), "reason": status.get("reason")}
        cfg_p = rec.path / "config.json"
        if cfg_p.exists():
            cfg = read_json(cfg_p)
            run = cfg.get("run") or {}
            row.update(suite=cfg.get("suite"), method=cfg.get("method"), label=cfg.get("label", cfg.get("method")),
                       dataset=run.get("dataset"), seed=run.get("seed"),
                       scenario_hash=cfg.get("scenario_hash"), run_config=run,
                       method_config=cfg.get("method_config"))
        if rec.is_complete():
            m = read_json(rec.path / "metrics.json")
            row.update({k: m[k] for k in ("final_acc", "avg_incremental_acc", "forgetting", "bwt", "bytes_up",
                                          "bytes_down", "client_flops", "server_flops", "server_seconds",
                                          "wall_seconds") if k in m})
            row["acc"] = m.get("acc")
            row["metrics_client"] = m.get("spaces", {}).get("client")
            row["metrics_global"] = m.get("spaces", {}).get("global")
            row["metrics"] = m
        elif not include_failed:
            continue
        rows.append(row)
    # the identity columns exist even for an empty or config-less store, so filters never hit a KeyError
    df = pd.DataFrame(rows)
    for col in _ID_COLUMNS:
        if col not in df:
            df[col] = None
    return df
