"""Tests of the claim verdicts (`fcl-bench report --claims`): the statistics on hand-computed numbers, each
verdict kind for each claim on hand-made result tables shaped like ``load_results``' output, and the
command on a results folder derived from one real smoke run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from fcl_bench.report import claims as C
from fcl_bench.report.claims import FAILS, HOLDS, NOT_SEPARATED, NOT_TESTABLE

SEEDS = (42, 1999, 2024)
T2 = {"full": "fedlscl", "no_o2d": "fedlscl-fedavg-agg", "no_cf": "fedlscl-no-cf",
      "no_both": "fedlscl-no-cf-fedavg-agg", "no_collab": "fedlscl-no-collab"}


# ------------------------------------------------------------------------------------- hand-made tables

def run_row(suite: str, label: str, seed: int, acc: list[float], method: str | None = None,
            current: list[float] | None = None, mb: tuple[float, float] = (1.0, 1.0),
            method_config: dict | None = None, run_config: dict | None = None, scenario: str | None = None,
            state: str = "completed", reason: str | None = None, depth: int = 6, dataset: str = "synthetic",
            per_client: list[float] | None = None) -> dict:
    """One run as a row of ``load_results``: accuracies in % (client space), MB up/down per client."""
    done = state == "completed"
    space = {"acc": [a / 100 for a in acc], "final_acc": acc[-1] / 100,
             "current_task_acc": [a / 100 for a in (current or acc)],
             "per_client": {"final_acc": [a / 100 for a in (per_client or [acc[-1]])]}}
    rc = {"clients": 5, "rounds_per_task": 5, "small_models": ["resnet18"], "seed": seed, **(run_config or {})}
    return {"path": f"/nonexistent/{suite}/{label}/{dataset}/seed{seed}", "state": state, "reason": reason,
            "suite": suite, "method": method or ("fedlscl" if label.startswith("fedlscl") else label),
            "label": label, "name": label, "dataset": dataset, "seed": seed,
            "scenario_hash": scenario or f"scenario-{seed}", "run_config": rc,
            "method_config": method_config or {}, "metrics_client": space if done else None,
            "tasks": len(acc) if done else np.nan, "mb_up_per_client": mb[0], "mb_down_per_client": mb[1],
            "mb_per_client": mb[0] + mb[1], "foundation_depth": depth}


def table(rows: list[dict]) -> pd.DataFrame:
    return pd.DataFrame(rows)


def seeds_of(suite: str, label: str, accs: dict[int, list[float]], **kw) -> list[dict]:
    return [run_row(suite, label, s, a, **kw) for s, a in accs.items()]


def spread3(center: list[float], noise: float = 0.5) -> dict[int, list[float]]:
    """Three seeds: center - noise, center, center + noise (sample std = noise)."""
    return {s: [c + k * noise for c in center] for s, k in zip(SEEDS, (-1, 0, 1))}


def one(claims: list, cid: str, dataset: str | None = "synthetic"):
    found = [c for c in claims if c.id == cid and c.dataset == dataset]
    assert len(found) == 1, [(c.id, c.dataset) for c in claims]
    return found[0]


# ------------------------------------------------------------------------------------------ statistics

def s(label: str, vals: list[float], seeds=SEEDS, hashes=None) -> C.Series:
    return C.Series(label, dict(zip(seeds, vals)), dict(zip(seeds, hashes or [f"h{x}" for x in seeds])))


def test_greater_uses_mean_sample_std_and_the_larger_std_as_spread():
    a, b = s("a", [1.0, 2.0, 3.0]), s("b", [0.4, 0.5, 0.6])          # means 2, 0.5; stds 1, 0.1
    p = C.greater(a, b, "a > b")
    assert p.a.mean == pytest.approx(2.0) and p.a.std == pytest.approx(1.0) and p.b.std == pytest.approx(0.1)
    assert p.difference == pytest.approx(1.5) and p.spread == pytest.approx(1.0) and p.verdict == HOLDS
    assert C.greater(b, a, "b > a").verdict == FAILS
    assert C.greater(a, s("c", [1.1, 1.2, 1.3]), "a > c").verdict == NOT_SEPARATED       # d 0.8 <= 1


def test_close_and_at_most_below():
    a = s("a", [9.0, 10.0, 11.0])                                        # mean 10, std 1
    assert C.close(a, s("b", [9.5, 9.5, 9.5]), "a ≈ b").verdict == HOLDS                  # |d| 0.5 <= 1
    assert C.close(a, s("b", [7.5, 7.5, 7.5]), "a ≈ b").verdict == FAILS                  # |d| 2.5 > 1
    assert C.at_most_below(a, s("b", [9.2] * 3), 1.0, "b near a").verdict == HOLDS        # loss 0.8
    assert C.at_most_below(a, s("b", [12.0] * 3), 1.0, "b near a").verdict == HOLDS       # b above a
    assert C.at_most_below(a, s("b", [8.5] * 3), 1.0, "b near a").verdict == NOT_SEPARATED  # 1.5 - 1 <= 1
    p = C.at_most_below(a, s("b", [7.0] * 3), 1.0, "b near a")                             # 3 - 1 > 1
    assert p.verdict == FAILS and p.difference == pytest.approx(3.0) and p.tolerance == 1.0


def test_only_seeds_with_the_same_scenario_are_compared():
    a = s("a", [1.0, 2.0, 3.0], hashes=["x", "y", "z"])
    b = s("b", [0.0, 0.0, 50.0], hashes=["x", "y", "other"])
    p = C.greater(a, b, "a > b")
    assert p.a.seeds == [42, 1999] and p.b.mean == 0.0 and "2024" in p.reason
    none = C.greater(a, s("b", [0.0] * 3, hashes=["p", "q", "r"]), "a > b")
    assert none.verdict == NOT_TESTABLE and "different scenarios" in none.reason


def test_one_seed_is_not_testable_for_accuracy_but_decides_for_bytes():
    a, b = s("a", [5.0], seeds=(42,)), s("b", [1.0], seeds=(42,))
    p = C.greater(a, b, "a > b")
    assert p.verdict == NOT_TESTABLE and "one seed (42)" in p.reason and p.difference == pytest.approx(4.0)
    assert C.greater(a, b, "a > b", one_seed_ok=True).verdict == HOLDS


def test_combine():
    assert C.combine([HOLDS, HOLDS]) == HOLDS
    assert C.combine([HOLDS, NOT_SEPARATED]) == NOT_SEPARATED
    assert C.combine([NOT_SEPARATED, NOT_TESTABLE, HOLDS]) == NOT_TESTABLE
    assert C.combine([NOT_TESTABLE, FAILS, HOLDS]) == FAILS
    assert C.combine([]) == NOT_TESTABLE


# ------------------------------------------------------------------------------------------ Table 1

def t1(ours: dict, others: dict[str, dict], suite: str = "table1", **kw) -> pd.DataFrame:
    rows = seeds_of(suite, "fedlscl", ours, **kw)
    for lab, accs in others.items():
        rows += seeds_of(suite, lab, accs, **kw)
    return table(rows)


def test_table1_holds_against_the_best_other_method_at_each_task():
    df = t1(spread3([80, 75, 70]), {"lorm": spread3([70, 72, 50]), "l2p": spread3([75, 60, 65])})
    c = one(C.table1_claims(df), "table1")
    assert c.verdict == HOLDS and len(c.parts) == 3
    assert [p.b.label for p in c.parts] == ["l2p", "lorm", "l2p"]           # best other per task
    assert [p.difference for p in c.parts] == pytest.approx([5.0, 3.0, 5.0])
    assert c.parts[0].a.text() == "80.00 ± 0.50" and c.parts[0].spread == pytest.approx(0.5)


def test_table1_does_not_hold_when_another_method_is_separated_above_at_one_task():
    df = t1(spread3([80, 75, 70]), {"lorm": spread3([70, 80, 50])})
    c = one(C.table1_claims(df), "table1")
    assert [p.verdict for p in c.parts] == [HOLDS, FAILS, HOLDS] and c.verdict == FAILS


def test_table1_not_separated_when_the_gap_is_within_the_spread():
    df = t1(spread3([80, 75, 70], noise=2.0), {"lorm": spread3([79, 60, 60])})
    c = one(C.table1_claims(df), "table1")
    assert c.parts[0].verdict == NOT_SEPARATED and c.verdict == NOT_SEPARATED


def test_table1_not_testable_with_one_seed_or_without_runs():
    df = t1({42: [80, 70]}, {"lorm": {42: [60, 50]}})
    c = one(C.table1_claims(df), "table1")
    assert c.verdict == NOT_TESTABLE and "one seed (42)" in c.reason
    assert c.parts[0].difference == pytest.approx(20.0)                       # the number is still shown
    absent = C.table1_claims(t1(spread3([1, 2]), {}, suite="table2"))
    assert absent[0].verdict == NOT_TESTABLE and "--suite table1" in absent[0].reason
    failed = table(seeds_of("table1", "fedlscl", spread3([1, 2]), state="failed", reason="NaN loss")
                   + seeds_of("table1", "lorm", spread3([1, 2])))
    c = one(C.table1_claims(failed), "table1")
    assert c.verdict == NOT_TESTABLE and "NaN loss" in c.reason


def test_table1_falls_back_to_a_preset_suite_and_reads_the_current_task_reading():
    df = t1(spread3([80, 60]), {"lorm": spread3([70, 70])}, suite="quick",
            current=None)
    df.loc[df["label"] == "fedlscl", "metrics_client"] = [
        {**m, "current_task_acc": [0.9, 0.9]} for m in df.loc[df["label"] == "fedlscl", "metrics_client"]]
    seen = one(C.table1_claims(df), "table1")
    cur = one(C.table1_claims(df, reading="current"), "table1-current-task")
    assert "suite quick" in seen.notes[0]
    assert [p.verdict for p in seen.parts] == [HOLDS, FAILS]
    assert [p.verdict for p in cur.parts] == [HOLDS, HOLDS] and cur.parts[1].a.mean == pytest.approx(90.0)


# ------------------------------------------------------------------------------------------ Table 2

def t2(finals: dict[str, float], noise: float = 0.5, drop: tuple[str, ...] = (), seeds=SEEDS) -> pd.DataFrame:
    rows = []
    for role, final in finals.items():
        if role not in drop:
            accs = {sd: [final + k * noise] for sd, k in zip(seeds, (-1, 0, 1))}
            rows += seeds_of("table2", T2[role], accs)
    return table(rows)


ORDERED = {"full": 90.0, "no_o2d": 80.0, "no_cf": 50.0, "no_both": 49.8, "no_collab": 30.0}


def test_table2_labels_come_from_the_suite_file():
    assert C.table2_labels() == T2


def test_table2_holds_in_the_papers_order():
    c = one(C.table2_claims(t2(ORDERED)), "table2")
    assert c.verdict == HOLDS and len(c.parts) == 7
    near = c.parts[2]
    assert near.statement.startswith("without SM-CF ≈") and near.difference == pytest.approx(0.2)


def test_table2_does_not_hold_when_collaboration_is_not_the_lowest():
    c = one(C.table2_claims(t2({**ORDERED, "no_collab": 60.0})), "table2")
    assert c.verdict == FAILS
    failing = [p.statement for p in c.parts if p.verdict == FAILS]
    assert failing == ["without SM-CF > without collaboration", "without SM-CF and O2D > without collaboration"]


def test_table2_approximately_equal_rows_that_are_separated_do_not_hold():
    c = one(C.table2_claims(t2({**ORDERED, "no_both": 45.0})), "table2")
    assert c.parts[2].verdict == FAILS and c.verdict == FAILS


def test_table2_not_separated_when_full_is_within_the_spread_of_without_o2d():
    c = one(C.table2_claims(t2({**ORDERED, "full": 80.4})), "table2")
    assert c.parts[0].verdict == NOT_SEPARATED and c.verdict == NOT_SEPARATED


def test_table2_not_testable_with_a_row_absent_or_one_seed():
    c = one(C.table2_claims(t2(ORDERED, drop=("no_cf",))), "table2")
    assert c.verdict == NOT_TESTABLE and "table2/fedlscl-no-cf" in c.reason
    assert c.parts[0].verdict == HOLDS                                    # parts without the row still judged
    c1 = one(C.table2_claims(t2(ORDERED, seeds=(42,))), "table2")
    assert c1.verdict == NOT_TESTABLE and "one seed" in c1.reason
    absent = C.table2_claims(t1(spread3([1.0]), {"lorm": spread3([1.0])}))
    assert absent[0].verdict == NOT_TESTABLE and "suite table2 absent" in absent[0].reason


# ------------------------------------------------------------------------------------------ Fig. 5

def f5(finals: dict[int, float], noise: float = 0.5, seeds=SEEDS, mb_up=None) -> pd.DataFrame:
    """Fig. 5 rows; MB up per client grows with the buffer (its features are uploaded) unless ``mb_up``."""
    rows = []
    for size, final in finals.items():
        accs = {sd: [final + k * noise] for sd, k in zip(seeds, (-1, 0, 1))}
        rows += seeds_of("fig5", f"fedlscl-buffer{size}", accs, method_config={"buffer_per_class": size},
                         mb=(mb_up if mb_up is not None else 1.0 + size / 100, 1.0))
    return table(rows)


@pytest.mark.parametrize("small,noise,verdict", [(79.3, 0.5, HOLDS), (81.0, 0.5, HOLDS),
                                                 (78.6, 0.5, NOT_SEPARATED), (77.0, 0.5, FAILS)])
def test_fig5_twenty_within_one_point_of_forty(small, noise, verdict):
    c = one(C.fig5_claims(f5({5: 60.0, 20: small, 40: 80.0}, noise)), "fig5")
    assert c.verdict == verdict
    p = c.parts[0]
    assert p.a.label == "fedlscl-buffer40" and p.b.label == "fedlscl-buffer20"
    assert p.difference == pytest.approx(80.0 - small) and p.tolerance == 1.0
    assert "5: 60.00 ± 0.50" in c.notes[0]


def test_fig5_not_testable():
    c = one(C.fig5_claims(f5({20: 80.0, 10: 70.0})), "fig5")
    assert c.verdict == NOT_TESTABLE and "buffer_per_class 40" in c.reason
    assert one(C.fig5_claims(f5({20: 80.0, 40: 80.0}, seeds=(42,))), "fig5").verdict == NOT_TESTABLE
    assert C.fig5_claims(t2(ORDERED))[0].reason == "suite fig5 absent: run --suite fig5"


def test_fig5_not_testable_when_the_buffers_of_20_and_40_held_the_same_samples():
    """Equal bytes up on every seed: no client holds more than 20 samples of a class, so 40 buffers the same."""
    c = one(C.fig5_claims(f5({20: 75.0, 40: 80.0}, mb_up=2.5)), "fig5")
    assert c.verdict == NOT_TESTABLE
    assert "held the same buffer (2.500 MB up per client" in c.reason and "train_per_class" in c.reason
    rows = f5({20: 75.0, 40: 80.0}, mb_up=2.5)
    rows.loc[(rows["label"] == "fedlscl-buffer40") & (rows["seed"] == SEEDS[0]), "mb_up_per_client"] = 2.6
    assert one(C.fig5_claims(rows), "fig5").verdict == FAILS          # one seed's buffers differ: judged


# ------------------------------------------------------------------------------------------ communication

def comm(ours_mb: list[float], others: dict[str, list[float]], seeds=SEEDS) -> pd.DataFrame:
    rows = [run_row("table1", "fedlscl", sd, [50.0], mb=(m / 2, m / 2)) for sd, m in zip(seeds, ours_mb)]
    for lab, mbs in others.items():
        rows += [run_row("table1", lab, sd, [50.0], mb=(m / 2, m / 2)) for sd, m in zip(seeds, mbs)]
    return table(rows)


def test_communication_fewer_than_every_baseline_holds():
    c = one(C.communication_claims(comm([3.0, 3.0, 3.0], {"fedavg": [5.7] * 3, "glfc": [9.0] * 3})), "communication")
    assert c.verdict == HOLDS and [p.outcome for p in c.parts] == ["fewer", "fewer"]
    assert c.parts[0].a.label == "fedavg" and c.parts[0].difference == pytest.approx(2.7)
    assert c.parts[0].extra["mb_per_client_round"] == pytest.approx(5.7 / 5)    # 1 task x 5 rounds


def test_communication_more_than_one_baseline_does_not_hold_one_line_each():
    df = comm([3.0, 3.0, 3.0], {"fedavg": [5.7] * 3, "l2p": [0.25] * 3})
    c = one(C.communication_claims(df), "communication")
    assert c.verdict == FAILS and [(p.extra["baseline"], p.outcome) for p in c.parts] == [
        ("fedavg", "fewer"), ("l2p", "more")]
    assert "fewer bytes than 1 of 2 baselines; more than l2p" in c.notes


def test_communication_one_seed_decides_and_a_spread_can_leave_it_not_separated():
    c = one(C.communication_claims(comm([3.0], {"fedavg": [5.7]}, seeds=(42,))), "communication")
    assert c.verdict == HOLDS and c.parts[0].spread == 0.0
    c = one(C.communication_claims(comm([2.0, 3.0, 4.0], {"fedavg": [3.5] * 3})), "communication")
    assert c.verdict == NOT_SEPARATED and c.parts[0].outcome == ""


def test_communication_not_testable_without_baselines():
    c = one(C.communication_claims(comm([3.0] * 3, {"lorm": [1.0] * 3}).assign(
        state=lambda d: np.where(d["label"] == "lorm", "failed", "completed"))), "communication")
    assert c.verdict == NOT_TESTABLE and "another method" in c.reason
    assert C.communication_claims(t2(ORDERED))[0].verdict == NOT_TESTABLE


# ------------------------------------------------------------------------------------------ Fig. 3 and 4

def f3(curves: dict[int, tuple[list[float], float]], depth: int, suite: str = "fig3") -> pd.DataFrame:
    rows = []
    for b, (curve, noise) in curves.items():
        rows += seeds_of(suite, f"fedlscl-block{b}", spread3(curve, noise), method_config={"block": b}, depth=depth)
    return table(rows)


def test_fig3_on_a_six_block_vit_has_no_deep_blocks():
    c = one(C.fig3_claims(f3({b: ([80, 78, 77 + 0.1 * b], 0.5) for b in range(6)}, depth=6)), "fig3")
    assert [p.verdict for p in c.parts] == [HOLDS, NOT_TESTABLE, NOT_TESTABLE] and c.verdict == NOT_TESTABLE
    assert "the ViT has 6 blocks (0-5): no deep blocks" in c.reason


def test_fig3_on_twelve_blocks_deep_worse_and_more_variable():
    curves = {b: ([80, 79, 78], 0.5) for b in range(6)}
    curves.update({b: ([70, 50, 65], 0.5) for b in range(6, 12)})
    c = one(C.fig3_claims(f3(curves, depth=12, suite="fig3-vit-b")), "fig3")
    assert c.verdict == HOLDS
    worse, variable = c.parts[1], c.parts[2]
    assert worse.a.mean == pytest.approx(78.0) and worse.b.mean == pytest.approx(65.0)
    assert variable.a.mean == pytest.approx((20 + 15) / 2) and variable.b.mean == pytest.approx(1.0)
    unstable = {**curves, 2: ([80, 79, 70], 0.5)}
    assert one(C.fig3_claims(f3(unstable, depth=12, suite="fig3-vit-b")), "fig3").parts[0].verdict == FAILS


def test_fig4_compares_with_the_homogeneous_run_of_the_same_scenario_and_settings():
    hetero = seeds_of("fig4", "fedlscl-hetero", spread3([70, 68.5]), per_client=[60, 70, 80, 70, 62.5],
                      run_config={"small_models": ["resnet18", "mobilenetv3_large_100", "densenet121",
                                                   "efficientnet_b3", "vgg16"]})
    homo = seeds_of("table1", "fedlscl", spread3([72, 70])) + seeds_of("table1", "lorm", spread3([60, 60]))
    c = one(C.fig4_claims(table(hetero + homo)), "fig4")
    assert c.verdict == HOLDS and c.parts[0].b.label == "fedlscl-hetero"
    assert c.parts[0].a.label == "table1/fedlscl" and c.parts[0].difference == pytest.approx(1.5)
    assert c.parts[0].extra["client_final_acc"]["client 4 (vgg16)"] == pytest.approx(62.5)
    worse = seeds_of("table1", "fedlscl", spread3([72, 75]))
    assert one(C.fig4_claims(table(hetero + worse)), "fig4").verdict == FAILS        # 6.5 - 2 > 0.5
    other = seeds_of("table1", "fedlscl", spread3([72, 70]), run_config={"clients": 3},
                     scenario="three-clients")
    c = one(C.fig4_claims(table(hetero + other)), "fig4")
    assert c.verdict == NOT_TESTABLE and "clients: 5 vs 3" in c.reason
    failed = seeds_of("fig4", "fedlscl-hetero", spread3([1, 2]), state="failed", reason="NaN logits")
    assert "NaN logits" in one(C.fig4_claims(table(failed + homo)), "fig4").reason


def test_fig4_falls_back_to_another_suites_fedlscl_with_the_same_settings():
    scratch = {"small_pretrained": False}
    hetero = seeds_of("fig4", "fedlscl-hetero", spread3([70, 68.5]),
                      run_config={**scratch, "small_models": ["resnet18", "vgg16"]})
    pretrained = seeds_of("table1", "fedlscl", spread3([72, 90]), run_config={"small_pretrained": True})
    alike = seeds_of("standard", "fedlscl", spread3([72, 69]), run_config=scratch)
    c = one(C.fig4_claims(table(hetero + pretrained + alike)), "fig4")
    assert c.parts[0].a.label == "standard/fedlscl" and c.parts[0].difference == pytest.approx(0.5)
    assert c.verdict == HOLDS
    c = one(C.fig4_claims(table(hetero + pretrained)), "fig4")     # only a run with other settings
    assert c.verdict == NOT_TESTABLE and "small_pretrained: False vs True" in c.reason
    own = seeds_of("fig4", "fedlscl", spread3([72, 75]), run_config=scratch)    # the suite's own run first
    c = one(C.fig4_claims(table(hetero + pretrained + alike + own)), "fig4")
    assert c.parts[0].a.label == "fig4/fedlscl" and c.verdict == FAILS


# ------------------------------------------------------------------------------------------ outputs

def test_every_claim_is_reported_and_the_json_is_complete(tmp_path):
    df = pd.concat([t1(spread3([80, 70]), {"lorm": spread3([60, 50])}), t2(ORDERED),
                    f5({20: 79.5, 40: 80.0})], ignore_index=True)
    claims = C.evaluate_claims(df)
    assert [c.id for c in claims] == ["table1", "table1-current-task", "table2", "fig3", "fig4", "fig5",
                                      "communication"]
    md, js = C.write_claims(claims, tmp_path)
    data = json.loads(js.read_text())
    assert [c["verdict"] for c in data["claims"]] == [c.verdict for c in claims]
    t2json = data["claims"][2]["parts"][0]
    assert t2json["a"]["mean"] == pytest.approx(90.0) and t2json["a"]["std"] == pytest.approx(0.5)
    assert t2json["a"]["seeds"] == list(SEEDS)
    text = md.read_text()
    assert "| Fig. 3 |" in text and "suites fig3 and fig3-vit-b absent" in text and "90.00 ± 0.50" in text


# ------------------------------------------------------------------------------------------ the command

@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> Path:
    """One real smoke run (fedavg, seeds 1 and 2) under ``<root>/smoke/fedavg/synthetic/seed<k>``."""
    from fcl_bench.cli import main
    from tests.conftest import SMOKE_OPTS

    root = tmp_path_factory.mktemp("claims-smoke")
    res = CliRunner().invoke(main, ["run", "--methods", "fedavg", "--seeds", "1,2", "--out", str(root),
                                    *SMOKE_OPTS])
    assert res.exit_code == 0, res.output
    return root


def _derive(src: Path, root: Path, suite: str, label: str, seed: int, final: float | None,
            method: str = "fedlscl", method_config: dict | None = None, run: dict | None = None) -> None:
    """Copy the real run of ``seed`` to ``root/suite/label`` as ``method`` with a chosen final accuracy."""
    dst = root / suite / label / "synthetic" / f"seed{seed}"
    shutil.copytree(src / "smoke" / "fedavg" / "synthetic" / f"seed{seed}", dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(suite=suite, label=label, method=method)
    cfg["run"].update(run or {})
    if method == "fedlscl":  # fedavg loads no foundation model; a fedlscl run records the tiny ViT like this
        cfg["foundation"] = {"name": "tiny", "depth": 6, "embed_dim": 192}
    cfg["method_config"] = {**cfg["method_config"], **(method_config or {})}
    (dst / "config.json").write_text(json.dumps(cfg))
    m = json.loads((dst / "metrics.json").read_text())
    for space in (m, m["spaces"]["client"]) if final is not None else ():
        space["acc"] = [*space["acc"][:-1], final]
        space["final_acc"] = final
    (dst / "metrics.json").write_text(json.dumps(m))


def test_report_claims_command_writes_and_prints_the_verdicts(smoke, tmp_path):
    from fcl_bench.report import report_command

    root = tmp_path / "results"
    for seed, k in ((1, -1), (2, 1)):
        for role, final in ORDERED.items():
            _derive(smoke, root, "table2", T2[role], seed, (final + 0.5 * k) / 100)
        for b in (0, 3, 5):
            _derive(smoke, root, "fig3", f"fedlscl-block{b}", seed, (70 + 0.5 * k) / 100,
                    method_config={"block": b})
        _derive(smoke, root, "table1", "fedlscl", seed, (60 + 0.5 * k) / 100)
        _derive(smoke, root, "table1", "fedavg", seed, None, method="fedavg")
        _derive(smoke, root, "fig4", "fedlscl-hetero", seed, (59.5 + 0.5 * k) / 100,
                run={"small_models": ["test_resnet", "mobilenetv3_small_050"]})
    res = CliRunner().invoke(report_command, [str(root), "--out", str(tmp_path / "r"), "--claims"])
    assert res.exit_code == 0, res.output
    data = json.loads((tmp_path / "r" / "claims.json").read_text())
    verdicts = {c["id"]: c for c in data["claims"]}
    assert verdicts["table2"]["verdict"] == HOLDS
    assert verdicts["table2"]["parts"][0]["a"]["seeds"] == [1, 2]
    fig3 = verdicts["fig3"]                                    # depth read from the runs' config.json
    assert fig3["verdict"] == NOT_TESTABLE and "the ViT has 6 blocks" in fig3["reason"]
    assert verdicts["table1"]["parts"][-1]["b"]["label"] == "fedavg"
    fig4 = verdicts["fig4"]["parts"][0]                        # same scenario and settings but small_models
    assert verdicts["fig4"]["verdict"] == HOLDS and fig4["difference"] == pytest.approx(0.5)
    comm = verdicts["communication"]["parts"][0]               # a copy of fedavg's run: the same bytes
    assert comm["verdict"] == NOT_SEPARATED and comm["difference"] == 0.0 and comm["a"]["mean"] > 0
    assert f"[{HOLDS}] Table 2" in res.output and "claims.md" in res.output
    assert "## Claim verdicts" in (tmp_path / "r" / "report.md").read_text()
    assert (tmp_path / "r" / "claims.md").read_text().startswith("# Claim verdicts")
    plain = CliRunner().invoke(report_command, [str(root), "--out", str(tmp_path / "plain")])
    assert plain.exit_code == 0 and not (tmp_path / "plain" / "claims.json").exists()
