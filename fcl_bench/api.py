"""The plugin contract (v2): what a method implements and what the harness lends it.

A method is a :class:`Method` subclass with a ``name``, a ``Config`` dataclass of hyperparameters (choice
fields typed as ``Literal``, an optional ``validate()``; every field settable as ``-o NAME.FIELD=VALUE``),
the patterns of the tensor names its clients upload (``uploads``), and two factories: ``client(id, env)``
builds a :class:`Client` from a :class:`ClientEnv`, ``server(env)`` the :class:`Server` from a
:class:`ServerEnv`. Clients and server exchange only :data:`Payload` dicts of tensors, which cross the wire
(:mod:`fcl_bench.wire`) as safetensors bytes, counted exactly.

The schedule (:mod:`fcl_bench.federation`), per task ``t``:

1. ``Server.start_task(t)`` -> downloads (e.g. the initial global model ``w_0``), over the wire, each
   received with ``Client.receive(payload, "start")``; then every client's ``start_task(task)``;
2. per round ``r``: the round's participants (``RoundInfo.participants``, a seeded sample of
   ``participation`` x clients) run ``train_round(info)`` -> uploads, over the wire;
   ``Server.aggregate(uploads, info)`` -> downloads, over the wire, ``receive(payload, "round")``;
3. ``Server.end_task(t)`` -> downloads, over the wire, ``receive(payload, "end")``; every client's
   ``end_task()``; every client is evaluated on the test sets of all tasks it has seen, through
   ``predict`` only; then every client's and the server's ``state_dict()`` is checkpointed.

A server may address any client in its downloads (an averaging server sends the new global model to
every client, so one that sat a round out still holds the current model). Clients that sit a round out
keep their state.

Environments: a :class:`ClientEnv` reaches only its client's data -- its training samples of the tasks
started so far (``env.task``, ``env.view``) and the frozen-feature cache restricted to the batches the
harness hands it (its own training batches; test batches only inside ``predict``). A :class:`ServerEnv`
holds the scenario's metadata and, when the scenario defines one, the server-held split
(``server_per_class`` training samples of each public class, reserved before the Dirichlet split so no
client holds them). No environment reaches test data.

State: ``state_dict()`` returns a :data:`fcl_bench.state.State` (tensors, numpy arrays and JSON scalars
in dicts and lists) and ``load_state_dict(state)`` restores it into a freshly built object, so a run can
resume from a checkpoint and a client can be rebuilt for every Flower message.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np
import torch

from fcl_bench.data import Batch, ClientData, Preprocess
from fcl_bench.state import State

if TYPE_CHECKING:
    from fcl_bench.nn.cache import FeatureView
    from fcl_bench.nn.foundation import FoundationModel

Payload = dict[str, torch.Tensor]
"""All that crosses the wire: a flat mapping of names to tensors. Nothing else can."""

DownloadKind = Literal["start", "round", "end"]
"""Which download a client receives: of ``Server.start_task``, of a round's ``aggregate``, of ``end_task``."""


@dataclass
class Task:
    """One task of one client, as that client sees it.

    ``classes``: global class ids of this task. ``seen_classes``: all classes of this client's tasks
    0..index (this task's included), sorted. ``train``: the client's own training samples of this task.
    """

    index: int
    classes: list[int]
    seen_classes: list[int]
    train: ClientData


@dataclass(frozen=True)
class RoundInfo:
    """Where a round stands: ``task`` and ``round`` (0-based), ``rounds_per_task``, and the ids of the
    clients that train in it (``participants``, sorted)."""

    task: int
    round: int
    rounds_per_task: int
    participants: tuple[int, ...]

    @property
    def is_first(self) -> bool:
        return self.round == 0

    @property
    def is_last(self) -> bool:
        return self.round == self.rounds_per_task - 1


@dataclass
class ScenarioInfo:
    """Scenario metadata a method may read (no data): class counts, each client's task classes, training
    set sizes, the public classes and the size of the server-held split (0 when there is none)."""

    num_classes: int
    num_clients: int
    num_tasks: int
    rounds_per_task: int
    client_tasks: list[list[list[int]]]
    train_sizes: list[list[int]]
    public_classes: list[int] = field(default_factory=list)
    server_samples: int = 0

    def seen_classes(self, client: int, task: int) -> list[int]:
        """Classes of tasks ``0..task`` of ``client``, sorted."""
        return sorted(c for t in range(task + 1) for c in self.client_tasks[client][t])


