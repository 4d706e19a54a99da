"""Verdicts on the paper's claims from a results table: ``fcl-bench report DIR --claims``.

:func:`evaluate_claims` takes the DataFrame of :func:`fcl_bench.report.tables.load_results` (one row per
run) and judges each claim of the Fed-LSCL paper on the runs it holds; :func:`write_claims` writes
``claims.md`` and ``claims.json``. Every verdict is one of

* ``holds``, ``does not hold``;
* ``not separated``: the difference is smaller than the seeds' spread;
* ``not testable with these runs``, with the reason (one seed, a suite or row absent or failed, another
  scenario, a ViT without deep blocks).

Statistics
----------
* A *series* is one number per seed for one row (a suite's label) on one dataset, e.g. the client-space
  final accuracy (%) of ``table2/fedlscl-no-cf``. Two series are compared on the seeds both completed
  **with the same scenario hash** (the other seeds are left out, and the part says so). Each side is
  summarised as mean ± sample std (``ddof=1``) over those seeds.
* ``d = mean_A - mean_B`` and the spread ``s = max(std_A, std_B)`` (the larger of the two stds).
* ``A > B``: holds when ``d > s``; does not hold when ``-d > s`` (B is separated above A); not separated
  when ``|d| <= s``.
* ``A ≈ B``: holds when ``|d| <= s``; does not hold when ``|d| > s``.
* ``B at most t below A`` (Figs. 4 and 5; a B above A satisfies it): with the loss ``l = mean_A - mean_B``,
  holds when ``l <= t``; does not hold when ``l - t > s``; not separated when ``t < l <= t + s``.
* With fewer than two common seeds there is no spread: an accuracy comparison is not testable (its
  one-seed difference is still shown). Bytes on the wire are counted, not drawn from training noise, so
  the communication claim is judged on the measured difference with one seed (``s = 0``).
* A claim made of several parts: does not hold if any part does not hold; else not testable if any part
  is not testable; else not separated if any part is not separated; else holds.

The claims
----------
Accuracies are in %, in the client evaluation space (the paper's local test sets).

* **Table 1** (``table1``): Fed-LSCL (label ``fedlscl``) is above the best other label at every task, on
  ``acc`` after each task (all tasks so far: the report's default Table 1 reading); ``table1-current-task``
  repeats it on the other reading (the current task's test set only). Rows: suite ``table1``, or else the
  first suite holding ``fedlscl`` and another method (e.g. ``make run``'s ``quick``). The best other label
  is the one with the highest mean at that task on the seeds it shares with Fed-LSCL.
* **Table 2** (``table2``): final accuracy of the ablation rows of suite ``table2``, found in
  ``fcl_bench/suites/table2.json`` by their switches: full > without O2D; without O2D > without SM-CF
  (the paper's row order); without SM-CF ≈ without both; without collaboration below each other row.
* **Fig. 3** (``fig3``, one claim per suite ``fig3`` / ``fig3-vit-b``): shallow blocks are 0-5, deep blocks
  6 and up. Shallow blocks are stable: the best and the worst shallow block (by mean final accuracy) are
  ≈. Deep blocks are worse: per seed, the mean final accuracy over the shallow blocks > that over the
  deep blocks. Deep blocks are more variable: per seed, the mean over deep blocks of the curve
  variability (mean ``|acc[t+1] - acc[t]|`` over consecutive tasks, points) > that over shallow blocks.
  A ViT of 6 blocks (the offline tiny ViT) has no deep blocks: those parts are not testable.
* **Fig. 4** (``fig4``): "about as good" = the heterogeneous run (suite ``fig4``, ``fedlscl-hetero``) is at
  most **2 points** below a homogeneous Fed-LSCL on final accuracy. The homogeneous run is the first of the
  fig4 suite's own ``fedlscl``, the Table 1 suite's ``fedlscl``, table2's full row and any other suite's
  ``fedlscl`` (by suite name) that has the same scenario and the same settings apart from ``small_models``.
* **Fig. 5** (``fig5``): 20 buffered samples per class are at most **1 point** below 40 on final accuracy
  (suite ``fig5``, rows found by ``buffer_per_class``); not testable when the two runs uploaded the same bytes
  on every seed (Fed-LSCL uploads its buffer's features, so their buffers held the same samples: no client
  has more than 20 samples of a class).
* **§5.3.2** (``communication``): Fed-LSCL communicates less than each other label of the Table 1 suite:
  MB up + down per client over the whole run (``mb_per_client``; per client-round is that divided by
  tasks x rounds_per_task), one part per baseline, ``fewer`` or ``more``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

HOLDS = "holds"
FAILS = "does not hold"
NOT_SEPARATED = "not separated"
NOT_TESTABLE = "not testable with these runs"
VERDICTS = (HOLDS, FAILS, NOT_SEPARATED, NOT_TESTABLE)

FEDLSCL = "fedlscl"
SHALLOW_BLOCKS = range(0, 6)          # the paper's "shallow blocks (0 to 5)"; deep: 6 and deeper
FIG4_TOLERANCE = 2.0                  # points: "about as good"
FIG5_TOLERANCE = 1.0                  # points: "within 1 point of 40"
FIG5_SMALL, FIG5_LARGE = 20, 40
THREE_SEEDS = "run three seeds (--seeds 42,1999,2024)"
# run-config fields that never make two runs different experiments
_IGNORED_KEYS = {"seed", "dataset", "device", "data_root", "download", "eval_batch_size", "channels_last"}


# ------------------------------------------------------------------------------------------- results

@dataclass
class Series:
    """One number per seed for one row on one dataset, with each seed's scenario hash."""

    label: str
    values: dict[Any, float]
    hashes: dict[Any, Any] = field(default_factory=dict)


