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
import fcntl
import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import pandas as pd

from fcl_bench.paths import PathError, check_inside, check_token

LOCK = ".lock"
_METRIC_KEYS = {"final_acc"}


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
    """``out/suite/method/dataset/seed<k>``; every part must be a plain name (:func:`check_token`)."""
    for value, what in ((suite, "suite name"), (method, "label"), (dataset, "dataset name")):
        check_token(value, what)
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise PathError(f"seed {seed!r} must be a non-negative integer")
    return Path(out) / suite / method / dataset / f"seed{seed}"


class RunRecord:
    """One run's folder. ``root`` (the results folder): the run folder must resolve inside it before
    anything in it is deleted."""

    def __init__(self, path: Path, root: Path | None = None):
        self.path = Path(path)
        self.root = Path(root) if root is not None else None

    def read(self, name: str) -> dict | None:
        """``name`` (a JSON file of this run) as a dict, or None when it is missing or unreadable."""
        try:
            obj = read_json(self.path / name)
        except (OSError, ValueError):
            return None
        return obj if isinstance(obj, dict) else None

    def damage(self) -> str | None:
        """What makes this run folder unreadable (a present but truncated, empty or non-object JSON file), or
        None."""
        bad = []
        for name in ("status.json", "config.json", "metrics.json"):
            if (self.path / name).exists() and self.read(name) is None:
                bad.append(name)
        metrics = self.read("metrics.json")
        if metrics is not None and not _METRIC_KEYS <= set(metrics):
            bad.append("metrics.json (keys missing)")
        return f"unreadable {', '.join(bad)}" if bad else None

    @property
    def status(self) -> dict | None:
        s = self.read("status.json")
        return s if s is not None and isinstance(s.get("state"), str) else None

    def is_complete(self) -> bool:
        s = self.status
        return bool(s) and s.get("state") == "completed" and self.damage() is None \
            and self.read("metrics.json") is not None

    # -- one writer per run folder ------------------------------------------------------------------
    def try_lock(self) -> int | None:
        """Take this run's lock (``.lock`` in its folder, held until :meth:`unlock` or the process ends):
        None when taken, else the pid of the process holding it (-1 if unknown). The kernel releases the
        lock of a killed process, so a stale lock is simply taken over; the file goes when it is unlocked."""
        if self.root is not None:
            check_inside(self.path, self.root, "run folder")
        self.path.mkdir(parents=True, exist_ok=True)
        lock = self.path / LOCK
        while True:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                try:
                    pid = int(os.read(fd, 32).decode().strip() or -1)
                except ValueError:
                    pid = -1
                os.close(fd)
                return pid
            try:  # the holder we waited on may have removed the file: lock the one that is there now
                same = os.fstat(fd).st_ino == os.stat(lock).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._lock_fd = fd
        return None

    def unlock(self) -> None:
        fd = getattr(self, "_lock_fd", None)
        if fd is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path / LOCK)
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
            self._lock_fd = None

    def start(self, keep: tuple[str, ...] = ()) -> None:
        """Begin (or restart cleanly): old files go, except those named in ``keep`` (a resumable checkpoint
        and its log), and status becomes ``running``."""
        if self.root is not None:
            check_inside(self.path, self.root, "run folder")
        if self.path.exists():
            for p in self.path.iterdir():
                if p.name in keep or p.name == LOCK:
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
        damage = rec.damage()
        if damage:  # listed, never a traceback
            row.update(state="unreadable", reason=damage)
        cfg = rec.read("config.json")
        if cfg is not None:
            run = cfg.get("run") if isinstance(cfg.get("run"), dict) else {}
            row.update(suite=cfg.get("suite"), method=cfg.get("method"), label=cfg.get("label", cfg.get("method")),
                       dataset=run.get("dataset"), seed=run.get("seed"),
                       scenario_hash=cfg.get("scenario_hash"), run_config=run,
                       method_config=cfg.get("method_config"))
        if rec.is_complete():
            m = rec.read("metrics.json")
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
