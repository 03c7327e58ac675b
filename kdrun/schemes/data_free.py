"""Data-free distillation: the student never sees a training image.

DAFL (Chen et al., ICCV 2019, "Data-Free Learning of Student Networks"): a generator turns noise
into images that the frozen teacher answers confidently, strongly and evenly over the classes, and
the student learns from the teacher on those images through the selected knowledge terms. Each
step, for a batch of latent codes ``z ~ N(0, I)``:

1. generator step (its own Adam): ``x = G(z)``, the teacher's logits ``z_t`` and features ``f_t``
   (its embedding tap, the input of its classifier) on ``x``, and
   ``L_G = onehot * CE(z_t, argmax z_t) + entropy * sum_k p_k log10 p_k - activation * mean|f_t|
   (+ bn_prior * R_BN)``, ``p`` the batch mean of softmax(z_t);
2. student step (the trainer's optimizer): the selected terms on the same, detached ``x`` against
   the teacher's detached taps; the label loss reads the teacher's argmax (the pseudo-labels).

``R_BN`` is DeepInversion's prior (Yin et al., CVPR 2020): ``sum over the teacher's BatchNorm2d
layers of ||mu(x_l) - running_mean||_2 + ||var(x_l) - running_var||_2``, ``x_l`` the layer's input
(batch statistics, biased variance). An epoch is ``scheme.iterations`` such steps on batches of
``trainer.batch_size`` codes (``trainer.limit_train_batches`` caps it); the student is scored on the
dataset's real test split after each.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from pathlib import Path

import torch
import torch.distributed as torch_dist
import torch.nn as nn
import torch.nn.functional as F

from kdrun.errors import ConfigError
from kdrun.knowledge import KnowledgeSet, Step
from kdrun.schemes.base import Scheme
from kdrun.schemes.stages import SupervisedStage, detached, freeze, tapped_forward

log = logging.getLogger("kdrun")


class DAFLGenerator(nn.Module):
    """DAFL's generator (DAFL-train.py ``Generator``): a linear map of the code to 128 maps of a
    quarter of the image side, BN, x2 upsampling, conv 3x3 128->128 + BN + LeakyReLU(0.2), x2
    upsampling, conv 3x3 128->64 + BN + LeakyReLU(0.2), conv 3x3 64->C, tanh, and a BN without
    affine parameters (so the images come out standardised, as the teacher's inputs are). The two
    inner BNs have eps 0.8, as in the authors' code (``nn.BatchNorm2d(128, 0.8)``). The second
    upsampling goes to the exact image size (the same as x2 when the sides are multiples of 4)."""

    def __init__(self, latent_dim: int, channels: int, size: tuple[int, int]) -> None:
        super().__init__()
        self.size = size
        self.init = (max(1, size[0] // 4), max(1, size[1] // 4))
        self.project = nn.Linear(latent_dim, 128 * self.init[0] * self.init[1])
        self.norm0 = nn.BatchNorm2d(128)
        self.block1 = nn.Sequential(nn.Conv2d(128, 128, 3, padding=1), nn.BatchNorm2d(128, eps=0.8),
                                    nn.LeakyReLU(0.2, inplace=True))
        self.block2 = nn.Sequential(nn.Conv2d(128, 64, 3, padding=1), nn.BatchNorm2d(64, eps=0.8),
                                    nn.LeakyReLU(0.2, inplace=True), nn.Conv2d(64, channels, 3, padding=1),
                                    nn.Tanh(), nn.BatchNorm2d(channels, affine=False))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.norm0(self.project(z).view(z.shape[0], 128, *self.init))
        x = self.block1(F.interpolate(x, scale_factor=2))
        return self.block2(F.interpolate(x, size=self.size))


def dafl_losses(logits: torch.Tensor, features: torch.Tensor) -> dict[str, torch.Tensor]:
    """DAFL's three generator losses from the teacher's logits and features (fp32):
    ``onehot = CE(z, argmax z)``, ``entropy = sum_k p_k log10 p_k`` with ``p`` the batch mean of
    softmax(z) (minimising it spreads the classes evenly), ``activation = -mean|f|``."""
    logits = logits.float()
    p = F.softmax(logits, dim=1).mean(dim=0)
    return {
        "onehot": F.cross_entropy(logits, logits.detach().argmax(dim=1)),
        "entropy": (p * torch.log10(p)).sum(),
        "activation": -features.float().abs().mean(),
    }


class BNStatistics:
    """DeepInversion's BatchNorm prior: while :meth:`recording`, every ``nn.BatchNorm2d`` of the
    model adds ``||mean(x) - running_mean||_2 + ||var(x) - running_var||_2`` of its input ``x``
    (per channel over batch and space, biased variance); :attr:`total` is their sum."""

    def __init__(self, model: nn.Module) -> None:
        self.layers = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
        self.terms: list[torch.Tensor] = []

    def _hook(self, module: nn.BatchNorm2d, inputs, output) -> None:
        x = inputs[0].float()
        mean, var = x.mean(dim=(0, 2, 3)), x.var(dim=(0, 2, 3), unbiased=False)
        self.terms.append(torch.linalg.vector_norm(module.running_var.float() - var)
                          + torch.linalg.vector_norm(module.running_mean.float() - mean))

    @contextlib.contextmanager
    def recording(self):
        self.terms = []
        handles = [m.register_forward_hook(self._hook) for m in self.layers]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()

    @property
    def total(self) -> torch.Tensor:
        return torch.stack(self.terms).sum()


class GeneratorTrainer(nn.Module):
    """The generator and its own Adam (DAFL's ``optimizer_G``); the optimizer's state is the
    module's extra state, so it is saved and restored with the generator for resuming."""

    def __init__(self, generator: nn.Module, lr: float) -> None:
        super().__init__()
        self.generator = generator
        self.optimizer = torch.optim.Adam(generator.parameters(), lr=lr)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.generator(z)

    def step(self, loss: torch.Tensor) -> None:
        """One update of the generator alone (gradients averaged over the processes of torchrun)."""
        params = [p for p in self.generator.parameters() if p.requires_grad]
        grads = torch.autograd.grad(loss, params)
        if torch_dist.is_available() and torch_dist.is_initialized():
            for g in grads:
                torch_dist.all_reduce(g)
                g /= torch_dist.get_world_size()
        for p, g in zip(params, grads):
            p.grad = g
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def get_extra_state(self) -> dict:
        return {"optimizer": self.optimizer.state_dict()}

    def set_extra_state(self, state: dict) -> None:
        if state:
            self.optimizer.load_state_dict(state["optimizer"])


class LatentBatches:
    """What the trainer iterates in a data-free stage: ``iterations`` batches of latent codes per
    epoch (``z ~ N(0, I)``, a function of (seed, epoch, batch) only, so a resumed run draws the same)
    with a label buffer the stage fills with the teacher's pseudo-labels (the trainer's train_top1
    is then the student's agreement with the teacher on generated images); the test split is the
    real dataset's."""

    def __init__(self, data, iterations: int, latent_dim: int, seed: int) -> None:
        self.data, self.info = data, data.info
        self.steps_per_epoch, self.latent_dim, self.seed = iterations, latent_dim, seed
        self.batch_size = data.batch_size
        self.device = data.device

    @property
    def eval_steps(self) -> int:
        return self.data.eval_steps

    def eval_batches(self):
        return self.data.eval_batches()

    def train_batches(self, epoch: int, with_index: bool = False):
        for i in range(self.steps_per_epoch):
            gen = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) * 1_000_003 + i)
            z = torch.randn(self.batch_size, self.latent_dim, generator=gen).to(self.device)
            labels = torch.zeros(self.batch_size, dtype=torch.long, device=self.device)
            index = torch.arange(self.batch_size, device=self.device)
            yield (z, labels, index) if with_index else (z, labels)