@dataclass
class Stat:
    """A series summarised over the seeds used: mean, sample std (None with one seed), n, seeds."""

    label: str
    mean: float
    std: float | None
    seeds: list[Any]

    @property
    def n(self) -> int:
        return len(self.seeds)

    def text(self, fmt: str = ".2f") -> str:
        return f"{self.mean:{fmt}} ± {self.std:{fmt}}" if self.std is not None else f"{self.mean:{fmt}} (one seed)"

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "mean": self.mean, "std": self.std, "n": self.n, "seeds": self.seeds}


@dataclass
class Part:
    """One comparison of a claim and its verdict; ``a`` and ``b`` are the two sides, ``difference`` is
    ``a.mean - b.mean``."""

    statement: str
    verdict: str
    a: Stat | None = None
    b: Stat | None = None
    difference: float | None = None
    spread: float | None = None
    tolerance: float | None = None
    unit: str = "points"
    fmt: str = ".2f"
    reason: str = ""
    outcome: str = ""                 # a word for the verdict where the claim has one ("fewer" / "more")
    extra: dict[str, Any] = field(default_factory=dict)

    def line(self) -> str:
        verdict = f"{self.verdict} ({self.outcome})" if self.outcome else self.verdict
        if self.a is None or self.b is None:
            return f"{self.statement}: {verdict}" + (f": {self.reason}" if self.reason else "")
        f = self.fmt
        nums = (f"{self.a.label} {self.a.text(f)} vs {self.b.label} {self.b.text(f)} {self.unit}; "
                f"difference {self.difference:+{f}}")
        if self.spread is not None:
            nums += f", spread {self.spread:{f}}"
        if self.tolerance is not None:
            nums += f", tolerance {self.tolerance:{f}}"
        return f"{self.statement}: {nums} -> {verdict}" + (f" ({self.reason})" if self.reason else "")

    def to_dict(self) -> dict[str, Any]:
        return {"statement": self.statement, "verdict": self.verdict, "outcome": self.outcome or None,
                "a": self.a.to_dict() if self.a else None, "b": self.b.to_dict() if self.b else None,
                "difference": self.difference, "spread": self.spread, "tolerance": self.tolerance,
                "unit": self.unit, "reason": self.reason or None, **({"extra": self.extra} if self.extra else {})}


@dataclass
class Claim:
    """One claim of the paper on one dataset: its parts, and a verdict combined from them."""

    id: str
    source: str                       # where in the paper: "Table 1", "Fig. 3", ...
    statement: str
    dataset: str | None
    rule: str                         # how the parts are judged, in words
    parts: list[Part]
    notes: list[str] = field(default_factory=list)

    @property
    def verdict(self) -> str:
        return combine(p.verdict for p in self.parts)

    @property
    def reason(self) -> str:
        """Why the claim is not testable (the reasons of its untestable parts), else empty."""
        if self.verdict != NOT_TESTABLE:
            return ""
        return "; ".join(dict.fromkeys(p.reason for p in self.parts if p.verdict == NOT_TESTABLE and p.reason))

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "source": self.source, "statement": self.statement, "dataset": self.dataset,
                "verdict": self.verdict, "reason": self.reason or None, "rule": self.rule,
                "parts": [p.to_dict() for p in self.parts], "notes": self.notes}


def combine(verdicts: Iterable[str]) -> str:
    """A conjunction's verdict: any part fails -> fails; else any untestable -> not testable; else any
    not separated -> not separated; else holds (an empty claim is not testable)."""
    vs = list(verdicts)
    for v in (FAILS, NOT_TESTABLE, NOT_SEPARATED):
        if v in vs:
            return v
    return HOLDS if vs else NOT_TESTABLE


# ---------------------------------------------------------------------------------------- statistics

def _common(a: Series, b: Series) -> tuple[list[Any], list[Any]]:
    """Seeds both series have, split into (same scenario hash, different hash)."""
    both = sorted(set(a.values) & set(b.values), key=_seed_key)
    same = [s for s in both if a.hashes.get(s) == b.hashes.get(s)]
    return same, [s for s in both if s not in same]


def _seed_key(s: Any) -> tuple:
    return (0, s, "") if isinstance(s, (int, np.integer)) else (1, 0, str(s))


def _stat(series: Series, seeds: list[Any] | None = None) -> Stat:
    """``series`` over ``seeds`` (default: all of its seeds)."""
    seeds = sorted(series.values, key=_seed_key) if seeds is None else seeds
    v = np.array([series.values[s] for s in seeds], dtype=float)
    return Stat(series.label, float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else None, list(seeds))


def _sides(a: Series, b: Series, statement: str, unit: str, fmt: str) -> tuple[Stat, Stat, list[str]] | Part:
    """Both sides on their common seeds, or an untestable part saying why there are none."""
    seeds, other = _common(a, b)
    if not seeds:
        why = (f"{a.label} and {b.label} ran on different scenarios for every seed they share "
               f"({', '.join(map(str, other))})" if other else
               f"no seed that both {a.label} ({_seeds_text(a)}) and {b.label} ({_seeds_text(b)}) completed")
        return Part(statement, NOT_TESTABLE, reason=why, unit=unit, fmt=fmt)
    notes = [f"seeds left out: {', '.join(map(str, other))} (different scenario)"] if other else []
    return _stat(a, seeds), _stat(b, seeds), notes


