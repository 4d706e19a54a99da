"""Suites: named lists of runs, stored as JSON data (``fcl_bench/suites/*.json`` or a user file).

A suite file::

    {"name": "fig5", "description": "...",
     "runs": [{"label": "fedlscl-buffer{value}", "method": "fedlscl",
               "overrides": {"rank": 4}, "run_overrides": {"small_models": "resnet18"},
               "sweep": {"key": "buffer_per_class", "values": [5, 10, 20, 40]}}]}

* ``method``: a registered method name, or ``"all"`` (every registered method, labelled by its name;
  ``label``, ``overrides`` and ``sweep`` are not allowed with it, ``run_overrides`` is).
* ``label``: the run's results folder and table row (default: the method name). Letters, digits and
  ``_ . + -`` only.
* ``overrides``: method ``Config`` fields; ``run_overrides``: :class:`fcl_bench.config.RunConfig` fields
  (``seed`` excluded: seeds come from ``--seeds``). Values are JSON scalars or lists; they are turned into
  the strings ``-o`` takes (``true``/``false``, comma lists) and parsed by the field types.
* ``sweep``: one run per value of a method ``Config`` key; ``values`` is an explicit list (the built-in
  ``fig3`` lists blocks 0..5, the offline tiny ViT's depth; ``fig3-vit-b`` lists 0..11). The label must
  contain ``{value}`` (default: ``<method>-<key><value>``).

Unknown keys anywhere are a :class:`SuiteError` naming the key and the valid ones.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fcl_bench import config as C
from fcl_bench.paths import PathError, check_token


class SuiteError(ValueError):
    """A malformed or unknown suite; the message names the problem and the fix."""


_SUITE_KEYS = {"name", "description", "runs"}
_RUN_KEYS = {"label", "method", "overrides", "run_overrides", "sweep"}
_SWEEP_KEYS = {"key", "values"}
# machine-specific paths and switches: set on the command line, never by a suite file
_MACHINE_KEYS = ("data_root", "download", "foundation_weights", "device")
_Scalar = (str, int, float, bool)


@dataclass(frozen=True)
class Sweep:
    """One run per value of a method ``Config`` key."""

    key: str
    values: tuple[Any, ...]


@dataclass(frozen=True)
class SuiteRun:
    """One entry of a suite's ``runs`` list (before ``all`` and sweeps are expanded)."""

    method: str
    label: str | None = None
    overrides: Mapping[str, Any] = field(default_factory=dict)
    run_overrides: Mapping[str, Any] = field(default_factory=dict)
    sweep: Sweep | None = None


@dataclass(frozen=True)
class Suite:
    """A named list of runs; :meth:`plan` expands it for the registered methods."""

    name: str
    description: str
    runs: tuple[SuiteRun, ...]
    source: str = "built-in"

    def plan(self, available_methods: Sequence[str],
             method_configs: Mapping[str, type] | None = None) -> list[dict[str, Any]]:
        """Expanded runs: ``[{"label", "method", "overrides", "run_overrides"}]`` with override values as the
        strings ``-o`` takes. ``method_configs`` (method name -> its ``Config`` dataclass), when given, checks
        every method override key and value up front."""
        available = list(available_methods)
        out: list[dict[str, Any]] = []
        for i, run in enumerate(self.runs):
            where = f"suite '{self.name}' ({self.source}), run {i + 1}"
            run_over = {k: _to_override(v) for k, v in run.run_overrides.items()}
            if run.method == "all":
                out += [_entry(m, m, {}, run_over) for m in available]
                continue
            if run.method not in available:
                raise SuiteError(f"{where}: method '{run.method}' is not registered; registered methods: "
                                 f"{', '.join(available) or '(none)'}")
            base = {k: _to_override(v) for k, v in run.overrides.items()}
            if run.sweep is None:
                out.append(_entry(run.label or run.method, run.method, base, run_over))
                continue
            template = run.label or f"{run.method}-{run.sweep.key}{{value}}"
            for v in run.sweep.values:
                label = template.replace("{value}", str(v))
                out.append(_entry(label, run.method, {**base, run.sweep.key: _to_override(v)}, run_over))
        _check_plan(out, self, method_configs)
        return out


def _entry(label: str, method: str, overrides: dict[str, str],
           run_overrides: dict[str, str]) -> dict[str, Any]:
    return {"label": label, "method": method, "overrides": dict(overrides),
            "run_overrides": dict(run_overrides)}


def _check_plan(plan: list[dict[str, Any]], suite: Suite, method_configs: Mapping[str, type] | None) -> None:
    seen: set[str] = set()
    for p in plan:
        try:  # a swept value becomes part of the label, and the label a folder
            check_token(p["label"], "label")
        except PathError as e:
            raise SuiteError(f"suite '{suite.name}' ({suite.source}): {e}") from None
        if p["label"] in seen:
            raise SuiteError(f"suite '{suite.name}' ({suite.source}): label '{p['label']}' is used by two "
                             "runs; labels name result folders and must be unique")
        seen.add(p["label"])
        cfg_cls = (method_configs or {}).get(p["method"])
        if cfg_cls is not None:
            try:
                C.apply_overrides(cfg_cls(), p["overrides"], p["method"])
            except C.ConfigError as e:
                raise SuiteError(f"suite '{suite.name}' ({suite.source}), run '{p['label']}': {e}") from None


