"""Executors: a plan of runs -> results in the store.

A plan is a list of :class:`RunSpec` (one method, label, run config with its seed, method overrides and
where results go). :func:`run_one` executes one spec and returns its record; it depends only on the spec
(and the files in the store and the cache), so the in-process executor here, Ray workers and Flower apps
can all call it. It

* skips a completed run unless ``force``;
* resumes a run that stopped midway from its last task-boundary checkpoint when the checkpoint was made
  by the same configuration (same run config, method, method config and scenario), else restarts it;
* records a failure with its reason instead of raising (``KeyboardInterrupt`` is recorded and re-raised).

Workspaces (data, scenario, foundation model, feature cache) are shared between consecutive runs with
equal :class:`~fcl_bench.config.WorkspaceConfig`: the process keeps the last one.

:func:`preflight` checks, once per plan, what would fail every run the same way (unknown dataset or
foundation model, missing data root or weights file, no such device) before anything runs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fcl_bench import config as C
from fcl_bench.paths import PathError
from fcl_bench.store import RunRecord, run_dir, write_json

CHECKPOINT = "checkpoint.safetensors"


@dataclass
class RunSpec:
    """One run of a plan. ``run`` carries the seed; ``method_overrides`` are ``-o METHOD.KEY=VALUE`` strings."""

    method: str
    label: str
    run: C.RunConfig
    out: str
    suite: str
    method_overrides: dict[str, str] = field(default_factory=dict)
    force: bool = False
    flops: str = "sampled"
    quiet: bool = False
    keep_checkpoints: bool = False
    plugins: tuple[str, ...] = ()
    command: str = ""
    executor: str = "in-process"  # in-process | flower-sim | flower (fcl_bench.flower)
    superlink: str = ""  # flower: the SuperLink's address, HOST:PORT
    root_certificates: str | None = None  # flower: CA certificate (TLS); None: insecure, loopback only
    flower_timeout: float | None = None  # flower: seconds a client may take to answer one message

    @property
    def seed(self) -> int:
        return self.run.seed

    @property
    def path(self) -> Path:
        return run_dir(Path(self.out), self.suite, self.label, self.run.dataset, self.run.seed)


class PlanError(ValueError):
    """Every run of the plan would fail the same way; the message names the problem and the fix."""


def preflight(specs: Sequence[RunSpec]) -> None:
    """Raise :class:`PlanError` for a problem every run sharing a workspace config would hit."""
    from fcl_bench.datasets import DatasetError, check_dataset
    from fcl_bench.datasets.synthetic import cache_root
    from fcl_bench.nn.foundation import FoundationError, check_foundation
    from fcl_bench.paths import PathError, check_writable_dir
    from fcl_bench.workspace import resolve_device

    try:
        check_writable_dir(cache_root(), "$FCL_BENCH_CACHE")
    except PathError as e:
        raise PlanError(f"{e} (the cache folder for datasets and foundation weights)") from None
    for ws in dict.fromkeys(s.run.workspace() for s in specs):
        try:
            resolve_device(ws.device)
            check_dataset(ws.dataset, ws.data_root, ws.download)
            check_foundation(ws.foundation, ws.foundation_weights)
        except (DatasetError, FoundationError, ValueError) as e:
            raise PlanError(str(e)) from None


_WORKSPACES: dict[C.WorkspaceConfig, Any] = {}


def workspace_for(cfg: C.RunConfig, progress: bool = True):
    """The process's workspace for ``cfg`` (built on first use; one kept in memory at a time)."""
    from fcl_bench.workspace import Workspace

    key = cfg.workspace()
    if key not in _WORKSPACES:
        _WORKSPACES.clear()
        _WORKSPACES[key] = Workspace.create(key)
    return _WORKSPACES[key]