def _seeds_text(s: Series) -> str:
    return "seeds " + ", ".join(map(str, sorted(s.values, key=_seed_key))) if s.values else "no completed run"


def _spread(a: Stat, b: Stat) -> float:
    return max(a.std or 0.0, b.std or 0.0)


def _one_seed(part: Part) -> Part:
    seed = part.a.seeds[0] if part.a else "?"
    part.verdict, part.spread = NOT_TESTABLE, None
    part.reason = f"one seed ({seed}): no spread to separate the difference; {THREE_SEEDS}"
    return part


def greater(a: Series, b: Series, statement: str, unit: str = "points", fmt: str = ".2f",
            one_seed_ok: bool = False) -> Part:
    """The claim ``A > B``: holds when ``d > s``, does not hold when ``-d > s``, else not separated."""
    sides = _sides(a, b, statement, unit, fmt)
    if isinstance(sides, Part):
        return sides
    sa, sb, notes = sides
    d, s = sa.mean - sb.mean, _spread(sa, sb)
    verdict = HOLDS if d > s else FAILS if -d > s else NOT_SEPARATED
    part = Part(statement, verdict, sa, sb, d, s, unit=unit, fmt=fmt, reason="; ".join(notes))
    return _one_seed(part) if sa.n < 2 and not one_seed_ok else part


def close(a: Series, b: Series, statement: str, unit: str = "points", fmt: str = ".2f") -> Part:
    """The claim ``A ≈ B``: holds when ``|d| <= s`` (not separated), does not hold when ``|d| > s``."""
    sides = _sides(a, b, statement, unit, fmt)
    if isinstance(sides, Part):
        return sides
    sa, sb, notes = sides
    d, s = sa.mean - sb.mean, _spread(sa, sb)
    part = Part(statement, HOLDS if abs(d) <= s else FAILS, sa, sb, d, s, unit=unit, fmt=fmt,
                reason="; ".join(notes))
    return _one_seed(part) if sa.n < 2 else part


def at_most_below(ref: Series, b: Series, tolerance: float, statement: str, unit: str = "points",
                  fmt: str = ".2f") -> Part:
    """The claim ``B is at most t below A`` with loss ``l = mean_A - mean_B``: holds when ``l <= t``, does
    not hold when ``l - t > s``, else not separated."""
    sides = _sides(ref, b, statement, unit, fmt)
    if isinstance(sides, Part):
        return sides
    sa, sb, notes = sides
    loss, s = sa.mean - sb.mean, _spread(sa, sb)
    verdict = HOLDS if loss <= tolerance else FAILS if loss - tolerance > s else NOT_SEPARATED
    part = Part(statement, verdict, sa, sb, loss, s, tolerance, unit=unit, fmt=fmt, reason="; ".join(notes))
    return _one_seed(part) if sa.n < 2 else part


def untestable(statement: str, reason: str) -> Part:
    return Part(statement, NOT_TESTABLE, reason=reason)


# ---------------------------------------------------------------------------------------- row access

def _completed(df: pd.DataFrame) -> pd.DataFrame:
    return df[df["state"].eq("completed")]


def _series(rows: pd.DataFrame, label: str, value: Callable[[Any], float]) -> Series:
    """The completed runs of ``label`` in ``rows`` (one suite, one dataset) as a series."""
    sub = _completed(rows[rows["label"] == label])
    vals = {r.seed: (float(value(r)), r.scenario_hash) for r in sub.itertuples()}
    vals = {s: vh for s, vh in vals.items() if math.isfinite(vh[0])}
    return Series(label, {s: v for s, (v, _) in vals.items()}, {s: h for s, (_, h) in vals.items()})


def _absent(rows: pd.DataFrame, suite: str, label: str, dataset: str | None = None) -> str | None:
    """Why ``label`` of ``suite`` has no completed run (absent, failed with its reason), or None."""
    sub = rows[(rows["suite"] == suite) & (rows["label"] == label)]
    if dataset is not None:
        sub = sub[sub["dataset"] == dataset]
    where = f"{suite}/{label}" + (f" on {dataset}" if dataset else "")
    if sub.empty:
        return f"no run of {where}"
    if sub["state"].eq("completed").any():
        return None
    reasons = [str(r) for r in sub["reason"] if isinstance(r, str) and r]
    return f"no completed run of {where} ({sub['state'].iloc[0]}" + (f": {reasons[0]}" if reasons else "") + ")"


def _final(r: Any) -> float:
    return 100.0 * r.metrics_client["final_acc"]


def _acc_at(t: int, reading: str) -> Callable[[Any], float]:
    """Accuracy (%) after task ``t`` in Table 1's ``seen`` or ``current`` reading."""
    from fcl_bench.report.tables import _table1_values

    def value(r: Any) -> float:
        vals = _table1_values(r.metrics_client, reading)
        return 100.0 * vals[t] if t < len(vals) else math.nan
    return value


def _variability(r: Any) -> float:
    """Mean |acc[t+1] - acc[t]| over consecutive tasks (points): how much the accuracy curve moves."""
    acc = 100.0 * np.asarray(r.metrics_client["acc"], dtype=float)
    return float(np.abs(np.diff(acc)).mean()) if len(acc) > 1 else math.nan


