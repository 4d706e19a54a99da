"""The on-disk caches (synthetic dataset, pretrained tiny ViT): damage is detected on load and rebuilt with
one line on stderr, and two processes that start on an empty cache build it once."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save

from fcl_bench.datasets import synthetic
from fcl_bench.nn import pretrain
from fcl_bench.nn.pretrain import PretrainConfig, pretrain_tiny_vit

TINY = {"num_classes": 4, "train_per_class": 3, "test_per_class": 2, "pretrain_classes": 5,
        "pretrain_train_per_class": 2, "pretrain_test_per_class": 1}
TINY_CFG = PretrainConfig(patch_size=8, embed_dim=32, depth=2, num_heads=2, epochs=1, batch_size=16)


def _data_offset(data: bytes) -> int:
    """Where a safetensors file's tensor bytes start (after the 8-byte length and the JSON header)."""
    return 8 + int.from_bytes(data[:8], "little")


def _damage_line(err: str, what: str, path: Path, redo: str) -> str:
    """The one damage line of ``err``, checked; returns the reason in its parentheses."""
    lines = [line for line in err.splitlines() if "damaged" in line]
    assert len(lines) == 1, err
    prefix, suffix = f"{what} at {path} is damaged (", f"); {redo}"
    assert lines[0].startswith(prefix) and lines[0].endswith(suffix), lines[0]
    assert "Traceback" not in err
    return lines[0][len(prefix):-len(suffix)]


# ---------------------------------------------------------------------------------------------------------
# The tiny ViT weights


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return synthetic.load_synthetic(root=tmp_path_factory.mktemp("synthetic"), **TINY)


@pytest.fixture
def counted_fit(monkeypatch) -> list[int]:
    """Replace the training loop by an instant stub (the weights stay at their seeded init); counts calls."""
    calls: list[int] = []

    def fit(vit, *args, **kwargs):
        calls.append(1)
        return {"train_seconds": 0.0, "stub": True}

    monkeypatch.setattr(pretrain, "_fit", fit)
    return calls


def _overwrite_64k_in_the_middle(weights: Path, report: Path) -> None:
    data = bytearray(weights.read_bytes())
    assert len(data) > 2 * 65536
    mid = len(data) // 2
    data[mid:mid + 65536] = np.random.default_rng(0).integers(0, 256, 65536, dtype=np.uint8).tobytes()
    weights.write_bytes(bytes(data))


def _zero_4mb_of_tensor_bytes(weights: Path, report: Path) -> None:  # the header still parses
    data = bytearray(weights.read_bytes())
    lo = _data_offset(data)
    hi = min(len(data), lo + 4 * 2**20)
    data[lo:hi] = bytes(hi - lo)
    weights.write_bytes(bytes(data))


def _zero_the_whole_file(weights: Path, report: Path) -> None:
    weights.write_bytes(bytes(weights.stat().st_size))


def _truncate(weights: Path, report: Path) -> None:
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])


def _delete_the_report(weights: Path, report: Path) -> None:
    report.unlink()


def _delete_the_weights(weights: Path, report: Path) -> None:
    weights.unlink()


def _report_that_does_not_parse(weights: Path, report: Path) -> None:
    report.write_text(report.read_text()[:40])


def _report_without_a_hash(weights: Path, report: Path) -> None:  # as written before the hash existed
    content = json.loads(report.read_text())
    del content["weights_sha256"]
    report.write_text(json.dumps(content))


