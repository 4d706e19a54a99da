"""FedMGP: multi-granularity prompts (Yu et al., KDD 2024), with server-side prompt fusion by distillation.

Official code: SkyOfBeginning/FedMGP (``Models/Client_DF.py``, ``Models/Server_DF.py``,
``Models/vision_transformer.py`` with ``method='delay'``, ``config/cifar100_delay.py``).

Two paths on the shared frozen ViT (never trained, never a submodule of a client's model):

* **query path**: the frozen ViT without prompts; its final-norm CLS feature (the run's feature cache) is the
  query of the global prompt's key (``embedding_key='cls'``, the official ``original_model``'s pre-logits);
* **global path**: a global prompt (a :class:`~fcl_bench.nn.prompts.PromptPool` of 1, ``length`` 15 tokens,
  one key) inserted after the CLS token at layer 0; feature = mean of the output tokens at the prompt
  positions (``head_type='prompt'``); global head = MLP ``d -> 512 -> C``;
* **local path**: the same input tokens (patches + the global prompt, no gradient) with one of
  ``C`` class-wise prefix prompts (:class:`~fcl_bench.nn.prompts.PrefixPool`, ``local_length`` 15 tokens,
  blocks ``local_layers`` 2-4, learnable keys); its query is the global path's pre-logits; feature = mean of
  the output tokens at the global prompt's positions; local head = MLP ``d -> 512 -> C``. The local path
  shares blocks ``0 .. min(local_layers) - 1`` with the global path (they see the same tokens there), so
  those are computed once.

Client, every round (official ``Client_DF.train``):

1. stage 1: train the global prompt, its key and the global head: ``CE(logits with classes outside the
   current task at -inf, y) - pull_lambda * pull`` (pull = cosine of the frozen CLS query with the key);
2. stage 2: stage 1's parameters frozen (the global path runs under ``no_grad``); train the local prompts,
   their keys and the local head with the same loss on the local path, the prefix chosen by the **true
   class** (``prompt_mask = class_id``) and the pull term on that class's key (query: the global
   pre-logits). At inference the prefix is the top-1 key match, per sample.

Adam ``lr`` 1.875e-3, weight decay 1e-3, gradient-norm clipping 1.0; a fresh Adam for each stage of each
round (the official code builds both optimisers inside ``train``, every round). Predictions are the local
path's logits (the official evaluation "using local prompts").

Server, every round (``Server_DF.kd_fusion_prompt``): start from the global prompt of the lowest-id
participant; minimise ``sum_j sum ||f(x; P) - f(x; P_j)||^2`` over every other participant ``j`` (f = the
frozen ViT's final-norm output tokens, all of them, with the global prompt inserted; ``MSELoss(
reduction='sum')``) with Adam (``server_lr``, weight decay 1e-3, no clipping) for ``server_epochs`` passes
over the **server-held split** (``-o server_per_class=N``), restricted to the classes of the participants'
current tasks (``distill_data='current'``, the official choice; all of the split when none of those
classes is public); broadcast the fused prompt and key to every client. The key gets no gradient in the
fusion (a pool of one is always selected), so the fused key is the starting client's key, as in the
official code. Communicated, each way: the global prompt and its key, ``(length + 1) * d`` floats (12,288
at length 15, d = 768). Local prompts, local head and global head never leave a client.

Choices where paper and code are silent (or where the code has a bug), recorded here and in the Config:
  * the surrogate set: the official code takes 20 samples per class from the **test** split, for all 100
    classes; we use the scenario's server-held split (public-class training samples that no client holds).
    Without one the method fails at once, naming ``-o server_per_class=N``;
  * one local head over all classes per client, kept across tasks. The official code keeps one local head
    per task and, at test time, picks the test task's head and masks logits to that task's classes: that
    is task identity at test time (task-incremental), which class-incremental evaluation does not allow;
  * the local pool has one prefix per class of the dataset (the official pool of 100 on CIFAR-100);
  * key matching at inference over every key (official); ``key_match='seen'`` (a labelled option) limits
    it to the client's seen classes;
  * every client initialises its own prompts, keys and heads (seeded per client), as the official code's
    re-initialisation after each client does; there is no start broadcast;
  * the official server also fuses global heads by CE on the surrogate set, but never sends the result,
    so the global head stays local: we do not compute it;
  * the official clients share one model object in the simulation, so in a task's first round each client
    starts from the previous client's heads (an unaccounted transfer): our clients share nothing;
  * the official local-stage class mask uses ``np.arange(200)`` (fails on 100 classes); we mask to the
    current task's classes as in stage 1;
  * per-sample selection by default; the official ``batchwise_prompt=True`` (the most frequent key of the
    batch, also at test time) is the labelled option ``batchwise``;
  * positional embedding of the global prompt: the CLS token's (``prompt_pos_embed='cls'``: the official
    ``resize_pos_embed`` copies the CLS entry over the prompt positions);
  * no data augmentation (the official code uses RandomResizedCrop + flip): the frozen-feature cache is
    valid only without it, as for every other method of this suite; inputs follow the foundation model's
    ``Preprocess`` (the official code feeds [0, 1] images);
  * heads initialised like timm ViT heads (truncated normal, std 0.02, zero bias; the official model's
    ``init_weights``), prompts and keys ``uniform(-1, 1)``;
  * the server's Adam uses the clients' lr unless ``server_lr`` is set, and the run's ``epochs`` unless
    ``server_epochs`` is set (the official code uses its local epochs); batches of the run's batch size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

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
from fcl_bench.nn.averaging import load_trainable, seeded, trainable_state
from fcl_bench.nn.heads import masked_logits
from fcl_bench.nn.prompt_methods import fit_layers
from fcl_bench.nn.prompts import (
    PrefixPool,
    PromptPool,
    forward_with_prompts,
    insert_prompts,
    mean_prompt_tokens,
    pull_loss,
    select_by_keys,
)
from fcl_bench.nn.training import optimizer_step, train_epochs
from fcl_bench.nn.vit_ops import block_forward, run_blocks
from fcl_bench.registry import register
from fcl_bench.state import State

#: The payload names of the global prompt ``(1, length, d)`` and its key ``(1, d)``: all that crosses the wire.
PROMPT, KEY = "global_pool.prompts", "global_pool.keys"


@dataclass
class FedMGPConfig:
    length: int = 15                           # global prompt tokens (a pool of 1, top-1)
    local_length: int = 15                     # tokens of each local prefix (per block, K and V each)
    local_layers: tuple[int, ...] = (2, 3, 4)  # local prefix blocks (clamped to the model's depth)
    head_hidden: int = 512                     # both heads: MLP d -> head_hidden -> C
    pull_lambda: float = 0.1                   # weight of the key pull term (both stages)
    lr: float = 1.875e-3                       # Adam, both stages
    weight_decay: float = 1e-3                 # Adam weight decay, clients and server
    clip_grad: float = 1.0                     # max gradient norm (<= 0: off), clients
    train_mask: bool = True                    # logits outside the current task set to -inf in training
    prompt_pos_embed: Literal["none", "cls"] = "cls"  # the global prompt's positional embedding
    init: Literal["uniform", "zero"] = "uniform"      # prompts and keys
    batchwise: bool = False                    # official batch-wise key match (batch-dependent predictions)
    key_match: Literal["all", "seen"] = "all"  # keys matched at inference: all (official) | the seen classes'
    server_lr: float | None = None             # fusion Adam lr; None: lr
    server_epochs: int | None = None           # passes over the server-held split per fusion; None: run's epochs
    distill_data: Literal["current", "all"] = "current"  # server samples of the participants' current classes | all

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first field that cannot work."""
        for k in ("length", "local_length", "head_hidden"):
            if getattr(self, k) < 1:
                raise ConfigError(f"fedmgp.{k} must be >= 1, got {getattr(self, k)}")
        if not self.local_layers or min(self.local_layers) < 0:
            raise ConfigError(f"fedmgp.local_layers needs block indices >= 0, e.g. local_layers=2,3,4; "
                              f"got {list(self.local_layers)}")
        for k in ("lr", "server_lr"):
            v = getattr(self, k)
            if v is not None and v <= 0:
                raise ConfigError(f"fedmgp.{k} must be > 0, got {v}")
        if self.weight_decay < 0:
            raise ConfigError(f"fedmgp.weight_decay must be >= 0, got {self.weight_decay}")
        if self.server_epochs is not None and self.server_epochs < 1:
            raise ConfigError(f"fedmgp.server_epochs must be >= 1 (or none for the run's epochs), "
                              f"got {self.server_epochs}")