def _datasets(rows: pd.DataFrame) -> list[str]:
    return sorted(str(d) for d in rows["dataset"].dropna().unique())


def table1_suite(df: pd.DataFrame) -> str | None:
    """Suite ``table1``, else the first suite holding label ``fedlscl`` and another method, else None."""
    cands = [str(s) for s, sub in df.groupby("suite")
             if ((sub["label"] == FEDLSCL) & (sub["method"] == FEDLSCL)).any() and (sub["method"] != FEDLSCL).any()]
    return "table1" if "table1" in cands else (sorted(cands)[0] if cands else None)


def _others(rows: pd.DataFrame) -> list[str]:
    """The labels of other methods than Fed-LSCL, in the report's row order."""
    from fcl_bench.report.tables import order_names

    other = rows[rows["method"] != FEDLSCL]
    return order_names(other.assign(name=other["label"])) if len(other) else []


# ---------------------------------------------------------------------------------------- the claims

def evaluate_claims(df: pd.DataFrame) -> list[Claim]:
    """Every claim of the paper judged on ``df`` (shaped like :func:`load_results`' output), in the
    paper's order; one claim per dataset where the runs cover several."""
    return [*table1_claims(df), *table1_claims(df, reading="current"), *table2_claims(df),
            *fig3_claims(df), *fig4_claims(df), *fig5_claims(df), *communication_claims(df)]


_T1_READING = {"seen": ("table1", "on all tasks so far", "acc after each task on all tasks so far (the report's "
                                                        "default Table 1 reading)"),
               "current": ("table1-current-task", "on the current task",
                                    "acc after each task on the current task's test set only (Table 1's other "
                                    "reading)")}


def table1_claims(df: pd.DataFrame, reading: str = "seen") -> list[Claim]:
    """Table 1: Fed-LSCL is above the best other method at every task; ``reading`` as in
    :func:`fcl_bench.report.tables.table1`: ``seen`` (``acc``) or ``current`` (``current_task_acc``)."""
    if reading not in _T1_READING:
        raise ValueError(f"reading must be one of {', '.join(_T1_READING)}; got {reading!r}")
    cid, short, what = _T1_READING[reading]
    statement = f"Fed-LSCL is best at every task (accuracy {short})"
    rule = (f"{what}, client space, %: at each task Fed-LSCL > the best other label (highest mean on the "
            "seeds it shares with Fed-LSCL); separated when |d| > max of the two stds")
    suite = table1_suite(df)
    if suite is None:
        return [Claim(cid, "Table 1", statement, None, rule, [untestable(
            statement, "no suite holds fedlscl and another method: run --suite table1")])]
    claims = []
    for d in _datasets(df[df["suite"] == suite]):
        rows = df[(df["suite"] == suite) & (df["dataset"] == d)]
        missing = _absent(df, suite, FEDLSCL, d)
        notes = [f"rows: suite {suite}"]
        if missing:
            claims.append(Claim(cid, "Table 1", statement, d, rule, [untestable(statement, missing)], notes))
            continue
        tasks = max(len(m["acc"]) for m in _completed(rows[rows["label"] == FEDLSCL])["metrics_client"])
        others = _others(rows)
        left = [m for m in (_absent(df, suite, o, d) for o in others) if m]
        others = [o for o in others if not _absent(df, suite, o, d)]
        notes += [f"left out: {m}" for m in left]
        if not others:
            claims.append(Claim(cid, "Table 1", statement, d, rule, [untestable(
                statement, f"no completed run of another method in suite {suite} on {d}")], notes))
            continue
        parts = []
        for t in range(tasks):
            ours = _series(rows, FEDLSCL, _acc_at(t, reading))
            theirs = [_series(rows, o, _acc_at(t, reading)) for o in others]
            means = {s.label: _stat(s, seeds).mean for s in theirs if (seeds := _common(ours, s)[0])}
            st = f"task {t + 1}: Fed-LSCL above the best other method"
            if not means:
                parts.append(untestable(st, "no other method shares a seed and scenario with fedlscl"))
                continue
            best = max(means, key=means.get)
            part = greater(ours, next(s for s in theirs if s.label == best), st)
            part.extra = {"others_mean": means}
            parts.append(part)
        claims.append(Claim(cid, "Table 1", statement, d, rule, parts, notes))
    return claims


# (collab, continual_finetune, aggregation) of each Table 2 row
_T2_ROLES = {"full": (True, True, "o2d"), "no_o2d": (True, True, "fedavg"), "no_cf": (True, False, "o2d"),
             "no_both": (True, False, "fedavg"), "no_collab": (False, False, "fedavg")}
_T2_TEXT = {"full": "full Fed-LSCL", "no_o2d": "without O2D", "no_cf": "without SM-CF",
            "no_both": "without SM-CF and O2D", "no_collab": "without collaboration"}


def table2_labels() -> dict[str, str]:
    """Role (full, no_o2d, no_cf, no_both, no_collab) -> label, read from suite ``table2``'s switches."""
    from fcl_bench.suites import load_suite

    found = {}
    for run in load_suite("table2").runs:
        o = run.overrides
        key = (o.get("collab"), o.get("continual_finetune"), o.get("aggregation"))
        found.update({role: run.label or run.method for role, k in _T2_ROLES.items() if k == key})
    missing = set(_T2_ROLES) - set(found)
    if missing:
        raise ValueError(f"suite table2 has no row for {', '.join(sorted(missing))}: fcl_bench/suites/table2.json "
                         "must set collab, continual_finetune and aggregation on each run")
    return found


