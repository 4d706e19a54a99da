"""Results -> the paper's tables and plots: ``fcl-bench report DIR [--out OUT]``.

:func:`make_report` reads every run under a results folder (:func:`load_results`) and writes, under
``OUT`` (default ``DIR/report``):

* ``report.md``: all tables inline, the figures, failed runs with their reasons, scenario warnings;
* ``tables/``: Table 1 (accuracy after each task on all tasks so far; and ``table1-current-task``: on the
  current task only), per-method variant tables (Table 2 format, whenever a method
  ran under two or more labels), per-dataset summaries (both evaluation spaces, communication, compute,
  time) as ``.md``, ``.csv`` (full precision: mean, std, n) and ``.tex`` (booktabs); ``runs.csv`` (one
  row per run);
* ``plots/``: accuracy vs task, final accuracy vs communication and vs client compute, accuracy-matrix
  heatmaps, client-wise accuracy bars (Fig. 4) and, for every detected sweep, a sensitivity figure
  (Figs. 3/5), each as PNG and PDF;
* with ``claims=True`` (``report --claims``): ``claims.md`` and ``claims.json``, a verdict on each of the
  paper's claims (:mod:`fcl_bench.report.claims`), also summarised at the end of ``report.md``.

Runs whose scenario hashes differ for the same (dataset, seed) are never mixed in one table: they are
split into scenario groups (see :mod:`fcl_bench.report.tables`), each with its own files (suffix
``-scenario<g>``), and the report starts with a warning listing the conflicting hashes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import click
import pandas as pd

from fcl_bench.paths import click_path
from fcl_bench.report.tables import (
    ReportError,
    Table,
    failed_table,
    find_sweeps,
    frame_to_markdown,
    load_results,
    order_names,
    runs_csv,
    scenario_conflicts,
    summary_table,
    table1,
    to_csv,
    to_latex,
    to_markdown,
    variants_table,
)

__all__ = ["ReportError", "load_results", "make_report", "report_command", "write_report"]


@dataclass
class ReportFiles:
    """What :func:`write_report` wrote."""

    markdown: Path
    tables: list[Path] = field(default_factory=list)
    plots: list[Path] = field(default_factory=list)
    claims: list = field(default_factory=list)          # fcl_bench.report.claims.Claim, with --claims
    claim_files: list[Path] = field(default_factory=list)


def make_report(root: str | Path, out: str | Path | None = None) -> Path:
    """Write the report of the results under ``root`` to ``out`` (default ``root/report``); returns the
    path of ``report.md``."""
    return write_report(root, out).markdown


def write_report(root: str | Path, out: str | Path | None = None, claims: bool = False) -> ReportFiles:
    """:func:`make_report`, returning every file written; ``claims``: also judge the paper's claims."""
    df = load_results(root)
    out = Path(out) if out is not None else Path(root) / "report"
    files = ReportFiles(markdown=out / "report.md")
    done = df[df["state"].eq("completed")]
    md = [f"# Results report: {Path(root).resolve()}\n",
          f"{len(df)} runs: {len(done)} completed, {len(df) - len(done)} failed or unfinished. "
          "Accuracies in %, mean ± sample std over seeds (`n` seeds per cell in the CSV files); the best "
          "value of each column in bold. Tables use the client evaluation space unless they say otherwise.\n"]
    md += _conflict_section(df)
    md += _batchnorm_note(done)
    groups = sorted(int(g) for g in done["group"].dropna().unique())
    for g in groups:
        suffix = "" if len(groups) == 1 else f"-scenario{g}"
        if len(groups) > 1:
            md.append(f"\n## Scenario group {g}\n")
        md += _group_sections(done[done["group"] == g], out, suffix, files)
    if not groups:
        md.append("\nNo completed runs: no tables or plots.\n")
    md += _failed_section(df)
    if claims:
        md += _claims_section(df, Path(root), out, files)
    tables_dir = out / "tables"
    tables_dir.mkdir(parents=True, exist_ok=True)
    (tables_dir / "runs.csv").write_text(runs_csv(df))
    files.tables.append(tables_dir / "runs.csv")
    files.markdown.write_text("\n".join(md))
    return files