def mlp_head(dim: int, hidden: int, num_classes: int) -> nn.Sequential:
    """FedMGP's heads: ``Linear(d, hidden) -> ReLU -> Linear(hidden, C)``, initialised like timm's ViT heads."""
    head = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))
    for m in head:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)
    return head


class FedMGPModel(nn.Module):
    """A client's trainable part.

    ``global_pool``: prompts ``(1, length, d)``, keys ``(1, d)``; ``global_head``: MLP ``d -> hidden -> C``;
    ``local_pool``: prefixes ``(C, len(layers), 2, local_length, d)``, keys ``(C, d)`` (one per class);
    ``local_head``: MLP ``d -> hidden -> C``.
    """

    def __init__(self, cfg: FedMGPConfig, layers: tuple[int, ...], dim: int, num_classes: int):
        super().__init__()
        self.global_pool = PromptPool(1, cfg.length, dim, init=cfg.init)
        self.global_head = mlp_head(dim, cfg.head_hidden, num_classes)
        self.local_pool = PrefixPool(num_classes, layers, cfg.local_length, dim, init=cfg.init)
        self.local_head = mlp_head(dim, cfg.head_hidden, num_classes)

    def stage1_parameters(self) -> list[nn.Parameter]:
        """Global prompt, its key, the global head."""
        return [*self.global_pool.parameters(), *self.global_head.parameters()]

    def stage2_parameters(self) -> list[nn.Parameter]:
        """Local prompts, their keys, the local head."""
        return [*self.local_pool.parameters(), *self.local_head.parameters()]