@dataclass(kw_only=True)
class MethodEnv:
    """What every part of a method may read: scenario metadata, device and precision, the frozen foundation
    model (``None`` for methods with ``uses_foundation = False`` on presets whose input pipeline does not
    need it), the small-model archs (cycled over clients), the run's seed and training settings, the input
    pipeline (``preprocess``: what turns ``[0, 1]`` images into ``batch.x``) and the dataset's native
    image side (``image_size``), e.g. for a server that synthesises images.

    ``foundation`` is shared by every client and the server: eval mode, no gradient; never train it.
    """

    scenario: ScenarioInfo
    device: torch.device
    amp_dtype: torch.dtype | None
    foundation: FoundationModel | None
    small_archs: list[str]
    small_width: int
    seed: int
    batch_size: int
    epochs: int
    eval_batch_size: int = 256
    participation: float = 1.0
    preprocess: Preprocess | None = None  # the input pipeline batches go through (size, mean, std)
    image_size: int | None = None         # the dataset's native image side (None: files of mixed sizes)
    log: Callable[[str], None] = print
    _make_small: Callable[[str, int], torch.nn.Module] | None = field(default=None, repr=False)

    def autocast(self):
        """bf16 autocast on CUDA (when enabled), a no-op elsewhere."""
        if self.amp_dtype is None or self.device.type != "cuda":
            return torch.autocast("cpu", enabled=False)
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def small_arch(self, client: int) -> str:
        """The small-model arch of ``client`` (archs cycle over clients)."""
        return self.small_archs[client % len(self.small_archs)]

    def build_small_model(self, client: int) -> torch.nn.Module:
        """A fresh small model of ``client``'s arch (timm CNN + projection to ``small_width``) on the device."""
        if self._make_small is None:
            raise RuntimeError("this environment builds no small models")
        return self._make_small(self.small_arch(client), self.small_width).to(self.device)


