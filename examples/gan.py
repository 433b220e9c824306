"""A GAN in a loop of its own: two TrainStates, two pure steps, alternating.

fnlight has no Trainer to fight: a research loop calls the steps itself. The generator and
the discriminator each get a ``TrainState`` from their own ``make_train_step``; each turn of
the loop is one discriminator update, then one generator update. What each loss needs from
the *other* network travels in the batch, explicitly:

- the discriminator's batch is ``(real, fake)``, the fakes drawn from the generator's state
  under ``no_grad`` (so nothing flows back into the generator);
- the generator's batch is ``(z, d_state)``: its loss runs the discriminator with
  ``fl.apply(d_state, ...)``, which binds the discriminator state's tensors. Those are plain
  tensors that do not require gradients, and the generator's optimizer only knows the
  generator's parameters, so the discriminator is held fixed without ``requires_grad_``
  toggling, ``.detach()`` juggling or a second ``zero_grad``.

Both steps are pure functions of ``(state, batch)`` and the loop draws its noise from its own
seeded generator, so a run is reproducible, and either state could be saved with
``fl.checkpoint.save`` at any turn. The discriminator's loss adds an R1 gradient penalty,
which differentiates the discriminator inside the loss function; the step differentiates
through that.

The data: a mixture of 8 Gaussians on a ring (radius 2, standard deviation 0.05), generated
here. The quality printed is the fraction of generated points within 3 standard deviations
of a mode and the number of modes covered (modes with at least 1 % of the samples near
them): from 0 % and 0/8 to 80-95 % and 8/8. Full size (3000 turns) takes about 15 s on one
CPU core; ``--steps 800`` is the CI size (about 5 s, 8/8 modes).

Run::

    python examples/gan.py                 # 3000 turns
    python examples/gan.py --steps 800     # the CI size
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import fnlight as fl
from fnlight.optim import adam

MODES, RADIUS, STD = 8, 2.0, 0.05
ANGLES = torch.arange(MODES) * (2 * math.pi / MODES)
CENTRES = RADIUS * torch.stack([ANGLES.cos(), ANGLES.sin()], dim=1)


def ring(n: int, generator: torch.Generator) -> Tensor:
    """``n`` points from the mixture: a random mode each, plus Gaussian noise."""
    modes = torch.randint(0, MODES, (n,), generator=generator)
    return CENTRES[modes] + STD * torch.randn(n, 2, generator=generator)


def mlp(inputs: int, width: int, outputs: int) -> nn.Sequential:
    """Two hidden ReLU layers."""
    return nn.Sequential(nn.Linear(inputs, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, outputs))


def make_discriminator_loss(*, r1: float):
    """Real points are class 1, generated ones class 0, plus an R1 penalty: ``r1 / 2`` times the mean
    squared norm of the discriminator's gradient at the real points (Mescheder et al., 2018).

    The penalty differentiates the discriminator inside the loss (``create_graph=True``); the
    step's own ``autograd.grad`` then differentiates through it.
    """

    def discriminator_loss(model: nn.Module, batch: tuple[Tensor, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        real, fake = batch
        real = real.detach().requires_grad_()
        logits_real, logits_fake = model(real).squeeze(-1), model(fake).squeeze(-1)
        (slope,) = torch.autograd.grad(logits_real.sum(), real, create_graph=True)
        penalty = slope.pow(2).sum(-1).mean()
        loss = F.binary_cross_entropy_with_logits(logits_real, torch.ones_like(logits_real))
        loss = loss + F.binary_cross_entropy_with_logits(logits_fake, torch.zeros_like(logits_fake))
        accuracy = torch.cat([logits_real > 0, logits_fake < 0]).float().mean()
        return loss + r1 / 2 * penalty, {"accuracy": accuracy.detach(), "r1": penalty.detach()}

    return discriminator_loss


def generator_loss(model: nn.Module, batch: tuple[Tensor, fl.TrainState]) -> Tensor:
    """The non-saturating generator loss, judged by the discriminator state that comes with the batch."""
    z, d_state = batch
    logits = fl.apply(d_state, model(z)).squeeze(-1)  # gradients flow through D's inputs, not into D
    return F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits))  # -log D(G(z))


def quality(points: Tensor) -> tuple[float, int]:
    """The fraction of points within 3 standard deviations of a mode, and the modes with >= 1 % of the points there."""
    distance, nearest = torch.cdist(points, CENTRES).min(dim=1)
    near = distance < 3 * STD
    counts = torch.bincount(nearest[near], minlength=MODES)
    return float(near.float().mean()), int((counts >= 0.01 * len(points)).sum())


def main() -> tuple[float, int]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3000, help="turns of the loop (one update of each network)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--latent", type=int, default=8)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--r1", type=float, default=0.1, help="weight of the discriminator's R1 gradient penalty")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for option in ("steps", "batch_size", "latent", "width"):
        if getattr(args, option) < 1:
            parser.error(f"--{option.replace('_', '-')} must be at least 1, got {getattr(args, option)}")

    torch.manual_seed(args.seed)
    generator, discriminator = mlp(args.latent, args.width, 2), mlp(2, args.width, 1)
    g_step = fl.make_train_step(generator, generator_loss, adam(args.lr, b1=0.5, b2=0.9))
    d_step = fl.make_train_step(discriminator, make_discriminator_loss(r1=args.r1), adam(args.lr, b1=0.5, b2=0.9))
    g_state, d_state = g_step.init(seed=args.seed), d_step.init(seed=args.seed + 1)

    noise = torch.Generator().manual_seed(args.seed)  # the loop's own randomness: reals and latents
    probe = torch.randn(2000, args.latent, generator=torch.Generator().manual_seed(args.seed + 1))  # fixed, for the metric

    def report(turn: int, g_state: fl.TrainState, losses: str = "") -> tuple[float, int]:
        with torch.no_grad():
            near, covered = quality(fl.apply(g_state, probe))
        print(f"turn {turn:5d}{losses}  near a mode {near:6.1%}  modes covered {covered}/{MODES}")
        return near, covered

    report(0, g_state)
    start = time.perf_counter()
    for turn in range(1, args.steps + 1):
        with torch.no_grad():
            fake = fl.apply(g_state, torch.randn(args.batch_size, args.latent, generator=noise))
        d_state, d_metrics = d_step(d_state, (ring(args.batch_size, noise), fake))
        z = torch.randn(args.batch_size, args.latent, generator=noise)
        g_state, g_metrics = g_step(g_state, (z, d_state))
        if turn % max(args.steps // 10, 1) == 0 or turn == args.steps:
            losses = f"  D loss {float(d_metrics['loss']):.3f}  G loss {float(g_metrics['loss']):.3f}"
            near, covered = report(turn, g_state, losses)
    seconds = time.perf_counter() - start
    print(f"{args.steps} turns in {seconds:.1f}s; final: near a mode {near:.1%}, modes covered {covered}/{MODES}")
    return near, covered


if __name__ == "__main__":
    main()