def table2_claims(df: pd.DataFrame) -> list[Claim]:
    """Table 2: the order of the ablation rows, on final accuracy."""
    statement = ("order of the ablation rows: full > without O2D > without SM-CF ≈ without both; without "
                 "collaboration the lowest")
    rule = "final accuracy, client space, %; > and ≈ as in the module's statistics (spread: max of the two stds)"
    labels = table2_labels()
    if not (df["suite"] == "table2").any():
        return [Claim("table2", "Table 2", statement, None, rule, [untestable(
            statement, "suite table2 absent: run --suite table2")])]
    claims = []
    for d in _datasets(df[df["suite"] == "table2"]):
        notes = ["rows: " + ", ".join(f"{_T2_TEXT[r]} = {lab}" for r, lab in labels.items())]
        claims.append(Claim("table2", "Table 2", statement, d, rule, _table2_parts(df, d, labels), notes))
    return claims


def _table2_parts(df: pd.DataFrame, dataset: str, labels: dict[str, str]) -> list[Part]:
    rows = df[(df["suite"] == "table2") & (df["dataset"] == dataset)]
    series = {role: _series(rows, lab, _final) for role, lab in labels.items()}
    missing = {role: _absent(df, "table2", lab, dataset) for role, lab in labels.items()}

    def part(kind: Callable[..., Part], ra: str, rb: str, st: str) -> Part:
        why = "; ".join(m for m in (missing[ra], missing[rb]) if m)
        return untestable(st, why) if why else kind(series[ra], series[rb], st)

    parts = [part(greater, "full", "no_o2d", "full > without O2D"),
             part(greater, "no_o2d", "no_cf", "without O2D > without SM-CF"),
             part(close, "no_cf", "no_both", "without SM-CF ≈ without SM-CF and O2D")]
    return parts + [part(greater, r, "no_collab", f"{_T2_TEXT[r]} > without collaboration")
                    for r in ("full", "no_o2d", "no_cf", "no_both")]


def _block_series(rows: pd.DataFrame, value: Callable[[Any], float]) -> dict[int, Series]:
    """Fed-LSCL rows of one suite and dataset by adapted block (method config ``block``)."""
    out: dict[int, Series] = {}
    for lab in dict.fromkeys(rows["label"]):
        sub = rows[(rows["label"] == lab) & (rows["method"] == FEDLSCL)]
        blocks = {c.get("block") for c in sub["method_config"] if isinstance(c, dict)}
        if len(blocks) == 1 and isinstance(b := blocks.pop(), int):
            s = _series(sub, lab, value)
            if s.values and b not in out:
                out[b] = s
    return out


def _group(label: str, members: list[Series]) -> Series:
    """Per seed, the mean over ``members`` on the seeds where every member ran the same scenario."""
    seeds = set.intersection(*(set(m.values) for m in members)) if members else set()
    seeds = {s for s in seeds if len({m.hashes.get(s) for m in members}) == 1}
    return Series(label, {s: float(np.mean([m.values[s] for m in members])) for s in seeds},
                  {s: members[0].hashes.get(s) for s in seeds})


def foundation_depth(rows: pd.DataFrame) -> int | None:
    """The ViT's number of blocks: a ``foundation_depth`` column, else each run's ``config.json``."""
    if "foundation_depth" in rows:
        vals = [int(v) for v in rows["foundation_depth"] if pd.notna(v)]
        return max(vals) if vals else None
    for p in rows["path"]:
        try:
            fm = json.loads((Path(str(p)) / "config.json").read_text()).get("foundation") or {}
        except (OSError, ValueError, TypeError):
            continue
        if isinstance(fm.get("depth"), int):
            return fm["depth"]
    return None


def fig3_claims(df: pd.DataFrame) -> list[Claim]:
    """Fig. 3: shallow blocks stable; deep blocks worse and more variable."""
    statement = "shallow blocks (0-5) are stable; deep blocks (6+) are worse and more variable"
    rule = ("final accuracy (client space, %) per block; stable: best and worst shallow block ≈; worse: per "
            "seed mean over shallow blocks > mean over deep blocks; variable: per seed mean over deep blocks "
            "of mean |acc[t+1] - acc[t]| > the same over shallow blocks")
    suites = [s for s in ("fig3", "fig3-vit-b") if (df["suite"] == s).any()]
    if not suites:
        return [Claim("fig3", "Fig. 3", statement, None, rule, [untestable(
            statement, "suites fig3 and fig3-vit-b absent: run --suite fig3 (or fig3-vit-b on a 12-block ViT)")])]
    claims = []
    for suite in suites:
        for d in _datasets(df[df["suite"] == suite]):
            rows = df[(df["suite"] == suite) & (df["dataset"] == d)]
            acc, var = _block_series(rows, _final), _block_series(rows, _variability)
            depth = foundation_depth(_completed(rows))
            shallow = [b for b in sorted(acc) if b in SHALLOW_BLOCKS]
            deep = [b for b in sorted(acc) if b >= SHALLOW_BLOCKS.stop]
            st = "shallow blocks stable: best ≈ worst shallow block"
            if len(shallow) < 2:
                parts = [untestable(st, f"fewer than two shallow blocks completed in suite {suite} on {d}")]
            else:
                means = {b: _stat(acc[b]).mean for b in shallow}
                ranked = sorted(shallow, key=means.get)          # ties keep block order: two distinct blocks
                parts = [close(acc[ranked[-1]], acc[ranked[0]], st)]
            st_w, st_v = "deep blocks worse than shallow", "deep blocks more variable than shallow"
            if not deep:
                why = (f"the ViT has {depth} blocks (0-{depth - 1}): no deep blocks (6+) to compare; run suite "
                       "fig3-vit-b on a 12-block ViT (ViT-B/16)" if depth is not None and depth <= SHALLOW_BLOCKS.stop
                       else f"no completed run on a deep block (6+) in suite {suite} on {d}")
                parts += [untestable(st_w, why), untestable(st_v, why)]
            else:
                sh = _group("shallow blocks " + _blocks_text(shallow), [acc[b] for b in shallow])
                dp = _group("deep blocks " + _blocks_text(deep), [acc[b] for b in deep])
                parts.append(greater(sh, dp, st_w))
                vsh = _group("shallow blocks " + _blocks_text(shallow), [var[b] for b in shallow if b in var])
                vdp = _group("deep blocks " + _blocks_text(deep), [var[b] for b in deep if b in var])
                parts.append(greater(vdp, vsh, st_v, unit="points per task"))
            notes = [f"suite {suite}; ViT depth {depth if depth is not None else 'unknown'}",
                     "final accuracy per block: " + ", ".join(
                         f"{b}: {_stat(acc[b]).text()}" for b in sorted(acc))]
            claims.append(Claim("fig3", "Fig. 3", statement, d, rule, parts, notes))
    return claims