def _claims_section(df: pd.DataFrame, root: Path, out: Path, files: ReportFiles) -> list[str]:
    from fcl_bench.report.claims import claims_markdown, evaluate_claims, write_claims

    files.claims = evaluate_claims(df)
    out.mkdir(parents=True, exist_ok=True)
    files.claim_files = write_claims(files.claims, out, title=f"Claim verdicts: {root.resolve()}")
    return ["\n## Claim verdicts\n\nEach claim of the paper judged on these runs (the statistics are in "
            "`claims.md`; every number in `claims.json`).\n", claims_markdown(files.claims)]


def _batchnorm_note(done: pd.DataFrame) -> list[str]:
    """Which model an averaging method's numbers are for: BatchNorm statistics local (FedBN-like) or averaged."""
    local, averaged = [], []
    for name, cfg in zip(done["name"], done["method_config"]):
        if isinstance(cfg, dict) and "average_bn_stats" in cfg:
            (averaged if cfg["average_bn_stats"] else local).append(name)
    lines = []
    if local:
        lines.append(f"BatchNorm statistics stay on each client for {', '.join(sorted(set(local)))}: only the "
                     "trainable parameters are averaged, so the evaluated models are FedBN-like "
                     "(`-o METHOD.average_bn_stats=true` averages the statistics too).")
    if averaged:
        lines.append(f"BatchNorm statistics are averaged with the parameters for {', '.join(sorted(set(averaged)))}.")
    return ["\n" + " ".join(lines) + "\n"] if lines else []


def _conflict_section(df: pd.DataFrame) -> list[str]:
    conflicts = scenario_conflicts(df)
    if conflicts.empty:
        return []
    return ["\n> **Warning: different scenarios for the same (dataset, seed).** These runs did not see the "
            "same data split, so their numbers are not comparable. They are reported in separate scenario "
            "groups below; re-run with one protocol to compare them.\n",
            frame_to_markdown(conflicts)]


def _group_sections(df: pd.DataFrame, out: Path, suffix: str, files: ReportFiles) -> list[str]:
    from fcl_bench.report import plots

    styles = plots.palette(order_names(df))
    md = ["\n## Table 1: task-wise accuracy on all tasks so far (the default reading)\n"]
    md += _emit(table1(df), out, f"table1{suffix}", files)
    md.append("\n## Table 1, other reading: accuracy on the current task only\n")
    md += _emit(table1(df, reading="current"), out, f"table1-current-task{suffix}", files)
    for method in dict.fromkeys(df["method"]):
        t = variants_table(df, method)
        if t is not None:
            md.append(f"\n## Variants of {method} (Table 2 format)\n")
            md += _emit(t, out, f"variants-{method}{suffix}", files)
    for d in sorted(df["dataset"].unique()):
        md.append(f"\n## Summary: {d}\n")
        md += _emit(summary_table(df, d), out, f"summary-{d}{suffix}", files)
    md.append("\n## Figures\n")
    pdir = out / "plots"
    figs = [("Accuracy after each task", plots.acc_vs_task(df, styles, pdir / f"acc_vs_task{suffix}"))]
    figs.append(("Final accuracy vs communication", plots.acc_vs_cost(
        df, styles, pdir / f"acc_vs_comm{suffix}", "mb_per_client", "MB per client (up + down), log")))
    figs.append(_compute_figure(df, styles, out, suffix))
    for d in sorted(df["dataset"].unique()):
        figs.append((f"Accuracy matrices ({d})", plots.heatmaps(df, pdir / f"heatmaps-{d}{suffix}", d)))
    figs.append(("Client-wise final accuracy (Fig. 4 style)",
                 plots.client_bars(df, styles, pdir / f"client_acc{suffix}")))
    for s in find_sweeps(df):
        figs.append((f"Sensitivity of {s.method} to {s.key} (Figs. 3/5 style)",
                     plots.sensitivity(df, s, pdir / f"sensitivity-{s.method}-{s.key}{suffix}")))
    for title, paths in figs:
        files.plots += paths
        md.append(f"### {title}\n\n![{title}](plots/{paths[0].name})\n")
    return md


