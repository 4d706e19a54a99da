"""Results -> figures: every figure is written as PNG and PDF.

Figures are built as :class:`matplotlib.figure.Figure` objects, without pyplot: no backend is chosen and
no global state changes, so the report works headless and leaves a user's interactive session alone.
Each label ("name") keeps one colour and marker across every figure of a report (:func:`palette`).
Accuracies are in %; error bars and bands are ± one sample standard deviation over seeds.
Matplotlib's own files (its font cache) go to ``$FCL_BENCH_CACHE/matplotlib`` unless ``MPLCONFIGDIR`` is set,
so a report writes nothing outside its folder and the suite's cache.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from fcl_bench.datasets.synthetic import cache_root

os.environ.setdefault("MPLCONFIGDIR", str(cache_root() / "matplotlib"))  # before matplotlib is imported

import matplotlib  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter, NullLocator  # noqa: E402

from fcl_bench.report.tables import SensitivitySweep, order_names  # noqa: E402

_RC = {"font.size": 9, "axes.titlesize": 10, "axes.labelsize": 9, "legend.fontsize": 8,
       "savefig.bbox": "tight"}


def _styled(fn: Callable) -> Callable:
    """Run a figure function under the report's rc settings (scoped, not global)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with matplotlib.rc_context(_RC):
            return fn(*args, **kwargs)
    return wrapper


def _cmap(name: str):
    return matplotlib.colormaps[name]


_MARKERS = ["o", "s", "^", "D", "v", "P", "X", "<", ">", "p", "h", "*"]


@dataclass(frozen=True)
class Style:
    """How one name is drawn in every figure of a report."""

    colour: tuple
    marker: str


def palette(names: Sequence[str]) -> dict[str, Style]:
    """One fixed colour and marker per name, in row order (tab10 up to 10 names, else tab20, tab20b and
    tab20c: 60 distinct colours, then repeating with other markers). Markers differ too, so names with
    identical results stay distinguishable where they overlap."""
    if len(names) <= 10:
        colours = [_cmap("tab10")(i) for i in range(10)]
    else:
        colours = [_cmap(m)(i) for m in ("tab20", "tab20b", "tab20c") for i in range(20)]
    return {name: Style(colours[i % len(colours)], _MARKERS[i % len(_MARKERS)])
            for i, name in enumerate(names)}


def save(fig: Figure, path: Path) -> list[Path]:
    """Write ``path.png`` (150 dpi) and ``path.pdf``; close the figure."""
    path.parent.mkdir(parents=True, exist_ok=True)
    out = [path.with_suffix(".png"), path.with_suffix(".pdf")]
    fig.savefig(out[0], dpi=150)
    fig.savefig(out[1])
    return out


def _legend(fig: Figure, axes: Sequence[Axes]) -> None:
    handles, labels = {}, []
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in handles:
                handles[lab] = h
                labels.append(lab)
    if labels:
        fig.legend([handles[lab] for lab in labels], labels, loc="center left", bbox_to_anchor=(1.0, 0.5),
                   frameon=False, title="method")


