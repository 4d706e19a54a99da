"""Tests of `fcl-bench report`: tables equal the stored metrics, mean ± std over seeds, every plot written,
LaTeX rows, failed runs, mixed scenarios. One real smoke run (fedavg, seeds 1 and 2) per module; other
labels are copies of it with edited configs and metrics, so the arithmetic is checked on distinct numbers.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from fcl_bench.report import ReportError, load_results, report_command, write_report
from fcl_bench.report.tables import aggregate, scenario_conflicts, table1, to_latex

SEEDS = (1, 2)


@pytest.fixture(scope="module")
def real(tmp_path_factory) -> Path:
    """``<root>/smoke/fedavg/synthetic/seed{1,2}`` from a real smoke run."""
    from fcl_bench.cli import main

    root = tmp_path_factory.mktemp("results")
    args = ["run", "--methods", "fedavg", "--preset", "smoke", "--seeds", ",".join(map(str, SEEDS)), "--out",
            str(root), "-o", "foundation_pretrained=false", "--quiet"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    return root


def _run_dir(root: Path, label: str, seed: int) -> Path:
    return root / "smoke" / label / "synthetic" / f"seed{seed}"


def _derive(root: Path, label: str, seed: int, src_seed: int, method_config: dict | None = None,
            acc: list[float] | None = None, scenario_hash: str | None = None) -> dict:
    """Copy the real fedavg run of ``src_seed`` to ``label``/``seed`` with an edited config and (client
    space) accuracies; returns its metrics."""
    dst = _run_dir(root, label, seed)
    shutil.copytree(_run_dir(root, "fedavg", src_seed), dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["label"], cfg["run"]["seed"] = label, seed
    cfg["method_config"].update(method_config or {})
    if scenario_hash:
        cfg["scenario_hash"] = scenario_hash
    (dst / "config.json").write_text(json.dumps(cfg))
    m = json.loads((dst / "metrics.json").read_text())
    if acc is not None:
        for target in (m, m["spaces"]["client"]):
            target.update(acc=acc, final_acc=acc[-1], avg_incremental_acc=float(np.mean(acc)))
        per = m["spaces"]["client"]["per_client"]
        per["final_acc"] = [acc[-1]] * len(per["acc"])
    (dst / "metrics.json").write_text(json.dumps(m))
    return m


X_ACC = {1: [0.61, 0.42], 2: [0.73, 0.35], 3: [0.58, 0.47]}     # label "fedavg-x", three seeds


@pytest.fixture(scope="module")
def tree(real, tmp_path_factory) -> Path:
    """The real runs plus: ``fedavg-x`` (lr 0.01, seeds 1-3 with chosen accuracies), an lr sweep of
    ``fedavg-lr*`` (one seed each) and a failed run ``broken``."""
    root = tmp_path_factory.mktemp("tree")
    shutil.copytree(real / "smoke", root / "smoke")
    for s, acc in X_ACC.items():
        _derive(root, "fedavg-x", s, 1 if s == 3 else s, {"lr": 0.01}, acc,
                scenario_hash="seed3-scenario" if s == 3 else None)
    for i, lr in enumerate((0.1, 0.2, 0.3)):
        _derive(root, f"fedavg-lr{i}", 1, 1, {"lr": lr}, [0.5, 0.3 + 0.1 * i])
    bad = _run_dir(root, "broken", 1)
    bad.mkdir(parents=True)
    (bad / "status.json").write_text(json.dumps({"state": "failed", "reason": "ValueError: boom in round 2"}))
    return root


@pytest.fixture(scope="module")
def report(tree, tmp_path_factory):
    return write_report(tree, tmp_path_factory.mktemp("report"))


def _csv(report, stem: str) -> pd.DataFrame:
    return pd.read_csv(report.markdown.parent / "tables" / f"{stem}.csv", index_col=0)


def _metrics(root: Path, label: str, seed: int) -> dict:
    return json.loads((_run_dir(root, label, seed) / "metrics.json").read_text())


def test_load_results_one_row_per_run_failed_included(tree):
    df = load_results(tree)
    assert len(df) == 2 + 3 + 3 + 1
    broken = df[df["label"] == "broken"].iloc[0]
    assert broken["state"] == "failed" and broken["reason"] == "ValueError: boom in round 2"
    assert broken["seed"] == 1 and broken["dataset"] == "synthetic" and broken["suite"] == "smoke"
    assert (df["state"] == "completed").sum() == 8


def test_table1_values_equal_stored_metrics(tree, report):
    csv, md = _csv(report, "table1"), (report.markdown.parent / "tables" / "table1.md").read_text()
    for label in ("fedavg-lr0", "fedavg-lr2"):    # one seed: the cell is the stored number
        m = _metrics(tree, label, 1)
        for t, a in enumerate(m["spaces"]["client"]["acc"]):
            assert csv.at[label, f"synthetic/task {t + 1}/mean"] == pytest.approx(100 * a, abs=1e-12)
            assert csv.at[label, f"synthetic/task {t + 1}/n"] == 1
        row = next(line for line in md.splitlines() if line.startswith(f"| {label} |"))
        assert [c.strip("* ") for c in row.split("|")[3:-1]] == [f"{100 * a:.2f}" for a in m["acc"]]
    real = [_metrics(tree, "fedavg", s)["acc"] for s in SEEDS]   # the unedited real runs, two seeds
    for t in range(2):
        expect = 100 * np.mean([a[t] for a in real])
        assert csv.at["fedavg", f"synthetic/task {t + 1}/mean"] == pytest.approx(expect)


def test_mean_and_std_over_three_seeds(report):
    csv = _csv(report, "table1")
    for t in range(2):
        vals = 100 * np.array([X_ACC[s][t] for s in X_ACC])
        assert csv.at["fedavg-x", f"synthetic/task {t + 1}/mean"] == pytest.approx(vals.mean(), abs=1e-9)
        assert csv.at["fedavg-x", f"synthetic/task {t + 1}/std"] == pytest.approx(vals.std(ddof=1), abs=1e-9)
        assert csv.at["fedavg-x", f"synthetic/task {t + 1}/n"] == 3
    md = (report.markdown.parent / "tables" / "table1.md").read_text()
    vals = 100 * np.array([X_ACC[s][0] for s in X_ACC])
    assert f"{vals.mean():.2f} ± {vals.std(ddof=1):.2f}" in md
    assert "| fedavg-x | 1, 2, 3 |" in md


def test_best_value_per_column_is_bold(report):
    md = (report.markdown.parent / "tables" / "table1.md").read_text().splitlines()
    csv = _csv(report, "table1")
    best = csv["synthetic/task 1/mean"].round(2).idxmax()
    bold_rows = [line.split("|")[1].strip() for line in md[2:] if line.split("|")[3].strip().startswith("**")]
    assert bold_rows == [best]


def test_summary_values_equal_stored_metrics(tree, report):
    csv = _csv(report, "summary-synthetic")
    m = _metrics(tree, "fedavg-lr1", 1)
    cfg = json.loads((_run_dir(tree, "fedavg-lr1", 1) / "config.json").read_text())
    k = cfg["run"]["clients"]
    expect = {"client/final acc": 100 * m["spaces"]["client"]["final_acc"],
              "global/final acc": 100 * m["spaces"]["global"]["final_acc"],
              "global/avg inc acc": 100 * m["spaces"]["global"]["avg_incremental_acc"],
              "client/forgetting": 100 * m["spaces"]["client"]["forgetting"],
              "global/BWT": 100 * m["spaces"]["global"]["bwt"],
              "cost/MB up/client": m["bytes_up"] / k / 1e6, "cost/MB down/client": m["bytes_down"] / k / 1e6,
              "cost/TFLOPs/client": m["client_flops"] / k / 1e12, "cost/wall s": m["wall_seconds"],
              "cost/server TFLOPs": m["server_flops"] / 1e12, "cost/server s": m["server_seconds"]}
    assert m["server_seconds"] > 0 and m["server_flops"] is not None  # the server's cost is measured
    for col, v in expect.items():
        assert csv.at["fedavg-lr1", f"{col}/mean"] == pytest.approx(v, rel=1e-12), col


def test_variants_table_names_the_differing_setting(report):
    csv = _csv(report, "variants-fedavg")
    assert set(csv.index) == {"fedavg", "fedavg-x", "fedavg-lr0", "fedavg-lr1", "fedavg-lr2"}
    assert csv.at["fedavg-x", "lr"] == 0.01 and csv.at["fedavg", "lr"] == 0.001


def test_every_plot_written_and_non_empty(report):
    stems = {p.stem for p in report.plots}
    assert stems == {"acc_vs_task", "acc_vs_comm", "acc_vs_compute", "heatmaps-synthetic", "client_acc",
                     "sensitivity-fedavg-lr"}
    for p in report.plots:
        data = p.read_bytes()
        assert len(data) > 5000, p
        assert data[:4] == (b"\x89PNG" if p.suffix == ".png" else b"%PDF"), p
    md = report.markdown.read_text()
    assert all(f"plots/{s}.png" in md for s in stems)


def test_latex_has_one_row_per_method(report):
    tex = (report.markdown.parent / "tables" / "table1.tex").read_text()
    assert "\\toprule" in tex and "\\midrule" in tex and "\\bottomrule" in tex
    body = tex.split("\\midrule")[1].split("\\bottomrule")[0].strip().splitlines()
    assert [line.split(" & ")[0] for line in body] == ["fedavg", "fedavg-lr0", "fedavg-lr1", "fedavg-lr2",
                                                     "fedavg-x"]
    assert all(line.endswith("\\\\") and line.count(" & ") == 3 for line in body)  # name, seeds, 2 tasks


def test_failed_runs_listed_with_reason_and_kept_out_of_tables(report):
    md = report.markdown.read_text()
    failed = md.split("## Failed or unfinished runs")[1]
    assert "| smoke | broken | synthetic | 1 | failed | ValueError: boom in round 2 |" in failed
    assert "broken" not in md.split("## Failed or unfinished runs")[0]


def test_mixed_scenario_hashes_are_split_into_groups(real, tmp_path):
    root = tmp_path / "mixed"
    shutil.copytree(real / "smoke", root / "smoke")
    _derive(root, "other", 1, 1, scenario_hash="a-different-split")
    _derive(root, "other", 2, 2)
    df = load_results(root)
    conflicts = scenario_conflicts(df)
    assert set(conflicts["seed"]) == {1} and set(conflicts["labels"]) == {"fedavg", "other"}
    assert df.loc[df["label"] == "fedavg", "group"].eq(1).all()
    assert df.loc[df["label"] == "other", "group"].eq(2).all()
    assert table1(df[df["group"] == 1]).rows == ["fedavg"]
    files = write_report(root, tmp_path / "out")
    md = files.markdown.read_text()
    assert "Warning: different scenarios" in md
    assert "## Scenario group 1" in md and "## Scenario group 2" in md
    assert {p.name for p in files.tables} >= {"table1-scenario1.csv", "table1-scenario2.csv"}
    assert "table1.csv" not in {p.name for p in files.tables}


def test_report_command_prints_what_it_wrote(tree, tmp_path):
    res = CliRunner().invoke(report_command, [str(tree), "--out", str(tmp_path / "r")])
    assert res.exit_code == 0, res.output
    assert str(tmp_path / "r" / "report.md") in res.output and "table1.tex" in res.output
    assert "acc_vs_task.png/.pdf" in res.output
    assert (tmp_path / "r" / "tables" / "runs.csv").exists()
    runs = pd.read_csv(io.StringIO((tmp_path / "r" / "tables" / "runs.csv").read_text()))
    assert len(runs) == 9 and {"label", "seed", "state", "final_acc"} <= set(runs.columns)


def test_empty_folder_is_a_clear_error(tmp_path):
    with pytest.raises(ReportError, match="no runs under"):
        load_results(tmp_path)
    res = CliRunner().invoke(report_command, [str(tmp_path)])
    assert res.exit_code != 0 and "no runs under" in res.output


def test_latex_escapes_labels():
    df = pd.DataFrame({"name": ["a_b&c"], "header": ["d%"], "column": ["task 1"], "value": [50.0]})
    tex = to_latex(aggregate(df, ["a_b&c"], "mean ± std", {}, {}))
    assert "a\\_b\\&c & $50.00$ \\\\" in tex and "d\\%" in tex
    assert "\\caption{mean $\\pm$ std}" in tex


# -- the global space of methods whose heads cover only the client's own classes ----------------------

def _global_na_tree(real, tmp_path, record: bool) -> Path:
    """The real fedavg runs, ``other`` (seed 1, global-space numbers of 0.5) and ``lscl`` (seed 1): the best
    global-space numbers (0.99), but no global space. ``record``: metrics.json says so; else it names the
    method ``fedlscl`` and leaves the key out (runs stored before the key existed)."""
    root = tmp_path / "na"
    shutil.copytree(real / "smoke", root / "smoke")
    for label, value in (("other", 0.5), ("lscl", 0.99)):
        _derive(root, label, 1, 1)
        m = json.loads((_run_dir(root, label, 1) / "metrics.json").read_text())
        m["spaces"]["global"].update(final_acc=value, avg_incremental_acc=value, bwt=value,
                                     acc=[value] * len(m["acc"]))
        (_run_dir(root, label, 1) / "metrics.json").write_text(json.dumps(m))
    dst = _run_dir(root, "lscl", 1)
    m = json.loads((dst / "metrics.json").read_text())
    m.pop("global_space_applicable", None)
    if record:
        m["global_space_applicable"] = False
    else:
        cfg = json.loads((dst / "config.json").read_text())
        cfg["method"] = "fedlscl"
        (dst / "config.json").write_text(json.dumps(cfg))
    (dst / "metrics.json").write_text(json.dumps(m))
    return root


@pytest.mark.parametrize("record", [True, False])
def test_global_space_not_applicable_is_na_with_a_footnote_and_never_bold(real, tmp_path, record):
    from fcl_bench.report.tables import NA, summary_table, to_csv

    df = load_results(_global_na_tree(real, tmp_path, record))
    assert df.groupby("label")["global_space_applicable"].all().to_dict() == {"fedavg": True, "lscl": False,
                                                                               "other": True}
    t = summary_table(df, "synthetic")
    md = to_markdown_rows(t)
    lscl = md["lscl"]
    heads = md["method"]
    for i, h in enumerate(heads):
        if h.startswith("global "):
            assert lscl[i] == NA, h                          # never its client-space number, never bold
            if h in ("global final acc", "global avg inc acc", "global BWT"):
                assert md["other"][i].startswith("**"), h    # the best applicable row is bold instead
        elif h.startswith("client "):
            assert lscl[i] != NA
    from fcl_bench.report.tables import to_markdown
    text = to_markdown(t)
    assert "† n/a: not applicable to lscl" in text
    csv = pd.read_csv(io.StringIO(to_csv(t)), index_col=0)
    assert pd.isna(csv.at["lscl", "global/final acc/mean"]) and pd.notna(csv.at["lscl", "client/final acc/mean"])
    tex = to_latex(t)
    assert "n/a$^\\dagger$" in tex and "\\footnotesize" in tex
    g1 = table1(df, space="global")
    assert all((("lscl", c) in g1.na) for c in g1.columns) and g1.notes
    assert not table1(df).na  # the client space is always applicable


def to_markdown_rows(t) -> dict[str, list[str]]:
    """Markdown table -> {first cell: the other cells} (header row under its first cell)."""
    from fcl_bench.report.tables import to_markdown

    rows = {}
    for line in to_markdown(t).splitlines():
        if line.startswith("| "):
            cells = [c.strip() for c in line.split("|")[1:-1]]
            rows[cells[0]] = cells[1:]
    return rows


def test_fedlscl_declares_no_global_space_and_the_harness_records_it():
    from fcl_bench.api import Method
    from fcl_bench.methods.fedavg import FedAvg
    from fcl_bench.methods.fedlscl import FedLSCL

    assert Method.global_space is True and FedAvg.global_space is True and FedLSCL.global_space is False


def test_stored_metrics_record_global_space_applicable(real):
    m = _metrics(real, "fedavg", 1)
    assert m["global_space_applicable"] is True


# -- Table 1's two readings ---------------------------------------------------------------------------

def test_table1_current_task_reading_is_the_diagonal_and_labelled(tree, report):
    csv = _csv(report, "table1-current-task")
    a = [np.array(_metrics(tree, "fedavg", s)["spaces"]["client"]["accuracy_matrix"], dtype=float) for s in SEEDS]
    for t in range(2):
        expect = 100 * np.mean([m[:, t, t].mean() for m in a])
        assert csv.at["fedavg", f"synthetic/task {t + 1}/mean"] == pytest.approx(expect)
    stored = [_metrics(tree, "fedavg", s)["spaces"]["client"]["current_task_acc"] for s in SEEDS]
    assert csv.at["fedavg", "synthetic/task 2/mean"] == pytest.approx(100 * np.mean([c[1] for c in stored]))
    md = report.markdown.read_text()
    assert "current task only" in md and "all tasks so far" in md
    done = load_results(tree).query("state == 'completed'")
    assert "test set of the current task only" in table1(done, reading="current").title
    assert "all tasks so far" in table1(done).title


def test_the_report_says_whether_batchnorm_statistics_were_averaged(tree, tmp_path):
    text = write_report(tree, tmp_path / "a").markdown.read_text()
    assert "FedBN-like" in text and "fedavg" in text.split("FedBN-like")[0].split("BatchNorm statistics stay")[1]
    _derive(tree, "fedavg-bn", 1, 1, {"average_bn_stats": True})
    text = write_report(tree, tmp_path / "b").markdown.read_text()
    assert "averaged with the parameters for fedavg-bn" in text
    shutil.rmtree(_run_dir(tree, "fedavg-bn", 1).parent.parent)


def test_report_writes_nothing_outside_its_folder_and_the_cache(tree, tmp_path, cli_subprocess, monkeypatch):
    """Matplotlib keeps a font cache (default ~/.cache/matplotlib): it goes to the suite's cache instead."""
    monkeypatch.delenv("MPLCONFIGDIR", raising=False)
    home = tmp_path / "home"
    home.mkdir()
    done = cli_subprocess("report", tree, "--out", tmp_path / "r", env={"HOME": str(home)})
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "r" / "report.md").exists()
    assert sorted(home.rglob("*")) == []
