"""What the runs of a plan share: the data, the scenario, the input pipeline, the frozen foundation model
and its feature cache, built from a :class:`~fcl_bench.config.WorkspaceConfig`.

The input pipeline (:class:`~fcl_bench.data.Preprocess`) comes from the foundation model's configuration
without loading the model, so methods that never read the foundation model (FedAvg, FedProx) see the same
inputs as every other method and never pay for loading it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from fcl_bench.config import WorkspaceConfig
from fcl_bench.data import ClientData, Dataset, Preprocess, cap_per_class
from fcl_bench.nn.cache import FeatureCache
from fcl_bench.nn.foundation import FoundationModel, foundation_preprocess, load_foundation
from fcl_bench.scenario import Scenario, ScenarioSpec, build_scenario


def resolve_device(name: str) -> torch.device:
    """``auto`` | ``cpu`` | ``cuda[:N]`` -> a device that exists here (else ``ValueError`` saying why)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available here; use --device cpu or auto")
    if name not in ("cpu",) and not name.startswith("cuda"):
        raise ValueError(f"--device must be auto, cpu or cuda[:N]; got '{name}'")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device must be auto, cpu or cuda[:N]; got '{name}'") from None
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    return dev


def load_data(cfg: WorkspaceConfig) -> tuple[Dataset, Dataset]:
    """(full dataset, dataset capped to the run's samples per class)."""
    from fcl_bench.datasets import load_dataset

    ds = load_dataset(cfg.dataset, root=cfg.data_root, download=cfg.download, seed=0)
    return ds, cap_per_class(ds, cfg.train_per_class, cfg.test_per_class, seed=cfg.seed)


def scenario_spec(cfg: WorkspaceConfig) -> ScenarioSpec:
    return ScenarioSpec(clients=cfg.clients, private=cfg.private, public=cfg.public, tasks=cfg.tasks,
                        classes_per_task=cfg.classes_per_task, alpha=cfg.alpha, seed=cfg.seed,
                        server_per_class=cfg.server_per_class)


def make_scenario(cfg: WorkspaceConfig, ds: Dataset) -> Scenario:
    return build_scenario(scenario_spec(cfg), ds.train.labels, ds.test.labels, num_classes=ds.num_classes)


@dataclass
class Workspace:
    """Shared by all runs with the same :class:`~fcl_bench.config.WorkspaceConfig`."""

    cfg: WorkspaceConfig
    dataset: Dataset
    scenario: Scenario
    device: torch.device
    preprocess: Preprocess
    full_dataset: Dataset | None = None
    foundation: FoundationModel | None = None
    features: FeatureCache | None = None

    @classmethod
    def create(cls, cfg: WorkspaceConfig) -> Workspace:
        device = resolve_device(cfg.device)
        pre = foundation_preprocess(cfg.foundation)  # fails early for an unknown model, before any data
        full, ds = load_data(cfg)
        scenario = make_scenario(cfg, ds)
        return cls(cfg=cfg, dataset=ds, scenario=scenario, device=device, preprocess=pre, full_dataset=full)

    def ensure_foundation(self, progress: bool = True) -> FoundationModel:
        """Load (or pretrain, for the offline tiny ViT) the frozen foundation model and its feature cache."""
        if self.foundation is None:
            # the offline model is pretrained (and probed) on the full dataset, whatever the run's caps
            fm = load_foundation(self.cfg.foundation, self.full_dataset or self.dataset, self.device,
                                 weights=self.cfg.foundation_weights, pretrained=self.cfg.foundation_pretrained,
                                 seed=self.cfg.seed, progress=progress)
            if fm.preprocess != self.preprocess:
                raise RuntimeError(f"the loaded foundation model's input pipeline {fm.preprocess} differs from "
                                   f"its configuration's {self.preprocess}")
            self.foundation = fm
            self.features = FeatureCache(fm, {"train": self.dataset.train, "test": self.dataset.test},
                                         self.dataset.fingerprint, batch_size=self.cfg.eval_batch_size)
        return self.foundation

    # -- data views: what the schedule hands clients, the server and the evaluation ---------------------
    def train_view(self, client: int, task: int) -> ClientData:
        return ClientData(self.dataset.train, self.scenario.train_indices[client][task], "train",
                          self.preprocess, self.device)

    def test_view(self, client: int, task: int) -> ClientData:
        return ClientData(self.dataset.test, self.scenario.test_indices[client][task], "test",
                          self.preprocess, self.device)

    def view(self, indices, split: str = "train") -> ClientData:
        source = self.dataset.train if split == "train" else self.dataset.test
        return ClientData(source, indices, split, self.preprocess, self.device)

    def server_view(self) -> ClientData | None:
        idx = self.scenario.server_indices
        return self.view(idx) if len(idx) else None


def describe(ws: Workspace) -> dict:
    """What a run records about its data and models."""
    fm = ws.foundation
    return {
        "dataset": {"name": ws.dataset.name, "fingerprint": ws.dataset.fingerprint, "classes": ws.dataset.num_classes,
                    "train": len(ws.dataset.train), "test": len(ws.dataset.test), **{
                        k: v for k, v in ws.dataset.info.items() if isinstance(v, (int, float, str, type(None)))}},
        "foundation": None if fm is None else {"name": fm.name, "key": fm.key, "depth": fm.depth,
                                               "embed_dim": fm.embed_dim,
                                               "source": fm.info.get("source")},
        "preprocess": dataclasses.asdict(ws.preprocess),
        "scenario_hash": ws.scenario.hash,
        "server_samples": int(len(ws.scenario.server_indices)),
    }
