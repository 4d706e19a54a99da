"""Tests of suites: the built-in files load and expand, user files work, bad files are clear errors."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest
import timm

from fcl_bench import registry
from fcl_bench.config import RunConfig, apply_overrides
from fcl_bench.nn.tiny_vit import build_tiny_vit
from fcl_bench.suites import SuiteError, available_suites, load_suite, parse_suite

METHODS = ["fedavg", "fedprox", "fedlscl", "l2p"]


def _configs() -> dict[str, type]:
    return {m: registry.get_method(m).Config for m in registry.available_methods()}


def test_builtin_suites_exist_and_are_named_after_their_files():
    names = available_suites()
    assert {"table1", "table2", "fig3", "fig4", "fig5"} <= set(names)
    for n in names:
        assert load_suite(n).name == n and load_suite(n).description


def test_builtin_suites_plan_against_the_registered_methods():
    methods = registry.available_methods()
    for n in available_suites():
        plan = load_suite(n).plan(methods, _configs())     # checks every method override key and value
        assert plan and len({p["label"] for p in plan}) == len(plan)
        for p in plan:
            assert set(p) == {"label", "method", "overrides", "run_overrides"}
            assert all(isinstance(v, str) for v in [*p["overrides"].values(), *p["run_overrides"].values()])


def test_all_expands_to_every_method_labelled_by_name():
    plan = load_suite("table1").plan(METHODS)
    assert [(p["label"], p["method"], p["overrides"]) for p in plan] == [(m, m, {}) for m in METHODS]


def test_table2_rows_are_the_ablations():
    plan = load_suite("table2").plan(METHODS)
    keys = ("collab", "continual_finetune", "aggregation")
    rows = {p["label"]: tuple(p["overrides"][k] for k in keys) for p in plan}
    assert rows == {"fedlscl": ("true", "true", "o2d"),
                    "fedlscl-fedavg-agg": ("true", "true", "fedavg"),
                    "fedlscl-no-cf": ("true", "false", "o2d"),
                    "fedlscl-no-cf-fedavg-agg": ("true", "false", "fedavg"),
                    "fedlscl-no-collab": ("false", "false", "fedavg")}
    assert {p["method"] for p in plan} == {"fedlscl"}


def test_sweeps_expand_one_run_per_value():
    depth = inspect.signature(build_tiny_vit).parameters["depth"].default
    fig3 = load_suite("fig3").plan(METHODS)
    assert [p["overrides"] for p in fig3] == [{"block": str(b)} for b in range(depth)]
    assert [p["label"] for p in fig3] == [f"fedlscl-block{b}" for b in range(depth)]
    fig5 = load_suite("fig5").plan(METHODS)
    assert [p["overrides"]["buffer_per_class"] for p in fig5] == ["5", "10", "20", "40"]


def test_fig4_gives_one_known_timm_arch_per_client():
    p, homo = load_suite("fig4").plan(METHODS)
    archs = p["run_overrides"]["small_models"].split(",")
    assert archs == ["resnet18", "mobilenetv3_large_100", "densenet121", "efficientnet_b3", "vgg16"]
    assert all(timm.is_model(a) for a in archs)
    cfg = apply_overrides(RunConfig(), p["run_overrides"], "run")
    assert cfg.small_models == archs
    # the homogeneous reference: the same settings but small_models (the preset's one CNN on every client)
    assert homo["label"] == "fedlscl" and homo["method"] == p["method"] and homo["overrides"] == p["overrides"]
    assert {k: v for k, v in p["run_overrides"].items() if k != "small_models"} == homo["run_overrides"]


def _write(tmp_path: Path, data) -> Path:
    p = tmp_path / "mine.json"
    p.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return p


def test_user_file_by_path(tmp_path):
    path = _write(tmp_path, {"name": "mine", "runs": [
        {"method": "fedprox", "label": "prox-mu", "overrides": {"mu": 0.1, "flag": True, "ids": [1, 2]},
         "run_overrides": {"clients": 3}}]})
    suite = load_suite(path)
    assert suite.source == str(path)
    assert suite.plan(METHODS) == [{"label": "prox-mu", "method": "fedprox",
                                    "overrides": {"mu": "0.1", "flag": "true", "ids": "1,2"},
                                    "run_overrides": {"clients": "3"}}]


def _one(**run) -> dict:
    return {"name": "x", "runs": [{"method": "fedavg", **run}]}


@pytest.mark.parametrize("data, match", [
    ({**_one(), "extra": 1}, r"unknown key\(s\) 'extra'; valid keys: description"),
    (_one(overide={}), r"run 1: unknown key\(s\) 'overide'"),
    ({"name": "x", "runs": []}, "'runs' must be a non-empty list"),
    ({"runs": [{"method": "fedavg"}]}, "missing key"),
    (_one(run_overrides={"clientz": 3}), "unknown run key 'clientz'"),
    (_one(run_overrides={"clients": "many"}), "not a valid int"),
    (_one(run_overrides={"seed": 3}), "seeds come from --seeds"),
    ({"name": "x", "runs": [{"method": "all", "label": "a"}]}, 'method "all" takes no label'),
    (_one(sweep={"key": "lr", "values": [1, 2]}, label="a"), r"must contain \{value\}"),
    (_one(sweep={"key": "lr", "values": []}), "non-empty list"),
    (_one(sweep={"key": "lr", "values": [1]}, overrides={"lr": 2}), "both swept and overridden"),
    (_one(label="a/b"), "may hold only letters"),
    (_one(overrides={"lr": {"a": 1}}), "must be a string, number"),
    ("{not json", "not valid JSON"),
])
def test_bad_files_are_clear_errors(tmp_path, data, match):
    with pytest.raises(SuiteError, match=match):
        load_suite(_write(tmp_path, data))


def test_unknown_suite_names_the_valid_ones():
    with pytest.raises(SuiteError, match="neither a built-in suite .*table1.*nor a suite JSON file"):
        load_suite("tabel1")


@pytest.mark.parametrize("runs, match", [
    ([{"method": "lorm"}], "method 'lorm' is not registered; registered methods: fedavg, fedprox"),
    ([{"method": "fedavg"}, {"method": "all"}], "label 'fedavg' is used by two runs"),
    ([{"method": "fedavg", "overrides": {"lrr": 0.1}}], "run 'fedavg': unknown fedavg key 'lrr'"),
])
def test_plan_errors(runs, match):
    suite = parse_suite({"name": "x", "runs": runs})
    with pytest.raises(SuiteError, match=match):
        suite.plan(METHODS, _configs())
