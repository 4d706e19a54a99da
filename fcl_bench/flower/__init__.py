"""Real federated execution on Flower (``pip install 'fcl-bench[flower]'``): any registered method, unchanged.

* :mod:`fcl_bench.flower.client_app`: the generic ClientApp (rebuilds its ``Client`` from ``Context.state``
  for every message);
* :mod:`fcl_bench.flower.server`: the generic ServerApp (the in-process schedule, client steps as
  messages) and the simulation runtime (``fcl-bench run --executor flower-sim``);
* :mod:`fcl_bench.flower.protocol`: the messages, and how their bytes are counted.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

EXECUTORS = ("flower-sim", "flower")


def run_spec(spec, method_cls, method_cfg, ws, run_path: Path, log: Callable[[str], None]) -> Any:
    """Run one executor spec on Flower (its ``executor`` says which runtime); returns a ``RunResult``."""
    try:
        import flwr  # noqa: F401
    except ImportError:
        raise RuntimeError("--executor flower-sim/flower needs Flower: pip install 'fcl-bench[flower]'") from None
    from fcl_bench.flower.server import FlowerFederation, describe_spec, run_simulation

    if spec.executor == "flower":
        from fcl_bench.flower.deploy import submit

        return submit(spec, method_cfg, run_path, log)
    if spec.executor != "flower-sim":
        raise ValueError(f"unknown Flower executor '{spec.executor}'")
    kw = {"timeout": spec.flower_timeout} if spec.flower_timeout else {}
    fed = FlowerFederation(method_cls, method_cfg, ws, spec.run, log=log, progress=not spec.quiet,
                           flops=spec.flops, setup=describe_spec(spec), **kw)
    return run_simulation(fed, (run_path / "scenario.json").read_text(encoding="ascii"))