class GlobalOut(NamedTuple):
    """The global path on a batch: pre-logits ``feat (B, d)``, the tokens entering the first local block
    ``trunk (B, N + length, d)``, the key similarities ``sim (B, 1)`` and indices ``idx (B, 1)``."""

    feat: Tensor
    trunk: Tensor
    sim: Tensor
    idx: Tensor


class FedMGPClient(Client):
    def __init__(self, cfg: FedMGPConfig, env: ClientEnv, layers: tuple[int, ...]):
        self.cfg, self.env, self.layers = cfg, env, layers
        self.vit = env.foundation.vit
        self.split = min(layers)  # blocks before it are shared by both paths
        dim, c = env.foundation.embed_dim, env.scenario.num_classes
        seed = env.seed * 1000 + env.client_id + 1
        self.model = seeded(seed, lambda: FedMGPModel(cfg, layers, dim, c)).to(env.device)
        self.task: Task | None = None

    # -- the two paths ---------------------------------------------------------------------------
    def global_path(self, batch: Batch) -> GlobalOut:
        """Global prompt keyed by the frozen CLS query (cache), inserted after CLS; the shared trunk."""
        pool, vit = self.model.global_pool, self.vit
        idx, sim = pool.select(self.env.features.cls(batch).float(), 1)
        h = insert_prompts(vit, self.env.features.prefix(batch, 0), pool.gather(idx), self.cfg.prompt_pos_embed)
        trunk = run_blocks(vit, h, 0, self.split)
        out = vit.norm(run_blocks(vit, trunk, self.split, len(vit.blocks)))
        return GlobalOut(mean_prompt_tokens(vit, out, self.cfg.length), trunk, sim, idx)

    def local_path(self, trunk: Tensor, idx: Tensor) -> Tensor:
        """Blocks from ``split`` on with the class prefixes ``idx (B, 1)`` -> feature ``(B, d)`` at the global
        prompt's positions."""
        prefixes = self.model.local_pool.gather(idx)
        h = trunk
        for i in range(self.split, len(self.vit.blocks)):
            blk = self.vit.blocks[i]
            h = block_forward(blk, h, prefix_kv=prefixes[i]) if i in prefixes else blk(h)
        return mean_prompt_tokens(self.vit, self.vit.norm(h), self.cfg.length)

    def local_select(self, query: Tensor) -> Tensor:
        """Top-1 local key match per sample (inference) -> class-prefix indices ``(B, 1)``."""
        keys = self.model.local_pool.keys
        if self.cfg.key_match == "seen" and self.task is not None:
            seen = torch.as_tensor(self.task.seen_classes, device=keys.device)
            sub, _ = select_by_keys(query, keys[seen], 1, self.cfg.batchwise)
            return seen[sub]
        return select_by_keys(query, keys, 1, self.cfg.batchwise)[0]

    @staticmethod
    def _head(head: nn.Module, feat: Tensor) -> Tensor:
        return head(feat.to(head[0].weight.dtype)).float()

    # -- losses ------------------------------------------------------------------------------------
    def _mask(self, logits: Tensor) -> Tensor:
        if not self.cfg.train_mask:
            return logits
        return masked_logits(logits, torch.as_tensor(self.task.classes, device=logits.device))

    def stage1_loss(self, batch: Batch) -> Tensor:
        g = self.global_path(batch)
        logits = self._mask(self._head(self.model.global_head, g.feat))
        return F.cross_entropy(logits, batch.y) - self.cfg.pull_lambda * pull_loss(g.sim, g.idx).float()

    def stage2_loss(self, batch: Batch) -> Tensor:
        with torch.no_grad():
            g = self.global_path(batch)
        query = g.feat.float()
        idx = batch.y.to(query.device).unsqueeze(1)  # the true class's prefix and key
        sim = F.normalize(query, dim=1) @ F.normalize(self.model.local_pool.keys, dim=1).T
        logits = self._mask(self._head(self.model.local_head, self.local_path(g.trunk, idx)))
        return F.cross_entropy(logits, batch.y) - self.cfg.pull_lambda * pull_loss(sim, idx)

    def _train(self, params: list[nn.Parameter], loss_fn) -> None:
        opt = torch.optim.Adam(params, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)

        def clip() -> None:
            if self.cfg.clip_grad > 0:
                nn.utils.clip_grad_norm_(params, self.cfg.clip_grad)
        train_epochs(self.env, self.task.train, loss_fn, opt, clip)

    def stage1(self) -> None:
        """Train the global prompt, its key and the global head (a fresh Adam)."""
        self._train(self.model.stage1_parameters(), self.stage1_loss)

    def stage2(self) -> None:
        """Train the local prompts, their keys and the local head; stage 1's parameters stay as they are."""
        self._train(self.model.stage2_parameters(), self.stage2_loss)

    # -- protocol ----------------------------------------------------------------------------------
    def start_task(self, task: Task) -> None:
        self.task = task

    def train_round(self, info: RoundInfo) -> Payload:
        self.model.train()
        self.stage1()
        self.stage2()
        return trainable_state(self.model.global_pool, prefix="global_pool.")

    def receive(self, download: Payload, kind: DownloadKind) -> None:
        load_trainable(self.model.global_pool, download, prefix="global_pool.")

    @torch.no_grad()
    def predict(self, batch: Batch) -> Tensor:
        self.model.eval()
        g = self.global_path(batch)
        idx = self.local_select(g.feat.float())
        return self._head(self.model.local_head, self.local_path(g.trunk, idx))

    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def state_dict(self) -> State:
        # both optimisers are rebuilt every round: the model and the task are the whole state
        return {"model": self.model.state_dict(), "task": -1 if self.task is None else self.task.index}

    def load_state_dict(self, state: State) -> None:
        self.model.load_state_dict(state["model"])
        self.task = self.env.task(state["task"]) if state["task"] >= 0 else None


