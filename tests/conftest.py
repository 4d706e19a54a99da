"""Shared test fixtures: a fresh cache per test session, the CLI (in-process and as a subprocess), and one
small suite run shared by the CLI and store tests.

Every session gets its own empty ``$FCL_BENCH_CACHE`` so CI starts clean and tests never touch
``~/.cache/fcl-bench``. Set ``FCL_BENCH_TEST_CACHE=DIR`` to reuse a cache across local sessions (the
synthetic dataset takes 10-20 s to generate).

Tests run torch on one intra-op thread (``FCL_BENCH_TEST_THREADS=N`` to change; subprocesses inherit it
through ``OMP_NUM_THREADS``): the tensors are tiny, and on a busy 2-core machine threads that spin-wait
for each other made the smoke runs up to 7x slower.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

#: The smallest useful run: the smoke protocol, a random-init tiny ViT (no pretraining) and timm's
#: 0.37M-parameter test ResNet as the client model.
SMOKE_OPTS = ("--preset", "smoke", "-o", "foundation_pretrained=false", "-o", "small_models=test_resnet", "--quiet")


@pytest.fixture(scope="session", autouse=True)
def torch_threads() -> Iterator[int]:
    import torch

    n = int(os.environ.get("FCL_BENCH_TEST_THREADS", "1"))
    old, old_env = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    torch.set_num_threads(n)
    os.environ["OMP_NUM_THREADS"] = str(n)
    yield n
    torch.set_num_threads(old)
    if old_env is None:
        os.environ.pop("OMP_NUM_THREADS", None)
    else:
        os.environ["OMP_NUM_THREADS"] = old_env


@pytest.fixture(scope="session", autouse=True)
def fresh_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Point ``$FCL_BENCH_CACHE`` at an empty folder before anything loads data; restore it afterwards."""
    path = Path(os.environ.get("FCL_BENCH_TEST_CACHE") or tmp_path_factory.mktemp("fcl-bench-cache"))
    old = os.environ.get("FCL_BENCH_CACHE")
    os.environ["FCL_BENCH_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("FCL_BENCH_CACHE", None)
    else:
        os.environ["FCL_BENCH_CACHE"] = old


@pytest.fixture(scope="session")
def smoke_opts() -> tuple[str, ...]:
    return SMOKE_OPTS


@pytest.fixture(scope="session")
def cli() -> Callable[..., Result]:
    """``cli("run", "--methods", ...)``: the click app in-process (exceptions are caught into the result)."""
    from fcl_bench.cli import main

    def invoke(*args: str) -> Result:
        return CliRunner().invoke(main, [str(a) for a in args])

    return invoke


@pytest.fixture(scope="session")
def cli_subprocess() -> Callable[..., subprocess.CompletedProcess]:
    """``cli_subprocess("list", cwd=...)``: the installed ``fcl-bench`` script, as a user runs it."""
    script = Path(sys.executable).parent / "fcl-bench"

    def run(*args: str, cwd: Path | None = None, timeout: float = 300,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        cmd = [str(script)] if script.exists() else [sys.executable, "-m", "fcl_bench.cli"]
        return subprocess.run(cmd + [str(a) for a in args], cwd=cwd, capture_output=True, text=True,
                              timeout=timeout, env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1", **(env or {})})

    return run


BAD_PLUGIN = textwrap.dedent('''
    """Methods that fail: one raises in train_round, one trains to NaN weights (the harness must notice)."""
    import torch
    from torch import nn

    from fcl_bench.api import Client, Method, Server
    from fcl_bench.methods.fedavg import FedAvg


    class Helper(FedAvg):
        """A helper base class that names no method: it must not be registered (it inherits 'fedavg')."""


    class NoServer(Server):
        def aggregate(self, uploads, info):
            return {}


    class BoomClient(Client):
        def start_task(self, task):
            self.task = task

        def train_round(self, info):
            raise RuntimeError("boom from the plugin")

        def predict(self, batch):
            return torch.zeros(len(batch), 10)


    class Boom(Method):
        name = "boom"

        def client(self, client_id, env):
            return BoomClient()

        def server(self, env):
            return NoServer()


    class NanClient(Client):
        """A linear model whose loss is NaN; it does not check, so its weights go NaN on the wire."""

        def __init__(self, num_classes):
            self.model = nn.Linear(3 * 32 * 32, num_classes)
            self.opt = torch.optim.SGD(self.model.parameters(), lr=0.1)

        def start_task(self, task):
            self.task = task

        def train_round(self, info):
            batch = next(iter(self.task.train.batches(8)))
            loss = nn.functional.cross_entropy(self.model(batch.x.flatten(1)), batch.y) * float("nan")
            self.opt.zero_grad()
            loss.backward()
            self.opt.step()
            return {k: v.detach() for k, v in self.model.state_dict().items()}

        def predict(self, batch):
            return self.model(batch.x.flatten(1))


    class NanLoss(Method):
        name = "nanloss"
        uses_foundation = False

        def client(self, client_id, env):
            return NanClient(env.scenario.num_classes)

        def server(self, env):
            return NoServer()
''')


@pytest.fixture(scope="session")
def suite_run(tmp_path_factory: pytest.TempPathFactory, cli, fresh_cache) -> tuple[Path, Result]:
    """One CLI run of fedavg plus two failing plugin methods, shared by the CLI and store tests:
    ``(out folder, click result)``; the suite folder is ``out/smoke``."""
    root = tmp_path_factory.mktemp("suite")
    plugin = root / "bad_methods.py"
    plugin.write_text(BAD_PLUGIN)
    out = root / "results"
    res = cli("run", "--methods", "fedavg,boom,nanloss", "--plugin", plugin, "--out", out, *SMOKE_OPTS)
    return out, res
