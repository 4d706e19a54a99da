"""What the prompt methods (FedAvg+L2P, FedAvg+DualPrompt) share: the client loop, the head, the server.

A :class:`PromptClient` owns a small ``nn.Module`` (prompts and/or prefixes, their keys, a linear head) and
only *reads* the shared frozen ViT (``env.foundation.vit``), which is never a submodule of it: its weights
never reach an optimiser, a payload or ``train()``. Both inputs of the frozen model come from the run's
feature cache: the query (final-norm CLS feature of the unprompted model, ``env.features.cls``) and the
embedded tokens entering block 0 (``env.features.prefix(batch, 0)``), so the patch embedding is computed
once per sample and run.

Per step (official L2P / DualPrompt engines): ``CE(masked logits, y) - lambda * pull``, where the training
class mask sets the logits of classes outside the *current task* to ``-inf``; gradient-norm clipping
(default 1.0, both codes); Adam re-created at every task start (``reinit_optimizer``). Upload: every
trainable tensor plus ``n_k``; the server (:func:`prompt_server`) is an
:class:`~fcl_bench.nn.averaging.AveragingServer` that broadcasts its seeded initial prompts, keys and head
at the first task start, so every client starts from the same ones (averaging independently drawn
``uniform(-1, 1)`` prompts would shrink them towards zero).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fcl_bench.api import ClientEnv, DownloadKind, Payload, RoundInfo, ServerEnv, Task
from fcl_bench.data import Batch
from fcl_bench.nn.averaging import AveragingServer, load_trainable, seeded, trainable_state, upload_with_count
from fcl_bench.nn.heads import masked_logits
from fcl_bench.nn.training import ModelClient, train_epochs

__all__ = ["PromptClient", "fit_layers", "linear_head", "prompt_server", "scaled_lr"]


def scaled_lr(base_lr: float, batch_size: int) -> float:
    """The official codes' learning-rate rule: ``base_lr * batch_size / 256``."""
    return base_lr * batch_size / 256.0


def linear_head(dim: int, num_classes: int) -> nn.Linear:
    """A head over all classes, initialised like timm's ViT head (truncated normal std 0.02, zero bias),
    as in the PyTorch ports of L2P and DualPrompt."""
    head = nn.Linear(dim, num_classes)
    nn.init.trunc_normal_(head.weight, std=0.02)
    nn.init.zeros_(head.bias)
    return head


def prompt_server(env: ServerEnv, build: Callable[[], nn.Module]) -> AveragingServer:
    """An averaging server whose initial global model is ``build()`` under the run's seed."""
    return AveragingServer(env, lambda: trainable_state(seeded(env.seed, build).to(env.device)))


def fit_layers(layers: Sequence[int], depth: int) -> tuple[int, ...]:
    """Block indices for prompts on a ViT of ``depth`` blocks: indices past the last block are clamped to it,
    duplicates dropped, order kept. ``(2, 3, 4)`` on depth 4 -> ``(2, 3)``; on depth 2 -> ``(1,)``."""
    if any(i < 0 for i in layers):
        raise ValueError(f"prompt layers must be >= 0, got {list(layers)}")
    out: list[int] = []
    for i in layers:
        j = min(int(i), depth - 1)
        if j not in out:
            out.append(j)
    return tuple(out)


class PromptClient(ModelClient):
    """Local training of ``model`` (prompts, keys, head) on the frozen ViT; subclasses define :meth:`forward`.

    Args:
        env: the client's environment (frozen model, feature cache, batch size, epochs).
        model: the trainable module; it must not contain the frozen ViT (its initial values are replaced
            by the server's broadcast).
        lr: Adam learning rate. clip_grad: max gradient norm (<= 0: no clipping).
        pull_lambda: weight of the key pull term. train_mask: mask logits outside the current task.
    """

    def __init__(self, env: ClientEnv, model: nn.Module, lr: float, clip_grad: float,
                 pull_lambda: float, train_mask: bool):
        self.env, self.id = env, env.client_id
        self.vit = env.foundation.vit
        self.model = model.to(env.device)
        self.lr, self.clip_grad, self.pull_lambda, self.train_mask = lr, clip_grad, pull_lambda, train_mask
        self.task: Task | None = None
        self.allowed: Tensor | None = None

    # -- frozen inputs, from the cache -------------------------------------------------------------
    def query(self, batch: Batch) -> Tensor:
        """Final-norm CLS feature of the unprompted frozen ViT ``(B, d)``: the key-matching query."""
        return self.env.features.cls(batch).float()

    def tokens(self, batch: Batch) -> Tensor:
        """Embedded tokens entering block 0 ``(B, N, d)`` (patch embedding + CLS + positions)."""
        return self.env.features.prefix(batch, 0)

    def forward(self, batch: Batch, train: bool) -> tuple[Tensor, Tensor]:
        """-> (logits over all classes ``(B, C)``, pull term (scalar)). ``train`` selects the training path
        (e.g. DualPrompt's prompt mask)."""
        raise NotImplementedError

    # -- protocol ----------------------------------------------------------------------------------
    def _begin(self, task: Task) -> None:
        self.task = task
        self.allowed = torch.as_tensor(task.classes, device=self.env.device) if self.train_mask else None
        self.opt = torch.optim.Adam(self.model.parameters(), lr=self.lr)

    def loss(self, batch: Batch) -> Tensor:
        logits, pull = self.forward(batch, train=True)
        logits = logits.float()
        if self.allowed is not None:
            logits = masked_logits(logits, self.allowed)
        return F.cross_entropy(logits, batch.y) - self.pull_lambda * pull.float()

    def train_round(self, info: RoundInfo) -> Payload:
        self.model.train()

        def clip() -> None:
            if self.clip_grad > 0:
                nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_grad)
        train_epochs(self.env, self.task.train, self.loss, self.opt, clip, model=self.model)
        return upload_with_count(trainable_state(self.model), len(self.task.train))

    def receive(self, download: Payload, kind: DownloadKind) -> None:
        load_trainable(self.model, download)

    @torch.no_grad()
    def predict(self, batch: Batch) -> Tensor:
        self.model.eval()
        return self.forward(batch, train=False)[0]