def token_mse(out: Tensor, targets: list[Tensor]) -> Tensor:
    """The fusion objective on a batch: ``sum_j sum (out - targets[j])^2`` over samples, tokens and width
    (the official ``MSELoss(reduction='sum')`` summed over teachers). ``out``, ``targets[j]``: ``(B, N, d)``."""
    return sum(((out.float() - t.float()) ** 2).sum() for t in targets)


class FedMGPServer(Server):
    """Fuses the participants' global prompts by distillation on the server-held split; broadcasts the result.

    After each :meth:`aggregate`: ``last_losses`` (the objective per step), ``last_indices`` (the dataset
    indices the fusion read), for tests and logs.
    """

    def __init__(self, cfg: FedMGPConfig, env: ServerEnv):
        self.cfg, self.env = cfg, env
        self.vit = env.foundation.vit
        self.global_state: dict[str, Tensor] = {}
        self.last_losses: list[float] = []
        self.last_indices = np.empty(0, dtype=np.int64)

    def tokens(self, batch: Batch, prompt: Tensor) -> Tensor:
        """The frozen ViT's final-norm output tokens ``(B, N + length, d)`` with global prompt ``(1, length, d)``."""
        return forward_with_prompts(self.vit, self.env.features.prefix(batch, 0), prompts=prompt,
                                    prompt_pos_embed=self.cfg.prompt_pos_embed)

    def distill_data(self, info: RoundInfo, ids: list[int]) -> ClientData:
        """The server-held samples of the participants' current classes (all of them when none is held)."""
        data = self.env.server_data
        if self.cfg.distill_data == "current":
            classes = {c for i in ids for c in self.env.scenario.client_tasks[i][info.task]}
            pos = np.flatnonzero(np.isin(data.labels, sorted(classes)))
            if len(pos):
                return data.subset(pos)
        return data

    def objective(self, prompt: Tensor, teachers: list[Tensor], data: ClientData) -> float:
        """The fusion objective summed over ``data`` (no gradient)."""
        total = 0.0
        with torch.no_grad(), self.env.autocast():
            for batch in data.batches(self.env.batch_size):
                total += float(token_mse(self.tokens(batch, prompt), [self.tokens(batch, t) for t in teachers]))
        return total

    def fuse(self, start: Tensor, teachers: list[Tensor], data: ClientData) -> Tensor:
        """Adam on ``token_mse`` from ``start`` against ``teachers`` (prompts ``(1, length, d)``) over ``data``."""
        prompt = nn.Parameter(start.detach().clone().float())
        opt = torch.optim.Adam([prompt], lr=self.cfg.server_lr or self.cfg.lr, weight_decay=self.cfg.weight_decay)
        self.last_losses, seen = [], []
        for _ in range(self.cfg.server_epochs or self.env.epochs):
            for batch in data.batches(self.env.batch_size, shuffle=True, generator=self.env.generator):
                seen.append(batch.index.cpu().numpy())
                with self.env.autocast():
                    with torch.no_grad():
                        targets = [self.tokens(batch, t) for t in teachers]
                    loss = token_mse(self.tokens(batch, prompt), targets)
                optimizer_step(loss, opt, "server prompt-fusion loss")
                self.last_losses.append(float(loss.detach()))
        self.last_indices = np.unique(np.concatenate(seen)) if seen else np.empty(0, dtype=np.int64)
        return prompt.detach()

    def aggregate(self, uploads: dict[int, Payload], info: RoundInfo) -> dict[int, Payload]:
        ids = sorted(c for c in uploads if uploads[c])
        if not ids:
            return {}
        first = uploads[ids[0]]  # the lowest-id participant's prompt is the starting point (official)
        prompt = first[PROMPT]
        if len(ids) > 1:
            teachers = [uploads[c][PROMPT] for c in ids[1:]]
            prompt = self.fuse(prompt, teachers, self.distill_data(info, ids)).to(first[PROMPT].dtype)
        self.global_state = {PROMPT: prompt, KEY: first[KEY]}  # no gradient reaches the key: the first's
        return {c: self.global_state for c in range(self.env.scenario.num_clients)}

    def state_dict(self) -> State:
        return {"global": dict(self.global_state)}

    def load_state_dict(self, state: State) -> None:
        self.global_state = {k: v.to(self.env.device) for k, v in state["global"].items()}


