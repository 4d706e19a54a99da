"""The profiling tools: the schedule's per-phase clock, and the three benchmark scripts
(``benchmarks/profile_methods.py``, ``scaling.py``, ``gpu_check.py``) run at a tiny size on the CPU, with
their JSON checked for the fields the README reports and for sane values (shares that sum to 1 with no
phase counted twice, FLOP/s > 0)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
from helpers import QUIET, smoke_config, workspace

from fcl_bench import registry
from fcl_bench.federation import Federation, PhaseClock

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import gpu_check  # noqa: E402
import profile_methods  # noqa: E402
import scaling  # noqa: E402

#: the scripts' run overrides for the tests: the tiny ViT at random init (no pretraining), timm's test CNN
TINY = ["-o", "foundation_pretrained=false", "-o", "small_models=test_resnet"]


# -- the phase clock -----------------------------------------------------------------------------------------
class FakeTime:
    def __init__(self):
        self.t = 0.0
        self.fill = 0.0

    def now(self) -> float:
        return self.t


def test_phase_clock_counts_each_phase_once_and_sets_the_cache_fill_apart():
    ft = FakeTime()
    clock = PhaseClock(aside=lambda: ft.fill, now=ft.now)
    with clock("client_train"):
        ft.t += 2.0
        with clock("wire"):  # nested: 0.5 s of wire, taken out of the 5 s of client training around it
            ft.t += 0.5
        ft.t += 1.0
        ft.t += 1.5  # 1.5 s of it filled the cache
        ft.fill += 1.5
    with clock("wire"):
        ft.t += 0.25
    with clock("eval"):
        with clock("client_other"):  # a fill inside the inner phase is the inner phase's to set apart
            ft.t += 1.0
            ft.fill += 0.4
        ft.t += 0.1
    assert clock.seconds["client_train"] == pytest.approx(3.0)
    assert clock.seconds["wire"] == pytest.approx(0.75)
    assert clock.seconds["client_other"] == pytest.approx(0.6)
    assert clock.seconds["eval"] == pytest.approx(0.1)
    assert clock.seconds["cache_fill"] == pytest.approx(1.9)
    assert sum(clock.seconds.values()) == pytest.approx(ft.t)  # every second counted exactly once


def test_a_run_records_its_phases_and_they_fit_in_its_wall_time(tmp_path):
    run = smoke_config(small_models="test_resnet")
    ws = workspace(run)
    cls = registry.get_method("fedvit")
    fed = Federation(cls, cls.Config(), ws, run, flops="off", **QUIET)
    res = fed.run(checkpoint=tmp_path / "checkpoint.safetensors")
    ph = res.metrics["phase_seconds"]
    assert {"setup", "client_train", "client_other", "server", "eval", "wire", "checkpoint", "cache_fill"} <= set(ph)
    assert all(v >= 0 for v in ph.values())
    assert ph["cache_fill"] > 0 and res.metrics["cache_fill"]["seconds"] == pytest.approx(ph["cache_fill"], rel=1e-6)
    assert sum(ph.values()) <= res.metrics["wall_seconds"]
    # the accountant's client seconds hold the round's training and any fill inside it, never the wire
    assert ph["client_train"] <= res.metrics["client_train_seconds"] + 1e-9


# -- profile_methods.py ----------------------------------------------------------------------------------------
def test_flop_counting_is_the_sampled_runs_extra_client_and_server_seconds():
    def run(wall, **ph):
        return {"wall": wall, "metrics": {"phase_seconds": ph}}

    sampled = run(10.0, client_train=5.0, server=1.0, eval=1.0, wire=0.5, client_other=0.5, setup=0.2)
    off = run(7.0, client_train=3.0, server=1.2, eval=1.1, wire=0.4, client_other=0.4, setup=0.2)
    sec = profile_methods.shares(sampled, off)
    assert sec["client_train"] == 3.0 and sec["server"] == 1.0  # the server's difference is noise: clamped
    assert sec["flop_count"] == pytest.approx(2.0)
    assert sec["rest"] == pytest.approx(10.0 - 3.0 - 1.0 - 2.0 - 1.0 - 0.5 - 0.5 - 0.2)
    assert sum(sec.values()) == pytest.approx(10.0)
    assert profile_methods.shares(sampled, None)["flop_count"] == 0.0


def test_profile_methods_script(tmp_path):
    out_md, out_json = tmp_path / "profile.md", tmp_path / "profile.json"
    res = profile_methods.main(["--methods", "fedavg,fedvit", "--preset", "smoke", *TINY, "--out", str(out_md),
                                "--json", str(out_json)])
    saved = json.loads(out_json.read_text())
    assert saved["methods"].keys() == {"fedavg", "fedvit"} == res["methods"].keys()
    ff = saved["frozen_forward"]
    assert ff["batch"] == 32 and ff["flops_per_batch"] > 0 and ff["flops_per_s"] > 0
    for name, r in saved["methods"].items():
        s = r["shares"]
        assert set(s) == {*profile_methods.PHASES, "rest"}
        assert math.isclose(sum(s.values()), 1.0, rel_tol=1e-9)
        assert all(0 <= v <= 1 for k, v in s.items() if k != "rest")
        assert s["rest"] > -0.02, f"{name}: phases overlap (counted twice): {s}"
        assert s["client_train"] > 0 and s["eval"] > 0 and s["wire"] > 0
        assert r["client_flops_per_train_image"] > 0 and r["achieved_flops_per_s"] > 0
        assert r["fraction_of_frozen_forward"] == pytest.approx(r["achieved_flops_per_s"] / ff["flops_per_s"])
        assert r["train_images"] > 0 and r["peak_rss_bytes"] >= r["rss_after_bytes"] > 0
        assert r["wall_seconds_flops_off"] > 0
    # a CNN method pays no cache fill; the first ViT method fills it
    assert saved["methods"]["fedavg"]["seconds"]["cache_fill"] == 0
    assert saved["methods"]["fedvit"]["seconds"]["cache_fill"] > 0
    table = out_md.read_text()
    assert table.splitlines()[0].startswith("| method | wall s |")
    assert sum(line.startswith("| fed") for line in table.splitlines()) == 2
    assert len(saved["process"]["rss_after_each_run_bytes"]) == 2


# -- scaling.py ------------------------------------------------------------------------------------------------
def test_power_fit_recovers_the_exponent():
    x = [2, 5, 10, 20]
    assert scaling.power_fit(x, [3 * v**2 for v in x]) == pytest.approx(2.0)
    assert scaling.power_fit(x, [0.1 * v for v in x]) == pytest.approx(1.0)
    assert scaling.power_fit([2], [1.0]) is None


def test_eval_images_count_every_seen_task_after_every_task():
    ws = workspace(smoke_config(tasks="3", private="3", public="3"))
    sc = ws.scenario
    sizes = [[len(sc.test_indices[c][i]) for i in range(3)] for c in range(sc.num_clients)]
    # after task 0: task 0; after task 1: tasks 0, 1; after task 2: all three
    assert scaling.eval_images(ws) == sum(3 * s[0] + 2 * s[1] + s[2] for s in sizes)


def test_scaling_script(tmp_path):
    res = scaling.main(["--methods", "fedavg,fedvit", "--axes", "clients", "--grid", "clients=2,3", *TINY,
                        "--out-dir", str(tmp_path)])
    saved = json.loads((tmp_path / "scaling.json").read_text())
    assert (tmp_path / "scaling.png").stat().st_size > 10_000
    assert saved["axes"].keys() == {"clients"} and saved["grids"] == {"clients": [2, 3]}
    assert res["axes"]["clients"].keys() == {"fedavg", "fedvit"}
    for m in ("fedavg", "fedvit"):
        pts = saved["axes"]["clients"][m]["points"]
        assert [p["value"] for p in pts] == [2, 3]
        # each client holds 4 private classes of its own: the training work grows with the clients
        assert pts[1]["train_images"] == pytest.approx(pts[0]["train_images"] * 3 / 2)
        for p in pts:
            assert p["cost_seconds"] > 0 and sum(p["components"].values()) == pytest.approx(p["cost_seconds"])
            assert p["components"]["client"] > 0 and p["components"]["harness"] > -0.05
        fit = saved["axes"]["clients"][m]["fit"]
        assert fit["train_images_exponent"] == pytest.approx(1.0, abs=1e-6)
        assert fit["exponent"]["cost"] is not None


# -- gpu_check.py ---------------------------------------------------------------------------------------------
def test_peak_table_prefers_the_most_specific_card_name():
    assert gpu_check.peak_tflops("NVIDIA H100 PCIe", None) == (756.0, "table: H100 PCIe")
    assert gpu_check.peak_tflops("NVIDIA H100 80GB HBM3", None)[0] == 989.0
    assert gpu_check.peak_tflops("NVIDIA GH200 480GB", None)[1] == "table: GH200"
    assert gpu_check.peak_tflops("NVIDIA A100-SXM4-80GB", None)[0] == 312.0
    assert gpu_check.peak_tflops("NVIDIA L40S", None)[0] == 362.0
    assert gpu_check.peak_tflops("NVIDIA L4", None)[0] == 121.0
    assert gpu_check.peak_tflops("Some Card", None)[0] is None
    assert gpu_check.peak_tflops("NVIDIA H200", 500.0) == (500.0, "--peak-tflops")


def test_gpu_check_script_runs_on_cpu_at_a_tiny_size(tmp_path):
    out = tmp_path / "gpu.json"
    res = gpu_check.main(["--tiny", "--device", "cpu", "--methods", "fedavg", "--batch", "4", "--steps", "1",
                          "--warmup", "0", "--peak-tflops", "1.0", "--json", str(out)])
    saved = json.loads(out.read_text())
    assert saved["card"]["name"] == "cpu" and saved["peak_bf16_tflops"] == 1.0 == res["peak_bf16_tflops"]
    st = saved["steps"]
    for key in ("fedlscl_step", "frozen_vit_head_step", "frozen_forward"):
        r = st[key]
        assert r["images_per_s"] > 0 and r["flops_per_image"] > 0
        assert r["mfu"] == pytest.approx(r["flops_per_s"] / 1e12)
    # Fed-LSCL adapts one block and trains a CNN: more FLOPs than the frozen ViT plus a head; the frozen
    # forward alone is the cheapest of the three
    assert st["fedlscl_over_frozen_vit_head"]["flops"] > 1
    assert st["frozen_forward"]["flops_per_image"] < st["frozen_vit_head_step"]["flops_per_image"]
    run = saved["runs"]["methods"]["fedavg"]
    assert run["wall_seconds"] > 0 and run["peak_memory_bytes"] > 0 and 0 <= run["final_acc"] <= 1
    assert saved["runs"]["run_config"]["train_per_class"] == 16  # --tiny keeps the smoke shape
