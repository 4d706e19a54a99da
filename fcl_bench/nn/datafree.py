"""Data-free synthesis on the server: generators, the BatchNorm-statistics loss and the synthesis loops of
TARGET (Zhang et al., ICCV 2023) and MFCL (Babakniya et al., NeurIPS 2023), and the synthetic pool that
crosses the wire.

* :class:`TargetGenerator`: ``z (B, nz) -> Linear -> (2 ngf, S/4, S/4) -> BN -> up2 -> Conv3x3(2 ngf) -> BN
  -> LeakyReLU(0.2) -> up2 -> Conv3x3(ngf) -> BN -> LeakyReLU -> Conv3x3(3) -> Sigmoid``: images in
  ``[0, 1]`` of side ``S`` (the dataset's image size; a side that is not a multiple of 4 is reached by a
  final bilinear resize);
* :class:`MFCLGenerator`: ``z (B, 1000) -> Linear -> (128, S/4, S/4) -> BN -> up2 -> Conv3x3(128) ->
  BN(eps 0.8) -> LeakyReLU -> up2 -> Conv3x3(64) -> BN(eps 0.8) -> LeakyReLU -> Conv3x3(3) -> Tanh ->
  BN(3, affine=False)``: images already in the model's input space (no further normalisation, as in the
  official code);
* :class:`BNStatsLoss`: forward hooks on every BatchNorm layer of a teacher that compare the batch mean
  and variance of the layer's input with the layer's running statistics; ``form="l2"`` is TARGET's
  ``||var - running_var||_2 + ||mean - running_mean||_2`` summed over layers (with its optional momentum
  blend of earlier batches' statistics), ``form="kl"`` MFCL's Gaussian KL
  ``mean_c[log(sigma / sigma_run) - 1/2 (1 - (sigma_run^2 + (mu_run - mu)^2) / sigma^2)]`` averaged over
  layers. The hooks are removed on :meth:`BNStatsLoss.remove` (or on leaving the ``with`` block), so the
  teacher is left as it was;
* :func:`synthesize_target`: TARGET's loop -- per synthesis round a fresh ``z`` and a fast copy of the
  generator trained ``iterations`` Adam steps on ``bn_weight * L_BN + ce_weight * CE(teacher(aug(G(z))),
  random targets)`` (+ ``adv_weight`` * the adversarial term against a student distilled on the pool so
  far), first-order MAML update of the generator, the lowest-loss batch kept for the pool;
* :func:`train_mfcl_generator`: MFCL's loop -- the persistent generator trained ``iterations`` Adam steps
  (a new Adam each call) on ``CE(o / 1000, argmax o) + w_ie (1 + sum p log p / log K) + w_bn L_BN-KL +
  w_smooth * MSE(x, gaussian_smooth(x))``;
* :func:`pool_payload` / :func:`pool_from_payload`: a pool as ``uint8 (N, 3, H, W)`` images and int64
  labels; :func:`label_pool` labels a pool with the teacher's predictions on exactly those uint8 images.

Randomness (``z``, targets, augmentation) comes from a ``torch.Generator`` the caller passes (the server's
seeded generator), so a synthesis is reproducible. Its cost is the server's: the harness measures
``Server.end_task`` (seconds, FLOPs, memory), and each loop returns a :class:`SynthesisReport`.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from fcl_bench.nn.distill import frozen_copy

Normalise = Callable[[torch.Tensor], torch.Tensor]
"""``[0, 1]`` images ``(B, 3, S, S)`` -> model inputs (e.g. :meth:`fcl_bench.data.Preprocess.normalise`)."""

POOL_IMAGES = "pool.images"
POOL_LABELS = "pool.labels"


# -- generators ------------------------------------------------------------------------------------------
class TargetGenerator(nn.Module):
    """TARGET's generator (the official ``Generator(nz=256, ngf=64)``), output side ``img_size``."""

    def __init__(self, nz: int = 256, ngf: int = 64, img_size: int = 32, nc: int = 3):
        super().__init__()
        self.nz, self.img_size = nz, img_size
        self.init_size = max(1, math.ceil(img_size / 4))
        self.l1 = nn.Sequential(nn.Linear(nz, ngf * 2 * self.init_size ** 2))
        self.conv_blocks = nn.Sequential(
            nn.BatchNorm2d(ngf * 2), nn.Upsample(scale_factor=2),
            nn.Conv2d(ngf * 2, ngf * 2, 3, stride=1, padding=1, bias=False), nn.BatchNorm2d(ngf * 2),
            nn.LeakyReLU(0.2), nn.Upsample(scale_factor=2),
            nn.Conv2d(ngf * 2, ngf, 3, stride=1, padding=1, bias=False), nn.BatchNorm2d(ngf), nn.LeakyReLU(0.2),
            nn.Conv2d(ngf, nc, 3, stride=1, padding=1), nn.Sigmoid())

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """``z (B, nz)`` -> images ``(B, 3, img_size, img_size)`` in ``[0, 1]``."""
        out = self.l1(z).view(z.shape[0], -1, self.init_size, self.init_size)
        img = self.conv_blocks(out)
        if img.shape[-1] != self.img_size:
            img = F.interpolate(img, size=(self.img_size, self.img_size), mode="bilinear", align_corners=False)
        return img