@dataclasses.dataclass(frozen=True)
class GeneratorWeights:
    """The weights of the generator's loss terms (DAFL's --oh, --ie, --a; DeepInversion's r_feature)."""

    onehot: float
    entropy: float
    activation: float
    bn_prior: float


class DataFreeStage(SupervisedStage):
    """One generator step and one student step per batch of latent codes (see the module docstring)."""

    def __init__(self, student: nn.Module, teacher: nn.Module, knowledge: KnowledgeSet, generator: GeneratorTrainer,
                 weights: GeneratorWeights, info, grid_dir: Path | None = None, grid_every: int = 0) -> None:
        super().__init__(student, "student")
        self.teacher, self.knowledge, self.generator, self.weights = freeze(teacher), knowledge, generator, weights
        self.s_taps = knowledge.student_taps()
        self.t_taps = knowledge.teacher_taps() | {"logits", "embedding"}
        self.prior = BNStatistics(self.teacher) if weights.bn_prior > 0 else None
        self.info, self.grid_dir, self.grid_every = info, grid_dir, grid_every
        self.last_images: torch.Tensor | None = None

    def parameters_to_train(self) -> list[nn.Parameter]:
        """The student and the terms' adapters; the generator has its own optimizer."""
        return super().parameters_to_train() + self.knowledge.trainable_parameters()

    def train(self) -> None:
        self.model.train()
        self.knowledge.train()
        self.generator.train()  # DAFL never puts its generator in eval mode
        self.teacher.eval()

    def generator_step(self, z: torch.Tensor) -> tuple[torch.Tensor, dict, dict]:
        """Generate a batch, update the generator on its loss; the images and the teacher's taps
        (both detached, from before the update, as in DAFL) and the generator's logs."""
        images = self.generator(z)
        with self.prior.recording() if self.prior is not None else contextlib.nullcontext():
            t_out = tapped_forward(self.teacher, images, self.t_taps)
        parts = dafl_losses(t_out["logits"], t_out["embedding"])
        w = self.weights
        loss = w.onehot * parts["onehot"] + w.entropy * parts["entropy"] + w.activation * parts["activation"]
        if self.prior is not None:
            parts["bn"] = self.prior.total
            loss = loss + w.bn_prior * parts["bn"]
        with torch.enable_grad():
            self.generator.step(loss)
        logs = {"gen_loss": loss.detach(), **{f"gen_{k}": v.detach() for k, v in parts.items()}}
        return images.detach(), detached(t_out), logs

    def training_step(self, z: torch.Tensor, step: Step):
        images, t_out, gen_logs = self.generator_step(z)
        step.targets.copy_(t_out["logits"].argmax(dim=1))  # the teacher's pseudo-labels (train_top1 reads them)
        step = dataclasses.replace(step, index=None)  # generated images have no training-set positions
        s_out = tapped_forward(self.model, images, self.s_taps)
        loss, logs = self.knowledge(s_out, t_out, step)
        self.last_images = images[:64]
        return loss, s_out["logits"], {**logs, **gen_logs}

    def end_epoch(self, epoch: int) -> None:
        """Every ``grid_every`` epochs: a PNG grid of the epoch's last generated images."""
        if self.grid_dir is None or not self.grid_every or (epoch + 1) % self.grid_every or self.last_images is None:
            return
        save_grid(self.last_images, self.info, self.grid_dir / f"epoch_{epoch + 1:03d}.png")

    def extra_modules(self) -> dict[str, nn.Module]:
        return {"generator": self.generator, "knowledge": self.knowledge}


