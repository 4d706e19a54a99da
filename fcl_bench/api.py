"""The plugin contract: what a method implements and what the harness gives it.

A method is a :class:`Method` subclass with a ``name``, a ``Config`` dataclass of hyperparameters
(documented defaults; every field is settable from the CLI as ``-o NAME.FIELD=VALUE``) and two factories,
one for :class:`Client` objects and one for the :class:`Server`. Clients and server only exchange
:data:`Payload` dictionaries of tensors, which cross the wire (:mod:`fcl_bench.wire`) as safetensors bytes.

Per task: every client ``start_task``; then per round: ``train_round`` on each client, uploads cross the
wire, ``Server.aggregate``, downloads cross the wire, ``Client.receive``; then ``Server.end_task`` (its
downloads also cross the wire), ``Client.end_task``, and evaluation of every client on the test sets of
every task it has seen, through ``Client.predict``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from fcl_bench.data import Batch, ClientData

if TYPE_CHECKING:
    from fcl_bench.nn.cache import FeatureCache
    from fcl_bench.nn.foundation import FoundationModel

Payload = dict[str, torch.Tensor]
"""All that crosses the wire: a flat mapping of names to tensors. Nothing else can."""


@dataclass
class Task:
    """One task of one client, as that client sees it.

    ``classes``: global class ids of this task. ``seen_classes``: all classes of this client's tasks
    0..index (this task's included), in the order they were learned. ``train``: the client's own training
    samples of this task, nothing else.
    """

    index: int
    classes: list[int]
    seen_classes: list[int]
    train: ClientData


@dataclass
class ScenarioInfo:
    """Scenario metadata a method may read (no data): class counts and each client's task classes."""

    num_classes: int
    num_clients: int
    num_tasks: int
    rounds_per_task: int
    client_tasks: list[list[list[int]]]
    train_sizes: list[list[int]]

    def seen_classes(self, client: int, task: int) -> list[int]:
        return [c for t in range(task + 1) for c in self.client_tasks[client][t]]


@dataclass
class Env:
    """What the harness owns and lends to a method.

    ``foundation`` is the frozen foundation model, shared by every client of the run (eval mode, no
    grad); ``features`` caches its frozen outputs per sample. ``make_small_model(client)`` builds that
    client's small CNN (+ projection to ``small_width``); archs cycle over clients. ``generator(client)``
    is a seeded ``torch.Generator`` per client (-1 for the server).
    """

    scenario: ScenarioInfo
    device: torch.device
    amp_dtype: torch.dtype | None
    foundation: FoundationModel
    features: FeatureCache
    make_small_model: Callable[[int], torch.nn.Module]
    small_width: int
    small_archs: list[str]
    seed: int
    batch_size: int
    epochs: int
    eval_batch_size: int = 256
    log: Callable[[str], None] = print
    _generators: dict[int, torch.Generator] = field(default_factory=dict)

    def generator(self, client: int) -> torch.Generator:
        if client not in self._generators:
            g = torch.Generator()
            g.manual_seed(self.seed * 1000 + client + 1)
            self._generators[client] = g
        return self._generators[client]

    def autocast(self):
        """bf16 autocast on CUDA (when enabled), a no-op elsewhere."""
        if self.amp_dtype is None or self.device.type != "cuda":
            return torch.autocast("cpu", enabled=False)
        return torch.autocast(self.device.type, dtype=self.amp_dtype)


class Client:
    """One client: local data, local state. Override what the method needs."""

    def start_task(self, task: Task) -> None:
        raise NotImplementedError

    def train_round(self) -> Payload:
        raise NotImplementedError

    def receive(self, download: Payload) -> None:
        """Take the server's download of this round (or of ``Server.end_task``)."""

    def end_task(self) -> None:
        """Called after the task's last round and the server's ``end_task`` downloads."""

    def predict(self, batch: Batch) -> torch.Tensor:
        """Logits over ALL global classes, ``(B, num_classes)``; a sample's prediction must not depend on
        the rest of its batch. ``batch.x`` are the normalised images, ``batch.index`` the dataset indices
        (for the frozen-feature cache)."""
        raise NotImplementedError

    def trainable_parameters(self) -> int:
        """Number of parameters this client trains (for the accounting); override if not ``self.model``."""
        model = getattr(self, "model", None)
        if isinstance(model, torch.nn.Module):
            return sum(p.numel() for p in model.parameters() if p.requires_grad)
        return 0


class Server:
    """The server: sees only payloads."""

    def aggregate(self, uploads: Mapping[int, Payload]) -> Mapping[int, Payload]:
        """Uploads of this round (client id -> payload) -> downloads (client id -> payload)."""
        raise NotImplementedError

    def end_task(self, task_index: int) -> Mapping[int, Payload]:
        """Optional extra downloads after a task's last round."""
        return {}


@dataclass
class MethodConfig:
    """Base of every method's ``Config``; fields are hyperparameters with documented defaults."""


class Method:
    """One per run. Subclasses set ``name``, ``Config`` (a dataclass) and build clients and a server."""

    name: ClassVar[str]
    Config: ClassVar[type] = MethodConfig
    description: ClassVar[str] = ""
    # Methods that never read the frozen foundation model set this False so the harness skips loading it.
    uses_foundation: ClassVar[bool] = True
    # False when a client's heads cover only its own classes: the `global` evaluation space (all classes any
    # client has seen) then equals the client space and reports mark it not applicable.
    global_space: ClassVar[bool] = True

    def __init__(self, config: Any, env: Env):
        self.config = config
        self.env = env

    def client(self, client_id: int) -> Client:
        raise NotImplementedError

    def server(self) -> Server:
        raise NotImplementedError

    @classmethod
    def config_fields(cls) -> dict[str, dataclasses.Field]:
        return {f.name: f for f in dataclasses.fields(cls.Config)}
