"""Weights that ship with the package: pinned by sha256, used whenever the pretraining key matches, refused
when tampered with, and regenerated bit for bit by ``fcl-bench pretrain --force``."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from types import SimpleNamespace

import pytest
import torch

from fcl_bench import weights as W
from fcl_bench.data import Preprocess
from fcl_bench.nn import pretrain
from fcl_bench.nn.pretrain import PretrainConfig, SmallPretrainConfig, pretrain_tiny_vit, weights_key
from fcl_bench.nn.tiny_vit import TINY_VIT_CONFIG

TINY_CFG = PretrainConfig(patch_size=8, embed_dim=32, depth=2, num_heads=2, epochs=1, batch_size=16)
TINY_SMALL_CFG = SmallPretrainConfig(batch_size=16)
PRE = Preprocess(**TINY_VIT_CONFIG)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    from helpers import tiny_synthetic

    return tiny_synthetic(tmp_path_factory.mktemp("synthetic"))


@pytest.fixture
def ship_dir(tmp_path, monkeypatch):
    """An empty folder standing in for the package's fcl_bench/weights/."""
    folder = tmp_path / "shipped"
    folder.mkdir()
    monkeypatch.setattr(W, "SHIPPED_DIR", folder)
    return folder


def _no_training(monkeypatch):
    monkeypatch.setattr(pretrain, "_fit", lambda *a, **k: pytest.fail("pretrained although weights ship"))


def _equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ---------------------------------------------------------------------------------------------------------
# What the package ships