@pytest.mark.parametrize("damage, reason", [
    (_overwrite_64k_in_the_middle, "sha256 mismatch"),
    (_zero_4mb_of_tensor_bytes, "sha256 mismatch"),
    (_zero_the_whole_file, "sha256 mismatch"),
    (_truncate, "sha256 mismatch"),
    (_delete_the_report, "is missing"),
    (_delete_the_weights, "the weights file is missing"),
    (_report_that_does_not_parse, "does not parse"),
    (_report_without_a_hash, "no sha256"),
], ids=lambda v: v.__name__.strip("_") if callable(v) else None)
def test_damaged_weights_are_reported_and_pretrained_again(tiny_data, tmp_path, counted_fit, capsys, damage,
                                                            reason):
    vit, report = pretrain_tiny_vit(tiny_data, cache_dir=tmp_path, config=TINY_CFG, progress=False, probe=False)
    weights = next((tmp_path / "tiny_vit").glob("*.safetensors"))
    report_path = weights.with_suffix(".json")
    assert len(report["weights_sha256"]) == 64 and counted_fit == [1]
    capsys.readouterr()

    damage(weights, report_path)
    again, _ = pretrain_tiny_vit(tiny_data, cache_dir=tmp_path, config=TINY_CFG, progress=False, probe=False)
    assert reason in _damage_line(capsys.readouterr().err, "the tiny ViT weights cache", weights,
                                  "pretraining again")
    assert counted_fit == [1, 1]                               # pretrained again ...
    assert all(torch.equal(a, b) for a, b in zip(vit.state_dict().values(), again.state_dict().values()))

    loaded, _ = pretrain_tiny_vit(tiny_data, cache_dir=tmp_path, config=TINY_CFG, progress=False, probe=False)
    assert counted_fit == [1, 1] and capsys.readouterr().err == ""  # ... and the rewritten cache is sound
    assert torch.equal(loaded.pos_embed, vit.pos_embed)


def test_force_pretrains_a_sound_cache_again_without_a_damage_message(tiny_data, tmp_path, counted_fit, capsys):
    for force in (False, True):
        pretrain_tiny_vit(tiny_data, cache_dir=tmp_path, config=TINY_CFG, progress=False, probe=False, force=force)
    assert counted_fit == [1, 1] and "damaged" not in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------
# The synthetic dataset


def _rewrite_arrays(path: Path, change) -> None:
    """Re-save ``path`` with ``change(arrays)`` and the original metadata (so its content hashes still match)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    arrays = load_file(str(path))
    change(arrays)
    path.write_bytes(save(arrays, metadata=meta))


def _ds_truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:1000])


def _ds_empty(path: Path) -> None:
    path.write_bytes(b"")


def _ds_zero_the_whole_file(path: Path) -> None:
    path.write_bytes(bytes(path.stat().st_size))


def _ds_zero_4mb_of_tensor_bytes(path: Path) -> None:
    data = bytearray(path.read_bytes())
    lo = _data_offset(data)
    hi = min(len(data), lo + 4 * 2**20)
    data[lo:hi] = bytes(hi - lo)
    path.write_bytes(bytes(data))


def _ds_header_not_json(path: Path) -> None:
    data = bytearray(path.read_bytes())
    assert data[8:9] == b"{"
    data[8] = ord("x")
    path.write_bytes(bytes(data))


def _ds_wrong_shape(path: Path) -> None:  # the same bytes, hence the same hash: only the shape tells
    _rewrite_arrays(path, lambda a: a.update(train_images=a["train_images"].reshape(-1, 3, 16, 64)))


def _ds_missing_array(path: Path) -> None:
    _rewrite_arrays(path, lambda a: a.pop("factors"))


@pytest.mark.parametrize("damage, reason", [
    (_ds_truncate, "truncated or unreadable"),
    (_ds_empty, "truncated or unreadable"),
    (_ds_zero_the_whole_file, "truncated or unreadable"),
    (_ds_zero_4mb_of_tensor_bytes, "content hash mismatch"),
    (_ds_header_not_json, "truncated or unreadable"),
    (_ds_wrong_shape, "train_images is torch.uint8 (12, 3, 16, 64) instead of torch.uint8 (12, 3, 32, 32)"),
    (_ds_missing_array, "missing arrays ['factors']"),
], ids=lambda v: v.__name__.removeprefix("_ds_") if callable(v) else None)
def test_damaged_dataset_cache_is_reported_and_regenerated(tmp_path, monkeypatch, capsys, damage, reason):
    calls, real = [], synthetic.generate
    monkeypatch.setattr(synthetic, "generate", lambda *a, **k: calls.append(1) or real(*a, **k))
    first = synthetic.load_synthetic(root=tmp_path, **TINY)
    (path,) = tmp_path.glob("*.safetensors")
    capsys.readouterr()

    damage(path)
    again = synthetic.load_synthetic(root=tmp_path, **TINY)
    assert reason in _damage_line(capsys.readouterr().err, "the synthetic dataset cache", path,
                                  "generating it again")
    assert calls == [1, 1]
    assert torch.equal(first.train.images, again.train.images) and first.fingerprint == again.fingerprint
    synthetic.load_synthetic(root=tmp_path, **TINY)
    assert calls == [1, 1] and capsys.readouterr().err == ""  # the regenerated file is sound


# ---------------------------------------------------------------------------------------------------------
# Concurrent first use

_CHILD = textwrap.dedent("""
    import sys, time
    from pathlib import Path

    from fcl_bench.datasets import synthetic
    from fcl_bench.nn import pretrain

    root, sync, me = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    TINY, CFG = {tiny!r}, pretrain.PretrainConfig(**{cfg!r})

    def slow(real, tag):  # record the call, then take long enough for the other process to arrive
        def run(*args, **kwargs):
            with open(sync / "calls", "a") as f:
                f.write(tag + "\\n")
            time.sleep(1.5)
            return real(*args, **kwargs)
        return run

    def barrier(name):  # both processes start each first use together
        (sync / (name + "-" + me)).touch()
        deadline = time.monotonic() + 60
        while len(list(sync.glob(name + "-*"))) < 2:
            if time.monotonic() > deadline:
                sys.exit("the other process never arrived")
            time.sleep(0.005)

    synthetic.generate = slow(synthetic.generate, "generate")
    pretrain._fit = slow(pretrain._fit, "fit")
    barrier("dataset")
    data = synthetic.load_synthetic(root=root / "synthetic", **TINY)
    barrier("weights")
    vit, report = pretrain.pretrain_tiny_vit(data, cache_dir=root, config=CFG, progress=False, probe=False)
    print(data.fingerprint, int(data.train.images.sum()), report["weights_sha256"], float(vit.pos_embed.sum()))
