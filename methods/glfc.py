"""GLFC (Dong et al., CVPR 2022, "Federated Class-Incremental Learning"; official code conditionWang/FCIL),
with all five mechanisms:

1. **Class-aware gradient compensation** (:func:`compensation_weights`, :func:`gc_loss`): BCE on every
   output of the model with one-hot targets, each sample weighted by ``w_i = g_i / mean g`` over its group
   (old-class samples or new-class samples), ``g_i = |sigmoid(z_{i,y_i}) - 1|`` detached; ``w_i = 1`` while
   the client has learned no class.
2. **Class-semantic relation distillation** (:func:`rd_targets`): BCE against the one-hot target whose
   old-class entries are the old model's sigmoid outputs. ``L = 0.5 L_GC + 0.5 L_RD``; ``L_GC`` alone
   while the client holds no old model.
3. **Entropy-based task-transition detection** (:class:`EntropyDetector`): each round, before training, the
   mean softmax entropy of the received global model on the client's current data; a rise of more than
   1.2 over the previous round's value marks a new task.
4. **iCaRL herding memory** (:func:`fcl_bench.nn.exemplars.herding` on L2-normalised features), with
   ``memory / (learned classes)`` exemplars per class, kept in herding order and cut to the new size.
5. **The proxy server** (:class:`GLFCServer`, :class:`BestModels`): on detection rounds each client takes,
   per current class, the real image nearest the class-mean feature (L2-normalised features of its trained
   model), perturbs it by ``perturb_steps`` SGD steps (lr 0.2, wd 1e-5) minimising its local BCE, and uploads
   the gradient of CE through a fixed LeNet (:func:`fcl_bench.nn.inversion.shared_lenet`, U(-0.5, 0.5),
   seeded identically on every client and the server; nothing of it crosses the wire). The server infers
   each label from the last layer's gradient (iDLG), reconstructs each image from N(0, 1) by L-BFGS
   gradient matching (lr 0.1) and keeps the last ``keep_iterates`` iterates as its proxy set (new gradients
   replace the set). Every round it scores the new global model on the proxy set and keeps two old models:
   when new gradients arrive ``best1 <- best2``; then ``best2 <- global`` if its accuracy is ``>=`` the best
   score. The best score is reset at each task change (``Server.start_task``). On a detected transition a
   client distils from best2, else from best1 (the official rule, including that a client keeps its old
   model while the server holds no best2).

Server: plain FedAvg (:class:`fcl_bench.nn.averaging.AveragingServer`, n_k-weighted), BatchNorm running
statistics averaged too (``average_bn_stats``, default on as in the official code, which averages the whole
state dict: the server scores the global model, and best1/best2 serve as old models on every client, so
they need one set of statistics). Small model: the run's CNN (``env.build_small_model``) and a linear head
over all global classes; predictions are the global model's (what every client received last).

How detection and the harness relate: ``start_task(task)`` only swaps the client's current data, as new
data arriving at a real client would; the client never reads the task index. What GLFC decides from a task
boundary -- which classes count as learned (old), when their exemplars are built, which old model it
distils from, when it uploads prototype gradients -- follows its own detection. The classes of the data it
trained on before the latest ``start_task`` wait as ``pending``; on the next detection they become learned
classes and get exemplars (chosen with the received global model, as the official code does before
training). A missed detection leaves them out of the memory (as officially, where ``last_class`` is then
overwritten at the next task); a detection that fires again later in a task adds nothing twice (the
official code re-adds ``last_class`` on every detection). The learning-rate schedule follows the server's
round clock (``RoundInfo``), as the official one follows its global epoch counter.

Defaults and choices (the paper/code silent or not transferable):

* ``loss_classes = "seen"``: BCE, the entropy and the prototype perturbation use the model's outputs of
  the classes the client has seen (the labels of every data it has held), the client-side analogue of the
  official model, whose outputs are the classes introduced so far (its head grows per task); the mean over
  those columns keeps the official loss scale, for which lr 2.0 was tuned. ``"all"`` uses every global
  class (targets 0 for the unseen ones): on the quick preset its mean over 100 columns barely moves the
  model and the entropy stays at log(100), so detection never fires after the first round (measured).
  Old classes for L_RD and the compensation groups: the client's learned classes.
* Memory: ``memory_size = None`` scales the official 2000 exemplars per client (CIFAR-100, 500 training
  images per class) by the scenario's training samples per class: ``round(2000 * n_per_class / 500)``,
  ``n_per_class`` = all clients' training samples over the number of classes in use (80 on the quick preset
  -> 320 exemplars per client).
* Learning rate: SGD lr 2.0, wd 1e-5 (official, at batch 128; the run's batch size is used, 32 on the quick
  preset). On quick, lr 2.0 trains (all clients detect the second task; final acc 0.110, forgetting 0.085)
  where the linearly scaled 0.5 leaves the model uniform (no detection after the first round; 0.082, 0.25);
  at batch 8 on the smoke data lr 2.0 diverged (NaN loss): ``lr = None`` gives ``2.0 * batch_size / 128``;
  optimiser re-created every round (official, no momentum);
  schedule ``official``: lr / 5, / 25, / 125 from 50%, 75%, 90% of a task's local epochs (the official
  100/150/180 of 200 epochs per task); batch size: the run's (official 128).
* Named constants (``constants``): ``official`` = 50 perturbation steps, 250 L-BFGS steps of 20 inner
  iterations, 20 iterates kept; ``offline`` (default, CPU minutes) = 50 perturbation steps, 25 L-BFGS steps
  of 5 inner iterations, 20 iterates kept. ``None`` fields are filled from it; an explicit value wins.
* One input space: prototypes are perturbed, passed through the LeNet, reconstructed and scored in the
  model's normalised input space. (Official traps avoided: its prototypes are ``ToTensor`` images in [0, 1]
  fed to a model trained on normalised inputs, and its reconstructions go through ``ToPILImage`` on
  unclamped floats, which wraps values around in ``byte()``; its label count and 32x32 are hard-coded.)
* No augmentation (the harness hands normalised tensors; the official uses crop/flip/jitter). Clients keep
  the scenario's disjoint data (the official lets clients share all images of a class).
* The server takes the image shape from the client's upload (``protograd.image_shape``, 3 integers): the
  contract gives it no data and no input size.
* Wire: up the model (+ BN statistics) and n_k every round, plus on detection rounds the LeNet gradients
  (``protograd.<j>.<param>``: 85,036 floats per current class at 32x32x3 with 100 classes); down the
  global model every round, plus ``old1.*`` / ``old2.*`` (best1 / best2) whenever that slot changed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from fcl_bench.api import (
    Client,
    ClientEnv,
    DownloadKind,
    Method,
    MethodEnv,
    Payload,
    RoundInfo,
    Server,
    ServerEnv,
    Task,
)
from fcl_bench.config import ConfigError
from fcl_bench.data import Batch, ClientData
from fcl_bench.methods.fedavg import Classifier, FedAvg
from fcl_bench.nn.averaging import (
    N_KEY,
    AveragingServer,
    load_trainable,
    trainable_state,
    upload_with_count,
)
from fcl_bench.nn.distill import frozen_copy
from fcl_bench.nn.exemplars import herding
from fcl_bench.nn.inversion import idlg_labels, input_gradient, invert_gradient, shared_lenet
from fcl_bench.nn.training import optimizer_step, single_sample_guard
from fcl_bench.registry import register
from fcl_bench.state import State

#: Named constants: the official values and cheaper ones for CPU presets (every mechanism kept).
GLFC_CONSTANTS = {
    "official": dict(perturb_steps=50, lbfgs_steps=250, lbfgs_max_iter=20, keep_iterates=20),
    "offline": dict(perturb_steps=50, lbfgs_steps=25, lbfgs_max_iter=5, keep_iterates=20),
}
OFFICIAL_MEMORY, OFFICIAL_PER_CLASS = 2000, 500  # exemplars per client; CIFAR-100 training images per class
PROTO, OLD1, OLD2 = "protograd.", "old1.", "old2."
SHAPE_KEY = PROTO + "image_shape"
LENET_SEED_OFFSET = 0x61F  # the shared LeNet's seed: run seed + this, on every client and the server


@dataclass
class GLFCConfig:
    constants: Literal["offline", "official"] = "offline"  # fills the None fields below
    lr: float | None = 2.0             # SGD (official, at batch 128); None: 2.0 * batch_size / 128
    weight_decay: float = 1e-5
    lr_schedule: Literal["official", "constant"] = "official"
    loss_classes: Literal["seen", "all"] = "seen"
    memory_size: int | None = None     # exemplars per client; None: 2000 * samples per class / 500
    entropy_threshold: float = 1.2     # a rise of the mean entropy above this marks a new task
    perturb_steps: int | None = None   # official 50
    perturb_lr: float = 0.2            # official: lr / 10
    lbfgs_steps: int | None = None     # official 250
    lbfgs_max_iter: int | None = None  # inner iterations per L-BFGS step; official 20 (torch's default)
    lbfgs_lr: float = 0.1
    keep_iterates: int | None = None   # proxy images kept per gradient; official 20
    average_bn_stats: bool = True

    def validate(self) -> None:
        if self.constants not in GLFC_CONSTANTS:
            raise ConfigError(f"glfc.constants must be one of {', '.join(GLFC_CONSTANTS)}; got '{self.constants}'")
        c = self.resolved()
        for name in ("lr", "perturb_lr", "lbfgs_lr", "entropy_threshold"):
            if getattr(c, name) is not None and not getattr(c, name) > 0:
                raise ConfigError(f"glfc.{name} must be > 0, got {getattr(c, name)}")
        for name in ("lbfgs_steps", "lbfgs_max_iter", "keep_iterates"):
            if getattr(c, name) < 1:
                raise ConfigError(f"glfc.{name} must be >= 1, got {getattr(c, name)}")
        if c.perturb_steps < 0 or c.weight_decay < 0:
            raise ConfigError("glfc.perturb_steps and glfc.weight_decay must be >= 0")
        if c.memory_size is not None and c.memory_size < 1:
            raise ConfigError(f"glfc.memory_size must be >= 1 or none (scaled from 2000), got {c.memory_size}")

    def resolved(self) -> GLFCConfig:
        """A copy with every ``None`` constant filled from ``constants`` (explicit values kept)."""
        d = GLFC_CONSTANTS[self.constants]
        return dataclasses.replace(self, **{k: v for k, v in d.items() if getattr(self, k) is None})


# -- losses --------------------------------------------------------------------------------------------------

def compensation_weights(logits: torch.Tensor, labels: torch.Tensor, old_classes: Sequence[int] | torch.Tensor,
                         eps: float = 1e-12) -> torch.Tensor:
    """GLFC's class-aware gradient compensation: ``(N,)`` weights ``g_i / mean_{j in group(i)} g_j`` with
    ``g_i = |sigmoid(z_{i,y_i}) - 1|`` (detached), groups = samples of ``old_classes`` / the others; all ones
    when there is no old class. ``logits``: ``(N, C)`` indexed by class id; ``labels``: ``(N,)``."""
    if len(old_classes) == 0:
        return torch.ones(len(labels), device=logits.device)
    g = (torch.sigmoid(logits.detach().float().gather(1, labels.view(-1, 1)).squeeze(1)) - 1).abs()
    old = torch.isin(labels, torch.as_tensor(old_classes, device=labels.device))
    w = torch.zeros_like(g)
    for group in (old, ~old):
        if group.any():
            w[group] = g[group] / g[group].mean().clamp_min(eps)
    return w


def gc_loss(logits: torch.Tensor, labels: torch.Tensor, old_classes: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """``L_GC = mean_{i,c} w_i BCE(z_ic, onehot(y_i)_c)`` over every column of ``logits`` ``(N, C)``."""
    target = F.one_hot(labels, logits.shape[1]).float()
    w = compensation_weights(logits, labels, old_classes)
    bce = F.binary_cross_entropy_with_logits(logits.float(), target, reduction="none")
    return (w.view(-1, 1) * bce).mean()


def rd_targets(labels: torch.Tensor, old_logits: torch.Tensor, old_columns: torch.Tensor) -> torch.Tensor:
    """Class-semantic relation distillation targets ``(N, C)``: one-hot of ``labels`` with the ``old_columns``
    entries replaced by the old model's ``sigmoid(old_logits)`` there (``old_logits``: ``(N, C)``)."""
    target = F.one_hot(labels, old_logits.shape[1]).float()
    target[:, old_columns] = torch.sigmoid(old_logits.detach().float()[:, old_columns])
    return target


