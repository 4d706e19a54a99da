"""The Ray executor: every run of a plan is one Ray task calling :func:`fcl_bench.executor.run_one`.

``fcl-bench run ... --executor ray [--ray-address auto|HOST:PORT] [--cpus-per-run N] [--gpus-per-run F]``.

* **Ray.** Without ``--ray-address`` the driver starts a local Ray with this machine's CPUs (the ones this
  process may use), its GPUs, a 200 MB object store (tasks pass only run specs and summary rows) and no
  dashboard, and stops it at the end (a new instance even when ``$RAY_ADDRESS`` is set or ``ray start``
  runs on this machine); up to CPUs / ``--cpus-per-run`` runs execute at once. With
  ``--ray-address`` it joins a running cluster (``auto``: the one started on this node by ``ray start``).
  A Ray already initialised in the process (a notebook, the tests) is used as it is.
* **Resources.** Each task asks for ``--cpus-per-run`` CPUs (default 1) and ``--gpus-per-run`` GPUs
  (default 0; fractions let several small runs share a card: Ray sets ``CUDA_VISIBLE_DEVICES``, so the
  default ``--device auto`` finds the card given, and a task that asks for none sees no GPU). Torch in a
  task uses ``--threads`` threads, by default the task's CPUs.
* **Workspace.** Workers build the workspace (data, scenario, foundation weights, feature cache) from the
  cache folder, ``$FCL_BENCH_CACHE``; a worker process keeps its last workspace for its next run, as the
  in-process executor does. The driver's ``FCL_*`` environment variables (the cache path among them) are
  set in every task, so workers on this machine share the driver's cache. On a cluster, a cache path that
  every node can read and write is shared; a path local to each node (or ``$FCL_BENCH_CACHE`` unset: each
  node's ``~/.cache/fcl-bench``) is filled by the first task on that node, under the cache's own locks.
* **Store.** The driver skips completed runs before submitting anything (so its ``--out`` is the single
  source of truth); workers run :func:`run_one`, which takes the run folder's lock, resumes from a matching
  checkpoint and writes the final status, exactly as in-process. Each task returns its run folder's small
  files (not the checkpoint); when the driver's copy differs (``--out`` is not on a filesystem shared with
  that node) the driver writes them into its store under the same lock, ``status.json`` last.
* **Faults.** A task whose worker dies (killed, out of memory, node lost) is retried ``RETRIES`` times
  (Ray's ``max_retries``); the retry resumes from the run's last task-boundary checkpoint. A run that still
  fails is recorded failed with the reason (by the worker for an exception, else by the driver under the
  run's lock) and the other runs go on. Exceptions are not retried (``retry_exceptions=False``): they are
  deterministic and :func:`run_one` records them. Ctrl-C cancels every pending task and interrupts running
  ones (``ray.cancel``), which record ``failed: interrupted``; ``completed`` is written only after a run's
  metrics, so no half-written run is ever marked complete.
* **Progress.** Runs done / running / failed with elapsed time and ETA: a bar on a terminal, plain lines
  otherwise (and one line per finished run either way).
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
import uuid
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from fcl_bench.executor import PlanError, RunSpec, run_one, summary_row
from fcl_bench.progress import format_seconds, is_terminal
from fcl_bench.store import LOCK, RunRecord, atomic_write

#: how many times a task whose worker died is run again (Ray's ``max_retries``)
RETRIES = 2
#: the object store of a local Ray (bytes): tasks pass specs and summary rows only
OBJECT_STORE_BYTES = 200 * 2**20
#: files of a run folder the driver copies into its store when it does not see the worker's
_SKIP_FILES = (LOCK, "checkpoint.safetensors")
_MISSING = "--executor ray needs Ray, an optional extra: pip install 'fcl-bench[ray]'"


class RayUnavailable(RuntimeError):
    """Ray is not installed (or cannot be reached); the message names what to do."""


def import_ray():
    """The ``ray`` module, or :class:`RayUnavailable` naming the extra to install."""
    try:
        import ray
    except ImportError:
        raise RayUnavailable(_MISSING) from None
    return ray


def local_cpus() -> int:
    """The CPUs this process may run on (its affinity), which a local Ray is given."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def worker_env() -> dict[str, str]:
    """What every task sets in its environment: the driver's ``FCL_*`` variables (cache path, test hooks)."""
    return {k: v for k, v in os.environ.items() if k.startswith("FCL_")}


