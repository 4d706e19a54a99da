"""Results -> tables: loading runs, scenario groups, mean ± std over seeds, Markdown / CSV / LaTeX.

Every table is a :class:`Table`: rows are run labels ("names"), numeric columns are keyed by
``(header, column)`` (e.g. ``("synthetic", "task 1")``) and hold the mean, sample standard deviation
(``ddof=1``; none with one seed) and seed count of one number per run. Accuracies are shown in %.

Scenario groups: methods are only comparable on the same scenario. Runs of the same (dataset, seed)
whose scenario hashes differ are split into separate *scenario groups* (greedily, in row order: a label
joins the first group whose hashes it agrees with), and each group gets its own tables and plots; the
report says so in a warning. With one group nothing changes.

Not applicable cells: a method whose heads cover only each client's own classes (``Method.global_space =
False``, recorded as ``global_space_applicable`` in metrics.json) has no global-space number of its own, so
its global-space cells show ``n/a†`` with a footnote, are left out of the CSV means and are never bold.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from fcl_bench.store import load_runs


class ReportError(ValueError):
    """Nothing to report, or results that cannot be reported; the message says what to do."""


# run-config fields that never make two runs different experiments (seed: pooled over; dataset: columns)
_IGNORED_RUN_KEYS = {"seed", "dataset", "device", "data_root", "download", "eval_batch_size"}
_BETTER = {"max", "min"}
NA = "n/a†"
GLOBAL_NA_NOTE = ("† n/a: not applicable to {rows}: each client's heads cover only its own classes, so the "
                  "global space (all classes any client has seen) would repeat the client-space number.")


# ---------------------------------------------------------------------------------------------- loading

def load_results(root: str | Path) -> pd.DataFrame:
    """One row per run under ``root`` (failed and unfinished runs included, with ``state`` and ``reason``).

    Columns of :func:`fcl_bench.store.load_runs` plus ``name`` (the table row: the label, prefixed by
    ``suite/`` when one label occurs in several suites), ``clients``, ``tasks``, ``mb_up_per_client``,
    ``mb_down_per_client``, ``mb_per_client`` (up + down), ``tflops_per_client``, ``server_tflops`` (the
    server's compute over the run, NaN for runs recorded before it was measured) and ``group`` (scenario
    group, 1-based; NaN for runs that did not complete).
    """
    root = Path(root)
    if not root.is_dir():
        raise ReportError(f"no results folder at {root}; give the --out folder of `fcl-bench run`")
    df = load_runs(root)
    if df.empty:
        raise ReportError(f"no runs under {root}: expected <suite>/<label>/<dataset>/seed<k>/status.json")
    df = _fill_identity(df)
    df["name"] = _names(df)
    completed = df["state"].eq("completed") & df["metrics"].notna()
    df["state"] = df["state"].where(completed | df["state"].ne("completed"), "incomplete")
    df["clients"] = [_run_key(rc, "clients") for rc in df["run_config"]]
    df["tasks"] = [len(m["acc"]) if isinstance(m, dict) else np.nan for m in df["metrics"]]
    per_client = df["clients"].astype(float)
    df["mb_up_per_client"] = df["bytes_up"].astype(float) / per_client / 1e6
    df["mb_down_per_client"] = df["bytes_down"].astype(float) / per_client / 1e6
    df["mb_per_client"] = df["mb_up_per_client"] + df["mb_down_per_client"]
    df["tflops_per_client"] = df["client_flops"].astype(float) / per_client / 1e12
    for col in ("server_flops", "server_seconds"):
        if col not in df:
            df[col] = np.nan
    df["server_tflops"] = df["server_flops"].astype(float) / 1e12
    df["group"] = assign_scenario_groups(df)
    df["global_space_applicable"] = [_global_applicable(m, meth) for m, meth in zip(df["metrics"], df["method"])]
    order = {n: i for i, n in enumerate(order_names(df))}
    keys = {"name": lambda s: s.map(order), "seed": lambda s: pd.to_numeric(s, errors="coerce"),
            "dataset": lambda s: s.astype(str)}
    return df.sort_values(["name", "dataset", "seed"], key=lambda s: keys[s.name](s), ignore_index=True)


def _fill_identity(df: pd.DataFrame) -> pd.DataFrame:
    """Runs without a config.json (crashed early) get suite/label/dataset/seed from their path."""
    cols = ["suite", "method", "label", "dataset", "seed", "scenario_hash", "run_config", "method_config",
            "final_acc", "avg_incremental_acc", "forgetting", "bwt", "bytes_up", "bytes_down", "client_flops",
            "wall_seconds", "acc", "metrics", "metrics_client", "metrics_global"]
    df = df.reindex(columns=list(df.columns) + [c for c in cols if c not in df.columns])
    df = df.astype({c: object for c in ("suite", "method", "label", "dataset", "seed")})
    for i, path in df["path"].items():
        suite, label, dataset, seed_dir = Path(path).parts[-4:]
        seed = int(seed_dir[4:]) if seed_dir.startswith("seed") and seed_dir[4:].isdigit() else seed_dir
        for col, val in (("suite", suite), ("label", label), ("method", label), ("dataset", dataset),
                         ("seed", seed)):
            if not isinstance(df.at[i, col], (str, int, np.integer)):
                df.at[i, col] = val
    return df


def _global_applicable(metrics: Any, method: Any) -> bool:
    """``global_space_applicable`` from metrics.json; runs written before it existed ask the registered
    method class (``Method.global_space``), and unknown methods count as applicable."""
    if isinstance(metrics, dict) and "global_space_applicable" in metrics:
        return bool(metrics["global_space_applicable"])
    try:
        from fcl_bench.registry import get_method
        return bool(get_method(str(method)).global_space)
    except Exception:  # a plugin that is not installed here, or a run without a method name
        return True


def _names(df: pd.DataFrame) -> list[str]:
    suites_per_label = df.groupby("label")["suite"].nunique()
    return [f"{s}/{lab}" if suites_per_label[lab] > 1 else lab for s, lab in zip(df["suite"], df["label"])]


def _run_key(run_config: Any, key: str) -> Any:
    return run_config.get(key, np.nan) if isinstance(run_config, dict) else np.nan


def order_names(df: pd.DataFrame) -> list[str]:
    """Row order: built-in methods in the paper's order (baselines first), then other methods, by label."""
    from fcl_bench.registry import BUILTIN_MODULES

    rank = {m: i for i, m in enumerate(BUILTIN_MODULES)}
    firsts = df.drop_duplicates("name")
    keys = {n: (rank.get(m, len(rank)), str(m), _natural(n))
            for n, m in zip(firsts["name"], firsts["method"])}
    return sorted(keys, key=keys.get)