def glfc_loss(logits: torch.Tensor, labels: torch.Tensor, old_columns: torch.Tensor,
              old_logits: torch.Tensor | None) -> torch.Tensor:
    """``0.5 L_GC + 0.5 L_RD`` with an old model, ``L_GC`` without. Columns are positions in ``logits``."""
    loss = gc_loss(logits, labels, old_columns)
    if old_logits is None:
        return loss
    rd = F.binary_cross_entropy_with_logits(logits.float(), rd_targets(labels, old_logits, old_columns))
    return 0.5 * loss + 0.5 * rd


def mean_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Per-sample softmax entropy ``-sum_c p_c log(p_c + 1e-5)`` (the official's form), ``(N,)``."""
    p = torch.softmax(logits.float(), dim=1)
    return -(p * torch.log(p + 1e-5)).sum(1)


@dataclass
class EntropyDetector:
    """Task-transition detection: ``update(h)`` with this round's mean entropy -> whether it rose by more
    than ``threshold`` over the previous round's value (the first value is compared with 0, as officially)."""

    threshold: float = 1.2
    last: float = 0.0

    def update(self, entropy: float) -> bool:
        fired = entropy - self.last > self.threshold
        self.last = float(entropy)
        return fired


@dataclass
class BestModels:
    """The proxy server's bookkeeping of old models (scores and model versions, no weights).

    ``new_gradients()``: new prototype gradients arrived, the proxy set changes: ``best1 <- best2``.
    ``score(acc, version)``: the new global model ``version`` scored ``acc`` on the proxy set: ``best2 <-
    version`` if ``acc >= best`` (and ``best <- acc``). ``task_change()``: the best score is reset (the
    official never resets it, so a later task's models rarely beat an earlier task's score).
    """

    best: float = 0.0
    best1: int | None = None
    best2: int | None = None

    def new_gradients(self) -> None:
        self.best1 = self.best2

    def score(self, acc: float, version: int) -> bool:
        if acc >= self.best:
            self.best, self.best2 = float(acc), version
            return True
        return False

    def task_change(self) -> None:
        self.best = 0.0


def scaled_memory(cfg: GLFCConfig, env: MethodEnv) -> int:
    """Exemplars per client: ``cfg.memory_size`` or the official 2000 scaled by samples per class / 500."""
    if cfg.memory_size is not None:
        return int(cfg.memory_size)
    sc = env.scenario
    used = {c for client in sc.client_tasks for task in client for c in task}
    per_class = sum(map(sum, sc.train_sizes)) / max(1, len(used))
    return max(1, int(round(OFFICIAL_MEMORY * per_class / OFFICIAL_PER_CLASS)))


def lr_factor(schedule: str, epoch: int, total: int) -> float:
    """The official step schedule as a fraction of a task's local epochs: 1, 1/5, 1/25, 1/125 from 0, 50%,
    75%, 90% (its epochs 100, 150, 180 of 200)."""
    if schedule == "constant" or total <= 0:
        return 1.0
    f = epoch / total
    return 1 / 125 if f >= 0.9 else 1 / 25 if f >= 0.75 else 1 / 5 if f >= 0.5 else 1.0


def _model(env: MethodEnv, client: int) -> Classifier:
    return Classifier(env.build_small_model(client), env.small_width, env.scenario.num_classes).to(env.device)


# -- client --------------------------------------------------------------------------------------------------

class GLFCClient(Client):
    def __init__(self, cfg: GLFCConfig, env: ClientEnv):
        self.cfg, self.env, self.id = cfg, env, env.client_id
        self.model = _model(env, env.client_id)  # replaced by the server's w_0 before the first task
        self.memory = scaled_memory(cfg, env)
        self.lr = cfg.lr if cfg.lr is not None else 2.0 * env.batch_size / 128
        self.detector = EntropyDetector(cfg.entropy_threshold)
        self.current: ClientData | None = None       # the data of the latest start_task
        self.pending: ClientData | None = None       # the data before it, until a detection memorises it
        self.learned: list[int] = []                 # classes this client has detected as old
        self.seen: set[int] = set()                  # classes of all data it has held
        self.exemplars: dict[int, np.ndarray] = {}   # class -> dataset indices, herding order
        self.best: dict[str, dict[str, torch.Tensor] | None] = {"old1": None, "old2": None}
        self.old_state: dict[str, torch.Tensor] | None = None  # the old model it distils from
        self.old_model: Classifier | None = None
        self.entropies: list[tuple[int, int, float, bool]] = []  # (task, round, entropy, detected) per round
        self.old_model_changes = 0
        self.perturb_stops = 0  # perturbations stopped early at a non-finite step
        self._lenet = None

    # what the client holds: data views are rebuilt from dataset indices
    def start_task(self, task: Task) -> None:
        self.pending, self.current = self.current, task.train
        self.seen |= set(np.unique(task.train.labels).tolist())  # from the data, not from the task

    def receive(self, download: Payload, kind: DownloadKind) -> None:
        load_trainable(self.model, {k: v for k, v in download.items() if not k.startswith((OLD1, OLD2))})
        for slot, prefix in (("old1", OLD1), ("old2", OLD2)):
            got = {k[len(prefix):]: v for k, v in download.items() if k.startswith(prefix)}
            if got:
                self.best[slot] = got

    # -- the pieces of a round ---------------------------------------------------------------------------
    def _columns(self) -> torch.Tensor:
        """Model outputs the loss, the entropy and the perturbation use (all classes, or the seen ones)."""
        if self.cfg.loss_classes == "all":
            return torch.arange(self.env.scenario.num_classes, device=self.env.device)
        return torch.as_tensor(sorted(self.seen), device=self.env.device)

    @torch.no_grad()
    def _features(self, data: ClientData) -> torch.Tensor:
        self.model.eval()
        feats = [self.model.backbone(b.x).float() for b in data.batches(self.env.eval_batch_size)]
        return F.normalize(torch.cat(feats), dim=1)

    @torch.no_grad()
    def current_entropy(self, columns: torch.Tensor) -> float:
        self.model.eval()
        ents = [mean_entropy(self.model(b.x)[:, columns]) for b in self.current.batches(self.env.eval_batch_size)]
        return float(torch.cat(ents).mean())

    def _memorise(self) -> None:
        """A detected transition: the pending classes become learned; memory cut to ``memory / learned``
        per class, herding exemplars for the pending classes with the received global model."""
        data, self.pending = self.pending, None
        if data is None:
            return
        new = [c for c in np.unique(data.labels).tolist() if c not in self.learned]
        if not new:
            return
        self.learned += new
        m = max(1, self.memory // len(self.learned))
        self.exemplars = {c: ix[:m] for c, ix in self.exemplars.items()}
        feats = self._features(data)
        for c in new:
            pos = np.flatnonzero(data.labels == c)
            order = herding(feats[torch.as_tensor(pos)], m)
            self.exemplars[c] = data.indices[pos[order]]

    def _choose_old_model(self, detected: bool) -> None:
        """best2 on a detected transition, else best1; while the server has no best2, a detection takes
        best1 (then None) and otherwise the client keeps its old model (the official rule)."""
        if self.best["old2"] is not None:
            state = self.best["old2"] if detected else self.best["old1"]
        elif detected:
            state = self.best["old1"]
        else:
            state = self.old_state
        if state is not self.old_state:
            self.old_model_changes += 1
            self._set_old(state)

    def _set_old(self, state: dict[str, torch.Tensor] | None) -> None:
        self.old_state, self.old_model = state, None
        if state is not None:
            model = _model(self.env, self.id)
            load_trainable(model, state)
            self.old_model = frozen_copy(model)

    def _train_data(self) -> ClientData:
        ex = [ix for c, ix in sorted(self.exemplars.items())]
        if not ex:
            return self.current
        return self.env.view(np.concatenate([self.current.indices, *ex]))

    def _train(self, info: RoundInfo, columns: torch.Tensor) -> None:
        env, data = self.env, self._train_data()
        # positions in `columns` of every class id, and of the learned (old) classes
        pos = torch.full((env.scenario.num_classes,), -1, dtype=torch.long, device=env.device)
        pos[columns] = torch.arange(len(columns), device=env.device)
        old_cols = pos[torch.as_tensor(self.learned, dtype=torch.long, device=env.device)]
        total = info.rounds_per_task * env.epochs
        self.model.train()
        with single_sample_guard(env, data, self.model):
            for e in range(env.epochs):
                lr = self.lr * lr_factor(self.cfg.lr_schedule, info.round * env.epochs + e, total)
                # re-created every round, as officially (plain SGD keeps no state anyway)
                opt = torch.optim.SGD(self.model.parameters(), lr=lr, weight_decay=self.cfg.weight_decay)
                for batch in data.batches(env.batch_size, shuffle=True, generator=env.generator):
                    with env.autocast():
                        z = self.model(batch.x)[:, columns]
                        old = None if self.old_model is None else self.old_model(batch.x)[:, columns]
                    loss = glfc_loss(z, pos[batch.y], old_cols, old)
                    optimizer_step(loss, opt, f"client {self.id} GLFC loss")

    def lenet(self, shape: Sequence[int]):
        if self._lenet is None:
            self._lenet = shared_lenet(self.env.seed + LENET_SEED_OFFSET, self.env.scenario.num_classes,
                                       shape, self.env.device)
        return self._lenet

    def prototype_gradients(self, columns: torch.Tensor) -> Payload:
        """Per current class: the image nearest the class mean of the L2-normalised features, perturbed by
        ``perturb_steps`` SGD steps minimising the local BCE, and its CE gradient through the shared LeNet."""
        cfg, data = self.cfg.resolved(), self.current
        feats = self._features(data)
        net = frozen_copy(self.model)
        out: Payload = {}
        pos = {int(c): i for i, c in enumerate(columns.tolist())}
        for j, c in enumerate(np.unique(data.labels).tolist()):
            where = np.flatnonzero(data.labels == c)
            f = feats[torch.as_tensor(where)]
            nearest = where[int(torch.cdist(f.mean(0, keepdim=True), f).argmin())]
            x = data.batch(np.array([nearest])).x.detach().clone().requires_grad_(True)
            target = torch.zeros(1, len(columns), device=x.device)
            target[0, pos[c]] = 1.0
            opt = torch.optim.SGD([x], lr=cfg.perturb_lr, weight_decay=self.cfg.weight_decay)
            for _ in range(cfg.perturb_steps):
                before = x.detach().clone()
                with torch.enable_grad():
                    loss = F.binary_cross_entropy_with_logits(net(x)[:, columns].float(), target)
                    opt.zero_grad()
                    loss.backward(inputs=[x])
                opt.step()
                if not torch.isfinite(x).all():  # a huge input gradient (lr 2.0 models): keep the last finite
                    with torch.no_grad():
                        x.copy_(before)
                    self.perturb_stops += 1
                    break
            lenet = self.lenet(x.shape[1:])
            grads = input_gradient(lenet, x.detach(), torch.tensor([c], device=x.device))
            out.update({f"{PROTO}{j}.{name}": g for (name, _), g in zip(lenet.named_parameters(), grads)})
            out[SHAPE_KEY] = torch.tensor(list(x.shape[1:]), dtype=torch.int64)
        return out

    def train_round(self, info: RoundInfo) -> Payload:
        columns = self._columns()
        entropy = self.current_entropy(columns)
        detected = self.detector.update(entropy)
        self.entropies.append((info.task, info.round, entropy, detected))  # a record; nothing reads the task
        if detected:
            self._memorise()
        self._choose_old_model(detected)
        self._train(info, self._columns())
        up = upload_with_count(trainable_state(self.model, with_bn_stats=self.cfg.average_bn_stats),
                               len(self.current))
        if detected:
            up.update(self.prototype_gradients(self._columns()))
        return up

    @torch.no_grad()
    def predict(self, batch: Batch) -> torch.Tensor:
        self.model.eval()
        return self.model(batch.x)

    # -- state ---------------------------------------------------------------------------------------------
    def state_dict(self) -> State:
        def idx(d: ClientData | None):
            return None if d is None else d.indices

        return {"model": self.model.state_dict(), "current": idx(self.current), "pending": idx(self.pending),
                "learned": list(self.learned), "seen": sorted(self.seen), "exemplars": {int(c): ix for c, ix in self.exemplars.items()},
                "best": dict(self.best), "old_state": self.old_state,
                "old_is": next((k for k, v in self.best.items() if v is not None and v is self.old_state), None),
                "last_entropy": self.detector.last, "entropies": [list(e) for e in self.entropies],
                "old_model_changes": self.old_model_changes}

    def load_state_dict(self, state: State) -> None:
        dev = self.env.device
        self.model.load_state_dict(state["model"])
        self.current = None if state["current"] is None else self.env.view(np.asarray(state["current"]))
        self.pending = None if state["pending"] is None else self.env.view(np.asarray(state["pending"]))
        self.learned = [int(c) for c in state["learned"]]
        self.seen = {int(c) for c in state["seen"]}
        self.exemplars = {int(c): np.asarray(ix, dtype=np.int64) for c, ix in state["exemplars"].items()}
        self.best = {k: None if v is None else {n: t.to(dev) for n, t in v.items()} for k, v in state["best"].items()}
        old = state["old_state"]
        # keep the identity "old model is best1/best2" that _choose_old_model counts changes by
        self.old_state = self.best[state["old_is"]] if state.get("old_is") else (
            None if old is None else {n: t.to(dev) for n, t in old.items()})
        self._set_old(self.old_state)
        self.detector.last = float(state["last_entropy"])
        self.entropies = [(int(t), int(r), float(h), bool(d)) for t, r, h, d in state["entropies"]]
        self.old_model_changes = int(state["old_model_changes"])


# -- server --------------------------------------------------------------------------------------------------

class GLFCServer(AveragingServer):
    """FedAvg plus the proxy server: iDLG labels and L-BFGS reconstructions of the prototype gradients, the
    proxy set (the last iterates), the scores of every new global model on it and best1/best2."""

    def __init__(self, cfg: GLFCConfig, env: ServerEnv, initial):
        super().__init__(env, initial)
        self.cfg = cfg.resolved()
        self.book = BestModels()
        self.version = 0  # of the global model
        self.models: dict[int, dict[str, torch.Tensor]] = {}  # version -> state, for best1/best2
        self.proxy_x: torch.Tensor | None = None
        self.proxy_y: torch.Tensor | None = None
        self.scores: list[float] = []
        self.reconstruction_losses: list[tuple[float, float]] = []  # (first, last) matching loss per image
        self._lenet = None
        self._scorer: Classifier | None = None

    def start_task(self, task_index: int) -> Mapping[int, Payload]:
        if task_index > 0:
            self.book.task_change()
        return super().start_task(task_index)

    def _reconstruct(self, grads: list[dict[str, torch.Tensor]], shape: Sequence[int]) -> None:
        env, cfg = self.env, self.cfg
        if self._lenet is None:
            self._lenet = shared_lenet(env.seed + LENET_SEED_OFFSET, env.scenario.num_classes, shape, env.device)
        names = [n for n, _ in self._lenet.named_parameters()]
        labels = idlg_labels(torch.stack([g["fc.weight"] for g in grads]))
        xs, ys = [], []
        for g, y in zip(grads, labels.tolist()):
            target = [g[n].to(env.device).float() for n in names]
            it, losses = invert_gradient(self._lenet, target, y, shape, cfg.lbfgs_steps, cfg.keep_iterates,
                                         lr=cfg.lbfgs_lr, max_iter=cfg.lbfgs_max_iter, generator=env.generator)
            self.reconstruction_losses.append((losses[0], losses[-1]))
            xs.append(it)
            ys.append(torch.full((len(it),), y, dtype=torch.long))
        self.proxy_x, self.proxy_y = torch.cat(xs).to(env.device), torch.cat(ys).to(env.device)

    @torch.no_grad()
    def _score(self) -> float:
        if self._scorer is None:
            self._scorer = _model(self.env, 0)
        load_trainable(self._scorer, self.global_state)
        self._scorer.eval()
        correct = 0
        for i in range(0, len(self.proxy_y), self.env.eval_batch_size):
            z = self._scorer(self.proxy_x[i:i + self.env.eval_batch_size])
            correct += int((z.argmax(1) == self.proxy_y[i:i + self.env.eval_batch_size]).sum())
        return correct / len(self.proxy_y)

    def aggregate(self, uploads: Mapping[int, Payload], info: RoundInfo) -> Mapping[int, Payload]:
        grads: list[dict[str, torch.Tensor]] = []
        shape = None
        models = {}
        for c in sorted(uploads):
            up = uploads[c]
            models[c] = {k: v for k, v in up.items() if not k.startswith(PROTO)}
            if SHAPE_KEY in up:
                shape = [int(s) for s in up[SHAPE_KEY].tolist()]
            per: dict[str, dict[str, torch.Tensor]] = {}
            for k, v in up.items():
                if k.startswith(PROTO) and k != SHAPE_KEY:
                    j, name = k[len(PROTO):].split(".", 1)
                    per.setdefault(j, {})[name] = v
            grads += [per[j] for j in sorted(per, key=int)]
        downloads = super().aggregate(models, info)
        if not downloads:
            return downloads
        self.version += 1
        self.models[self.version] = self.global_state
        before = (self.book.best1, self.book.best2)
        if grads:
            self._reconstruct(grads, shape)
            self.book.new_gradients()
        if self.proxy_y is not None:
            acc = self._score()
            self.scores.append(acc)
            self.book.score(acc, self.version)
        self.models = {v: s for v, s in self.models.items() if v in (self.book.best1, self.book.best2)}
        extra: dict[str, torch.Tensor] = {}
        for slot, prefix, was in (("best1", OLD1, before[0]), ("best2", OLD2, before[1])):
            now = getattr(self.book, slot)
            if now is not None and now != was:  # the old model goes down when it changes
                extra.update({prefix + k: v for k, v in self.models[now].items()})
        return {c: {**p, **extra} for c, p in downloads.items()}

    def state_dict(self) -> State:
        return {**super().state_dict(), "version": self.version, "models": {int(v): s for v, s in self.models.items()},
                "book": dataclasses.asdict(self.book), "proxy_x": self.proxy_x, "proxy_y": self.proxy_y,
                "scores": list(self.scores), "reconstruction_losses": [list(x) for x in self.reconstruction_losses]}

    def load_state_dict(self, state: State) -> None:
        super().load_state_dict(state)
        dev = self.env.device
        self.version = int(state["version"])
        self.models = {int(v): {k: t.to(dev) for k, t in s.items()} for v, s in state["models"].items()}
        self.book = BestModels(**state["book"])
        self.proxy_x = None if state["proxy_x"] is None else state["proxy_x"].to(dev)
        self.proxy_y = None if state["proxy_y"] is None else state["proxy_y"].to(dev)
        self.scores = [float(s) for s in state["scores"]]
        self.reconstruction_losses = [tuple(x) for x in state["reconstruction_losses"]]


@register
class GLFC(Method):
    name = "glfc"
    description = ("GLFC: gradient-compensated BCE, relation distillation, entropy task detection, herding memory, "
                   "proxy server (LeNet gradient inversion, best old models); FedAvg server")
    Config = GLFCConfig
    uses_foundation = False
    uploads = ("backbone.*", "head.*", N_KEY, PROTO + "*")

    def __init__(self, config: GLFCConfig, env: MethodEnv):
        config.validate()
        super().__init__(config.resolved(), env)
        if len(set(env.small_archs)) > 1:
            raise ValueError(f"{self.name} averages one model, so every client needs the same small-model arch; "
                             f"got {env.small_archs}")
        c = self.config
        lr = c.lr if c.lr is not None else 2.0 * env.batch_size / 128
        env.log(f"[glfc] lr={lr:g}, constants={c.constants}: perturb_steps={c.perturb_steps} lbfgs_steps={c.lbfgs_steps} "
                f"lbfgs_max_iter={c.lbfgs_max_iter} keep_iterates={c.keep_iterates}; memory "
                f"{scaled_memory(c, env)} exemplars per client")

    def client(self, client_id: int, env: ClientEnv) -> Client:
        return GLFCClient(self.config, env)

    def server(self, env: ServerEnv) -> Server:
        return GLFCServer(self.config, env, FedAvg.global_model(env, self.config.average_bn_stats)[1])