def save_grid(images: torch.Tensor, info, path: Path) -> None:
    """Images (standardised like the dataset's inputs) back to pixels, as one PNG grid, atomically."""
    from torchvision.utils import save_image

    from kdrun.engine.io import atomic_write

    mean = torch.tensor(info.mean, device=images.device).view(1, -1, 1, 1)
    std = torch.tensor(info.std, device=images.device).view(1, -1, 1, 1)
    pixels = (images.float() * std + mean).clamp(0, 1).cpu()
    atomic_write(path, lambda f: save_image(pixels, f, nrow=8, format="png"), mode="wb")


def _number(key: str, value, minimum: float = 0.0, above: bool = False, integer: bool = False):
    """``scheme.<key>`` as a number (an int where ``integer``), checked: one ConfigError line otherwise."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value == value
    ok = ok and (value > minimum if above else value >= minimum) and (not integer or float(value).is_integer())
    if not ok:
        kind = "an integer" if integer else "a number"
        raise ConfigError(f"scheme.{key}={value} must be {kind} {'>' if above else '>='} {minimum:g}")
    return int(value) if integer else float(value)


class DataFree(Scheme):
    """``kdrun scheme=data_free teacher=resnet56 student=resnet20 loss=kd``: DAFL's generator teaches
    the student through the frozen teacher; reports the teacher (trained on the real data, or given)
    and the student, both scored on the real test split."""

    name = "data_free"
    report_rows = (("teacher_top1", "teacher", "teacher"),)

    def __init__(self, name: str | None = None, iterations: int = 120, latent_dim: int = 100, lr_g: float = 0.2,
                 onehot: float = 1.0, entropy: float = 5.0, activation: float = 0.1, bn_prior: float = 0.0,
                 grid_every: int = 1) -> None:
        super().__init__(name)
        self.iterations = _number("iterations", iterations, 1, integer=True)
        self.latent_dim = _number("latent_dim", latent_dim, 1, integer=True)
        self.lr_g = _number("lr_g", lr_g, 0, above=True)
        self.weights = GeneratorWeights(_number("onehot", onehot), _number("entropy", entropy),
                                        _number("activation", activation), _number("bn_prior", bn_prior))
        self.grid_every = _number("grid_every", grid_every, 0, integer=True)

    def validate(self, cfg) -> None:
        if "+" in str(cfg.teacher.name):
            raise ConfigError(f"teacher={cfg.teacher.name} names several teachers; scheme=data_free takes one")

    def run(self, ctx) -> dict:
        cfg = ctx.cfg
        if ctx.models.world.active:
            raise ConfigError("scheme=data_free runs in one process; start it without torchrun")
        teacher = ctx.teachers.obtain(cfg.teacher, role="teacher")  # trained on the real data, as offline
        out = {**ctx.evaluate_summary(teacher, "teacher"), **ctx.models.stats(teacher, "teacher")}
        student = ctx.models.build(cfg.student)
        knowledge = ctx.distiller.new_knowledge(student, teacher)
        for term in knowledge.terms.values():
            if term.init_epochs > 0:
                raise ConfigError(f"loss.{term.name}.init_epochs={term.init_epochs}: scheme=data_free has no training "
                                  f"images for an initialisation stage; set loss.{term.name}.init_epochs=0")
        info = ctx.data.info
        size = tuple(info.image_size) if isinstance(info.image_size, (tuple, list)) else (info.image_size,) * 2
        torch.manual_seed(int(cfg.seed))
        generator = ctx.models.place(GeneratorTrainer(DAFLGenerator(self.latent_dim, info.in_chans, size), self.lr_g))
        stage = DataFreeStage(student, teacher, knowledge, generator, self.weights, info,
                              grid_dir=None if ctx.dry else ctx.run_dir / "generated", grid_every=self.grid_every)
        latent = LatentBatches(ctx.data, self.iterations, self.latent_dim, int(cfg.seed))
        fit = ctx.distiller.fit(stage, cfg.student, data=latent)
        out.update(fit.as_summary("student"))
        out.update(ctx.models.stats(student, "student"))
        out["generator_params"] = sum(p.numel() for p in generator.parameters())
        return out