def _natural(s: str) -> tuple:
    """Sort key putting ``buffer5`` before ``buffer10``; the name itself breaks ties (e.g. 1 vs 01)."""
    parts = re.split(r"(\d+)", s)
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in parts if p), s


def assign_scenario_groups(df: pd.DataFrame) -> pd.Series:
    """Scenario group per completed run (1, 2, ...): labels that agree on every (dataset, seed) hash."""
    groups: list[dict[tuple, str]] = []
    out = pd.Series(np.nan, index=df.index, dtype=float)
    done = df[df["state"].eq("completed")]
    for name in order_names(done) if len(done) else []:
        rows = done[done["name"] == name]
        sig = {(d, s): h for d, s, h in zip(rows["dataset"], rows["seed"], rows["scenario_hash"])}
        fits = [gi for gi, g in enumerate(groups) if all(g.get(k, h) == h for k, h in sig.items())]
        if not fits:
            groups.append({})
            fits = [len(groups) - 1]
        groups[fits[0]].update(sig)
        out[rows.index] = fits[0] + 1
    return out


def scenario_conflicts(df: pd.DataFrame) -> pd.DataFrame:
    """(dataset, seed) pairs with more than one scenario hash among completed runs, with the labels."""
    done = df[df["state"].eq("completed")]
    rows = []
    for (d, s), sub in done.groupby(["dataset", "seed"]):
        if sub["scenario_hash"].nunique() > 1:
            for h, hs in sub.groupby("scenario_hash"):
                rows.append({"dataset": d, "seed": s, "scenario": str(h)[:12],
                             "group": int(hs["group"].iloc[0]), "labels": ", ".join(hs["name"])})
    return pd.DataFrame(rows, columns=["dataset", "seed", "scenario", "group", "labels"])


# ------------------------------------------------------------------------------------------ the Table

