"""Packaging: ``methods/`` and ``datasets/`` install as ``fcl_bench.methods`` / ``fcl_bench.datasets``, never as
top-level packages (a top-level ``datasets`` would shadow Hugging Face ``datasets``)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

PROBE = r'''
import importlib.metadata as md, importlib.util, json
dist = md.distribution("fcl-bench")
files = [str(f) for f in (dist.files or [])]
top = (dist.read_text("top_level.txt") or "").split()
spec = {n: importlib.util.find_spec(n) for n in ("methods", "datasets")}
import fcl_bench.methods, fcl_bench.datasets, fcl_bench.methods.fedavg
print(json.dumps({
    "files": files, "top_level": top,
    "spec": {n: (s.origin if s else None) for n, s in spec.items()},
    "owners": {n: md.packages_distributions().get(n, []) for n in ("methods", "datasets", "fcl_bench")},
    "methods_path": list(fcl_bench.methods.__path__), "datasets_path": list(fcl_bench.datasets.__path__),
    "datasets_registry": sorted(fcl_bench.datasets.DATASETS),
}))
'''


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict:
    """What the installed distribution looks like from a folder other than the repository root."""
    cwd = tmp_path_factory.mktemp("elsewhere")
    done = subprocess.run([sys.executable, "-c", PROBE], cwd=cwd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_distribution_declares_only_fcl_bench_at_top_level(installed):
    assert installed["top_level"] == ["fcl_bench"]
    tops = {f.split("/")[0] for f in installed["files"]}
    assert not tops & {"methods", "datasets"}
    assert "fcl-bench" not in installed["owners"]["methods"] + installed["owners"]["datasets"]
    assert installed["owners"]["fcl_bench"] == ["fcl-bench"]


def test_methods_and_datasets_are_subpackages_only(installed):
    assert installed["spec"]["methods"] is None
    # Hugging Face `datasets` may legitimately be installed; ours must not be what `import datasets` finds
    origin = installed["spec"]["datasets"]
    assert origin is None or not Path(origin).is_relative_to(REPO)
    assert [Path(p).name for p in installed["methods_path"]] == ["methods"]
    assert [Path(p).name for p in installed["datasets_path"]] == ["datasets"]
    assert "synthetic" in installed["datasets_registry"]


def test_a_built_wheel_holds_no_top_level_methods_or_datasets(tmp_path):
    # build from a copy so the repository gets no build/ or egg-info folders
    src = tmp_path / "src"
    ignore = shutil.ignore_patterns(".venv", "results", "tests", "build", "dist", "*.egg-info", "__pycache__", ".*")
    shutil.copytree(REPO, src, ignore=ignore)
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                           "-q", "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    (wheel,) = (tmp_path / "dist").glob("fcl_bench-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops <= {"fcl_bench", next(t for t in tops if t.endswith(".dist-info"))}
    for module in ("fcl_bench/methods/fedavg.py", "fcl_bench/datasets/synthetic.py", "fcl_bench/wire.py",
                   "fcl_bench/suites/table1.json", "fcl_bench/weights/manifest.json"):
        assert module in names
    manifest = json.loads(zipfile.ZipFile(wheel).read("fcl_bench/weights/manifest.json"))
    for entry in manifest["weights"].values():  # every pinned weights file ships in the wheel
        assert f"fcl_bench/weights/{entry['file']}" in names


def test_no_harness_module_imports_a_method():
    """The harness (fcl_bench/) never depends on a method module; only the registry loads them by name."""
    import ast

    root = Path(__file__).resolve().parents[1] / "fcl_bench"
    offenders = []
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else \
                [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if any(n == "fcl_bench.methods" or n.startswith("fcl_bench.methods.") for n in names):
                offenders.append(f"{path.relative_to(root)}:{node.lineno}")
    assert not offenders, offenders