def _to_override(value: Any) -> str:
    """A JSON value as the string ``-o KEY=VALUE`` takes."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "none"
    if isinstance(value, list):
        return ",".join(_to_override(v) for v in value)
    return str(value)


def _suites_dir() -> Path:
    # a plain folder next to this module (package data), also in editable installs
    return Path(__file__).with_name("suites")


def available_suites() -> list[str]:
    """Names of the built-in suites."""
    return sorted(p.name[:-5] for p in _suites_dir().iterdir() if p.name.endswith(".json"))


def load_suite(name_or_path: str | Path) -> Suite:
    """A built-in suite by name, or a suite JSON file by path."""
    text = str(name_or_path)
    if text in available_suites():
        return parse_suite(json.loads((_suites_dir() / f"{text}.json").read_text()), source="built-in")
    path = Path(text)
    if not path.is_file():
        raise SuiteError(f"unknown suite '{text}': neither a built-in suite "
                         f"({', '.join(available_suites())}) nor a suite JSON file")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise SuiteError(f"suite file {path} is not valid JSON: {e}") from None
    return parse_suite(data, source=str(path))


def parse_suite(data: Any, source: str = "<data>") -> Suite:
    """Validate a suite's JSON data (see the module docstring for the format)."""
    where = f"suite {source}"
    _check_keys(data, _SUITE_KEYS, where, required=("name", "runs"))
    name = data["name"]
    try:
        check_token(name, "'name'")
    except PathError as e:
        raise SuiteError(f"{where}: {e}") from None
    description = data.get("description", "")
    if not isinstance(description, str):
        raise SuiteError(f"{where}: 'description' must be a string")
    runs = data["runs"]
    if not isinstance(runs, list) or not runs:
        raise SuiteError(f"{where}: 'runs' must be a non-empty list of run objects")
    return Suite(name=name, description=description, source=source,
                 runs=tuple(_parse_run(r, f"{where}, run {i + 1}") for i, r in enumerate(runs)))


def _check_keys(obj: Any, valid: set[str], where: str, required: tuple[str, ...] = ()) -> None:
    if not isinstance(obj, dict):
        raise SuiteError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    unknown = sorted(set(obj) - valid)
    if unknown:
        raise SuiteError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; valid keys: "
                         f"{', '.join(sorted(valid))}")
    missing = [k for k in required if k not in obj]
    if missing:
        raise SuiteError(f"{where}: missing key(s) {', '.join(map(repr, missing))}")


def _parse_run(obj: Any, where: str) -> SuiteRun:
    _check_keys(obj, _RUN_KEYS, where, required=("method",))
    method, label = obj["method"], obj.get("label")
    if not isinstance(method, str) or not method:
        raise SuiteError(f"{where}: 'method' must be a method name or \"all\"")
    overrides = _parse_values(obj.get("overrides", {}), f"{where}, overrides")
    run_overrides = _parse_values(obj.get("run_overrides", {}), f"{where}, run_overrides")
    _check_run_overrides(run_overrides, where)
    sweep = _parse_sweep(obj["sweep"], where) if "sweep" in obj else None
    if method == "all":
        extra = [k for k in ("label", "overrides", "sweep") if k in obj]
        if extra:
            raise SuiteError(f"{where}: method \"all\" takes no {', '.join(extra)} (each method runs with "
                             "its defaults, labelled by its name); list methods one by one instead")
    if label is not None:
        try:
            check_token(label.replace("{value}", "0") if isinstance(label, str) else label, "label")
        except PathError:
            raise SuiteError(f"{where}: label {label!r} may hold only letters, digits, _ . + - "
                             "(and {value}), starting with a letter, digit or _") from None
        if sweep is not None and "{value}" not in label:
            raise SuiteError(f"{where}: a sweep's label must contain {{value}} so each run gets its "
                             "own label")
    if sweep is not None and sweep.key in overrides:
        raise SuiteError(f"{where}: '{sweep.key}' is both swept and overridden; drop it from 'overrides'")
    return SuiteRun(method=method, label=label, overrides=overrides, run_overrides=run_overrides, sweep=sweep)


def _parse_values(obj: Any, where: str) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise SuiteError(f"{where}: expected an object of key: value")
    for k, v in obj.items():
        scalars = v if isinstance(v, list) else [v]
        if not all(x is None or isinstance(x, _Scalar) for x in scalars):
            raise SuiteError(f"{where}: '{k}' must be a string, number, boolean, null or list of those; "
                             f"got {v!r}")
    return dict(obj)


def _check_run_overrides(run_overrides: dict[str, Any], where: str) -> None:
    if "seed" in run_overrides:
        raise SuiteError(f"{where}: run_overrides may not set 'seed'; seeds come from --seeds")
    machine = [k for k in _MACHINE_KEYS if k in run_overrides]
    if machine:
        raise SuiteError(f"{where}: run_overrides may not set {', '.join(machine)}: paths and devices belong "
                         f"to the machine; give them on the command line (--data-root, --download, "
                         "--foundation-weights, --device)")
    try:
        C.apply_overrides(C.RunConfig(), {k: _to_override(v) for k, v in run_overrides.items()}, "run")
    except C.ConfigError as e:
        raise SuiteError(f"{where}: {e}") from None


def _parse_sweep(obj: Any, where: str) -> Sweep:
    _check_keys(obj, _SWEEP_KEYS, f"{where}, sweep", required=("key", "values"))
    key, values = obj["key"], obj["values"]
    if not isinstance(key, str) or not key:
        raise SuiteError(f"{where}, sweep: 'key' must be a method Config field name")
    if not isinstance(values, list) or not values or not all(isinstance(v, _Scalar) for v in values):
        raise SuiteError(f"{where}, sweep: 'values' must be a non-empty list of numbers or strings, "
                         "e.g. [0, 1, 2]")
    if len(set(map(str, values))) != len(values):
        raise SuiteError(f"{where}, sweep: 'values' repeats a value")
    return Sweep(key=key, values=tuple(values))