# -- the task -----------------------------------------------------------------------------------------
def _run_folder_files(path: Path) -> dict[str, bytes]:
    out = {}
    if path.is_dir():
        for p in sorted(path.iterdir()):
            if p.is_file() and p.name not in _SKIP_FILES and not p.name.startswith("."):
                out[p.name] = p.read_bytes()
    return out


def run_task(spec: RunSpec, env: dict[str, str], cwd: str, threads: int, user_errors: tuple, marker: str) -> dict:
    """What a Ray worker runs for one spec: :func:`run_one`, quiet, with the driver's environment and working
    folder (where it exists on the worker's node: relative paths then mean the same); returns the summary row
    plus the run folder's files (``files``) and the worker's host (``node``)."""
    import socket

    import torch

    if os.path.isdir(cwd):
        os.chdir(cwd)
    for k in [k for k in os.environ if k.startswith("FCL_") and k not in env]:  # a reused worker's last run
        del os.environ[k]
    os.environ.update(env)
    torch.set_num_threads(threads)
    _kv_put(marker)
    row = run_one(dataclasses.replace(spec, quiet=True), None, None, user_errors)
    row["files"] = _run_folder_files(spec.path)
    row["node"] = socket.gethostname()
    return row


_KV_NAMESPACE = "fcl-bench"


def _kv_put(key: str) -> None:
    """Mark a run as started (read by the driver's progress); best effort, Ray's key-value store is internal."""
    try:
        from ray.experimental.internal_kv import _internal_kv_put

        _internal_kv_put(key, b"1", namespace=_KV_NAMESPACE)
    except Exception:  # progress only
        pass


def _kv_started(prefix: str) -> set[str] | None:
    try:
        from ray.experimental.internal_kv import _internal_kv_list

        return {k.decode() for k in _internal_kv_list(prefix, namespace=_KV_NAMESPACE)}
    except Exception:
        return None


def _kv_clear(prefix: str) -> None:
    try:
        from ray.experimental.internal_kv import _internal_kv_del

        _internal_kv_del(prefix, del_by_prefix=True, namespace=_KV_NAMESPACE)
    except Exception:
        pass


