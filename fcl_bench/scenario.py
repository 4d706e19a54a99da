"""The FCL protocol as data: which classes, samples and task order each client gets.

A :class:`ScenarioSpec` holds the protocol's parameters (Fed-LSCL, section 3): ``clients`` clients, each with
``private`` classes of its own and all ``public`` classes, whose training instances are split among the
clients by Dirichlet(``alpha``) proportions with no instance on two clients. Each client's classes are
shuffled (seeded, per client) into ``tasks`` tasks of ``classes_per_task`` classes.

:func:`build_scenario` turns a spec and a dataset's label arrays into a :class:`Scenario`: every training and
test index of every client and task. A scenario is saved as canonical JSON with a sha256 content hash, so
all methods of a suite with the same seed share exactly the same split, and a tampered file fails to load.

Random streams are independent per purpose (class choice, public split, each client's task order), all
derived from ``seed`` with :class:`numpy.random.SeedSequence`: changing ``alpha`` changes only the public
split, never which classes are chosen or the task orders.
"""

from __future__ import annotations

import hashlib
import json
import numbers
import os
import tempfile
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np

FORMAT = "fcl-bench-scenario"
VERSION = 1

# spawn_key prefixes of the independent random streams derived from the seed.
_STREAM_CLASSES, _STREAM_PUBLIC, _STREAM_TASKS, _STREAM_SERVER = 0, 1, 2, 3


class ScenarioError(ValueError):
    """An impossible or inconsistent scenario: bad parameters, too few classes or samples, a tampered file."""


def _rng(seed: int, *key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=key))


@dataclass(frozen=True)
class ScenarioSpec:
    """Parameters of the FCL protocol.

    ``clients`` (k) clients each hold ``private`` classes of their own plus all ``public`` classes, learned
    as ``tasks`` tasks of ``classes_per_task`` classes, so ``private + public == tasks * classes_per_task``
    and the dataset needs ``clients * private + public`` classes. ``alpha`` is the Dirichlet concentration
    of the public split (small: skewed, large: even); ``min_per_class`` training samples of every public
    class are guaranteed on every client. ``server_per_class`` training samples of each public class are
    reserved for the server (the server-held split) before the Dirichlet split, so no client holds them.

    Construction does not validate (so overrides can be applied one field at a time); call
    :meth:`validate`, which :func:`build_scenario` also does.
    """

    clients: int
    private: int
    public: int
    tasks: int
    classes_per_task: int
    alpha: float
    seed: int
    min_per_class: int = 1
    server_per_class: int = 0

    @property
    def classes_per_client(self) -> int:
        return self.private + self.public

    @property
    def classes_needed(self) -> int:
        return self.clients * self.private + self.public

    def validate(self, num_classes: int | None = None) -> None:
        """Raise :class:`ScenarioError` naming the first broken rule; ``num_classes``: classes available."""
        for name in ("clients", "private", "public", "tasks", "classes_per_task", "seed", "min_per_class",
                     "server_per_class"):
            value = getattr(self, name)
            if not isinstance(value, numbers.Integral) or isinstance(value, bool):
                raise ScenarioError(f"{name} must be an integer, got {value!r}")
        for name, low in (("clients", 1), ("tasks", 1), ("classes_per_task", 1),
                          ("private", 0), ("public", 0), ("seed", 0), ("min_per_class", 0),
                          ("server_per_class", 0)):
            if getattr(self, name) < low:
                raise ScenarioError(f"{name} must be >= {low}, got {getattr(self, name)}")
        if not isinstance(self.alpha, numbers.Real) or isinstance(self.alpha, bool) \
                or not np.isfinite(self.alpha) or self.alpha <= 0:
            raise ScenarioError(f"alpha (Dirichlet concentration) must be a finite number > 0, got {self.alpha!r}")
        per_task = self.tasks * self.classes_per_task
        if self.classes_per_client != per_task:
            raise ScenarioError(
                f"each client has {self.private} private + {self.public} public = {self.classes_per_client} "
                f"classes, but {self.tasks} tasks x {self.classes_per_task} classes per task = {per_task}; "
                f"private + public must equal tasks x classes_per_task")
        if self.server_per_class and not self.public:
            raise ScenarioError(f"server_per_class={self.server_per_class} reserves samples of the public "
                                "classes for the server, but public is 0; set public > 0 or server_per_class=0")
        if num_classes is not None and self.classes_needed > num_classes:
            raise ScenarioError(
                f"{self.clients} clients x {self.private} private + {self.public} public = "
                f"{self.classes_needed} classes needed, dataset has {num_classes}; "
                f"use fewer clients or fewer private/public classes")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["alpha"] = float(self.alpha)  # 1 and 1.0 must hash alike
        if not self.server_per_class:  # scenarios without a server-held split keep their hashes
            del d["server_per_class"]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ScenarioSpec:
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ScenarioError(f"unknown scenario parameters {unknown}; known: {sorted(names)}")
        missing = sorted(f.name for f in fields(cls) if f.name not in d
                         and f.name not in ("min_per_class", "server_per_class"))
        if missing:
            raise ScenarioError(f"missing scenario parameters {missing}")
        return cls(**d)


