"""Gaussian-noise augmentation (the noise-robustness baseline of Demyanov et al. §5.3; Bishop 1995)."""

import torch
import torch.nn.functional as F

from robust_cli.defenses.utils import check_in_box, check_nonnegative, detached, frozen_buffers, per_example_norm


class GaussianAugmentation:
    """Cross-entropy at x + sigma * N(0, I) (clipped to the [0, 1] box when clip=True).

    For small sigma, E ell(x + sigma n) ~ ell(x) + sigma^2/2 tr(Hessian) (Bishop; Demyanov §A.4 shows that for
    a single logistic neuron this is Loss IBP): the logged penalty is that increase, ell(x + noise) - ell(x),
    measured with a no-grad clean forward that does not touch the BatchNorm statistics.
    Set clip=false for data that is not in [0, 1] (gaussians2d).
    """

    def __init__(self, sigma=0.1, clip=True):
        self.sigma = check_nonnegative("sigma", sigma)
        self.clip = bool(clip)

    def __call__(self, model, x, y):
        if self.clip:
            check_in_box(x, (0.0, 1.0), "defense.clip=false")
        noise = self.sigma * torch.randn_like(x)
        noisy = x + noise
        if self.clip:
            noisy = noisy.clamp(0, 1)
        noisy_losses = F.cross_entropy(model(noisy), y, reduction="none")
        with torch.no_grad(), frozen_buffers(model):
            clean_losses = F.cross_entropy(model(x), y, reduction="none")
        loss = noisy_losses.mean()
        return loss, detached(
            ce=loss,
            clean_loss=clean_losses.mean(),
            penalty=(noisy_losses - clean_losses).mean(),
            noise_l2=per_example_norm(noisy - x).mean(),
        )
