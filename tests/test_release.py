"""A finished run releases its clients, server and optimiser state: runs in one process do not pile up."""

from __future__ import annotations

import gc
import weakref

import pytest
from helpers import federation, smoke_config, workspace

from fcl_bench.registry import get_method


@pytest.mark.parametrize("name", ["fedlscl", "dualprompt", "fedavg"])
def test_runs_in_one_process_free_their_state(name):
    run = smoke_config()
    ws = workspace(run)
    cls = get_method(name)
    refs = []
    for _ in range(3):
        fed = federation(cls, cls.Config(), ws, run, flops="sampled")
        result = fed.run()
        assert result.metrics["client_flops"] > 0
        objs = [fed, fed.server, *fed.clients.values()]
        shared = {id(m) for m in ws.foundation.vit.modules()} if ws.foundation is not None else set()  # the workspace's frozen model stays
        objs += [o for c in fed.clients.values() for o in vars(c).values()
                 if (hasattr(o, "state_dict") and hasattr(o, "parameters") or hasattr(o, "param_groups"))
                 and id(o) not in shared]
        assert len(objs) > 3  # the clients' own models and optimisers are tracked
        refs.append([weakref.ref(o) for o in objs])
        del fed, objs, result
        gc.collect()
    alive = [r() for rs in refs for r in rs if r() is not None]
    assert not alive, [type(o).__name__ for o in alive]