def _seeded_generator(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g


@dataclass(kw_only=True)
class ClientEnv(MethodEnv):
    """One client's environment: :class:`MethodEnv` plus its own data and nothing else.

    ``features``: the frozen-feature cache, answering only for this client's training batches and, inside
    ``predict``, the test batches the harness hands it. ``generator``: this client's seeded
    ``torch.Generator`` (shuffling, sampling). ``task(i)`` / ``view(indices)``: the client's own training
    data of tasks started so far, to rebuild a state's data views.
    """

    client_id: int
    features: FeatureView | None = None
    generator: torch.Generator = None  # type: ignore[assignment]
    _task_of: Callable[[int], Task] | None = field(default=None, repr=False)
    _tasks_started: int = 0
    _own_train: Callable[[], np.ndarray] | None = field(default=None, repr=False)
    _make_view: Callable[[np.ndarray], ClientData] | None = field(default=None, repr=False)
    notes: dict[str, Any] = field(default_factory=dict, repr=False)  # one-off log lines already given

    def __post_init__(self) -> None:
        if self.generator is None:
            self.generator = _seeded_generator(self.seed * 1000 + self.client_id + 1)

    def make_small_model(self) -> torch.nn.Module:
        """A fresh small model of this client's arch."""
        return self.build_small_model(self.client_id)

    def task(self, index: int) -> Task:
        """Task ``index`` of this client (only tasks already started)."""
        if not 0 <= index < self._tasks_started or self._task_of is None:
            raise PermissionError(f"client {self.client_id} has started {self._tasks_started} tasks; "
                                  f"task {index} is not available to it")
        return self._task_of(index)

    def view(self, indices: np.ndarray) -> ClientData:
        """A view on training samples (dataset indices) this client holds in the tasks started so far."""
        idx = np.asarray(indices, dtype=np.int64)
        own = self._own_train() if self._own_train is not None else np.empty(0, np.int64)
        if not np.isin(idx, own).all():
            raise PermissionError(f"client {self.client_id} asked for training samples it does not hold")
        return self._make_view(idx)


@dataclass(kw_only=True)
class ServerEnv(MethodEnv):
    """The server's environment: :class:`MethodEnv` plus ``server_data`` (the scenario's server-held split
    of public-class training samples, ``None`` when ``server_per_class`` is 0), the feature cache restricted
    to it, and the server's seeded ``generator``. No client data, no test data."""

    server_data: ClientData | None = None
    features: FeatureView | None = None
    generator: torch.Generator = None  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.generator is None:
            self.generator = _seeded_generator(self.seed * 1000)


class Client(ABC):
    """One client: local data, local state. ``start_task``, ``train_round`` and ``predict`` are required."""

    @abstractmethod
    def start_task(self, task: Task) -> None:
        """A new task begins: ``task.train`` holds this client's samples of it."""

    @abstractmethod
    def train_round(self, info: RoundInfo) -> Payload:
        """Local training for one round -> the upload (a dict of tensors; ``{}`` uploads nothing)."""

    def receive(self, download: Payload, kind: DownloadKind) -> None:
        """Take a download from the server: of ``Server.start_task`` (``"start"``, before ``start_task``),
        of a round (``"round"``) or of ``Server.end_task`` (``"end"``, before ``end_task``)."""
        return None

    def end_task(self) -> None:
        """Called after the task's last round and the server's ``end_task`` downloads."""
        return None

    @abstractmethod
    def predict(self, batch: Batch) -> torch.Tensor:
        """Logits over ALL global classes, ``(B, num_classes)``; a sample's prediction must not depend on
        the rest of its batch. ``batch.x`` are the normalised images, ``batch.index`` the dataset indices
        (for the frozen-feature cache)."""

    def state_dict(self) -> State:
        """Everything needed to rebuild this client in a fresh object (see :mod:`fcl_bench.state`)."""
        raise NotImplementedError(f"{type(self).__name__} does not implement state_dict(); checkpoints, "
                                  "resume and the Flower engine need it")

    def load_state_dict(self, state: State) -> None:
        """Restore :meth:`state_dict`'s output into a freshly built client."""
        raise NotImplementedError(f"{type(self).__name__} does not implement load_state_dict()")

    def trainable_parameters(self) -> int:
        """Number of parameters this client trains (for the accounting); override if not ``self.model``."""
        model = getattr(self, "model", None)
        if isinstance(model, torch.nn.Module):
            return sum(p.numel() for p in model.parameters() if p.requires_grad)
        return 0


class Server(ABC):
    """The server: sees only payloads, the scenario's metadata and the server-held split."""

    def start_task(self, task_index: int) -> Mapping[int, Payload]:
        """Before a task's first round -> downloads (client id -> payload), e.g. the initial global model."""
        return {}

    @abstractmethod
    def aggregate(self, uploads: Mapping[int, Payload], info: RoundInfo) -> Mapping[int, Payload]:
        """The round's uploads (participant id -> payload) -> downloads (client id -> payload)."""

    def end_task(self, task_index: int) -> Mapping[int, Payload]:
        """After a task's last round -> extra downloads (synthetic pools, old models, ...)."""
        return {}

    def state_dict(self) -> State:
        """Everything needed to rebuild this server in a fresh object. A stateless server returns ``{}``."""
        raise NotImplementedError(f"{type(self).__name__} does not implement state_dict()")

    def load_state_dict(self, state: State) -> None:
        """Restore :meth:`state_dict`'s output into a freshly built server."""
        raise NotImplementedError(f"{type(self).__name__} does not implement load_state_dict()")


@dataclass
class MethodConfig:
    """Base of every method's ``Config``; fields are hyperparameters with documented defaults."""


class Method(ABC):
    """One per run. Subclasses set ``name``, ``Config`` (a dataclass) and build clients and a server.

    ``uploads``: shell-style patterns (:func:`fnmatch.fnmatchcase`) of the tensor names a client may
    upload; anything else is refused by the harness (so nothing leaves a client by accident).
    ``uses_foundation = False``: the method never reads the frozen foundation model (the harness may then
    skip loading it). ``global_space = False``: its predictions cover only the evaluated client's own
    classes, so the ``global`` evaluation space does not apply to it.
    """

    name: ClassVar[str]
    Config: ClassVar[type] = MethodConfig
    description: ClassVar[str] = ""
    uses_foundation: ClassVar[bool] = True
    uploads: ClassVar[tuple[str, ...]] = ("*",)
    global_space: ClassVar[bool] = True

    def __init__(self, config: Any, env: MethodEnv):
        self.config = config
        self.env = env

    @abstractmethod
    def client(self, client_id: int, env: ClientEnv) -> Client:
        """Build client ``client_id`` in its environment."""

    @abstractmethod
    def server(self, env: ServerEnv) -> Server:
        """Build the server in its environment."""

    @classmethod
    def config_fields(cls) -> dict[str, dataclasses.Field]:
        return {f.name: f for f in dataclasses.fields(cls.Config)}


__all__ = ["Client", "ClientEnv", "DownloadKind", "Method", "MethodConfig", "MethodEnv", "Payload", "RoundInfo",
           "ScenarioInfo", "Server", "ServerEnv", "State", "Task"]
