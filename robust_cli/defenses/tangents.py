"""Tangent vectors of images under small translations, scalings and a rotation (Simard's Lie operators).

For a transformation T_a with T_0 = identity, the tangent vector at image x is dT_a(x)/da at a = 0. For a
smooth image I(u, v), moving the sampling grid gives, with (u, v) the column/row coordinates:
    shift_u: dI/du     shift_v: dI/dv     scale_u: u dI/du     scale_v: v dI/dv     rotation: v dI/du - u dI/dv
(up to sign, which no squared penalty sees; rotation is counter-clockwise in (u, v), i.e. with v pointing down
the image turns clockwise on screen).
Simard smooths the image with a Gaussian first so that the derivatives exist; the derivatives are central
differences of the smoothed image. Coordinates are centred and scaled to [-1, 1] (u = -1 at the left border,
+1 at the right), so a unit of every parameter moves a border pixel by about one half-width: the five
tangents are on a comparable scale and one weight serves them all. Demyanov et al. use these five.
"""

import math

import torch
import torch.nn.functional as F

from robust_cli.core.errors import UserError

TANGENT_NAMES = ("shift_u", "shift_v", "scale_u", "scale_v", "rotation")


def gaussian_blur(images, sigma):
    """Separable Gaussian smoothing of (B, C, H, W) images, sigma in pixels, replicate padding."""
    if sigma <= 0:
        return images
    radius = max(1, math.ceil(3 * sigma))
    offsets = torch.arange(-radius, radius + 1, dtype=images.dtype, device=images.device)
    kernel = torch.exp(-(offsets**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    channels = images.shape[1]
    rows = kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1)
    cols = kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1)
    out = F.conv2d(F.pad(images, (0, 0, radius, radius), mode="replicate"), rows, groups=channels)
    return F.conv2d(F.pad(out, (radius, radius, 0, 0), mode="replicate"), cols, groups=channels)


def image_tangents(images, sigma=0.9):
    """Tangent vectors (B, 5, C, H, W) of images (B, C, H, W), in the order of TANGENT_NAMES.

    Derivatives are per unit of the [-1, 1] coordinates (so d/du = (W - 1)/2 * d/d(column)).
    """
    if images.dim() != 4:
        raise UserError(
            f"tangent vectors need image inputs (B, C, H, W), got shape {tuple(images.shape)}: use an image dataset (digits, mnist, ...) with this defense"
        )
    height, width = images.shape[-2:]
    smooth = gaussian_blur(images, sigma)
    # central differences with replicate padding, in pixel units, then rescaled to [-1, 1] units
    padded = F.pad(smooth, (1, 1, 1, 1), mode="replicate")
    d_col = (padded[..., 1:-1, 2:] - padded[..., 1:-1, :-2]) / 2 * ((width - 1) / 2)
    d_row = (padded[..., 2:, 1:-1] - padded[..., :-2, 1:-1]) / 2 * ((height - 1) / 2)
    u = torch.linspace(-1, 1, width, dtype=images.dtype, device=images.device).view(1, 1, 1, width)
    v = torch.linspace(-1, 1, height, dtype=images.dtype, device=images.device).view(1, 1, height, 1)
    tangents = (d_col, d_row, u * d_col, v * d_row, v * d_col - u * d_row)
    return torch.stack(tangents, dim=1)