# -- the driver ---------------------------------------------------------------------------------------
class RunsProgress:
    """Runs done / running / failed, elapsed and ETA: a tqdm bar on a terminal, else a plain line whenever
    the counts change. ``enabled=False``: nothing."""

    def __init__(self, total: int, enabled: bool = True, out=None):
        self.total, self.out = total, out
        self.enabled = enabled and total > 0
        self.start = time.perf_counter()
        self.done = self.failed = 0
        self.running: int | None = 0
        self._last: tuple | None = None
        self.bar = None
        if self.enabled and is_terminal(out):
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc="runs", unit="run", file=out or sys.stderr, dynamic_ncols=True)

    def line(self) -> str:
        finished = self.done + self.failed
        elapsed = time.perf_counter() - self.start
        eta = f"ETA {format_seconds(elapsed / finished * (self.total - finished))}" if finished else "ETA ?"
        running = "?" if self.running is None else self.running
        return (f"runs: {finished}/{self.total} finished ({self.done} done, {self.failed} failed), "
                f"{running} running, elapsed {format_seconds(elapsed)}, {eta}")

    def update(self, done: int, failed: int, running: int | None) -> None:
        if not self.enabled:
            return
        step = done + failed - self.done - self.failed
        self.done, self.failed, self.running = done, failed, running
        if self.bar is not None:
            self.bar.set_postfix_str(f"{done} done, {'?' if running is None else running} running, {failed} failed",
                                     refresh=False)
            self.bar.update(step)
            return
        key = (done, failed, running)
        if key != self._last:
            self._last = key
            print(self.line(), file=self.out or sys.stdout, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _record_failure(spec: RunSpec, reason: str) -> dict:
    """The driver's record of a run whose task did not return: ``failed`` with ``reason``, under the run's
    lock; a run another process holds or that completed meanwhile is left as it is."""
    rec = RunRecord(spec.path, root=Path(spec.out))
    holder = rec.try_lock()
    if holder is None:
        try:
            if not rec.is_complete():
                rec.log(f"FAILED (recorded by the Ray driver): {reason}")
                rec.fail(reason, 0.0)
        finally:
            rec.unlock()
    row = summary_row(spec, rec)
    if row["state"] != "completed":
        row.update(state="failed", reason=reason)
    return row


def _mirror(spec: RunSpec, files: dict[str, bytes] | None) -> None:
    """Write a worker's run folder files into the driver's store when the driver sees other ones (``--out``
    not shared with the worker's node); ``status.json`` goes last, under the run's lock."""
    if not files or "status.json" not in files:
        return
    rec = RunRecord(spec.path, root=Path(spec.out))
    try:
        if (rec.path / "status.json").read_bytes() == files["status.json"]:
            return  # the same folder (one machine, or a shared filesystem)
    except OSError:
        pass
    if rec.try_lock() is not None:
        return
    try:
        for name, data in files.items():
            if name != "status.json":
                atomic_write(rec.path / name, data)
        atomic_write(rec.path / "status.json", files["status.json"])
    finally:
        rec.unlock()


def _connect(ray, address: str | None) -> bool:
    """Join ``address`` or start a local Ray (unless one is initialised); True when this call started it."""
    if ray.is_initialized():
        return False
    with warnings.catch_warnings():  # Ray's notice about a future default for CUDA_VISIBLE_DEVICES
        warnings.filterwarnings("ignore", message=".*RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO.*")
        if address:
            try:
                ray.init(address=address)
            except ConnectionError as e:
                raise RayUnavailable(f"no Ray cluster at --ray-address {address} ({e}); start one with "
                                     "`ray start --head`, or leave out --ray-address for a local Ray") from None
            return False
        # "local": a new instance even where RAY_ADDRESS is set or `ray start` runs here (--ray-address auto joins it)
        ray.init(address="local", num_cpus=local_cpus(), object_store_memory=OBJECT_STORE_BYTES,
                 include_dashboard=False)
    return True


def _check_resources(ray, cpus: float, gpus: float) -> None:
    res = ray.cluster_resources()
    have_cpu, have_gpu = res.get("CPU", 0.0), res.get("GPU", 0.0)
    if cpus > have_cpu:
        raise PlanError(f"--cpus-per-run {cpus:g}, but the Ray cluster has {have_cpu:g} CPUs; no run could start")
    if gpus > have_gpu:
        raise PlanError(f"--gpus-per-run {gpus:g}, but the Ray cluster has {have_gpu:g} GPUs; no run could start")


def _cause(e: BaseException) -> BaseException:
    cause = getattr(e, "cause", None)
    return cause if isinstance(cause, BaseException) else e


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".strip()


def run_on_ray(specs: Sequence[RunSpec], echo: Callable[[str], None], err: Callable[[str], None],
               user_errors: tuple[type[BaseException], ...] = (), address: str | None = None,
               cpus_per_run: float = 1, gpus_per_run: float = 0, threads: int | None = None,
               progress: bool = True) -> list[dict]:
    """Run every spec as a Ray task and return their summary rows in plan order (see the module docstring).

    An exception in ``user_errors`` (every run would fail the same way) cancels the plan and is raised, as
    in-process."""
    ray = import_ray()
    threads = threads or max(1, int(cpus_per_run))
    started = _connect(ray, address)
    marker_prefix = f"plan-{uuid.uuid4().hex[:12]}:"
    pending: dict[Any, int] = {}
    try:
        _check_resources(ray, cpus_per_run, gpus_per_run)
        rows: list[dict | None] = [None] * len(specs)
        todo = []
        for i, s in enumerate(specs):
            rec = RunRecord(s.path, root=Path(s.out))
            if rec.is_complete() and not s.force:
                echo(f"skip {s.label} seed {s.seed}: completed in {rec.path} (use --force to re-run)")
                rows[i] = summary_row(s, rec)
            else:
                todo.append(i)
        task = ray.remote(max_retries=RETRIES, retry_exceptions=False)(run_task)
        env = worker_env()
        for i in todo:
            ref = task.options(num_cpus=cpus_per_run, num_gpus=gpus_per_run, name=f"{specs[i].label}-seed{specs[i].seed}") \
                .remote(specs[i], env, os.getcwd(), threads, user_errors, f"{marker_prefix}{i}")
            pending[ref] = i
        if todo:
            echo(f"ray: {len(todo)} runs submitted ({cpus_per_run:g} CPU, {gpus_per_run:g} GPU each) to a cluster "
                 f"with {ray.cluster_resources().get('CPU', 0):g} CPUs, "
                 f"{ray.cluster_resources().get('GPU', 0):g} GPUs")
        bar = RunsProgress(len(todo), enabled=progress)
        done = failed = 0
        try:
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)
                for ref in ready:
                    i = pending.pop(ref)
                    s = specs[i]
                    try:
                        row = ray.get(ref)
                    except ray.exceptions.RayTaskError as e:  # raised in run_one: a user error or a bug
                        cause = _cause(e)
                        if user_errors and isinstance(cause, user_errors):
                            raise cause from None
                        row = _record_failure(s, _first_line(cause))
                    except ray.exceptions.RayError as e:  # the worker died on every try
                        row = _record_failure(s, f"the Ray worker died {RETRIES + 1} times; last: {_first_line(e)}")
                    _mirror(s, row.pop("files", None))
                    node = row.pop("node", None)
                    rows[i] = row
                    if row["state"] == "completed":
                        done += 1
                        echo(f"done {s.label} seed {s.seed}: final_acc {row['final_acc']:.4f} "
                             f"({row['seconds']:.1f} s{f', on {node}' if node else ''})")
                    elif row["state"] == "skipped":
                        done += 1
                        echo(f"skip {s.label} seed {s.seed}: {row['reason']}")
                    else:
                        failed += 1
                        err(f"FAILED {s.label} seed {s.seed}: {row['reason']} (log: {Path(row['path']) / 'log.txt'})")
                started_keys = _kv_started(marker_prefix)
                running = None if started_keys is None else \
                    sum(f"{marker_prefix}{i}" in started_keys for i in pending.values())
                bar.update(done, failed, running)
        finally:
            bar.close()
        return [r for r in rows if r is not None]
    except BaseException:
        _cancel(ray, pending, specs, echo)
        raise
    finally:
        _kv_clear(marker_prefix)
        if started:
            ray.shutdown()