def _blocks_text(blocks: list[int]) -> str:
    return f"{blocks[0]}-{blocks[-1]}" if len(blocks) > 1 else str(blocks[0])


def _config_diff(a: Any, b: Any, ignore: set[str]) -> list[str]:
    """``key: a vs b`` for every run- or method-config key on which two runs differ."""
    out = []
    for col in ("run_config", "method_config"):
        ca, cb = a[col], b[col]
        ca, cb = ca if isinstance(ca, dict) else {}, cb if isinstance(cb, dict) else {}
        for k in sorted((set(ca) | set(cb)) - ignore - _IGNORED_KEYS):
            if ca.get(k) != cb.get(k):
                out.append(f"{k}: {ca.get(k)!r} vs {cb.get(k)!r}")
    return out


def _fig4_label() -> str:
    from fcl_bench.suites import load_suite

    run = load_suite("fig4").runs[0]
    return run.label or run.method


def fig4_claims(df: pd.DataFrame) -> list[Claim]:
    """Fig. 4: heterogeneous client CNNs at most 2 points below a homogeneous Fed-LSCL."""
    hetero = _fig4_label()
    statement = "heterogeneous client CNNs are about as good as homogeneous ones"
    rule = (f"final accuracy (client space, %): {hetero} at most {FIG4_TOLERANCE:g} points below a homogeneous "
            "fedlscl of the same scenario and settings (apart from small_models); not separated when the "
            "shortfall beyond that is within the seeds' spread")
    if not (df["suite"] == "fig4").any():
        return [Claim("fig4", "Fig. 4", statement, None, rule, [untestable(statement, "suite fig4 absent: run --suite fig4")])]
    # the fig4 suite's own homogeneous run, then Table 1's, table2's full row, then any other suite's plain
    # fedlscl (e.g. `--methods fedlscl -o small_pretrained=false`): the first with the same scenario and
    # settings is the reference
    cands = [(s, FEDLSCL) for s in dict.fromkeys(["fig4", table1_suite(df), "table1"]) if s]
    cands.append(("table2", table2_labels()["full"]))
    held = df[(df["label"] == FEDLSCL) & (df["method"] == FEDLSCL)]
    cands += [(str(s), FEDLSCL) for s in sorted(held["suite"].astype(str).unique()) if (str(s), FEDLSCL) not in cands]
    claims = []
    for d in _datasets(df[df["suite"] == "fig4"]):
        missing = _absent(df, "fig4", hetero, d)
        if missing:
            claims.append(Claim("fig4", "Fig. 4", statement, d, rule, [untestable(statement, missing)]))
            continue
        het_rows = _completed(df[(df["suite"] == "fig4") & (df["label"] == hetero) & (df["dataset"] == d)])
        het = _series(het_rows, hetero, _final)
        why, part = [], None
        for suite, lab in cands:
            homo_rows = _completed(df[(df["suite"] == suite) & (df["label"] == lab) & (df["dataset"] == d)])
            if homo_rows.empty:
                why.append(_absent(df, suite, lab, d))
                continue
            diff = _config_diff(het_rows.iloc[0], homo_rows.iloc[0], {"small_models"})
            if diff:
                why.append(f"{suite}/{lab} differs in {'; '.join(diff)}")
                continue
            homo = _series(homo_rows, lab, _final)
            homo.label = f"{suite}/{lab}"
            p = at_most_below(homo, het, FIG4_TOLERANCE, f"{hetero} at most {FIG4_TOLERANCE:g} points below "
                                                          f"homogeneous {suite}/{lab}")
            if p.a is None:               # no common seed and scenario: try the next candidate
                why.append(p.reason)
                continue
            part = p
            break
        if part is None:
            part = untestable(statement, "no homogeneous fedlscl with the same scenario and settings: "
                                         + "; ".join(w for w in why if w))
        part.extra = {"client_final_acc": _per_client(het_rows)}
        claims.append(Claim("fig4", "Fig. 4", statement, d, rule, [part]))
    return claims


