"""Typed configuration: the run config, presets, and ``-o KEY=VALUE`` overrides.

``-o clients=3`` sets a run-config field; ``-o fedlscl.rank=8`` sets a field of a method's ``Config``.
Values are parsed by the field's declared type (bool accepts true/false/1/0/yes/no only; lists are
comma-separated); unknown keys and unparsable values are :class:`ConfigError` listing the valid keys.
A config class may define ``validate()`` (raising :class:`ConfigError`): :func:`apply_overrides` calls it on
the result, so a broken combination is reported before anything runs.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field, fields
from typing import Any


class ConfigError(ValueError):
    """A user-facing configuration error; the message names the problem and the fix."""


def _shared(default: Any) -> Any:
    """A :class:`RunConfig` field that is also a :class:`WorkspaceConfig` field (it decides what runs share)."""
    return field(default=default, metadata={"workspace": True})


@dataclass
class RunConfig:
    """Everything about a run except the method's own hyperparameters.

    Protocol (paper section 3/5.1): ``clients`` k, ``private`` classes per client, ``public`` classes
    shared by all (instances split by Dirichlet(``alpha``)), ``tasks`` x ``classes_per_task``,
    ``rounds_per_task`` communication rounds per task, ``epochs`` local epochs per round.
    ``cnn_only_epochs``: local epochs per round of the CNN-only methods (``uses_foundation = False``: FedAvg,
    FedProx, GLFC, TARGET, MFCL), which train their small CNN without a foundation model; None = ``epochs``.
    The quick preset sets it so that those CNNs get past a constant prediction (see :data:`PRESETS`).
    ``train_per_class`` / ``test_per_class`` cap the samples per class (seeded choice; None = all) so the
    offline presets stay fast. ``server_per_class`` training samples of each public class are held by the
    server, never by a client (default 0: no server-held split). ``participation``: the fraction of
    clients that train in a round (a seeded sample per round; 1.0, the paper's setting, is all of them).
    ``small_pretrained``: the client CNNs' backbones start pretrained (on the synthetic dataset's
    pretraining classes offline, timm's pretrained tag on a real dataset) instead of at random init; see
    :mod:`fcl_bench.nn.small`. ``channels_last``: the client CNNs' parameters and inputs in channels-last
    memory layout (the same model and arithmetic, other conv kernels: results agree to rounding, not bit for
    bit; ``benchmarks/step_efficiency.py`` measures the gain).

    The fields that decide what runs share (data, scenario, foundation model, feature cache) are marked
    ``_shared`` here; they make up :class:`WorkspaceConfig`, and :meth:`workspace` extracts them.
    """

    dataset: str = _shared("synthetic")
    data_root: str | None = _shared(None)
    download: bool = _shared(False)
    foundation: str = _shared("tiny")
    foundation_weights: str | None = _shared(None)
    foundation_pretrained: bool = _shared(True)
    small_models: list[str] = field(default_factory=lambda: ["resnet18"])
    small_width: int = 512
    small_pretrained: bool = False
    channels_last: bool = False
    clients: int = _shared(5)
    private: int = _shared(15)
    public: int = _shared(25)
    tasks: int = _shared(5)
    classes_per_task: int = _shared(8)
    alpha: float = _shared(0.5)
    server_per_class: int = _shared(0)
    participation: float = 1.0
    rounds_per_task: int = 5
    epochs: int = 1
    cnn_only_epochs: int | None = None
    batch_size: int = 64
    eval_batch_size: int = _shared(256)
    train_per_class: int | None = _shared(None)
    test_per_class: int | None = _shared(None)
    device: str = _shared("auto")
    amp: bool = True
    seed: int = _shared(42)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def normalised(self) -> RunConfig:
        """The same config with names in their canonical spelling (``SYNTHETIC`` -> ``synthetic``), so one
        dataset never gets two results trees."""
        name = self.dataset.strip().lower() if isinstance(self.dataset, str) else self.dataset
        return self if name == self.dataset else dataclasses.replace(self, dataset=name)

    def local_epochs(self, uses_foundation: bool) -> int:
        """Local epochs per round of a method: ``epochs``, or ``cnn_only_epochs`` (when set) for a method
        with ``uses_foundation = False``."""
        return self.epochs if uses_foundation or self.cnn_only_epochs is None else self.cnn_only_epochs

    def workspace(self) -> WorkspaceConfig:
        """The data/protocol sub-config: runs with equal ones share a workspace."""
        return WorkspaceConfig(**{f.name: getattr(self, f.name) for f in fields(WorkspaceConfig)})

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first broken rule that needs no data to check (the protocol's
        counts, positive sizes, a registered dataset). ``clients * private + public <= classes in the
        dataset`` needs the dataset and is checked when the scenario is built."""
        from fcl_bench.datasets import available_datasets
        from fcl_bench.scenario import ScenarioError, ScenarioSpec

        try:
            ScenarioSpec(clients=self.clients, private=self.private, public=self.public, tasks=self.tasks,
                         classes_per_task=self.classes_per_task, alpha=self.alpha, seed=self.seed,
                         server_per_class=self.server_per_class).validate()
        except ScenarioError as e:
            raise ConfigError(str(e)) from None
        if not 0 <= self.seed <= 2**32 - 1:
            raise ConfigError(f"seed {self.seed} is out of range; seeds are integers in 0..{2**32 - 1}")
        if not (0 < self.participation <= 1):
            raise ConfigError(f"participation is the fraction of clients that train in a round, in (0, 1]; "
                              f"got {self.participation}")
        for name in ("rounds_per_task", "epochs", "batch_size", "eval_batch_size", "small_width"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("train_per_class", "test_per_class", "cnn_only_epochs"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1 or none (all samples), got {getattr(self, name)}")
        if not self.small_models:
            raise ConfigError("small_models is empty; give at least one timm CNN name, e.g. -o small_models=resnet18")
        if self.dataset.strip().lower() not in available_datasets():
            raise ConfigError(f"unknown dataset '{self.dataset}'; available datasets: {', '.join(available_datasets())}")


WorkspaceConfig = dataclasses.make_dataclass(
    "WorkspaceConfig", [(f.name, f.type, field(default=f.default)) for f in fields(RunConfig)
                        if f.metadata.get("workspace")], frozen=True)
WorkspaceConfig.__module__ = __name__
WorkspaceConfig.__doc__ = """What a workspace is made of: the data, the scenario's protocol and seed, the foundation model
and where it runs -- the fields of :class:`RunConfig` marked ``_shared``. Runs whose ``RunConfig.workspace()``
are equal share data, scenario, foundation model and feature cache (the executor keys its workspaces by it)."""


#: ``server_per_class``: every preset with public classes reserves a small server-held split (training samples
#: of each public class that no client holds; FedMGP distils its global prompts on it, other methods ignore
#: it): 2 of 16 per class on smoke, 8 of 80 on quick, 20 of 500 on paper-cifar100 (the official FedMGP
#: ``surrogate_num``, which it draws from the test split). paper-imagenet-r has no public classes, so no split.
#: ``small_pretrained``: quick starts its client CNNs from the backbone the suite pretrains (and ships) on the
#: synthetic pretraining classes; smoke (tests) from random init. The paper presets start from random init:
#: the paper (5.1) names ResNet-18 clients but no pretrained weights for them, and the CNN baselines it
#: compares with (GLFC, TARGET, MFCL) train their CNNs from scratch; `-o small_pretrained=true` there loads
#: timm's ImageNet weights.
PRESETS: dict[str, dict[str, Any]] = {
    # seconds: for tests and a first look
    "smoke": dict(dataset="synthetic", foundation="tiny", small_models=["mobilenetv3_small_050"], small_width=64,
                  clients=2, private=2, public=2, tasks=2, classes_per_task=2, rounds_per_task=1, epochs=1,
                  batch_size=32, train_per_class=16, test_per_class=8, alpha=1.0, server_per_class=2,
                  small_pretrained=False),
    # minutes on a laptop CPU for every method; the default of `fcl-bench run`
    "quick": dict(dataset="synthetic", foundation="tiny", small_models=["mobilenetv3_small_050"], small_width=128,
                  clients=3, private=4, public=8, tasks=3, classes_per_task=4, rounds_per_task=2, epochs=1,
                  batch_size=32, train_per_class=80, test_per_class=40, alpha=0.5, server_per_class=8,
                  small_pretrained=True),
    # the paper's protocol shape (section 5.1) offline. Sizing (one seed, --threads 1, CPU seconds of one
    # `fcl-bench run` each on a 2-core x86-64 box, client CNNs from random init, cnn_only_epochs 3): fedavg 70 /
    # fedvit 18 / l2p 193 / fedlscl 233 at 40 train images per class; fedlscl 197 and fedavg 103 at 20. Fed-LSCL
    # barely shrinks with the data: its Stage 2 runs over the buffer (20 per class, the paper's M), not the
    # task's data. Client CNNs start pretrained (from random init with 1 local epoch, FedAvg predicted one class
    # on 3 of 5 clients after the first task). Three-seed suites as measured (pretrained CNNs, --threads 1, a
    # second suite on the other core; results/reference/standard/README.md): table1 99 min, table2 49, fig5 61.
    "standard": dict(dataset="synthetic", foundation="tiny", small_models=["mobilenetv3_small_050"], small_width=128,
                     clients=5, private=15, public=25, tasks=5, classes_per_task=8, rounds_per_task=5, epochs=1,
                     batch_size=32, train_per_class=20, test_per_class=16, alpha=0.5, server_per_class=2,
                     small_pretrained=True),
    # the paper's protocol (section 5.1): ViT-B/16 at 224, resnet18 clients, Adam lr 1e-3
    "paper-cifar100": dict(dataset="cifar100", foundation="vit_base_patch16_224.augreg_in21k_ft_in1k",
                           small_models=["resnet18"], small_width=512, clients=5, private=15, public=25,
                           tasks=5, classes_per_task=8, rounds_per_task=5, epochs=1, batch_size=64,
                           alpha=0.5, server_per_class=20, small_pretrained=False),
    "paper-imagenet-r": dict(dataset="imagenet-r", foundation="vit_base_patch16_224.augreg_in21k_ft_in1k",
                             small_models=["resnet18"], small_width=512, clients=5, private=40, public=0,
                             tasks=5, classes_per_task=8, rounds_per_task=5, epochs=1, batch_size=64,
                             alpha=0.5, small_pretrained=False),
}
PRESET_HELP = {
    "smoke": "seconds: 2 clients, 2 tasks x 2 classes, tiny data, 2 server-held samples per public class, client "
             "CNNs from random init (tests)",
    "quick": "minutes on CPU: 3 clients, 3 tasks x 4 classes, synthetic data, tiny pretrained ViT, 8 server-held samples per "
             "public class, client CNNs pretrained on the synthetic pretraining classes (default)",
    "standard": "the paper's protocol shape offline: 5 clients, 15 private + 25 public, 5 tasks x 8, 5 rounds per "
                "task, synthetic data (20 train / 16 test per class), tiny pretrained ViT, client CNNs pretrained "
                "on the synthetic pretraining classes; seeds 42, 1999, 2024 by default",
    "paper-cifar100": "paper protocol on CIFAR-100: 5 clients, 15 private + 25 public, 5 tasks x 8, ViT-B/16, "
                      "20 server-held samples per public class, resnet18 clients from random init",
    "paper-imagenet-r": "paper protocol on ImageNet-R: 5 clients, 40 private, 0 public, 5 tasks x 8, ViT-B/16, "
                        "resnet18 clients from random init",
}

#: Seeds a preset runs by default (``fcl-bench run`` without ``--seeds`` or ``-o seed=``); a preset not listed
#: runs its one ``seed``.
PRESET_SEEDS: dict[str, tuple[int, ...]] = {"standard": (42, 1999, 2024)}


def preset_seeds(name: str) -> list[int]:
    """The seeds preset ``name`` runs when none are given: :data:`PRESET_SEEDS`, else its ``seed``."""
    return list(PRESET_SEEDS.get(name, (preset(name).seed,)))


def offline_pretrained_archs() -> list[str]:
    """The client CNNs that offline presets (synthetic data) start pretrained: the small-model weights the
    package ships and ``fcl-bench pretrain`` makes."""
    return sorted({arch for p in PRESETS.values() if p.get("dataset") == "synthetic" and p.get("small_pretrained")
                   for arch in p["small_models"]})


def preset(name: str) -> RunConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset '{name}'; valid presets: {', '.join(PRESETS)}")
    cfg = RunConfig(**PRESETS[name]).normalised()
    cfg.validate()
    return cfg


_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def _parse(value: str, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value.lower() in ("none", "null") and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _parse(value, inner[0], key)
    if origin in (list, tuple):
        inner = args[0] if args else str
        items = [v.strip() for v in value.split(",") if v.strip()]
        parsed = [_parse(v, inner, key) for v in items]
        return parsed if origin is list else tuple(parsed)
    if tp is bool:
        v = value.lower()
        if v in _TRUE:
            return True
        if v in _FALSE:
            return False
        raise ConfigError(f"{key}: '{value}' is not a boolean (use true/false)")
    if tp in (int, float, str):
        try:
            return tp(value)
        except ValueError:
            raise ConfigError(f"{key}: '{value}' is not a valid {tp.__name__}") from None
    if typing.get_origin(tp) is typing.Literal:
        if value not in args:
            raise ConfigError(f"{key}: '{value}' is not one of {', '.join(map(str, args))}")
        return value
    raise ConfigError(f"{key}: cannot parse values of type {tp}")


def apply_overrides(obj: Any, overrides: dict[str, str], what: str) -> Any:
    """Return a copy of dataclass ``obj`` with ``overrides`` (field -> string value) parsed and applied, checked
    by its ``validate()`` if it has one."""
    hints = typing.get_type_hints(type(obj))
    valid = [f.name for f in fields(obj)]
    changes = {}
    for key, value in overrides.items():
        if key not in hints or key not in valid:
            raise ConfigError(f"unknown {what} key '{key}'; valid keys: {', '.join(valid)}")
        changes[key] = _parse(value, hints[key], f"{what}.{key}")
    out = dataclasses.replace(obj, **changes)
    normalised = getattr(out, "normalised", None)
    if callable(normalised):
        out = normalised()
    validate = getattr(out, "validate", None)
    if callable(validate):
        validate()
    return out


def split_overrides(items: list[str] | tuple[str, ...]) -> tuple[dict[str, str], dict[str, dict[str, str]]]:
    """``["clients=3", "fedlscl.rank=8"]`` -> (run overrides, {method: overrides})."""
    run: dict[str, str] = {}
    per_method: dict[str, dict[str, str]] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like KEY=VALUE or METHOD.KEY=VALUE")
        key, value = item.split("=", 1)
        key = key.strip()
        if "." in key:
            method, sub = key.split(".", 1)
            per_method.setdefault(method.strip(), {})[sub.strip()] = value.strip()
        else:
            run[key] = value.strip()
    return run, per_method