def _cancel(ray, pending: dict, specs: Sequence[RunSpec], echo: Callable[[str], None],
            wait_s: float = 30.0) -> None:
    """Cancel every unfinished task: ``ray.cancel(force=True)`` ends a running task's worker (a plain cancel,
    a ``KeyboardInterrupt`` in the task, was not delivered after Ctrl-C had interrupted the driver in Ray
    2.55.1), and a pending one never starts. Then wait (up to ``wait_s``) until each run folder is unlocked
    and record a run left ``running`` as ``failed: interrupted``, under its lock. Its checkpoint stays: the
    next call resumes it."""
    if not pending:
        return
    echo(f"ray: cancelling {len(pending)} unfinished runs")
    for ref in list(pending):
        try:
            ray.cancel(ref, force=True)
        except Exception:
            pass
    deadline = time.monotonic() + wait_s
    try:
        for i in pending.values():
            rec = RunRecord(specs[i].path, root=Path(specs[i].out))
            if not rec.path.is_dir():  # never started
                continue
            while rec.try_lock() is not None:  # the worker is still ending
                if time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            else:
                try:
                    if (rec.status or {}).get("state") == "running":
                        rec.log("interrupted (Ctrl-C; recorded by the Ray driver)")
                        rec.fail("interrupted", 0.0)
                finally:
                    rec.unlock()
    except BaseException:  # a second Ctrl-C: stop waiting
        pass