def _per_client(rows: pd.DataFrame) -> dict[str, float]:
    """Mean over seeds of each client's final accuracy (%), keyed ``client <i> (<arch>)``."""
    per = [r.metrics_client.get("per_client", {}).get("final_acc") for r in rows.itertuples()]
    per = [p for p in per if p]
    if not per or len({len(p) for p in per}) != 1:
        return {}
    archs = rows.iloc[0]["run_config"].get("small_models", []) if isinstance(rows.iloc[0]["run_config"], dict) else []
    mean = 100.0 * np.mean(np.array(per, dtype=float), axis=0)
    return {f"client {i}" + (f" ({archs[i % len(archs)]})" if archs else ""): float(v) for i, v in enumerate(mean)}


def fig5_claims(df: pd.DataFrame) -> list[Claim]:
    """Fig. 5: 20 buffered samples per class at most 1 point below 40."""
    statement = f"{FIG5_SMALL} buffered samples per class are within {FIG5_TOLERANCE:g} point of {FIG5_LARGE}"
    rule = (f"final accuracy (client space, %): buffer {FIG5_SMALL} at most {FIG5_TOLERANCE:g} point below buffer "
            f"{FIG5_LARGE} (above it satisfies the claim); not separated when the shortfall beyond "
            f"{FIG5_TOLERANCE:g} point is within the seeds' spread")
    if not (df["suite"] == "fig5").any():
        return [Claim("fig5", "Fig. 5", statement, None, rule, [untestable(statement, "suite fig5 absent: run --suite fig5")])]
    claims = []
    for d in _datasets(df[df["suite"] == "fig5"]):
        rows = df[(df["suite"] == "fig5") & (df["dataset"] == d) & (df["method"] == FEDLSCL)]
        by_size: dict[int, str] = {}
        for lab, cfg in zip(rows["label"], rows["method_config"]):
            if isinstance(cfg, dict) and isinstance(cfg.get("buffer_per_class"), int):
                by_size.setdefault(cfg["buffer_per_class"], lab)
        why = [f"no run with buffer_per_class {k} in suite fig5 on {d}" for k in (FIG5_SMALL, FIG5_LARGE)
               if k not in by_size]
        why += [m for k in (FIG5_SMALL, FIG5_LARGE) if k in by_size and (m := _absent(df, "fig5", by_size[k], d))]
        if why:
            claims.append(Claim("fig5", "Fig. 5", statement, d, rule, [untestable(statement, "; ".join(why))]))
            continue
        same = _same_buffers(rows, by_size[FIG5_SMALL], by_size[FIG5_LARGE])
        if same:
            claims.append(Claim("fig5", "Fig. 5", statement, d, rule, [untestable(statement, same)]))
            continue
        small, large = (_series(rows, by_size[k], _final) for k in (FIG5_SMALL, FIG5_LARGE))
        part = at_most_below(large, small, FIG5_TOLERANCE, statement)
        sizes = {k: _series(rows, lab, _final) for k, lab in sorted(by_size.items())}
        notes = ["final accuracy per buffer size: " + ", ".join(
            f"{k}: {_stat(s).text()}" for k, s in sizes.items() if s.values)]
        claims.append(Claim("fig5", "Fig. 5", statement, d, rule, [part], notes))
    return claims


def _same_buffers(rows: pd.DataFrame, small: str, large: str) -> str | None:
    """Why runs ``small`` and ``large`` cannot differ by their buffer, or None. Fed-LSCL uploads the features
    of its whole buffer every round, so equal bytes up on every seed both completed (same scenario) mean
    the two buffers held the same samples: no client holds more samples of a class than the smaller one."""
    up = {lab: _series(rows, lab, lambda r: r.mb_up_per_client) for lab in (small, large)}
    seeds = [sd for sd in up[small].values if sd in up[large].values
             and up[small].hashes.get(sd) == up[large].hashes.get(sd)]
    if not seeds or any(up[small].values[sd] != up[large].values[sd] for sd in seeds):
        return None
    return (f"{small} and {large} held the same buffer ({up[small].values[seeds[0]]:.3f} MB up per client on "
            f"each of seeds {', '.join(map(str, seeds))}): no client holds more than {FIG5_SMALL} samples of a "
            f"class, so the buffer size is not what differs; give the clients more data per class "
            f"(-o train_per_class=...)")