@dataclass
class Table:
    """Numbers as mean / std / n per (row, column); ``text`` holds leading non-numeric columns."""

    title: str
    mean: pd.DataFrame
    std: pd.DataFrame
    n: pd.DataFrame
    better: dict[tuple[str, str], str | None]
    fmt: dict[tuple[str, str], str]
    text: pd.DataFrame = field(default_factory=pd.DataFrame)
    row_header: str = "method"
    na: set[tuple[str, tuple[str, str]]] = field(default_factory=set)   # (row, column) not applicable
    notes: list[str] = field(default_factory=list)                       # footnotes, printed below

    @property
    def rows(self) -> list[str]:
        return list(self.mean.index)

    @property
    def columns(self) -> list[tuple[str, str]]:
        return list(self.mean.columns)


def aggregate(long: pd.DataFrame, rows: Sequence[str], title: str, better: dict, fmt: dict,
              text: pd.DataFrame | None = None, row_header: str = "method") -> Table:
    """``long`` has columns name, header, column, value (one value per run): mean, std, n over runs."""
    g = long.groupby(["name", "header", "column"], sort=False)["value"]
    cols = list(dict.fromkeys(zip(long["header"], long["column"])))

    def wide(s: pd.Series) -> pd.DataFrame:
        w = s.unstack(["header", "column"]) if len(s) else pd.DataFrame(index=[])
        return w.reindex(index=list(rows), columns=pd.MultiIndex.from_tuples(cols) if cols else None)

    t = text.reindex(list(rows)) if text is not None else pd.DataFrame(index=list(rows))
    return Table(title=title, mean=wide(g.mean()), std=wide(g.std(ddof=1)), n=wide(g.count()),
                 better={c: better.get(c[1], better.get(c)) for c in cols},
                 fmt={c: fmt.get(c[1], fmt.get(c, ".2f")) for c in cols}, text=t,
                 row_header=row_header)


def seeds_text(df: pd.DataFrame, rows: Sequence[str]) -> pd.DataFrame:
    """A ``seeds`` text column: the seeds each row averages over."""
    seeds = df.groupby("name")["seed"].apply(lambda s: ", ".join(str(x) for x in sorted(set(s))))
    return pd.DataFrame({"seeds": seeds}).reindex(list(rows))


# ------------------------------------------------------------------------------------------ tables

TABLE1_READINGS = {
    "seen": "accuracy after each task on the test sets of all tasks so far",
    "current": "accuracy after each task on the test set of the current task only",
}


def table1(df: pd.DataFrame, space: str = "client", reading: Literal["seen", "current"] = "seen") -> Table:
    """Paper Table 1: accuracy after each task (%) per dataset, one row per label.

    ``reading`` picks which of the paper's two possible readings: ``seen`` (the default, metric ``acc``)
    on the test sets of all tasks so far, or ``current`` (``current_task_acc``) on the current task's only.
    """
    if reading not in TABLE1_READINGS:
        raise ValueError(f"reading must be one of {', '.join(TABLE1_READINGS)}; got {reading!r}")
    key = f"metrics_{space}"
    recs = [{"name": r.name, "header": r.dataset, "column": f"task {t + 1}", "value": 100.0 * a}
            for r in df.itertuples() for t, a in enumerate(_table1_values(getattr(r, key), reading))]
    rows = order_names(df)
    better = {r["column"]: "max" for r in recs}
    title = f"Task-wise accuracy (%, {space} space): {TABLE1_READINGS[reading]}, mean ± std over seeds"
    if not recs:
        return _empty()
    t = aggregate(pd.DataFrame(recs), rows, title, better=better, fmt={}, text=seeds_text(df, rows))
    return mark_global_not_applicable(t, df) if space == "global" else t


def _table1_values(space_metrics: dict, reading: str) -> list[float]:
    if reading == "seen":
        return space_metrics["acc"]
    if "current_task_acc" in space_metrics:
        return space_metrics["current_task_acc"]
    # runs stored before current_task_acc existed: the client-averaged diagonal of the accuracy matrix
    a = np.array(space_metrics["accuracy_matrix"], dtype=float)
    return np.diagonal(a, axis1=1, axis2=2).mean(0).tolist()


def mark_global_not_applicable(t: Table, df: pd.DataFrame, header: str | None = None) -> Table:
    """Blank the cells of rows whose runs have no global space (``global_space_applicable`` False): in every
    column, or only under ``header``; they render as ``n/a†`` with :data:`GLOBAL_NA_NOTE` below the table."""
    if "global_space_applicable" not in df:
        return t
    applicable = df.groupby("name")["global_space_applicable"].all()
    rows = [r for r in t.rows if not applicable.get(r, True)]
    cols = [c for c in t.columns if header is None or c[0] == header]
    if not rows or not cols:
        return t
    for r in rows:
        for c in cols:
            t.mean.at[r, c], t.std.at[r, c], t.n.at[r, c] = np.nan, np.nan, 0
            t.na.add((r, c))
    t.notes.append(GLOBAL_NA_NOTE.format(rows=", ".join(rows)))
    return t