def _compute_figure(df: pd.DataFrame, styles: dict, out: Path, suffix: str) -> tuple[str, list[Path]]:
    """Final accuracy vs client TFLOPs, or vs client training seconds when FLOPs were not counted."""
    from fcl_bench.report import plots

    path = out / "plots" / f"acc_vs_compute{suffix}"
    if df["tflops_per_client"].notna().all():
        return "Final accuracy vs client compute", plots.acc_vs_cost(
            df, styles, path, "tflops_per_client", "client TFLOPs per client, log")
    seconds = [m["client_train_seconds"] / k for m, k in zip(df["metrics"], df["clients"])]
    df = df.assign(train_s_per_client=seconds)
    return "Final accuracy vs client training time (FLOPs not counted for some runs)", plots.acc_vs_cost(
        df, styles, path, "train_s_per_client", "client training seconds per client, log")


def _emit(t: Table, out: Path, stem: str, files: ReportFiles) -> list[str]:
    d = out / "tables"
    d.mkdir(parents=True, exist_ok=True)
    for ext, text in (("md", to_markdown(t)), ("csv", to_csv(t)), ("tex", to_latex(t, label=f"tab:{stem}"))):
        (d / f"{stem}.{ext}").write_text(text)
        files.tables.append(d / f"{stem}.{ext}")
    return [f"{t.title}.\n", to_markdown(t), f"Files: `tables/{stem}.md`, `.csv`, `.tex`.\n"]


def _failed_section(df: pd.DataFrame) -> list[str]:
    bad = failed_table(df)
    if bad.empty:
        return ["\n## Failed or unfinished runs\n\nNone.\n"]
    return [f"\n## Failed or unfinished runs ({len(bad)})\n\nNot in any table or figure; each log is "
            "`<path>/log.txt`.\n", frame_to_markdown(bad)]


@click.command("report")
@click.argument("results_dir", type=click_path(exists=True, file_okay=False))
@click.option("--out", default=None, type=click_path(file_okay=False),
              help="output folder (default: RESULTS_DIR/report)")
@click.option("--claims", is_flag=True,
              help="also judge each of the paper's claims on these runs: claims.md and claims.json in the output "
                   "folder, printed here")
def report_command(results_dir: str, out: str | None, claims: bool) -> None:
    """Tables (Markdown, CSV, LaTeX) and plots (PNG, PDF) of the runs under RESULTS_DIR; with --claims, a
    verdict on each of the paper's claims."""
    from fcl_bench.paths import PathError, check_writable_dir

    try:
        if out is not None:
            check_writable_dir(out, "--out")
        files = write_report(results_dir, out, claims=claims)
    except (ReportError, PathError, OSError) as e:
        err = click.ClickException(str(e) if not isinstance(e, OSError) else f"{e.strerror or e}; check the path")
        err.exit_code = 2  # a user error, like click's own usage errors
        raise err from None
    click.echo(f"report:  {files.markdown}")
    click.echo(f"tables:  {len(files.tables)} files in {files.markdown.parent / 'tables'}")
    for p in files.tables:
        click.echo(f"  {p.name}")
    click.echo(f"plots:   {len(files.plots)} files in {files.markdown.parent / 'plots'}")
    for p in files.plots:
        if p.suffix == ".png":
            click.echo(f"  {p.stem}.png/.pdf")
    if claims:
        from fcl_bench.report.claims import claims_text

        click.echo(f"claims:  {', '.join(str(p) for p in files.claim_files)}")
        for line in claims_text(files.claims):
            click.echo(f"  {line}")