@register
class FedMGP(Method):
    name = "fedmgp"
    description = ("FedMGP: global prompt + class-wise local prefixes on the frozen ViT; global prompts fused "
                   "by distillation on the server-held split")
    Config = FedMGPConfig
    uploads = ("global_pool.*",)

    def __init__(self, config: FedMGPConfig, env: MethodEnv):
        super().__init__(config, env)
        config.validate()
        if env.scenario.server_samples == 0:
            raise ConfigError(
                "fedmgp fuses the clients' global prompts by distillation on the server-held split, and this "
                "scenario has none: add -o server_per_class=N (N training samples of each public class, held by "
                "no client; it needs public > 0). The official code distils on test data; this suite does not.")
        if getattr(env.foundation.vit, "cls_token", None) is None:
            raise ValueError("fedmgp queries the global prompt's key with the frozen CLS feature; this "
                             "foundation model has no class token (use a ViT with class_token=True)")
        depth = env.foundation.depth
        self.layers = fit_layers(config.local_layers, depth)
        if self.layers != tuple(config.local_layers):
            env.log(f"[fedmgp] the foundation model has {depth} blocks: local prefixes on blocks {self.layers}")

    def client(self, client_id: int, env: ClientEnv) -> Client:
        return FedMGPClient(self.config, env, self.layers)

    def server(self, env: ServerEnv) -> Server:
        return FedMGPServer(self.config, env)


__all__ = ["FedMGP", "FedMGPClient", "FedMGPConfig", "FedMGPModel", "FedMGPServer", "mlp_head", "token_mse"]