def test_every_shipped_file_matches_its_pinned_sha256():
    entries = W.read_manifest()
    assert {e["name"] for e in entries.values()} >= {"tiny_vit", "mobilenetv3_small_050"}
    for key, entry in entries.items():
        data = (W.SHIPPED_DIR / entry["file"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == entry["sha256"] == entry["report"]["weights_sha256"]
        assert len(data) == entry["bytes"] and entry["report"]["key"] == key
        assert W.read_shipped(key)[0] == data


def test_the_shipped_weights_are_the_default_pretraining_of_the_default_dataset():
    """Their keys are what the offline presets compute (default recipe, seed 0, the default synthetic
    dataset's fingerprint, the tiny ViT's input pipeline): a run on quick loads them."""
    from fcl_bench.config import offline_pretrained_archs

    by_name = {e["name"]: (k, e) for k, e in W.read_manifest().items()}
    key, entry = by_name["tiny_vit"]
    dataset = SimpleNamespace(fingerprint=entry["dataset_fingerprint"])
    assert key == weights_key(dataset, PretrainConfig(), 0)
    for arch in offline_pretrained_archs():
        key, entry = by_name[arch]
        assert key == weights_key(dataset, SmallPretrainConfig(), 0, model=arch,
                                  preprocess=dataclasses.asdict(PRE))


def test_a_run_on_the_default_dataset_loads_the_shipped_tiny_vit_without_training(monkeypatch):
    from fcl_bench.datasets import load_dataset
    from fcl_bench.nn.foundation import load_foundation

    _no_training(monkeypatch)
    ds = load_dataset("synthetic")
    fm = load_foundation("tiny", ds, torch.device("cpu"))
    report = fm.info["pretrain_report"]
    assert report["origin"] == "shipped" and report["dataset_fingerprint"] == ds.fingerprint
    shipped = W.shipped_entry(report["key"])
    assert hashlib.sha256(pretrain.weights_bytes(fm.vit, report["key"])).hexdigest() == shipped["sha256"]


# ---------------------------------------------------------------------------------------------------------
# Loading, checking and refusing


def test_shipped_weights_are_used_when_the_key_matches_and_a_tampered_file_is_refused(tiny_data, tmp_path,
                                                                                   ship_dir, monkeypatch, capsys):
    vit, report = pretrain_tiny_vit(tiny_data, cache_dir=tmp_path / "a", config=TINY_CFG, progress=False,
                                    probe=False)
    assert report["origin"] == "trained"
    W.write_shipped(report["key"], "tiny_vit", pretrain.weights_bytes(vit, report["key"]), report)

    with monkeypatch.context() as m:
        _no_training(m)
        shipped, shipped_report = pretrain_tiny_vit(tiny_data, cache_dir=tmp_path / "b", config=TINY_CFG,
                                                    progress=False, probe=False)
        assert shipped_report["origin"] == "shipped" and _equal(shipped, vit)
        assert not (tmp_path / "b").exists()                # nothing trained, nothing cached
        other = dataclasses.replace(TINY_CFG, lr=2e-3)      # another key: the shipped file does not apply
        with pytest.raises(pytest.fail.Exception, match="pretrained although"):
            pretrain_tiny_vit(tiny_data, cache_dir=tmp_path / "b", config=other, progress=False, probe=False)

    (file,) = ship_dir.glob("*.safetensors")
    data = bytearray(file.read_bytes())
    data[-1] ^= 1                                           # one bit of one weight
    file.write_bytes(bytes(data))
    with pytest.raises(W.ShippedWeightsError) as refused:
        pretrain_tiny_vit(tiny_data, cache_dir=tmp_path / "c", config=TINY_CFG, progress=False, probe=False)
    message = str(refused.value)
    assert str(file) in message and "sha256" in message and "reinstall" in message
    assert "fcl-bench pretrain --force" in message

    # the fix it names: `pretrain --force` writes a cached copy, which is then used (with a note)
    pretrain_tiny_vit(tiny_data, cache_dir=tmp_path / "c", config=TINY_CFG, progress=False, probe=False,
                      force=True)
    capsys.readouterr()
    fixed, fixed_report = pretrain_tiny_vit(tiny_data, cache_dir=tmp_path / "c", config=TINY_CFG,
                                            progress=False, probe=False)
    assert fixed_report["origin"] == "cache" and _equal(fixed, vit)
    assert "using the cached copy" in capsys.readouterr().err

    file.unlink()
    with pytest.raises(W.ShippedWeightsError, match="is missing"):
        pretrain_tiny_vit(tiny_data, cache_dir=tmp_path / "d", config=TINY_CFG, progress=False, probe=False)


def test_write_shipped_replaces_a_models_earlier_file(ship_dir):
    first = W.write_shipped("k1", "tiny_vit", b"one", {"key": "k1"})
    W.write_shipped("m1", "resnet18", b"cnn", {"key": "m1"})
    second = W.write_shipped("k2", "tiny_vit", b"two", {"key": "k2"})
    assert not first.exists() and second.read_bytes() == b"two"
    assert sorted(W.read_manifest()) == ["k2", "m1"]
    assert W.compare_to_shipped("k2", hashlib.sha256(b"two").hexdigest()).startswith("matches the shipped")
    assert W.compare_to_shipped("k2", hashlib.sha256(b"2").hexdigest()).startswith("differs from the shipped")
    assert W.compare_to_shipped("k9", "x").startswith("no shipped weights")


def test_a_manifest_of_another_format_is_a_clear_error(ship_dir):
    (ship_dir / "manifest.json").write_text(json.dumps({"format": 99, "weights": {}}))
    with pytest.raises(W.ShippedWeightsError, match="format 99.*reinstall"):
        W.read_manifest()


# ---------------------------------------------------------------------------------------------------------
# `fcl-bench pretrain --force`: deterministic, compared with the shipped file


def test_pretrain_force_reproduces_the_shipped_files_bit_for_bit(cli, tiny_data, tmp_path, ship_dir, monkeypatch):
    """Two regenerations on this machine give the same bytes: the second matches what the first shipped."""
    import fcl_bench.datasets

    monkeypatch.setattr(fcl_bench.datasets, "load_dataset", lambda name: tiny_data)
    monkeypatch.setattr(pretrain, "PretrainConfig", lambda: TINY_CFG)
    monkeypatch.setattr(pretrain, "SmallPretrainConfig", lambda: TINY_SMALL_CFG)
    monkeypatch.setenv("FCL_BENCH_CACHE", str(tmp_path / "cache"))

    first = cli("pretrain", "--force", "--small-models", "test_resnet", "--write-shipped", "--quiet")
    assert first.exit_code == 0, first.output
    assert first.output.count("no shipped weights for this configuration") == 2
    assert sorted(e["name"] for e in W.read_manifest().values()) == ["test_resnet", "tiny_vit"]
    shipped = {p.name: p.read_bytes() for p in ship_dir.glob("*.safetensors")}

    torch.manual_seed(12345)  # the caller's RNG state must not matter
    again = cli("pretrain", "--force", "--small-models", "test_resnet", "--quiet")
    assert again.exit_code == 0, again.output
    assert again.output.count("bit for bit") == 2 and "differs" not in again.output
    assert {p.name: p.read_bytes() for p in ship_dir.glob("*.safetensors")} == shipped  # not rewritten
    cached = {p.name: p.read_bytes() for p in (tmp_path / "cache").rglob("*.safetensors")}
    assert cached == shipped                                # the cache holds the same bytes, same names

    loaded = cli("pretrain", "--small-models", "test_resnet", "--quiet")  # no --force: the shipped files load
    assert loaded.exit_code == 0 and loaded.output.count(": shipped") == 2, loaded.output
    assert loaded.output.count("its sha256 checked") == 2 and "bit for bit" not in loaded.output


def test_pretrain_write_shipped_needs_force(cli):
    res = cli("pretrain", "--write-shipped", "--quiet")
    assert res.exit_code != 0 and "add --force" in res.output