""")


def test_concurrent_first_use_builds_each_cache_once(tmp_path, monkeypatch):
    """Two processes start on an empty cache at the same time, with slow builders: the dataset is generated
    once and the ViT pretrained once; the other process waits and loads what the first wrote."""
    from dataclasses import asdict

    root, sync = tmp_path / "cache", tmp_path / "sync"
    sync.mkdir()
    code = _CHILD.format(tiny=TINY, cfg=asdict(TINY_CFG))
    procs = [subprocess.Popen([sys.executable, "-c", code, str(root), str(sync), str(i)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0 and "Traceback" not in err and "damaged" not in err, err
        outs.append(out.split())
    assert sorted((sync / "calls").read_text().split()) == ["fit", "generate"]  # each built once
    assert outs[0] == outs[1] and len(outs[0]) == 4   # the same dataset and the same weights in both

    monkeypatch.setattr(synthetic, "generate", lambda *a, **k: pytest.fail("the dataset cache is not sound"))
    monkeypatch.setattr(pretrain, "_fit", lambda *a, **k: pytest.fail("the weights cache is not sound"))
    data = synthetic.load_synthetic(root=root / "synthetic", **TINY)
    _, report = pretrain_tiny_vit(data, cache_dir=root, config=TINY_CFG, progress=False, probe=False)
    assert outs[0][0] == data.fingerprint and outs[0][2] == report["weights_sha256"]
    assert not list(root.rglob("*.tmp"))              # no temporary files left behind


def test_a_killed_builder_leaves_no_stale_lock(tmp_path):
    """The kernel drops a ``flock`` with its process: a builder killed while it holds the lock blocks nobody."""
    import signal

    from fcl_bench.disk_cache import cache_lock

    path = tmp_path / "cache.safetensors"
    code = ("import sys, time; from pathlib import Path; from fcl_bench.disk_cache import cache_lock\n"
            "with cache_lock(Path(sys.argv[1])):\n    print('locked', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=10)
    finally:
        holder.kill()
    done = subprocess.run([sys.executable, "-c", code.replace("time.sleep(60)", "pass"), str(path)],
                          capture_output=True, text=True, timeout=10)
    assert done.stdout.strip() == "locked" and "waiting" not in done.stderr
    with cache_lock(path):              # and in this process too
        assert (tmp_path / "cache.safetensors.lock").is_file()