def communication_claims(df: pd.DataFrame) -> list[Claim]:
    """§5.3.2: Fed-LSCL sends fewer bytes (up + down per client over the run) than each baseline."""
    statement = "Fed-LSCL communicates less than the baselines"
    rule = ("MB up + down per client over the whole run (measured bytes); per baseline: fewer when the "
            "baseline's mean exceeds Fed-LSCL's by more than the larger std over seeds (one seed: the "
            "measured difference decides)")
    suite = table1_suite(df)
    if suite is None:
        return [Claim("communication", "§5.3.2", statement, None, rule, [untestable(
            statement, "no suite holds fedlscl and another method: run --suite table1")])]
    claims = []
    for d in _datasets(df[df["suite"] == suite]):
        rows = df[(df["suite"] == suite) & (df["dataset"] == d)]
        missing = _absent(df, suite, FEDLSCL, d)
        if missing:
            claims.append(Claim("communication", "§5.3.2", statement, d, rule, [untestable(statement, missing)]))
            continue
        ours = _series(rows, FEDLSCL, lambda r: r.mb_per_client)
        parts, notes = [], [f"rows: suite {suite}"]
        for o in _others(rows):
            if (m := _absent(df, suite, o, d)) is not None:
                notes.append(f"left out: {m}")
                continue
            p = greater(_series(rows, o, lambda r: r.mb_per_client), ours, f"Fed-LSCL vs {o}", unit="MB",
                        fmt=".4g", one_seed_ok=True)
            p.outcome = {HOLDS: "fewer", FAILS: "more"}.get(p.verdict, "")
            p.extra = {"baseline": o, **_comm_extra(rows, o)}
            parts.append(p)
        if not parts:
            parts = [untestable(statement, f"no completed run of another method in suite {suite} on {d}")]
        else:
            fewer = [p.extra["baseline"] for p in parts if p.outcome == "fewer"]
            more = [p.extra["baseline"] for p in parts if p.outcome == "more"]
            notes.append(f"fewer bytes than {len(fewer)} of {len(parts)} baselines"
                         + (f"; more than {', '.join(more)}" if more else ""))
            notes.append("Fed-LSCL per client: " + _comm_text(_comm_extra(rows, FEDLSCL)))
        claims.append(Claim("communication", "§5.3.2", statement, d, rule, parts, notes))
    return claims


def _comm_extra(rows: pd.DataFrame, label: str) -> dict[str, float]:
    """Mean over seeds of MB up, MB down and MB up + down per client-round (tasks x rounds_per_task)."""
    sub = _completed(rows[rows["label"] == label])
    rounds = [float(r.tasks) * float(r.run_config.get("rounds_per_task", math.nan))
              if isinstance(r.run_config, dict) else math.nan for r in sub.itertuples()]
    per_round = (sub["mb_per_client"].astype(float) / np.array(rounds, dtype=float)).mean() if len(sub) else math.nan
    return {"mb_up_per_client": float(sub["mb_up_per_client"].astype(float).mean()),
            "mb_down_per_client": float(sub["mb_down_per_client"].astype(float).mean()),
            "mb_per_client_round": float(per_round)}


def _comm_text(e: dict[str, float]) -> str:
    return (f"{e['mb_up_per_client']:.4g} MB up + {e['mb_down_per_client']:.4g} MB down; "
            f"{e['mb_per_client_round']:.4g} MB per client-round")


# ---------------------------------------------------------------------------------------- rendering

def claims_markdown(claims: list[Claim]) -> str:
    """A summary table (claim, dataset, verdict) and, per claim, its rule, parts and notes."""
    lines = ["| paper | claim | dataset | verdict |", "|---|---|---|---|"]
    for c in claims:
        v = c.verdict + (f": {c.reason}" if c.reason else "")
        lines.append(f"| {c.source} | {c.statement} | {c.dataset or '–'} | **{v}** |".replace("\n", " "))
    for c in claims:
        lines += ["", f"### {c.source}: {c.statement} ({c.dataset or 'no dataset'}): **{c.verdict}**", "",
                  f"Judged on: {c.rule}.", ""]
        lines += [f"- {p.line()}" for p in c.parts]
        for p in c.parts:
            if "client_final_acc" in p.extra and p.extra["client_final_acc"]:
                lines.append("- client-wise final accuracy of the heterogeneous run: " + ", ".join(
                    f"{k} {v:.2f}" for k, v in p.extra["client_final_acc"].items()))
            if "mb_up_per_client" in p.extra:
                lines.append(f"  - {p.extra['baseline']} per client: {_comm_text(p.extra)}")
        lines += [f"- note: {n}" for n in c.notes]
    return "\n".join(lines) + "\n"


STATISTICS_TEXT = ("Verdicts: holds, does not hold, not separated (a difference within the seeds' spread), "
                   "not testable with these runs (with the reason). Each side is mean ± sample std over the "
                   "seeds both rows completed on the same scenario; two sides are separated when |mean "
                   "difference| > the larger of their two stds. One common seed: accuracy comparisons are not "
                   "testable (bytes: the measured difference decides). Accuracies in %, client space.")


def claims_json(claims: list[Claim]) -> dict[str, Any]:
    return {"statistics": STATISTICS_TEXT, "verdicts": list(VERDICTS), "claims": [c.to_dict() for c in claims]}


def write_claims(claims: list[Claim], out: str | Path, title: str = "Claim verdicts") -> list[Path]:
    """``claims.md`` and ``claims.json`` in ``out``; returns their paths."""
    from fcl_bench.store import atomic_write

    out = Path(out)
    md, js = out / "claims.md", out / "claims.json"
    atomic_write(md, f"# {title}\n\n{STATISTICS_TEXT}\n\n{claims_markdown(claims)}")
    atomic_write(js, json.dumps(_plain(claims_json(claims)), indent=2, allow_nan=False) + "\n")
    return [md, js]


def _plain(v: Any) -> Any:
    """JSON-ready: numpy scalars as Python numbers, NaN as null, dict keys as strings."""
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    if isinstance(v, (int, np.integer)):
        return int(v)
    if isinstance(v, (float, np.floating)):
        return float(v) if math.isfinite(v) else None
    return v if v is None or isinstance(v, str) else str(v)


def claims_text(claims: list[Claim]) -> list[str]:
    """Console lines: one per claim (verdict first), one per part."""
    out = []
    for c in claims:
        out.append(f"[{c.verdict}] {c.source}: {c.statement} ({c.dataset or '–'})")
        out += [f"    {p.line()}" for p in c.parts]
    return out
