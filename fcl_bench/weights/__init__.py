"""Pretrained weights that ship with the package, pinned by sha256.

The offline presets' models (the tiny foundation ViT and the small client CNNs they use) are pretrained by
:mod:`fcl_bench.nn.pretrain` on the synthetic dataset's pretraining classes. Pretraining the same code on two
machines can give different bits (CPU kernels, thread counts, bf16 support), so the weights the offline
presets use ship here as safetensors files, and every machine starts from the same ones.

``manifest.json`` maps a pretraining key (the hash of what decides the weights: the pretraining version, the
dataset fingerprint, the architecture, the recipe and the seed; see :func:`fcl_bench.nn.pretrain.weights_key`)
to an entry: the file name, its sha256 and size, the model's name (``tiny_vit`` or the timm arch), the
dataset fingerprint, the config and the pretraining report. :func:`read_shipped` returns a file's bytes only
after checking them against the pinned sha256; a mismatch is a :class:`ShippedWeightsError` that names the
file and the fix, never a silent fallback. :func:`write_shipped` (``fcl-bench pretrain --force
--write-shipped``, for maintainers) replaces a model's entry and file.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from fcl_bench.store import atomic_write

SHIPPED_DIR = Path(__file__).resolve().parent
MANIFEST_FORMAT = 1


class ShippedWeightsError(RuntimeError):
    """A shipped weights file is missing or its bytes do not match the sha256 its manifest pins."""


def manifest_path(folder: Path | None = None) -> Path:
    return (folder or SHIPPED_DIR) / "manifest.json"


def read_manifest(folder: Path | None = None) -> dict[str, dict]:
    """The manifest's entries, key -> entry (empty when there is no manifest)."""
    path = manifest_path(folder)
    if not path.is_file():
        return {}
    manifest = json.loads(path.read_text())
    if manifest.get("format") != MANIFEST_FORMAT:
        raise ShippedWeightsError(f"{path} has format {manifest.get('format')!r}, this fcl-bench reads format "
                                  f"{MANIFEST_FORMAT}; reinstall fcl-bench")
    return manifest["weights"]


def shipped_entry(key: str, folder: Path | None = None) -> dict | None:
    """The manifest entry of pretraining key ``key``, or None when no shipped file has it."""
    return read_manifest(folder).get(key)


def read_shipped(key: str, folder: Path | None = None) -> tuple[bytes, dict] | None:
    """``(file bytes, manifest entry)`` of the shipped weights of ``key`` once their sha256 is checked; None
    when nothing ships for ``key``. Raises :class:`ShippedWeightsError` naming the file and the fix when the
    file is missing or its bytes are not the pinned ones."""
    entry = shipped_entry(key, folder)
    if entry is None:
        return None
    path = (folder or SHIPPED_DIR) / entry["file"]
    fix = (f"reinstall fcl-bench (pip install --force-reinstall fcl-bench), or run `fcl-bench pretrain --force` "
           f"to pretrain {entry['name']} into the cache, which is then used instead")
    if not path.is_file():
        raise ShippedWeightsError(f"the shipped weights file {path} is missing; {fix}")
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != entry["sha256"]:
        raise ShippedWeightsError(f"the shipped weights file {path} has sha256 {digest[:16]}... but the manifest "
                                  f"pins {entry['sha256'][:16]}...: the file is damaged or was replaced; {fix}")
    return data, entry


def compare_to_shipped(key: str, sha256: str | None, folder: Path | None = None) -> str:
    """One line saying whether weights with ``sha256`` are, bit for bit, the shipped ones of ``key``."""
    entry = shipped_entry(key, folder)
    if entry is None:
        return f"no shipped weights for this configuration (key {key}); nothing to compare with"
    if sha256 == entry["sha256"]:
        return f"matches the shipped {entry['file']} bit for bit (sha256 {sha256[:16]}...)"
    return (f"differs from the shipped {entry['file']}: sha256 {str(sha256)[:16]}... here, "
            f"{entry['sha256'][:16]}... shipped")


def write_shipped(key: str, name: str, data: bytes, report: dict, folder: Path | None = None) -> Path:
    """Ship ``data`` (a safetensors file's bytes) as the weights of model ``name`` for ``key``: write the file,
    then the manifest entry, replacing (and deleting the file of) any earlier entry of ``name``."""
    folder = folder or SHIPPED_DIR
    entries = read_manifest(folder)
    for old_key, old in list(entries.items()):
        if old["name"] == name:
            del entries[old_key]
            if old["file"] != _file_name(name, key):
                (folder / old["file"]).unlink(missing_ok=True)
    file = _file_name(name, key)
    atomic_write(folder / file, data)
    entries[key] = {"file": file, "name": name, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data),
                    "dataset_fingerprint": report.get("dataset_fingerprint"), "config": report.get("config"),
                    "seed": report.get("seed"), "version": report.get("version"), "report": report}
    atomic_write(manifest_path(folder), json.dumps({"format": MANIFEST_FORMAT, "weights": entries}, indent=2,
                                                   sort_keys=True) + "\n")
    return folder / file


def _file_name(name: str, key: str) -> str:
    return f"{name}-{key}.safetensors"
