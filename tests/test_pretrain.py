"""The tiny ViT, its pretraining cache and the linear probe (tiny configs; the full calibration is
``python -m fcl_bench.nn.pretrain``)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fcl_bench.data import Dataset, Preprocess
from fcl_bench.nn import pretrain
from fcl_bench.nn.pretrain import PretrainConfig, fit_linear_classifier, linear_probe, pretrain_tiny_vit
from fcl_bench.nn.tiny_vit import TINY_VIT_CONFIG, build_tiny_vit

TINY_CFG = PretrainConfig(patch_size=8, embed_dim=32, depth=2, num_heads=2, epochs=1, batch_size=16)
REPORT_KEYS = {"version", "key", "dataset_fingerprint", "seed", "config", "epochs", "train_seconds",
               "images_per_second", "final_train_loss", "pretrain_test_accuracy", "probe_acc_pretrained",
               "probe_acc_random_init"}


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    from helpers import tiny_synthetic

    return tiny_synthetic(tmp_path_factory.mktemp("synthetic"))


def test_tiny_vit_returns_final_norm_cls_feature():
    vit = build_tiny_vit(patch_size=8, embed_dim=48, depth=4, num_heads=3).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = vit.forward_features(x)                       # (B, 1 + 16, D), after the final norm
        assert torch.allclose(vit(x), tokens[:, 0])
    assert tokens.shape == (2, 17, 48) and len(vit.blocks) == 4 and vit.num_classes == 0
    assert Preprocess(**TINY_VIT_CONFIG).input_size == 32


@pytest.mark.parametrize("kwargs", [{"patch_size": 5}, {"embed_dim": 100, "num_heads": 3}, {"depth": 0}])
def test_tiny_vit_rejects_bad_shapes(kwargs):
    with pytest.raises(ValueError):
        build_tiny_vit(**kwargs)


def test_random_shift_crops_the_padded_image():
    x = torch.rand(6, 3, 8, 8)
    shifted = pretrain._random_shift(x, 2, torch.Generator().manual_seed(0))
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2), mode="replicate")
    for i in range(len(x)):  # every output is one of the 5x5 crops of its own padded input
        crops = [padded[i, :, dy:dy + 8, dx:dx + 8] for dy in range(5) for dx in range(5)]
        assert any(torch.equal(shifted[i], c) for c in crops)
    assert not torch.equal(shifted, x)


def test_linear_classifier_separates_blobs_and_folds_standardisation():
    gen = torch.Generator().manual_seed(0)
    centres = torch.randn(5, 8, generator=gen) * 4
    y = torch.arange(500) % 5
    x = centres[y] + torch.randn(500, 8, generator=gen) + 100   # offset: standardisation must be folded in
    layer = fit_linear_classifier(x[:400], y[:400], 5)
    assert (layer(x[400:]).argmax(1) == y[400:]).float().mean() > 0.95
    again = fit_linear_classifier(x[:400], y[:400], 5)
    assert torch.equal(layer.weight, again.weight)              # full-batch L-BFGS from zeros: deterministic


def test_pretrain_cache_round_trip_and_report(tiny_data, tmp_path, monkeypatch):
    vit, report = pretrain_tiny_vit(tiny_data, cache_dir=tmp_path, config=TINY_CFG, progress=False)
    assert REPORT_KEYS <= report.keys() and report["epochs"] == 1
    assert 0 <= report["probe_acc_pretrained"] <= 1 and 0 <= report["probe_acc_random_init"] <= 1
    assert np.isfinite(report["final_train_loss"])
    (weights,) = (tmp_path / "tiny_vit").glob("*.safetensors")
    assert report.pop("origin") == "trained"                   # where it came from: not part of the file
    assert json.loads(weights.with_suffix(".json").read_text()) == report

    with monkeypatch.context() as m:
        m.setattr(pretrain, "_fit", lambda *a, **k: pytest.fail("the cached model was not used"))
        cached, cached_report = pretrain_tiny_vit(tiny_data, cache_dir=tmp_path, config=TINY_CFG, progress=False)
    assert cached_report.pop("origin") == "cache" and cached_report == report
    assert vit.state_dict().keys() == cached.state_dict().keys()
    for (name, a), (_, b) in zip(vit.state_dict().items(), cached.state_dict().items()):
        assert torch.equal(a, b), name
    x = tiny_data.test.load(np.arange(4), Preprocess(**TINY_VIT_CONFIG))
    with torch.no_grad():
        assert torch.equal(vit(x), cached(x))

    weights.write_bytes(b"truncated")  # a damaged cache file is retrained, not an error
    retrained, _ = pretrain_tiny_vit(tiny_data, cache_dir=tmp_path, config=TINY_CFG, progress=False, probe=False)
    assert torch.equal(retrained.pos_embed, vit.pos_embed)     # same seed: the same weights again
    assert weights.stat().st_size > 1000


def test_pretraining_pins_its_threads_and_restores_the_callers(tiny_data, tmp_path, monkeypatch):
    seen = []
    real = pretrain._fit

    def fit(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return real(*args, **kwargs)

    monkeypatch.setattr(pretrain, "_fit", fit)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        import dataclasses

        pretrain_tiny_vit(tiny_data, cache_dir=tmp_path, config=dataclasses.replace(TINY_CFG, threads=1),
                          progress=False, probe=False)
        assert seen == [1] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert PretrainConfig().precision == "fp32" and PretrainConfig().threads == 1  # what the shipped ones used


def test_pretraining_is_deterministic_and_keyed_by_seed(tiny_data, tmp_path):
    cfg = TINY_CFG
    a, _ = pretrain_tiny_vit(tiny_data, cache_dir=tmp_path / "a", config=cfg, progress=False, probe=False)
    b, _ = pretrain_tiny_vit(tiny_data, cache_dir=tmp_path / "b", config=cfg, progress=False, probe=False)
    c, _ = pretrain_tiny_vit(tiny_data, cache_dir=tmp_path / "a", config=cfg, seed=1, progress=False,
                             probe=False)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.pos_embed, c.pos_embed)
    assert len(list((tmp_path / "a" / "tiny_vit").glob("*.safetensors"))) == 2


def test_pretraining_reads_only_the_pretrain_classes(tiny_data, tmp_path):
    from helpers import guarded

    vit, report = pretrain_tiny_vit(guarded(tiny_data), cache_dir=tmp_path, config=TINY_CFG, progress=False, probe=False)
    assert report["probe_acc_pretrained"] is None and vit.num_classes == 0


def test_linear_probe_is_an_accuracy(tiny_data):
    torch.manual_seed(0)
    acc = linear_probe(build_tiny_vit(embed_dim=32, depth=2, num_heads=2), tiny_data, Preprocess(**TINY_VIT_CONFIG))
    assert 0.0 <= acc <= 1.0 and acc * len(tiny_data.test) == pytest.approx(round(acc * len(tiny_data.test)))


def test_dataset_without_pretraining_classes_is_a_clear_error(tiny_data, tmp_path):
    plain = Dataset(name="plain", train=tiny_data.train, test=tiny_data.test, classes=tiny_data.classes,
                    fingerprint="x")
    with pytest.raises(ValueError, match="no pretraining classes"):
        pretrain_tiny_vit(plain, cache_dir=tmp_path, config=TINY_CFG, progress=False)


def test_pretraining_source_is_synthetic_for_a_dataset_without_pretraining_classes(tiny_data):
    import dataclasses

    assert pretrain.pretraining_source(tiny_data) is tiny_data
    real_like = dataclasses.replace(tiny_data, name="fashionmnist", pretrain=None)
    source = pretrain.pretraining_source(real_like)
    assert source.name == "synthetic" and source.pretrain is not None and source is not real_like


def test_pretraining_prints_plain_progress_lines_when_stdout_is_not_a_terminal(tiny_data, tmp_path, capsys):
    import dataclasses

    cfg = dataclasses.replace(TINY_CFG, batch_size=4)  # 12 steps over the 48 pretraining images
    pretrain_tiny_vit(tiny_data, cache_dir=tmp_path, config=cfg, progress=True)
    out = capsys.readouterr().out.splitlines()          # pytest's captured stdout is not a terminal
    steps = [line for line in out if "images/s" in line]
    assert 9 <= len(steps) <= 11 and all("ETA" in line and "/48 images" in line for line in steps)
    assert steps[-1].startswith("pretrain tiny ViT: 100% (48/48 images)")
    assert sum(line.startswith("pretrain tiny ViT: linear probe") for line in out) == 4  # 2 probes: start, result
    pretrain_tiny_vit(tiny_data, cache_dir=tmp_path / "quiet", config=cfg, progress=False)
    assert capsys.readouterr().out == ""


def test_plain_progress_is_silent_on_a_terminal():
    import io

    from fcl_bench.progress import PlainProgress, format_seconds

    class Tty(io.StringIO):
        def isatty(self):
            return True

    tty, log = Tty(), io.StringIO()
    for out in (tty, log):
        p = PlainProgress(100, "work", out=out)
        for _ in range(100):
            p.update(1)
    assert tty.getvalue() == "" and len(log.getvalue().splitlines()) == 10
    assert format_seconds(75.3) == "1 min 15 s" and format_seconds(8.2) == "8 s"