def _empty() -> Table:
    e = pd.DataFrame()
    return Table("", e, e, e, {}, {})


_SUMMARY_ACC = [("final_acc", "final acc", "max"), ("avg_incremental_acc", "avg inc acc", "max"),
                ("forgetting", "forgetting", "min"), ("bwt", "BWT", "max")]
_SUMMARY_COST = [("mb_up_per_client", "MB up/client", "min", ".3g"),
                 ("mb_down_per_client", "MB down/client", "min", ".3g"),
                 ("tflops_per_client", "TFLOPs/client", "min", ".3g"),
                 # never bolded: torch's counter sees matrix products, not an averaging server's sums
                 ("server_tflops", "server TFLOPs", None, ".3g"),
                 ("server_seconds", "server s", None, ".2f"),
                 ("wall_seconds", "wall s", "min", ".1f")]


def summary_table(df: pd.DataFrame, dataset: str) -> Table:
    """Final / average incremental accuracy, forgetting, BWT (%, both evaluation spaces) and costs."""
    sub = df[df["dataset"] == dataset]
    recs, better, fmt = [], {}, {}
    for r in sub.itertuples():
        for space in ("client", "global"):
            m = getattr(r, f"metrics_{space}")
            for key, col, b in _SUMMARY_ACC:
                recs.append({"name": r.name, "header": space, "column": col, "value": 100.0 * m[key]})
                better[(space, col)] = b
        for key, col, b, f in _SUMMARY_COST:
            recs.append({"name": r.name, "header": "cost", "column": col, "value": float(getattr(r, key))})
            better[("cost", col)], fmt[("cost", col)] = b, f
    rows = order_names(sub)
    title = (f"Summary on {dataset}: accuracies in % (client space: classes the client has seen; global "
             "space: classes any client has seen); MB and TFLOPs per client and the server's TFLOPs and "
             "seconds, totals over the run")
    t = aggregate(pd.DataFrame(recs), rows, title, better=better, fmt=fmt, text=seeds_text(sub, rows))
    return mark_global_not_applicable(t, sub, header="global")


def varied_keys(df: pd.DataFrame) -> dict[str, dict[str, Any]]:
    """Config keys whose values differ across the labels of ``df`` -> {name: value}. Method config keys
    come first; run config keys that clash with a method key get a ``run.`` prefix."""
    firsts = df.drop_duplicates("name").set_index("name")
    out: dict[str, dict[str, Any]] = {}
    for source, prefix in (("method_config", ""), ("run_config", "run.")):
        cfgs = {n: (c if isinstance(c, dict) else {}) for n, c in firsts[source].items()}
        keys = sorted({k for c in cfgs.values() for k in c} - (_IGNORED_RUN_KEYS if prefix else set()))
        for k in keys:
            vals = {n: c.get(k) for n, c in cfgs.items()}
            if len({repr(v) for v in vals.values()}) > 1:
                out[f"{prefix}{k}" if k in out else k] = vals
    return out


def variants_table(df: pd.DataFrame, method: str) -> Table | None:
    """Paper Table 2 format: the labels of one method, the config switches that tell them apart, and final
    accuracy (client space, %) per dataset. None when the method has fewer than two labels."""
    sub = df[df["method"] == method]
    rows = order_names(sub)
    if len(rows) < 2:
        return None
    keys = varied_keys(sub)
    text = pd.DataFrame({k: pd.Series(v, dtype=object) for k, v in keys.items()}, index=rows, dtype=object)
    text.insert(0, "seeds", seeds_text(sub, rows)["seeds"])
    recs = [{"name": r.name, "header": r.dataset, "column": "final acc", "value": 100.0 * r.final_acc}
            for r in sub.itertuples()]
    title = (f"Variants of {method} (Table 2 format): final accuracy (%, client space) on all tasks; the "
             "columns before it are the settings that differ")
    return aggregate(pd.DataFrame(recs), rows, title, better={"final acc": "max"}, fmt={}, text=text)