def _labels_digest(train_labels: np.ndarray, test_labels: np.ndarray) -> str:
    h = hashlib.sha256()
    for labels in (train_labels, test_labels):
        arr = np.ascontiguousarray(labels, dtype="<i8")
        h.update(len(arr).to_bytes(8, "little"))
        h.update(arr.tobytes())
    return h.hexdigest()


def _canonical(obj: dict) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


@dataclass(frozen=True, eq=False)
class Scenario:
    """Every client's classes, task order and sample indices; built by :func:`build_scenario`.

    ``client_tasks[c][t]``: global class ids of task ``t`` of client ``c`` (in the order drawn).
    ``train_indices[c][t]`` / ``test_indices[c][t]``: sorted int64 indices into the dataset's train/test
    split. ``private_classes[c]``: client ``c``'s own classes (sorted); ``public_classes``: shared (sorted).
    ``labels_sha256`` fingerprints the label arrays the scenario was built from (see :meth:`check_labels`).
    ``server_indices``: sorted training indices of the server-held split (empty without one).
    Two scenarios are equal when their content hashes are.
    """

    spec: ScenarioSpec
    num_classes: int
    client_tasks: list[list[list[int]]]
    train_indices: list[list[np.ndarray]]
    test_indices: list[list[np.ndarray]]
    private_classes: list[list[int]]
    public_classes: list[int]
    labels_sha256: str
    server_indices: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))

    @property
    def num_clients(self) -> int:
        return len(self.client_tasks)

    @property
    def num_tasks(self) -> int:
        return self.spec.tasks

    def client_classes(self, c: int) -> list[int]:
        """All classes of client ``c``, sorted."""
        return sorted(k for task in self.client_tasks[c] for k in task)

    def seen_classes(self, c: int, t: int) -> list[int]:
        """Classes of tasks ``0..t`` of client ``c``, sorted."""
        return sorted(k for task in self.client_tasks[c][: t + 1] for k in task)

    def all_seen_classes(self, t: int) -> list[int]:
        """Union over clients of the classes of tasks ``0..t``, sorted."""
        return sorted({k for c in range(self.num_clients) for k in self.seen_classes(c, t)})

    def used_classes(self) -> list[int]:
        """Every class some client learns, sorted."""
        return sorted({k for c in range(self.num_clients) for k in self.client_classes(c)})

    def client_train_counts(self, c: int, train_labels: np.ndarray) -> np.ndarray:
        """int64 ``(num_classes,)``: training samples of each class on client ``c``."""
        idx = np.concatenate(self.train_indices[c])
        return np.bincount(np.asarray(train_labels)[idx], minlength=self.num_classes).astype(np.int64)

    def public_split(self, train_labels: np.ndarray) -> np.ndarray:
        """int64 ``(public, clients)``: training samples of each public class (rows in
        ``public_classes`` order) on each client."""
        counts = np.stack([self.client_train_counts(c, train_labels) for c in range(self.num_clients)], 1)
        return counts[self.public_classes]

    def check_labels(self, train_labels: np.ndarray, test_labels: np.ndarray) -> None:
        """Raise :class:`ScenarioError` unless these are the label arrays the scenario was built from."""
        digest = _labels_digest(train_labels, test_labels)
        if digest != self.labels_sha256:
            raise ScenarioError(
                f"scenario {self.short_hash} was built for other labels (sha256 {self.labels_sha256[:16]}, "
                f"these are {digest[:16]}); rebuild the scenario for this dataset")

    # -- serialisation -------------------------------------------------------------------------------
    def _payload(self) -> dict:
        clients = []
        for c in range(self.num_clients):
            tasks = [{"classes": [int(k) for k in self.client_tasks[c][t]],
                      "train": self.train_indices[c][t].tolist(),
                      "test": self.test_indices[c][t].tolist()} for t in range(len(self.client_tasks[c]))]
            clients.append({"private_classes": [int(k) for k in self.private_classes[c]], "tasks": tasks})
        out = {"format": FORMAT, "version": VERSION, "spec": self.spec.to_dict(),
               "num_classes": int(self.num_classes), "labels_sha256": self.labels_sha256,
               "public_classes": [int(k) for k in self.public_classes], "clients": clients}
        if self.spec.server_per_class:
            out["server"] = self.server_indices.tolist()
        return out

    def to_json(self) -> str:
        """Canonical JSON (sorted keys, no spaces) with ``"hash"``: sha256 of the same JSON without it."""
        payload = self._payload()
        payload["hash"] = hashlib.sha256(_canonical(payload).encode()).hexdigest()
        return _canonical(payload)

    @property
    def hash(self) -> str:
        """Full sha256 hex digest of the canonical JSON (without the hash field)."""
        return hashlib.sha256(_canonical(self._payload()).encode()).hexdigest()

    @property
    def short_hash(self) -> str:
        """First 16 hex characters of :attr:`hash`, for display."""
        return self.hash[:16]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Scenario):
            return NotImplemented
        return self.hash == other.hash

    def __hash__(self) -> int:
        return hash(self.hash)

    def save(self, path: str | Path) -> None:
        """Write :meth:`to_json` to ``path`` atomically (temporary file in the same folder, then rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="ascii") as f:
                f.write(self.to_json())
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, path: str | Path) -> Scenario:
        """Read a scenario saved by :meth:`save`, verifying its hash."""
        return cls.from_json(Path(path).read_text(encoding="ascii"))

    @classmethod
    def from_json(cls, text: str) -> Scenario:
        """Parse :meth:`to_json` output; raise :class:`ScenarioError` if malformed or the hash does not match."""
        try:
            payload = json.loads(text)
        except json.JSONDecodeError as e:
            raise ScenarioError(f"not a scenario file: invalid JSON ({e})") from None
        if not isinstance(payload, dict) or payload.get("format") != FORMAT:
            raise ScenarioError(f"not a scenario file: missing \"format\": \"{FORMAT}\"")
        if payload.get("version") != VERSION:
            raise ScenarioError(f"scenario format version {payload.get('version')!r} is not supported "
                                f"(this fcl-bench reads version {VERSION}); rebuild the scenario")
        stated = payload.pop("hash", None)
        actual = hashlib.sha256(_canonical(payload).encode()).hexdigest()
        if stated != actual:
            raise ScenarioError(f"scenario hash mismatch: the file says {stated!r} but its content hashes to "
                                f"{actual!r}; the file was edited or corrupted, rebuild it")
        try:
            spec = ScenarioSpec.from_dict(payload["spec"])
            clients = payload["clients"]
            scenario = cls(
                spec=spec, num_classes=int(payload["num_classes"]),
                client_tasks=[[list(t["classes"]) for t in cl["tasks"]] for cl in clients],
                train_indices=[[np.asarray(t["train"], dtype=np.int64) for t in cl["tasks"]] for cl in clients],
                test_indices=[[np.asarray(t["test"], dtype=np.int64) for t in cl["tasks"]] for cl in clients],
                private_classes=[list(cl["private_classes"]) for cl in clients],
                public_classes=list(payload["public_classes"]), labels_sha256=payload["labels_sha256"],
                server_indices=np.asarray(payload.get("server", []), dtype=np.int64))
        except (KeyError, TypeError) as e:
            raise ScenarioError(f"malformed scenario file: {type(e).__name__} {e}") from None
        spec.validate(scenario.num_classes)
        if scenario.num_clients != spec.clients or any(len(t) != spec.tasks for t in scenario.client_tasks):
            raise ScenarioError(f"malformed scenario file: clients/tasks do not match the spec {spec}")
        return scenario


# -- building -----------------------------------------------------------------------------------------

def _check_labels(name: str, labels: np.ndarray, num_classes: int | None) -> np.ndarray:
    arr = np.asarray(labels)
    if arr.ndim != 1:
        raise ScenarioError(f"{name} must be a 1-D array of class ids, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ScenarioError(f"{name} must hold integer class ids, got dtype {arr.dtype}")
    arr = arr.astype(np.int64, copy=False)
    if arr.size and arr.min() < 0:
        raise ScenarioError(f"{name} holds a negative class id ({arr.min()})")
    if arr.size and num_classes is not None and arr.max() >= num_classes:
        raise ScenarioError(f"{name} holds class id {arr.max()} but num_classes is {num_classes}")
    return arr


def _split_counts(sizes: np.ndarray, k: int, alpha: float, min_per_class: int,
                  rng: np.random.Generator) -> np.ndarray:
    """int64 ``(len(sizes), k)``: per class, ``min_per_class`` per client plus the rest by Dirichlet
    proportions with cumulative rounding (each share within 1 of its exact quota; rows sum to ``sizes``)."""
    props = rng.dirichlet(np.full(k, alpha), size=len(sizes))
    bad = ~np.isfinite(props).all(1) | (props.sum(1) <= 0)
    if bad.any():  # older numpy can underflow to 0/0 for tiny alpha: its limit is all on one client
        props[bad] = np.eye(k)[rng.integers(k, size=int(bad.sum()))]
    rest = sizes - k * min_per_class
    edges = np.rint(np.cumsum(props, 1) / props.sum(1, keepdims=True) * rest[:, None]).astype(np.int64)
    edges[:, -1] = rest  # exact totals despite float rounding
    return min_per_class + np.diff(edges, axis=1, prepend=0)


def _reserve_for_server(spec: ScenarioSpec, train: np.ndarray, public: np.ndarray) -> np.ndarray:
    """Sorted training indices of ``server_per_class`` seeded samples of each public class."""
    if not spec.server_per_class:
        return np.empty(0, dtype=np.int64)
    rng = _rng(spec.seed, _STREAM_SERVER)
    keep = []
    for k in public:
        members = np.flatnonzero(train == k)
        need = spec.server_per_class + spec.clients * spec.min_per_class
        if len(members) < need:
            raise ScenarioError(
                f"public class {k} has {len(members)} training samples, but server_per_class "
                f"{spec.server_per_class} + {spec.clients} clients x min_per_class {spec.min_per_class} = "
                f"{need} are needed; lower server_per_class")
        keep.append(rng.permutation(members)[:spec.server_per_class])
    return np.sort(np.concatenate(keep)).astype(np.int64)


def _assign_owners(spec: ScenarioSpec, train: np.ndarray, num_classes: int,
                   private: list[np.ndarray], public: np.ndarray, reserved: np.ndarray) -> np.ndarray:
    """int64 ``(N_train,)``: the client owning each training sample, -1 for classes nobody uses and for
    the ``reserved`` (server-held) samples."""
    owner_of_class = np.full(num_classes, -1, dtype=np.int64)
    for c, classes in enumerate(private):
        owner_of_class[classes] = c
    owner = owner_of_class[train]
    if len(public) == 0:
        return owner
    available = np.ones(len(train), dtype=bool)
    available[reserved] = False
    owner[reserved] = -1
    order = np.argsort(train, kind="stable")
    order = order[available[order]]
    starts = np.searchsorted(train[order], public)
    sizes = np.bincount(train[available], minlength=num_classes)[public]
    short = sizes < spec.clients * spec.min_per_class
    if short.any():
        detail = ", ".join(f"class {k} has {n}" for k, n in zip(public[short], sizes[short]))
        raise ScenarioError(
            f"public classes need {spec.clients} clients x min_per_class {spec.min_per_class} = "
            f"{spec.clients * spec.min_per_class} training samples each, but {detail}; "
            f"lower min_per_class or use fewer clients")
    rng = _rng(spec.seed, _STREAM_PUBLIC)
    counts = _split_counts(sizes, spec.clients, spec.alpha, spec.min_per_class, rng)
    for start, size, row in zip(starts, sizes, counts):
        members = rng.permutation(order[start:start + size])
        owner[members] = np.repeat(np.arange(spec.clients), row)
    return owner


def _split_by_task(idx: np.ndarray, labels: np.ndarray, tasks: list[list[int]],
                   num_classes: int) -> list[np.ndarray]:
    """Split sorted sample indices ``idx`` by the task of their label (samples of other classes dropped)."""
    task_of_class = np.full(num_classes, -1, dtype=np.int64)
    for t, classes in enumerate(tasks):
        task_of_class[classes] = t
    task_of_sample = task_of_class[labels[idx]]
    return [idx[task_of_sample == t] for t in range(len(tasks))]


def build_scenario(spec: ScenarioSpec, train_labels: np.ndarray, test_labels: np.ndarray,
                   num_classes: int | None = None) -> Scenario:
    """Build the scenario for a dataset's labels (int ``(N_train,)`` and ``(N_test,)``).

    Classes: a seeded permutation of the classes present in ``train_labels``; client ``c`` gets block
    ``c`` of the first ``clients * private`` as its private classes, the next ``public`` are public; the
    rest are unused. A private class's training samples all go to its client. First ``server_per_class``
    seeded samples of each public class are set aside as the server-held split; the rest of each public
    class's samples are shuffled and split: every client first gets ``min_per_class`` of them, the rest is split by
    Dirichlet(``alpha``) proportions rounded cumulatively (shares sum exactly, each within one sample of
    its proportion). Each client's classes are shuffled by its own seeded generator and cut into
    ``tasks`` tasks of ``classes_per_task``. A task's test set is every test sample of its classes.
    ``num_classes`` defaults to the largest label + 1. Same inputs -> byte-identical :meth:`Scenario.to_json`.
    """
    train = _check_labels("train_labels", train_labels, num_classes)
    test = _check_labels("test_labels", test_labels, num_classes)
    if train.size == 0:
        raise ScenarioError("train_labels is empty: a scenario needs training samples")
    if num_classes is None:
        num_classes = int(max(train.max(), test.max() if test.size else 0)) + 1
    present = np.unique(train)
    spec.validate(len(present))
    k, p = spec.clients, spec.private
    chosen = _rng(spec.seed, _STREAM_CLASSES).permutation(present)
    private = [np.sort(chosen[c * p:(c + 1) * p]) for c in range(k)]
    public = np.sort(chosen[k * p:k * p + spec.public])
    reserved = _reserve_for_server(spec, train, public)
    owner = _assign_owners(spec, train, num_classes, private, public, reserved)
    all_test = np.arange(len(test), dtype=np.int64)  # a client is tested on every test sample of its classes

    client_tasks, train_idx, test_idx = [], [], []
    for c in range(k):
        mine = _rng(spec.seed, _STREAM_TASKS, c).permutation(np.concatenate([private[c], public]))
        tasks = [mine[t * spec.classes_per_task:(t + 1) * spec.classes_per_task].tolist()
                 for t in range(spec.tasks)]
        client_tasks.append(tasks)
        train_idx.append(_split_by_task(np.flatnonzero(owner == c), train, tasks, num_classes))
        test_idx.append(_split_by_task(all_test, test, tasks, num_classes))
    return Scenario(spec=spec, num_classes=num_classes, client_tasks=client_tasks, train_indices=train_idx,
                    test_indices=test_idx, private_classes=[x.tolist() for x in private],
                    public_classes=public.tolist(), labels_sha256=_labels_digest(train, test),
                    server_indices=reserved)


# -- display ------------------------------------------------------------------------------------------

def scenario_table(scenario: Scenario, class_names: list[str] | None = None) -> str:
    """A plain-text table: one row per client and task (classes, #private/#public, train/test samples),
    a total row per client, and a header with the spec and hash."""
    s = scenario.spec
    lines = [f"scenario {scenario.short_hash}: {s.clients} clients x ({s.private} private + {s.public} public "
             f"classes) = {s.tasks} tasks x {s.classes_per_task} classes; alpha={s.alpha:g}, seed={s.seed}, "
             f"min_per_class={s.min_per_class}; {scenario.num_classes} classes in the dataset",
             f"public classes: {_names(scenario.public_classes, class_names)}"]
    rows = [("client", "task", "private", "public", "train", "test", "classes")]
    for c in range(scenario.num_clients):
        own = set(scenario.private_classes[c])
        total = [0, 0, 0, 0]
        for t, classes in enumerate(scenario.client_tasks[c]):
            n_priv = sum(k in own for k in classes)
            vals = [n_priv, len(classes) - n_priv, len(scenario.train_indices[c][t]),
                    len(scenario.test_indices[c][t])]
            total = [a + b for a, b in zip(total, vals)]
            rows.append((str(c), str(t), *map(str, vals), _names(classes, class_names)))
        rows.append((str(c), "total", *map(str, total), ""))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for i, row in enumerate(rows):
        cells = [row[0].ljust(widths[0]), row[1].ljust(widths[1])]
        cells += [cell.rjust(w) for cell, w in zip(row[2:-1], widths[2:])]
        lines.append("  ".join(cells + [row[-1]]).rstrip())
        if i == 0:
            lines.append("-" * len(lines[-1]))
    return "\n".join(lines)


def _names(classes: list[int], class_names: list[str] | None) -> str:
    if class_names is None:
        return " ".join(str(k) for k in classes)
    return " ".join(f"{k}:{class_names[k]}" for k in classes)