def fingerprint(spec: RunSpec, method_config: Any, scenario_hash: str) -> str:
    """What a checkpoint must match to be resumed: run config, method, method config, scenario."""
    from fcl_bench import __version__

    blob = json.dumps({"run": spec.run.to_dict(), "method": spec.method, "label": spec.label,
                       "method_config": dataclasses.asdict(method_config), "scenario": scenario_hash,
                       "version": __version__}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def summary_row(spec: RunSpec, rec: RunRecord) -> dict:
    """The record of a run as the executors return it: identity, state, and headline metrics."""
    st = rec.status or {}
    row = {"method": spec.label, "seed": spec.seed, "state": st.get("state"), "reason": st.get("reason", ""),
           "path": str(rec.path)}
    if rec.is_complete():
        m = rec.read("metrics.json")

        def num(key: str, scale: float = 1.0) -> float:
            v = m.get(key)
            return float(v) / scale if isinstance(v, (int, float)) else float("nan")

        row.update(final_acc=num("final_acc"), avg_inc=num("avg_incremental_acc"), forgetting=num("forgetting"),
                   mb_up=num("bytes_up", 1e6), mb_down=num("bytes_down", 1e6), seconds=num("wall_seconds"))
    return row


def _load_resumable(rec: RunRecord, fp: str, log: Callable[[str], None]) -> dict | None:
    from fcl_bench import state as S

    path = rec.path / CHECKPOINT
    if not path.exists():
        return None
    try:
        st = S.load(path)
    except Exception as e:  # a damaged checkpoint costs a restart, never the run
        log(f"   checkpoint {path} is unreadable ({type(e).__name__}: {e}); restarting the run")
        return None
    if st.get("fingerprint") != fp:
        log(f"   checkpoint {path} was made by another configuration; restarting the run")
        return None
    return st


def run_one(spec: RunSpec, echo: Callable[[str], None] | None = None, err: Callable[[str], None] | None = None,
            user_errors: tuple[type[BaseException], ...] = ()) -> dict:
    """Execute one run into the store and return :func:`summary_row`. ``echo`` prints progress lines
    (``None``: silent), ``err`` failure lines. Exceptions in ``user_errors`` raised while building the
    workspace are re-raised after the failure is recorded (the CLI stops the plan: every run would fail)."""
    from fcl_bench import registry

    echo = echo or (lambda line: None)
    err = err or echo
    for p in spec.plugins:
        registry.load_plugin_file(p)
    rec = RunRecord(spec.path, root=Path(spec.out))
    if rec.is_complete() and not spec.force:
        echo(f"skip {spec.label} seed {spec.seed}: completed in {rec.path} (use --force to re-run)")
        return summary_row(spec, rec)
    try:
        holder = rec.try_lock()
    except PathError as e:  # a run folder that resolves outside --out: nothing is written there
        err(f"FAILED {spec.label} seed {spec.seed}: {e}")
        return {"method": spec.label, "seed": spec.seed, "state": "failed", "reason": str(e), "path": str(rec.path)}
    if holder is not None:  # one writer per run folder
        who = f"pid {holder}" if holder > 0 else "another process"
        echo(f"skip {spec.label} seed {spec.seed}: running in {who} ({rec.path})")
        return {**summary_row(spec, rec), "state": "skipped", "reason": f"running in {who}"}
    try:
        return _run_locked(spec, rec, echo, err, user_errors)
    finally:
        rec.unlock()


def _run_locked(spec: RunSpec, rec: RunRecord, echo: Callable[[str], None], err: Callable[[str], None],
                user_errors: tuple[type[BaseException], ...]) -> dict:
    from fcl_bench import registry
    from fcl_bench.federation import Federation
    from fcl_bench.workspace import describe

    if rec.is_complete() and not spec.force:  # completed by the lock's previous holder meanwhile
        echo(f"skip {spec.label} seed {spec.seed}: completed in {rec.path} (use --force to re-run)")
        return summary_row(spec, rec)
    damage = rec.damage()
    if damage:
        echo(f"run folder {rec.path}: {damage}; running it again")
    cls = registry.get_method(spec.method)
    mcfg = C.apply_overrides(cls.Config(), spec.method_overrides, cls.name)
    t0 = time.perf_counter()
    had_checkpoint = (rec.path / CHECKPOINT).exists() and not spec.force
    rec.start(keep=(CHECKPOINT, "log.txt") if had_checkpoint else ())

    def log(line: str) -> None:
        rec.log(line)
        if not spec.quiet:
            echo(line)

    try:
        ws = workspace_for(spec.run, progress=not spec.quiet)
        log(f"== {spec.label} ({spec.method}) on {spec.run.dataset}, seed {spec.seed}, "
            f"scenario {ws.scenario.short_hash}")
        ws.scenario.save(rec.path / "scenario.json")

        def write_config(method_config) -> None:
            write_json(rec.path / "config.json", {
                "suite": spec.suite, "method": spec.method, "label": spec.label, "run": spec.run.to_dict(),
                "method_config": dataclasses.asdict(method_config), **describe(ws), "command": spec.command})

        write_config(mcfg)  # also for runs that fail
        fp = fingerprint(spec, mcfg, ws.scenario.hash)
        resume = _load_resumable(rec, fp, log) if had_checkpoint else None
        if spec.executor == "in-process":
            fed = Federation(cls, mcfg, ws, spec.run, log=log, progress=not spec.quiet, flops=spec.flops)
            fed.fingerprint = fp
            if resume is not None:
                fed.restore(resume)
                log(f"   resumed from the checkpoint after task {fed.next_task}/{fed.T}")
            result = fed.run(checkpoint=rec.path / CHECKPOINT, keep_final=spec.keep_checkpoints)
        else:
            from fcl_bench.flower import run_spec

            result = run_spec(spec, cls, mcfg, ws, rec.path, log)
        write_config(result.method_config)  # as resolved, with the foundation model's description
        rec.finish(result.metrics, result.rounds, result.seconds)
        if not spec.keep_checkpoints:
            (rec.path / CHECKPOINT).unlink(missing_ok=True)
        log(f"   final_acc {result.metrics['final_acc']:.4f}  ({result.seconds:.1f} s)")
    except KeyboardInterrupt:
        rec.fail("interrupted", time.perf_counter() - t0)
        raise
    except user_errors as e:  # recorded, then the plan stops: every run would fail the same way
        rec.fail(f"{type(e).__name__}: {e}", time.perf_counter() - t0)
        raise
    except Exception as e:  # one failed run never aborts the suite
        reason = f"{type(e).__name__}: {e}"
        rec.log(traceback.format_exc())
        rec.fail(reason, time.perf_counter() - t0)
        err(f"FAILED {spec.label} seed {spec.seed}: {reason} (log: {rec.path / 'log.txt'})")
    return summary_row(spec, rec)


def run_in_process(specs: Sequence[RunSpec], echo: Callable[[str], None], err: Callable[[str], None],
                   user_errors: tuple[type[BaseException], ...] = ()) -> list[dict]:
    """The default executor: every spec in order, in this process (workspaces built afresh for the plan)."""
    _WORKSPACES.clear()
    try:
        return [run_one(s, echo, err, user_errors) for s in specs]
    finally:
        _WORKSPACES.clear()