def _grid(n: int, ncols: int, w: float, h: float) -> tuple[Figure, list[Axes]]:
    ncols = max(1, min(ncols, n))
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(w * ncols, h * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    flat = list(axes.ravel())
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


def _mean_std(values: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    arr = np.stack(values).astype(float)
    std = arr.std(0, ddof=1) if len(arr) > 1 else np.zeros(arr.shape[1:])
    return arr.mean(0), std


@_styled
def acc_vs_task(df: pd.DataFrame, styles: dict[str, Style], path: Path) -> list[Path]:
    """Accuracy after each task (client space, %) per label, ± std band; one panel per dataset."""
    datasets = sorted(df["dataset"].unique())
    fig, axes = _grid(len(datasets), 3, 4.2, 3.2)
    for ax, d in zip(axes, datasets):
        sub = df[df["dataset"] == d]
        for name in order_names(sub):
            st = styles[name]
            accs = [100.0 * np.asarray(m["acc"]) for m in sub.loc[sub["name"] == name, "metrics_client"]]
            mean, std = _mean_std(accs)
            x = np.arange(1, len(mean) + 1)
            ax.plot(x, mean, marker=st.marker, ms=6, mfc="none", color=st.colour, label=name)
            ax.fill_between(x, mean - std, mean + std, color=st.colour, alpha=0.15, lw=0)
        ax.set(title=d, xlabel="after task", ylabel="accuracy on tasks so far (%)")
        ax.set_xticks(x)
        _pct_axis(ax)
        ax.grid(alpha=0.3)
    _legend(fig, axes)
    return save(fig, path)


def _pct_axis(ax: Axes, min_span: float = 10.0) -> None:
    """Y limits inside [0, 100] spanning at least ``min_span`` points, so ties and tiny gaps do not
    look like large differences."""
    lo, hi = ax.get_ylim()
    if hi - lo < min_span:
        mid = (lo + hi) / 2
        lo, hi = mid - min_span / 2, mid + min_span / 2
    if lo < 0:
        lo, hi = 0.0, hi - lo
    if hi > 100:
        lo, hi = lo - (hi - 100), 100.0
    ax.set_ylim(max(lo, 0.0), hi)


@_styled
def acc_vs_cost(df: pd.DataFrame, styles: dict[str, Style], path: Path, cost: str, xlabel: str) -> list[Path]:
    """Final accuracy (%) against a per-client cost column (log x); error bars ± std over seeds."""
    datasets = sorted(df["dataset"].unique())
    fig, axes = _grid(len(datasets), 3, 4.2, 3.2)
    for ax, d in zip(axes, datasets):
        sub = df[df["dataset"] == d]
        for name in order_names(sub):
            rows = sub[sub["name"] == name]
            x, y = rows[cost].astype(float), 100.0 * rows["final_acc"].astype(float)
            if x.isna().all():
                continue
            st = styles[name]
            xerr, yerr = _spread(x), _spread(y)
            if xerr or yerr:
                ax.errorbar(x.mean(), y.mean(), yerr=yerr, xerr=xerr, fmt="none", elinewidth=0.8, capsize=3,
                            color=st.colour)
            ax.plot(x.mean(), y.mean(), st.marker, ms=8, mfc="none", mew=1.5, color=st.colour, label=name)
        ax.set(title=d, xlabel=xlabel, ylabel="final accuracy (%)")
        _log_x(ax)
        _pct_axis(ax)
        ax.grid(alpha=0.3, which="both")
    _legend(fig, axes)
    return save(fig, path)


def _spread(v: pd.Series) -> float | None:
    """Sample std over seeds, or None when there is nothing to draw (one seed, or no spread)."""
    sd = float(v.std(ddof=1)) if len(v) > 1 else 0.0
    return sd if sd > 0 else None


def _log_x(ax: Axes) -> None:
    """Log x with plain-number labels at 1, 2, 5 x 10^k and a margin so points do not sit on the frame."""
    ax.set_xscale("log")
    lo, hi = ax.dataLim.x0, ax.dataLim.x1
    if lo > 0 and np.isfinite(lo) and np.isfinite(hi):
        ax.set_xlim(lo / 10 ** 0.4, hi * 10 ** 0.4)
    decades = math.log10(ax.get_xlim()[1] / ax.get_xlim()[0])
    ax.xaxis.set_major_locator(LogLocator(subs=(1.0,) if decades > 4 else (1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())


@_styled
def heatmaps(df: pd.DataFrame, path: Path, dataset: str) -> list[Path]:
    """Accuracy matrix a[t, i] (%, client space) per label, averaged over clients and seeds."""
    sub = df[df["dataset"] == dataset]
    names = order_names(sub)
    fig, axes = _grid(len(names), 4, 3.0, 2.8)
    for ax, name in zip(axes, names):
        mats = [np.array(m["accuracy_matrix"], dtype=float)
                for m in sub.loc[sub["name"] == name, "metrics_client"]]
        stack = np.concatenate(mats, axis=0)     # (clients x seeds, T, T), NaN above the diagonal
        T = stack.shape[1]
        a = np.full((T, T), np.nan)
        low = np.tril_indices(T)
        a[low] = 100.0 * stack[:, low[0], low[1]].mean(0)
        im = ax.imshow(a, vmin=0, vmax=100, cmap="viridis")
        for t, i in zip(*np.tril_indices(T)):
            ax.text(i, t, f"{a[t, i]:.0f}", ha="center", va="center", fontsize=7 if T <= 6 else 5,
                    color="white" if a[t, i] < 60 else "black")
        ax.set_xticks(range(T), [str(i + 1) for i in range(T)])
        ax.set_yticks(range(T), [str(t + 1) for t in range(T)])
        ax.set(title=name, xlabel="test set of task", ylabel="after task")
    fig.colorbar(im, ax=axes, shrink=0.8, label="accuracy (%)")
    fig.suptitle(f"Accuracy matrices on {dataset} (mean over clients and seeds)")
    return save(fig, path)


@_styled
def client_bars(df: pd.DataFrame, styles: dict[str, Style], path: Path) -> list[Path]:
    """Fig. 4 style: final accuracy (%) of each client on all its tasks, grouped bars per label."""
    datasets = sorted(df["dataset"].unique())
    k_max = int(df["clients"].max())
    width = min(12.0, max(5.0, 1.5 + 0.12 * df["name"].nunique() * k_max))
    if any("\n" in tick for d in datasets for tick in _client_ticks(df[df["dataset"] == d], k_max)):
        width = max(width, 1.5 + 1.8 * k_max)     # room for architecture names under the bars
    fig, axes = _grid(len(datasets), 1, width, 3.0)
    for ax, d in zip(axes, datasets):
        sub = df[df["dataset"] == d]
        names = order_names(sub)
        width = 0.8 / len(names)
        for j, name in enumerate(names):
            per = [np.asarray(m["per_client"]["final_acc"])
                   for m in sub.loc[sub["name"] == name, "metrics_client"]]
            mean, std = _mean_std(per)
            x = np.arange(len(mean)) + (j - (len(names) - 1) / 2) * width
            ax.bar(x, 100.0 * mean, width, yerr=100.0 * std if len(per) > 1 else None, capsize=2,
                   color=styles[name].colour, label=name)
        k = int(sub["clients"].max())
        ax.set_xticks(range(k), _client_ticks(sub, k))
        ax.set(title=d, ylabel="final accuracy (%)", ylim=(0, 100))
        ax.grid(alpha=0.3, axis="y")
    _legend(fig, axes)
    return save(fig, path)


def _client_ticks(sub: pd.DataFrame, k: int) -> list[str]:
    """``client c`` plus its small-model arch when every run shares one heterogeneous arch list."""
    archs = {tuple(rc.get("small_models") or ()) for rc in sub["run_config"]}
    if len(archs) == 1:
        (arch,) = archs
        if len(set(arch)) > 1:
            return [f"client {c}\n{arch[c % len(arch)]}" for c in range(k)]
    return [f"client {c}" for c in range(k)]


@_styled
def sensitivity(df: pd.DataFrame, sweep: SensitivitySweep, path: Path) -> list[Path]:
    """Figs. 3/5 style, one row per dataset: final and average incremental accuracy (%) against the swept
    value (± std), and accuracy after each task for every value."""
    sub = df[df["name"].isin(sweep.values)].copy()
    sub["value"] = sub["name"].map(sweep.values)
    sub = sub.drop_duplicates(["value", "dataset", "seed"])   # same config under two labels counts once
    datasets = sorted(sub["dataset"].unique())
    fig = Figure(figsize=(9.0, 3.2 * len(datasets)), layout="constrained")
    axes = fig.subplots(len(datasets), 2, squeeze=False)
    values = sorted(set(sweep.values.values()))
    cmap = _cmap("viridis")
    for (left, right), d in zip(axes, datasets):
        sd = sub[sub["dataset"] == d]
        for col, style in (("final_acc", "o-"), ("avg_incremental_acc", "s--")):
            g = sd.groupby("value")[col]
            mean, std = 100.0 * g.mean(), 100.0 * g.std(ddof=1).fillna(0.0)
            left.plot(mean.index, mean, style, ms=4, label=col.replace("_", " "))
            left.fill_between(mean.index, mean - std, mean + std, alpha=0.18, lw=0)
        log = min(values) > 0 and max(values) / min(values) >= 10    # e.g. learning rates
        if log:
            left.set_xscale("log")
            left.xaxis.set_minor_locator(NullLocator())
        left.set(title=d, xlabel=f"{sweep.key} (log)" if log else sweep.key, ylabel="accuracy (%)")
        left.set_xticks(values, [_fmt_value(v) for v in values])
        left.legend(frameon=False)
        for v in values:
            accs = [100.0 * np.asarray(m["acc"]) for m in sd.loc[sd["value"] == v, "metrics_client"]]
            if accs:
                mean, _ = _mean_std(accs)
                right.plot(np.arange(1, len(mean) + 1), mean, marker="o", ms=3,
                           color=cmap(values.index(v) / max(1, len(values) - 1)),
                           label=f"{sweep.key}={_fmt_value(v)}")
                right.set_xticks(np.arange(1, len(mean) + 1))
        right.set(title=f"{d}: accuracy after each task", xlabel="after task",
                  ylabel="accuracy on tasks so far (%)")
        right.legend(frameon=False, fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
        for ax in (left, right):
            _pct_axis(ax)
            ax.grid(alpha=0.3)
    fig.suptitle(f"Sensitivity of {sweep.method} to {sweep.key}")
    return save(fig, path)


def _fmt_value(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else f"{v:g}"