@dataclass
class SensitivitySweep:
    """Labels of one method that differ only in one numeric key, one label (or more) per value."""

    method: str
    key: str
    values: dict[str, float]      # name -> value


def find_sweeps(df: pd.DataFrame, min_values: int = 3) -> list[SensitivitySweep]:
    """Sensitivity sweeps (Figs. 3, 5): for each method and numeric key, the largest set of labels whose
    configs agree on everything else and take at least ``min_values`` distinct values of that key."""
    sweeps = []
    for method, sub in df.groupby("method", sort=False):
        firsts = sub.drop_duplicates("name").set_index("name")
        cfgs = {n: _flat_config(mc, rc) for n, mc, rc in zip(firsts.index, firsts["method_config"],
                                                              firsts["run_config"])}
        for key in sorted({k for c in cfgs.values() for k in c}):
            best: dict[str, float] = {}
            for members in _agree_except(cfgs, key).values():
                vals = {n: cfgs[n].get(key) for n in members}
                if all(_is_number(v) for v in vals.values()) and len(set(vals.values())) >= min_values \
                        and len(members) > len(best):
                    best = {n: float(v) for n, v in vals.items()}
            if best:
                sweeps.append(SensitivitySweep(str(method), key, best))
    return sweeps


def _flat_config(method_config: Any, run_config: Any) -> dict[str, Any]:
    run = {f"run.{k}": v for k, v in (run_config or {}).items() if k not in _IGNORED_RUN_KEYS}
    return {**run, **(method_config or {})}


def _agree_except(cfgs: dict[str, dict], key: str) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {}
    for n, c in cfgs.items():
        if key in c:
            groups.setdefault(repr(sorted((k, repr(v)) for k, v in c.items() if k != key)), []).append(n)
    return groups


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def failed_table(df: pd.DataFrame) -> pd.DataFrame:
    """Runs that did not complete: suite, label, dataset, seed, state, reason, path."""
    bad = df[~df["state"].eq("completed")]
    out = bad[["suite", "label", "dataset", "seed", "state", "reason", "path"]].copy()
    reason = out["reason"].fillna("").astype(str)
    out["reason"] = reason.replace("", "(no reason recorded: unfinished or killed)")
    return out.reset_index(drop=True)


def runs_csv(df: pd.DataFrame) -> str:
    """Every run's scalar columns, one row per run (the raw data behind every table)."""
    keep = [c for c in df.columns if not df[c].map(lambda v: isinstance(v, (dict, list))).any()]
    return df[keep].to_csv(index=False)


# ------------------------------------------------------------------------------------------ rendering

def _display(t: Table, r: str, c: tuple[str, str]) -> tuple[str, str] | None:
    """(mean, std) as displayed strings, or None for an empty cell."""
    m = t.mean.at[r, c]
    if pd.isna(m):
        return None
    s = t.std.at[r, c]
    return format(m, t.fmt[c]), (format(s, t.fmt[c]) if pd.notna(s) and t.n.at[r, c] > 1 else "")


def _best(t: Table, c: tuple[str, str]) -> set[str]:
    """Rows whose displayed mean is the best of the column (ties all win); none with fewer than 2 values."""
    how = t.better.get(c)
    col = t.mean[c].dropna()
    if how not in _BETTER or len(col) < 2:
        return set()
    shown = col.map(lambda v: float(format(v, t.fmt[c])))
    target = shown.max() if how == "max" else shown.min()
    return set(shown.index[shown == target])


def _header(c: tuple[str, str]) -> str:
    return f"{c[0]} {c[1]}" if c[0] else str(c[1])


def _text_cell(v: Any, style: str) -> str:
    if isinstance(v, bool) or isinstance(v, np.bool_):
        return {"md": ("✓", "×"), "tex": (r"\checkmark", r"$\times$")}[style][0 if v else 1]
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–" if style == "md" else "--"
    if isinstance(v, list):
        v = ",".join(map(str, v))
    return str(v) if style == "md" else latex_escape(str(v))


