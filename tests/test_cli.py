"""The command line: listing, clear errors for bad input, failed runs recorded while the suite goes on,
and third-party methods found through the ``fcl_bench.methods`` entry-point group."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from fcl_bench.config import PRESETS
from fcl_bench.store import read_json, run_dir


def _clean_error(res) -> None:
    """A user error: non-zero exit through SystemExit (not an exception escaping), no traceback."""
    assert res.exit_code != 0
    assert isinstance(res.exception, SystemExit), repr(res.exception)
    assert "Traceback" not in res.output


def test_list_shows_methods_datasets_presets_and_method_options(cli):
    res = cli("list")
    assert res.exit_code == 0, res.output
    for section in ("methods:", "datasets:", "presets:"):
        assert section in res.output
    for name in ("fedavg", "fedprox", "synthetic", "cifar100", "imagenet-r", *PRESETS):
        assert name in res.output
    assert "lr, weight_decay, average_bn_stats, mu" in res.output  # fedprox's options, from its Config dataclass
    only = cli("list", "presets")
    assert "smoke" in only.output and "methods:" not in only.output


def test_unknown_method_lists_the_valid_ones(cli, tmp_path):
    res = cli("run", "--methods", "fedavg,fedavgg", "--preset", "smoke", "--out", tmp_path)
    _clean_error(res)
    assert "unknown method 'fedavgg'; valid methods:" in res.output and "fedprox" in res.output
    assert not any(tmp_path.iterdir())


def test_unknown_dataset_lists_the_valid_ones(cli, tmp_path):
    res = cli("run", "--methods", "fedavg", "--preset", "smoke", "--dataset", "cifar1000", "--out", tmp_path)
    _clean_error(res)
    assert "unknown dataset 'cifar1000'" in res.output
    assert all(name in res.output for name in ("cifar100", "synthetic", "imagenet-r"))


def test_unknown_method_option_lists_valid_keys(cli, tmp_path):
    res = cli("run", "--methods", "fedavg,fedprox", "--preset", "smoke", "-o", "fedprox.nope=1", "--out", tmp_path)
    _clean_error(res)
    assert "unknown fedprox key 'nope'; valid keys: lr, weight_decay, average_bn_stats, mu" in res.output


def test_a_plugin_that_fails_to_import_is_a_clean_error(cli, tmp_path):
    plugin = tmp_path / "broken.py"
    plugin.write_text("import torch\n\nx = 1 / 0\n")
    res = cli("run", "--methods", "fedavg", "--preset", "smoke", "--plugin", plugin, "--out", tmp_path)
    _clean_error(res)
    assert "failed to import" in res.output and "ZeroDivisionError" in res.output and "broken.py:3" in res.output


def test_failed_methods_are_recorded_and_the_others_complete(suite_run):
    out, res = suite_run
    assert res.exit_code == 1 and isinstance(res.exception, SystemExit)
    assert "Traceback" not in res.output
    states = {m: read_json(run_dir(out, "smoke", m, "synthetic", 42) / "status.json")
              for m in ("fedavg", "boom", "nanloss")}
    assert states["fedavg"]["state"] == "completed"
    assert states["boom"]["state"] == "failed"
    assert states["boom"]["reason"] == "RuntimeError: boom from the plugin"
    assert states["nanloss"]["state"] == "failed"
    assert "NonFiniteError" in states["nanloss"]["reason"] and "not finite" in states["nanloss"]["reason"]
    assert "client 0 upload" in states["nanloss"]["reason"]
    # the summary at the end names both failures; the full traceback went to the run's log
    assert "2 of 3 runs failed" in res.output
    assert "boom seed 42: RuntimeError: boom from the plugin" in res.output
    log = (run_dir(out, "smoke", "boom", "synthetic", 42) / "log.txt").read_text()
    assert "Traceback" in log and "train_round" in log
    # a failed run still says what it was
    assert read_json(run_dir(out, "smoke", "boom", "synthetic", 42) / "config.json")["method"] == "boom"


# -- a third-party method installed as a package ----------------------------------------------------------

PLUGIN_PYPROJECT = textwrap.dedent('''
    [build-system]
    requires = ["setuptools>=61"]
    build-backend = "setuptools.build_meta"

    [project]
    name = "fclb-test-mymethod"
    version = "0.0.1"

    [project.entry-points."fcl_bench.methods"]
    mymethod = "fclb_test_mymethod:MyMethod"
''')

PLUGIN_MODULE = textwrap.dedent('''
    """A third-party method: FedAvg with a smaller learning rate, declared outside the repository."""
    from dataclasses import dataclass

    from fcl_bench.methods.fedavg import FedAvg, FedAvgConfig


    @dataclass
    class MyConfig(FedAvgConfig):
        lr: float = 5e-4
        tag: str = "mine"


    class MyMethod(FedAvg):
        name = "mymethod"
        description = "a plugin from an installed package"
        Config = MyConfig
''')


@pytest.fixture(scope="module")
def installed_plugin(tmp_path_factory):
    src = tmp_path_factory.mktemp("plugin_pkg")
    (src / "pyproject.toml").write_text(PLUGIN_PYPROJECT)
    (src / "fclb_test_mymethod.py").write_text(PLUGIN_MODULE)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    done = subprocess.run(pip + ["install", "--no-deps", "--no-build-isolation", "--no-index", str(src)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    yield src
    subprocess.run(pip + ["uninstall", "-y", "fclb-test-mymethod"], capture_output=True, timeout=120)


def test_an_installed_entry_point_method_runs_through_the_cli(installed_plugin, cli_subprocess, smoke_opts,
                                                               tmp_path):
    listed = cli_subprocess("list", "methods", cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    assert "mymethod" in listed.stdout and "options: lr, weight_decay, average_bn_stats, tag" in listed.stdout
    out = tmp_path / "results"
    done = cli_subprocess("run", "--methods", "mymethod", "-o", "mymethod.tag=x", "--out", out, *smoke_opts,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    path = run_dir(out, "smoke", "mymethod", "synthetic", 42)
    assert read_json(path / "status.json")["state"] == "completed"
    assert read_json(path / "config.json")["method_config"] == {"lr": 5e-4, "weight_decay": 0.0,
                                                                   "average_bn_stats": False, "tag": "x"}
    assert 0.0 <= read_json(path / "metrics.json")["final_acc"] <= 1.0


# -- the registry behind --methods ------------------------------------------------------------------------

def test_a_broken_entry_point_warns_and_leaves_the_other_methods_usable(monkeypatch):
    from importlib.metadata import EntryPoint

    from fcl_bench import registry

    ghost = EntryPoint("ghost", "fclb_no_such_module:Ghost", registry.ENTRY_POINT_GROUP)
    monkeypatch.setattr(registry, "entry_points", lambda group: [ghost])
    monkeypatch.setattr(registry, "_LOADED", False)
    monkeypatch.setattr(registry, "_BROKEN", {})
    with pytest.warns(UserWarning, match="entry point 'ghost'"):
        names = registry.available_methods()
    assert "fedavg" in names and "ghost" not in names
    with pytest.raises(registry.RegistryError, match="ghost.*failed to load: ModuleNotFoundError"):
        registry.get_method("ghost")


def test_two_different_classes_may_not_share_a_name():
    from fcl_bench import registry
    from fcl_bench.api import Method

    registry.available_methods()
    impostor = type("FedAvg", (Method,), {"name": "fedavg", "__module__": "elsewhere"})
    with pytest.raises(registry.RegistryError, match="two methods are named 'fedavg'.*elsewhere.FedAvg"):
        registry.register(impostor)
    with pytest.raises(registry.RegistryError, match="may not contain"):
        registry.register(type("Dotted", (Method,), {"name": "a.b"}))


def test_a_run_prints_one_plain_line_per_task_when_stdout_is_not_a_terminal(cli, tmp_path):
    # CliRunner's stdout is not a terminal, as in `make run > log`: no progress bar, but one line per task
    res = cli("run", "--methods", "fedvit", "--preset", "smoke", "--out", tmp_path, "-o",
              "foundation_pretrained=false")
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    for t in (1, 2):
        assert any(line.startswith(f"[fedvit] task {t}/2: acc (client space) = ") for line in lines), res.output
    assert "\r" not in res.output  # no progress-bar redraws in the log