class MFCLGenerator(nn.Module):
    """MFCL's ``CIFAR_GEN`` generator (``zdim=1000``, 128 channels), output side ``img_size``."""

    def __init__(self, nz: int = 1000, img_size: int = 32, channels: int = 128, nc: int = 3):
        super().__init__()
        self.nz, self.img_size, self.channels = nz, img_size, channels
        self.init_size = max(1, math.ceil(img_size / 4))
        self.l1 = nn.Sequential(nn.Linear(nz, channels * self.init_size ** 2))
        self.conv_blocks0 = nn.Sequential(nn.BatchNorm2d(channels))
        self.conv_blocks1 = nn.Sequential(nn.Conv2d(channels, channels, 3, stride=1, padding=1),
                                          nn.BatchNorm2d(channels, 0.8), nn.LeakyReLU(0.2))
        self.conv_blocks2 = nn.Sequential(nn.Conv2d(channels, 64, 3, stride=1, padding=1),
                                          nn.BatchNorm2d(64, 0.8), nn.LeakyReLU(0.2),
                                          nn.Conv2d(64, nc, 3, stride=1, padding=1), nn.Tanh(),
                                          nn.BatchNorm2d(nc, affine=False))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """``z (B, nz)`` -> images ``(B, 3, img_size, img_size)`` in the model's input space."""
        out = self.l1(z).view(z.shape[0], self.channels, self.init_size, self.init_size)
        img = F.interpolate(self.conv_blocks0(out), scale_factor=2)
        img = F.interpolate(self.conv_blocks1(img), scale_factor=2)
        img = self.conv_blocks2(img)
        if img.shape[-1] != self.img_size:
            img = F.interpolate(img, size=(self.img_size, self.img_size), mode="bilinear", align_corners=False)
        return img

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` images from ``z ~ N(0, I)`` drawn with ``generator`` (CPU) and moved to the model's device."""
        dev = self.l1[0].weight.device
        return self(torch.randn(n, self.nz, generator=generator).to(dev))


# -- BatchNorm statistics ------------------------------------------------------------------------------
def _batch_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    dims = [d for d in range(x.ndim) if d != 1]
    return x.mean(dims), x.var(dims, unbiased=False)


class BNStatsLoss:
    """Forward hooks on every BatchNorm layer (with running statistics) of ``teacher``.

    After a forward pass, :meth:`loss` is the statistics mismatch of that pass (a scalar with gradient
    toward the input). ``form="l2"`` (TARGET's ``DeepInversionHook``): sum over layers of
    ``||rv - v||_2 + ||rm - m||_2``, where ``(m, v)`` are blended with the statistics kept by
    :meth:`update_momentum` as ``(1 - momentum) * now + momentum * kept`` once any are kept.
    ``form="kl"`` (MFCL's ``DeepInversionFeatureHook``): the Gaussian KL of the module docstring per layer,
    averaged over layers. :meth:`remove` (or leaving ``with``) takes every hook off.
    """

    def __init__(self, teacher: nn.Module, form: Literal["l2", "kl"] = "l2", momentum: float = 0.0):
        if form not in ("l2", "kl"):
            raise ValueError(f"BNStatsLoss form must be 'l2' or 'kl', got {form!r}")
        self.form, self.momentum = form, momentum
        self.layers = [m for m in teacher.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                       and m.running_mean is not None and m.running_var is not None]
        if not self.layers:
            raise ValueError("the teacher has no BatchNorm layer with running statistics to match")
        self._terms: dict[int, torch.Tensor] = {}
        self._now: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._kept: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.handles = [m.register_forward_hook(self._hook(i)) for i, m in enumerate(self.layers)]

    def _hook(self, i: int):
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            x = inputs[0].float()
            mean, var = _batch_stats(x)
            rm, rv = module.running_mean.float(), module.running_var.float()
            self._now[i] = (mean.detach(), var.detach())
            if self.form == "l2":
                if i in self._kept:
                    km, kv = self._kept[i]
                    mean = (1 - self.momentum) * mean + self.momentum * km
                    var = (1 - self.momentum) * var + self.momentum * kv
                self._terms[i] = torch.norm(rv - var, 2) + torch.norm(rm - mean, 2)
            else:
                var = var + 1e-8
                m1 = torch.log(var.sqrt() / (rv + 1e-8).sqrt()).mean()
                self._terms[i] = m1 - 0.5 * (1.0 - (rv + 1e-8 + (rm - mean) ** 2) / var).mean()
        return hook

    def loss(self) -> torch.Tensor:
        """The mismatch of the last forward pass (``l2``: summed over layers; ``kl``: averaged)."""
        if not self._terms:
            raise RuntimeError("BNStatsLoss.loss() before any forward pass of the teacher")
        total = sum(self._terms.values())
        return total / len(self._terms) if self.form == "kl" else total

    def update_momentum(self) -> None:
        """Keep the last pass's statistics for the ``l2`` momentum blend (TARGET's ``update_mmt``)."""
        for i, (mean, var) in self._now.items():
            if i in self._kept:
                km, kv = self._kept[i]
                self._kept[i] = (self.momentum * km + (1 - self.momentum) * mean,
                                 self.momentum * kv + (1 - self.momentum) * var)
            else:
                self._kept[i] = (mean, var)

    @property
    def active(self) -> bool:
        return bool(self.handles)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
        self._terms.clear()

    def __enter__(self) -> BNStatsLoss:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


# -- helpers -------------------------------------------------------------------------------------------
def restricted(logits: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """``logits (B, C)`` -> ``(B, len(classes))``: the columns of ``classes`` (global ids)."""
    return logits[:, classes]


def random_crop_flip(x: torch.Tensor, generator: torch.Generator, padding: int = 4) -> torch.Tensor:
    """Per-sample random crop (zero padding ``padding``) and horizontal flip, differentiable in ``x``
    (TARGET's kornia ``RandomCrop(padding=4)`` + ``RandomHorizontalFlip``)."""
    b, _, h, w = x.shape
    padded = F.pad(x, (padding,) * 4)
    oy = torch.randint(0, 2 * padding + 1, (b,), generator=generator).to(x.device)
    ox = torch.randint(0, 2 * padding + 1, (b,), generator=generator).to(x.device)
    flip = torch.rand(b, generator=generator).to(x.device) < 0.5
    rows = oy[:, None] + torch.arange(h, device=x.device)
    cols = torch.arange(w, device=x.device).expand(b, w)
    cols = torch.where(flip[:, None], cols.flip(1), cols) + ox[:, None]
    out = padded[torch.arange(b, device=x.device)[:, None, None], :, rows[:, :, None], cols[:, None, :]]
    return out.permute(0, 3, 1, 2)


def soft_cross_entropy(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """TARGET's ``_KD_loss``: ``-(1/B) sum softmax(teacher/T) . log_softmax(student/T)`` (no ``T^2``)."""
    log_p = F.log_softmax(student.float() / temperature, dim=1)
    q = F.softmax(teacher.detach().float() / temperature, dim=1)
    return -(q * log_p).sum() / student.shape[0]


def gaussian_kernel(channels: int = 3, size: int = 5, sigma: float = 1.0) -> torch.Tensor:
    """MFCL's ``Gaussiansmoothing`` kernel ``(channels, 1, size, size)``: the official formula
    ``exp(-((x - mean) / (2 sigma))^2)`` per axis, normalised to sum 1 (a Gaussian of std ``sqrt(2) sigma``)."""
    grid = torch.arange(size, dtype=torch.float32)
    g = torch.exp(-((grid - (size - 1) / 2) / (2 * sigma)) ** 2) / (sigma * math.sqrt(2 * math.pi))
    k = g[:, None] * g[None, :]
    k = k / k.sum()
    return k.expand(channels, 1, size, size).contiguous()


def smoothness_loss(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """``mean (x - smooth(reflect_pad(x, 2)))^2`` (MFCL's image prior)."""
    pad = kernel.shape[-1] // 2
    smooth = F.conv2d(F.pad(x, (pad,) * 4, mode="reflect"), kernel.to(x.device, x.dtype), groups=x.shape[1])
    return F.mse_loss(x, smooth)


@dataclass
class SynthesisReport:
    """What a synthesis did: steps, images produced, seconds, and the loss terms per step."""

    steps: int = 0
    images: int = 0
    seconds: float = 0.0
    history: dict[str, list[float]] = field(default_factory=dict)

    def add(self, **terms: float) -> None:
        for k, v in terms.items():
            self.history.setdefault(k, []).append(float(v))

    def summary(self) -> str:
        last = ", ".join(f"{k} {v[-1]:.4g}" for k, v in self.history.items() if v)
        return f"{self.steps} generator steps, {self.images} images, {self.seconds:.1f}s (last: {last})"


# -- TARGET --------------------------------------------------------------------------------------------
@dataclass
class TargetSynthesis:
    """TARGET's synthesis constants (official CIFAR-100 values in brackets)."""

    rounds: int = 10             # synthesis rounds, one pool batch each [syn_round 10]
    iterations: int = 10         # Adam steps of the fast generator per round [g_steps 10]
    batch_size: int = 256        # images per round [synthesis_batch_size 256]
    lr_g: float = 2e-3           # [lr_g 0.002]; the meta (first-order MAML) step uses lr_g * iterations
    lr_z: float = 1e-2           # [lr_z 0.01]
    bn_weight: float = 10.0      # [bn 10]
    ce_weight: float = 0.5       # [oh 0.5]
    adv_weight: float = 0.0      # [adv 1.0, but inactive: warmup 20 > syn_round 10]
    warmup: int = 20             # rounds before the adversarial term and the student's KD start [20]
    bn_momentum: float = 0.9     # [bn_mmt 0.9]
    kd_steps: int = 400          # student KD steps per round after warmup (adversarial term only) [400]
    kd_temperature: float = 20.0  # student KD temperature [T 20]
    nz: int = 256                # [nz 256]
    ngf: int = 64                # [ngf 64]


def _adversarial(student: nn.Module, inputs: torch.Tensor, t_out: torch.Tensor,
                 classes: torch.Tensor) -> torch.Tensor:
    s_out = restricted(student(inputs), classes)
    agree = (s_out.argmax(1) == t_out.argmax(1)).float()
    kl = F.kl_div(F.log_softmax(s_out, 1), F.softmax(t_out, 1), reduction="none").sum(1)
    return -(kl * agree).mean()


def _student_kd(student: nn.Module, teacher: nn.Module, pool: torch.Tensor, cfg: TargetSynthesis,
                classes: torch.Tensor, normalise: Normalise, opt: torch.optim.Optimizer,
                generator: torch.Generator) -> None:
    student.train()
    for _ in range(cfg.kd_steps):
        pick = torch.randint(0, len(pool), (min(cfg.batch_size, len(pool)),), generator=generator)
        x = normalise(pool[pick].to(next(student.parameters()).device))
        with torch.no_grad():
            t = restricted(teacher(x), classes)
        s = restricted(student(x), classes)
        log_p = F.log_softmax(s / cfg.kd_temperature, 1)
        loss = F.kl_div(log_p, F.softmax(t / cfg.kd_temperature, 1), reduction="batchmean") * cfg.kd_temperature ** 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    student.eval()


def synthesize_target(teacher: nn.Module, classes: Sequence[int], img_size: int, normalise: Normalise,
                      cfg: TargetSynthesis, generator: torch.Generator,
                      make_student: Callable[[], nn.Module] | None = None) -> tuple[torch.Tensor, SynthesisReport]:
    """TARGET's data-free synthesis against ``teacher`` (a global model, logits over all classes).

    Per round: ``z ~ N(0, I)`` and targets uniform over ``classes`` (the seen classes, global ids); a fast
    copy of the generator and ``z`` trained ``cfg.iterations`` Adam steps (betas 0.5, 0.999) on
    ``bn_weight * L_BN(l2, momentum) + ce_weight * CE(teacher(norm(aug(G(z))))[classes], targets)``
    (+ ``adv_weight * L_adv`` from round ``warmup`` on); the generator takes a first-order MAML step with
    the fast copy's summed gradients; the round's lowest-loss batch joins the pool. ``make_student``
    builds the student of the adversarial term (needed when ``adv_weight > 0``), distilled on the pool
    after every round from ``warmup`` on.

    Returns ``(pool, report)``: ``pool`` float ``(rounds * batch_size, 3, img_size, img_size)`` in
    ``[0, 1]`` on the CPU. The teacher is left unchanged (its hooks removed, its modes restored).
    """
    t0 = time.perf_counter()
    dev = next(teacher.parameters()).device
    cls = torch.as_tensor(list(classes), dtype=torch.long, device=dev)
    teacher = frozen_copy(teacher)  # eval mode, no gradients; the caller's model is never touched
    with torch.random.fork_rng(devices=[]):  # module inits from the caller's generator, not the global RNG
        torch.manual_seed(int(torch.randint(0, 2 ** 31 - 1, (1,), generator=generator)))
        gen = TargetGenerator(cfg.nz, cfg.ngf, img_size).to(dev).train()
        student = None
        if cfg.adv_weight > 0:
            if make_student is None:
                raise ValueError("TARGET's adversarial term needs a student (make_student)")
            student = make_student().to(dev).eval()
    meta = torch.optim.Adam(gen.parameters(), cfg.lr_g * cfg.iterations, betas=(0.5, 0.999))
    s_opt = None if student is None else torch.optim.SGD(student.parameters(), lr=0.2, momentum=0.9,
                                                         weight_decay=1e-4)
    report, pool = SynthesisReport(), []
    with BNStatsLoss(teacher, "l2", cfg.bn_momentum) as bn:
        for rnd in range(cfg.rounds):
            z = torch.randn(cfg.batch_size, cfg.nz, generator=generator).to(dev).requires_grad_(True)
            targets = cls[torch.randint(0, len(cls), (cfg.batch_size,), generator=generator).to(dev)]
            targets = torch.searchsorted(cls, targets)  # positions among `classes`
            fast = copy.deepcopy(gen)
            opt = torch.optim.Adam([{"params": fast.parameters()}, {"params": [z], "lr": cfg.lr_z}],
                                   lr=cfg.lr_g, betas=(0.5, 0.999))
            meta.zero_grad(set_to_none=True)
            best, best_cost = None, math.inf
            use_adv = student is not None and rnd >= cfg.warmup
            for _ in range(cfg.iterations):
                inputs = fast(z)
                x = normalise(random_crop_flip(inputs, generator))
                t_out = restricted(teacher(x), cls)
                loss_bn, loss_ce = bn.loss(), F.cross_entropy(t_out, targets)
                loss = cfg.bn_weight * loss_bn + cfg.ce_weight * loss_ce
                if use_adv:
                    loss = loss + cfg.adv_weight * _adversarial(student, x, t_out, cls)
                if loss.item() < best_cost:
                    best_cost, best = loss.item(), inputs.detach().cpu()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                for p, fp in zip(gen.parameters(), fast.parameters()):  # first-order MAML: sum fast grads
                    if fp.grad is not None:
                        p.grad = fp.grad.clone() if p.grad is None else p.grad + fp.grad
                opt.step()
                report.steps += 1
                report.add(bn=loss_bn.item(), ce=loss_ce.item(), loss=loss.item())
            meta.step()
            bn.update_momentum()
            pool.append(best)
            if use_adv:
                _student_kd(student, teacher, torch.cat(pool), cfg, cls, normalise, s_opt, generator)
    images = torch.cat(pool)
    report.images, report.seconds = len(images), time.perf_counter() - t0
    return images, report


# -- MFCL ----------------------------------------------------------------------------------------------
@dataclass
class MFCLSynthesis:
    """MFCL's generator-training constants (official CIFAR-100 values in brackets)."""

    iterations: int = 100        # Adam steps per task [pi 100]
    batch_size: int = 128        # [server_ss 128]
    lr: float = 1e-3             # a new Adam each task [generator_lr 1e-3]
    content_temperature: float = 1e3  # CE(o / 1000, argmax o) [deep_inv_params[3] 1e3]
    ce_weight: float = 1.0       # [content_weight 1]
    ie_weight: float = 1.0       # information entropy [w_ie 1]
    bn_weight: float = 50.0      # BN-statistics KL [w_bn 50]
    smooth_weight: float = 1e-3  # [w_noise 1e-3]


def train_mfcl_generator(gen: MFCLGenerator, teacher: nn.Module, classes: Sequence[int], cfg: MFCLSynthesis,
                         generator: torch.Generator, to_input: Callable[[torch.Tensor], torch.Tensor] = lambda x: x
                         ) -> SynthesisReport:
    """Train the persistent ``gen`` in place against the frozen ``teacher`` over ``classes`` (global ids of
    the classes learned so far); a new Adam (``cfg.lr``) each call. Per step, on ``x = G(z)`` of
    ``cfg.batch_size`` samples and ``o = teacher(to_input(x))[classes]``:
    ``ce_weight * CE(o / T_c, argmax o) + ie_weight * (1 + sum_k p_k log p_k / log K)`` (``p`` the
    batch-mean softmax of ``o``) ``+ bn_weight * L_BN-KL + smooth_weight * smoothness(x)``. ``gen`` ends in
    eval mode; the teacher is unchanged."""
    t0 = time.perf_counter()
    dev = next(teacher.parameters()).device
    cls = torch.as_tensor(list(classes), dtype=torch.long, device=dev)
    teacher = frozen_copy(teacher)
    kernel = gaussian_kernel(3, 5, 1.0).to(dev)
    opt = torch.optim.Adam(gen.parameters(), lr=cfg.lr)
    gen.train()
    report = SynthesisReport()
    k = len(cls)
    with BNStatsLoss(teacher, "kl") as bn:
        for _ in range(cfg.iterations):
            x = gen.sample(cfg.batch_size, generator)
            o = restricted(teacher(to_input(x)), cls)
            ce = F.cross_entropy(o / cfg.content_temperature, o.argmax(1))
            p = F.softmax(o, dim=1).mean(0)
            ie = 1.0 + (p * torch.log(p)).sum() / math.log(k) if k > 1 else o.new_zeros(())
            loss_bn = bn.loss()
            smooth = smoothness_loss(x, kernel)
            loss = (cfg.ce_weight * ce + cfg.ie_weight * ie + cfg.bn_weight * loss_bn
                    + cfg.smooth_weight * smooth)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            report.steps += 1
            report.add(ce=ce.item(), ie=float(ie.detach()), bn=loss_bn.item(), smooth=smooth.item(), loss=loss.item())
    gen.eval()
    report.images = cfg.iterations * cfg.batch_size
    report.seconds = time.perf_counter() - t0
    return report


# -- the pool on the wire -------------------------------------------------------------------------------
def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """``[0, 1]`` float images -> ``uint8`` (rounded, clamped), on the CPU."""
    return (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()


def from_uint8(images: torch.Tensor) -> torch.Tensor:
    return images.float() / 255.0


@torch.no_grad()
def label_pool(teacher: nn.Module, images: torch.Tensor, classes: Sequence[int], normalise: Normalise,
               batch_size: int = 256) -> torch.Tensor:
    """The teacher's predictions (argmax over ``classes``, global ids) on ``uint8`` ``images``; int64 ``(N,)``."""
    dev = next(teacher.parameters()).device
    cls = torch.as_tensor(list(classes), dtype=torch.long, device=dev)
    was = teacher.training
    teacher.eval()
    out = []
    for i in range(0, len(images), batch_size):
        x = normalise(from_uint8(images[i:i + batch_size]).to(dev))
        out.append(cls[restricted(teacher(x), cls).argmax(1)].cpu())
    teacher.train(was)
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long)


def pool_payload(images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """The pool as it crosses the wire: ``uint8 (N, 3, H, W)`` images and int64 ``(N,)`` labels."""
    if images.dtype != torch.uint8:
        raise TypeError(f"a pool crosses the wire as uint8 images, got {images.dtype}")
    return {POOL_IMAGES: images.contiguous(), POOL_LABELS: labels.to(torch.int64).contiguous()}


def pool_from_payload(payload: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    return payload[POOL_IMAGES], payload[POOL_LABELS]


__all__ = ["BNStatsLoss", "MFCLGenerator", "MFCLSynthesis", "POOL_IMAGES", "POOL_LABELS", "SynthesisReport",
           "TargetGenerator", "TargetSynthesis", "from_uint8", "gaussian_kernel", "label_pool", "pool_from_payload",
           "pool_payload", "random_crop_flip", "smoothness_loss", "soft_cross_entropy", "synthesize_target",
           "to_uint8", "train_mfcl_generator"]
