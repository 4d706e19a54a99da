"""Configuration: ``-o`` parsing by declared type, unknown keys and presets, rules checked before a run."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from fcl_bench.config import PRESETS, ConfigError, apply_overrides, preset, split_overrides


@dataclass
class Hyper:
    steps: int = 3
    lr: float = 1e-3
    flag: bool = False
    targets: list[str] = field(default_factory=lambda: ["qkv"])
    sizes: list[int] = field(default_factory=lambda: [1])
    limit: int | None = 5
    note: str = "x"


def test_values_are_parsed_by_the_field_type():
    h = apply_overrides(Hyper(), {"steps": "12", "lr": "5e-4", "flag": "yes", "targets": "qkv, proj,fc1",
                                  "sizes": "2,4", "limit": "none", "note": "a=b"}, "m")
    assert h == Hyper(steps=12, lr=5e-4, flag=True, targets=["qkv", "proj", "fc1"], sizes=[2, 4], limit=None,
                      note="a=b")
    assert apply_overrides(Hyper(), {"limit": "7"}, "m").limit == 7
    assert Hyper().targets == ["qkv"]  # the original is not modified


@pytest.mark.parametrize("text, value", [("true", True), ("TRUE", True), ("1", True), ("on", True),
                                         ("false", False), ("0", False), ("No", False), ("off", False)])
def test_bool_accepts_the_usual_spellings(text, value):
    assert apply_overrides(Hyper(), {"flag": text}, "m").flag is value


@pytest.mark.parametrize("key, text, problem", [
    ("flag", "maybe", "'maybe' is not a boolean"),
    ("flag", "", "not a boolean"),
    ("steps", "1.5", "'1.5' is not a valid int"),
    ("steps", "none", "not a valid int"),  # not Optional: none is not allowed
    ("lr", "fast", "'fast' is not a valid float"),
    ("sizes", "1,two", "'two' is not a valid int"),
])
def test_unparsable_values_are_errors_naming_the_key(key, text, problem):
    with pytest.raises(ConfigError, match=problem) as e:
        apply_overrides(Hyper(), {key: text}, "m")
    assert f"m.{key}" in str(e.value)


def test_unknown_key_lists_the_valid_keys():
    with pytest.raises(ConfigError) as e:
        apply_overrides(Hyper(), {"rnak": "4"}, "fedlscl")
    msg = str(e.value)
    assert "unknown fedlscl key 'rnak'" in msg
    assert all(k in msg for k in ("steps", "lr", "flag", "targets", "sizes", "limit", "note"))


def test_split_overrides_separates_run_and_method_keys():
    run, per_method = split_overrides(["clients=3", "fedlscl.rank=8", " fedlscl.block = 2", "fedprox.mu=0.1",
                                       "note=a=b"])
    assert run == {"clients": "3", "note": "a=b"}
    assert per_method == {"fedlscl": {"rank": "8", "block": "2"}, "fedprox": {"mu": "0.1"}}
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        split_overrides(["clients"])


def test_presets_build_and_unknown_preset_lists_the_valid_ones():
    for name in PRESETS:
        cfg = preset(name)  # every preset satisfies the protocol's rules
        assert cfg.private + cfg.public == cfg.tasks * cfg.classes_per_task
    with pytest.raises(ConfigError) as e:
        preset("smok")
    assert "unknown preset 'smok'" in str(e.value)
    assert all(name in str(e.value) for name in PRESETS)


def test_run_overrides_parse_lists_and_optionals():
    cfg = apply_overrides(preset("smoke"), {"small_models": "test_resnet,resnet10t", "train_per_class": "none",
                                            "amp": "false", "alpha": "0.25"}, "run")
    assert cfg.small_models == ["test_resnet", "resnet10t"] and cfg.train_per_class is None
    assert cfg.amp is False and cfg.alpha == 0.25


@pytest.mark.parametrize("overrides, problem", [
    ({"private": "3"}, r"private \+ public must equal tasks x classes_per_task"),
    ({"clients": "0"}, "clients must be >= 1"),
    ({"alpha": "0"}, "alpha"),
    ({"rounds_per_task": "0"}, "rounds_per_task must be >= 1"),
    ({"batch_size": "-4"}, "batch_size must be >= 1"),
    ({"train_per_class": "0"}, "train_per_class must be >= 1"),
    ({"small_models": ""}, "small_models is empty"),
    ({"dataset": "cifar101"}, "unknown dataset 'cifar101'; available datasets: .*cifar100"),
])
def test_impossible_run_configs_are_rejected_before_anything_runs(overrides, problem):
    with pytest.raises(ConfigError, match=problem):
        apply_overrides(preset("smoke"), overrides, "run")


def test_cli_rejects_a_broken_protocol_rule_up_front(cli, tmp_path):
    res = cli("run", "--methods", "fedavg", "--preset", "smoke", "-o", "private=3", "--out", tmp_path)
    assert res.exit_code != 0 and isinstance(res.exception, SystemExit)
    assert "3 private + 2 public = 5 classes" in res.output and "Traceback" not in res.output
    assert not any(tmp_path.iterdir())  # nothing ran, nothing was recorded


def test_cli_error_for_too_many_clients_names_the_rule(cli, tmp_path):
    # k * private + public <= classes needs the dataset; the error says the numbers, without a traceback
    res = cli("run", "--methods", "fedavg", "--preset", "smoke", "-o", "clients=50", "-o",
              "foundation_pretrained=false", "--out", tmp_path, "--quiet")
    assert res.exit_code != 0 and isinstance(res.exception, SystemExit)
    assert "50 clients x 2 private + 2 public = 102 classes needed, dataset has 100" in res.output
    assert "Traceback" not in res.output


def test_cli_unknown_method_key_lists_valid_keys(cli, tmp_path):
    res = cli("run", "--methods", "fedavg", "--preset", "smoke", "-o", "fedavg.nope=1", "--out", tmp_path)
    assert res.exit_code != 0 and isinstance(res.exception, SystemExit)
    assert "unknown fedavg key 'nope'; valid keys: lr, weight_decay" in res.output
    assert "Traceback" not in res.output


def test_cli_override_for_a_method_not_run_is_an_error(cli, tmp_path):
    res = cli("run", "--methods", "fedavg", "--preset", "smoke", "-o", "fedprox.mu=1", "--out", tmp_path)
    assert res.exit_code != 0 and "fedprox" in res.output and "not among the methods run" in res.output