def to_markdown(t: Table) -> str:
    """A GitHub Markdown table; best value per column in bold."""
    tcols = list(t.text.columns)
    head = [t.row_header, *tcols, *(_header(c) for c in t.columns)]
    rule = ["---"] * (1 + len(tcols)) + ["---:"] * len(t.columns)
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(rule) + "|"]
    best = {c: _best(t, c) for c in t.columns}
    for r in t.rows:
        cells = [r, *(_text_cell(t.text.at[r, k], "md") for k in tcols)]
        for c in t.columns:
            d = _display(t, r, c)
            s = NA if (r, c) in t.na else "–" if d is None else (f"{d[0]} ± {d[1]}" if d[1] else d[0])
            cells.append(f"**{s}**" if r in best[c] else s)
        lines.append("| " + " | ".join(cells) + " |")
    notes = ["", *t.notes] if t.notes else []
    return "\n".join(lines + notes) + "\n"


def to_csv(t: Table) -> str:
    """Full-precision numbers: one row per table row; ``<header>/<column>/{mean,std,n}`` columns."""
    out = pd.DataFrame(index=pd.Index(t.rows, name=t.row_header))
    for k in t.text.columns:
        out[k] = t.text[k].map(lambda v: ",".join(map(str, v)) if isinstance(v, list) else v)
    for c in t.columns:
        base = "/".join(x for x in c if x)
        na = [r for r in t.rows if (r, c) in t.na]
        out[f"{base}/mean"], out[f"{base}/std"] = t.mean[c].astype(object), t.std[c]
        out.loc[na, f"{base}/mean"] = "n/a"
        out[f"{base}/n"] = t.n[c].astype("Int64")
    return out.to_csv()


def latex_escape(s: str) -> str:
    rep = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
           "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "±": r"$\pm$",
           "†": r"$^\dagger$"}
    return "".join(rep.get(ch, ch) for ch in s)


def to_latex(t: Table, label: str = "") -> str:
    """A booktabs ``table`` (needs ``booktabs`` and, for check marks, ``amssymb``); one row per table row."""
    tcols = list(t.text.columns)
    nlead = 1 + len(tcols)
    spans = _spans(h for h, _ in t.columns)
    lines = [r"\begin{table}[t]", r"\centering", r"\small",
             r"\begin{tabular}{" + "l" * nlead + "r" * len(t.columns) + "}", r"\toprule"]
    if any(h for h, _ in spans):
        lines.append(" & " * (nlead - 1) + "".join(
            f" & \\multicolumn{{{k}}}{{c}}{{{latex_escape(h)}}}" for h, k in spans) + r" \\")
        start = nlead + 1
        rules = []
        for _, k in spans:
            rules.append(rf"\cmidrule(lr){{{start}-{start + k - 1}}}")
            start += k
        lines.append(" ".join(rules))
    head = [t.row_header.capitalize(), *tcols, *(str(c[1]) for c in t.columns)]
    lines += [" & ".join(latex_escape(h) for h in head) + r" \\", r"\midrule"]
    best = {c: _best(t, c) for c in t.columns}
    for r in t.rows:
        cells = [latex_escape(r), *(_text_cell(t.text.at[r, k], "tex") for k in tcols)]
        for c in t.columns:
            cells.append(latex_escape(NA) if (r, c) in t.na else _latex_num(_display(t, r, c), r in best[c]))
        lines.append(" & ".join(cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    lines += [r"\par\smallskip{\footnotesize " + latex_escape(n) + "}" for n in t.notes]
    lines.append(rf"\caption{{{latex_escape(t.title)}}}")
    if label:
        lines.append(rf"\label{{{label}}}")
    return "\n".join(lines + [r"\end{table}"]) + "\n"


def _latex_num(d: tuple[str, str] | None, bold: bool) -> str:
    if d is None:
        return "--"
    body = f"{d[0]} \\pm {d[1]}" if d[1] else d[0]
    return f"$\\mathbf{{{body}}}$" if bold else f"${body}$"


def _spans(headers: Iterable[str]) -> list[tuple[str, int]]:
    spans: list[tuple[str, int]] = []
    for h in headers:
        if spans and spans[-1][0] == h:
            spans[-1] = (h, spans[-1][1] + 1)
        else:
            spans.append((h, 1))
    return spans


def frame_to_markdown(df: pd.DataFrame, fmt: Callable[[Any], str] = str) -> str:
    """A plain DataFrame (no numbers to bold) as a Markdown table."""
    cols = list(df.columns)
    lines = ["| " + " | ".join(map(str, cols)) + " |", "|" + "|".join(["---"] * len(cols)) + "|"]
    for row in df.itertuples(index=False):
        lines.append("| " + " | ".join(fmt(v).replace("|", "\\|").replace("\n", " ") for v in row) + " |")
    return "\n".join(lines) + "\n"
