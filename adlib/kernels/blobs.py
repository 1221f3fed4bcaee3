"""Gaussian-mixture blobs: synthetic anomalies with exact masks (semi-formula-driven pre-training).

- :func:`gmm_blobs`: images ``(B, C, H, W)`` -> anomalous images ``(B, C, H, W)``, masks
  ``(B, 1, H, W)``, the drawn :class:`BlobParams` and scores ``(B,)``.
- :func:`paint_blobs`: the same with parameters chosen by the caller.
- :func:`blob_score`: the score ``(B,)`` of given blobs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

BLOB_SIGNS = ("both", "positive", "negative")   # the sign of each blob's intensity change
BLOB_COLOURS = ("random", "gray")               # per-channel weights in [0.5, 1], or all 1


@dataclass
class BlobParams:
    """Parameters of the blobs added to each image; ``K`` is the largest component count.

    ``centre (B, K, 2)`` in [0, 1] (y, x); ``sigma (B, K, 2)`` as fractions of the image side;
    ``angle (B, K)`` radians; ``amplitude (B, K)`` signed; ``active (B, K)`` bool;
    ``colour (B, C)`` per-channel weights.
    """

    centre: Tensor
    sigma: Tensor
    angle: Tensor
    amplitude: Tensor
    active: Tensor
    colour: Tensor


def _uniform(shape: tuple[int, ...], low: float, high: float, generator: torch.Generator, device) -> Tensor:
    return low + (high - low) * torch.rand(shape, generator=generator, device=device)


def gmm_blobs(images: Tensor, n_components: tuple[int, int] = (1, 4), centre: tuple[float, float] = (0.15, 0.85),
              sigma: tuple[float, float] = (0.02, 0.12), rotation: tuple[float, float] = (0.0, math.pi),
              amplitude: tuple[float, float] = (0.3, 1.5), signs: str = "both", colour: str = "random",
              mask_level: float = 2.0, generator: torch.Generator | None = None,
              ) -> tuple[Tensor, Tensor, BlobParams, Tensor]:
    """Add a random mixture of 2-D Gaussians to each image: synthetic anomalies with exact masks.

    For image ``b`` with ``n_b`` components drawn from ``n_components`` (inclusive), the blob field is
    ``g(u) = sum_k a_k exp(-q_k(u) / 2)`` with ``q_k`` the rotated anisotropic quadratic form of centre
    ``c_k``, standard deviations ``sigma_k`` (fractions of the side) and angle ``theta_k``; the image
    becomes ``x + g * colour`` (colour: ``"random"`` unit-norm-ish per-channel weights in [0.5, 1], or
    ``"gray"`` all ones). Vectorized over images and components (images grouped by their component
    count), on the images' device; the same ``generator`` seed gives the same anomalies.

    Each component is cut off at its ``mask_level``-sigma ellipse (zero outside it), so a pixel
    changes exactly where the mask says: the mask is the ground truth of the change, not an
    approximation of it (at ``mask_level = 2`` the cut is at e^-2 = 13.5% of the amplitude).

    Returns:
        anomalous images ``(B, C, H, W)``; masks ``(B, 1, H, W)``: pixels inside some component's
        ``mask_level``-sigma ellipse; the :class:`BlobParams`; and a score ``(B,)`` from
        :func:`blob_score`: the blobs' total contrast times extent.
    """
    if images.ndim != 4:
        raise ValueError(f"images must be (B, C, H, W), got shape {tuple(images.shape)}")
    if not images.dtype.is_floating_point:
        raise TypeError(f"images must be floating point, got {images.dtype}")
    lo, hi = n_components
    if not (0 < sigma[0] <= sigma[1] and mask_level > 0):
        raise ValueError(f"sigma must be (min, max) with 0 < min <= max and mask_level > 0, got {sigma}, {mask_level}")
    if not 1 <= lo <= hi:
        raise ValueError(f"n_components must be (min, max) with 1 <= min <= max, got {n_components}")
    if signs not in BLOB_SIGNS:
        raise ValueError(f"signs must be one of {BLOB_SIGNS}, got {signs!r}")
    if colour not in BLOB_COLOURS:
        raise ValueError(f"colour must be one of {BLOB_COLOURS}, got {colour!r}")
    b, c, h, w = images.shape
    device = images.device
    if generator is None:
        generator = torch.Generator(device=device).manual_seed(0)
    k = hi
    count = torch.randint(lo, hi + 1, (b, 1), generator=generator, device=device)
    active = torch.arange(k, device=device)[None] < count                           # (B, K)
    centres = _uniform((b, k, 2), *centre, generator, device)
    sigmas = _uniform((b, k, 2), *sigma, generator, device)
    angles = _uniform((b, k), *rotation, generator, device)
    amps = _uniform((b, k), *amplitude, generator, device)
    if signs == "both":
        amps = amps * torch.where(torch.rand((b, k), generator=generator, device=device) < 0.5, -1.0, 1.0)
    elif signs == "negative":
        amps = -amps
    amps = amps * active
    weights = (_uniform((b, c), 0.5, 1.0, generator, device) if colour == "random"
               else torch.ones(b, c, device=device))

    params = BlobParams(centres, sigmas, angles, amps, active, weights)
    out, masks, score = paint_blobs(images, params, mask_level)
    return out, masks, params, score


def blob_score(params: BlobParams, mask_level: float = 2.0) -> Tensor:
    """The anomaly score ``(B,)`` of each image's blobs: ``sum_k |a_k| * area_k`` over its active
    components, ``area_k = pi (mask_level sigma_y,k)(mask_level sigma_x,k)`` the ellipse's area as a
    fraction of the image. It grows with every amplitude, either standard deviation and the number
    of components, and ignores centre, angle and colour (the part of an ellipse beyond the border
    still counts)."""
    area = math.pi * (mask_level * params.sigma[..., 0]) * (mask_level * params.sigma[..., 1])
    return (params.amplitude.abs() * area * params.active).sum(1)


def paint_blobs(images: Tensor, params: BlobParams, mask_level: float = 2.0) -> tuple[Tensor, Tensor, Tensor]:
    """Add given blobs to ``images (B, C, H, W)`` -> (anomalous images, masks ``(B, 1, H, W)``, scores
    ``(B,)``): :func:`gmm_blobs` with parameters chosen by the caller, e.g. to change one at a time.
    Each image's active components come first; an image with none is returned unchanged."""
    if images.ndim != 4 or params.centre.shape[0] != images.shape[0]:
        raise ValueError(f"images must be (B, C, H, W) with B = {params.centre.shape[0]} parameter rows, "
                         f"got {tuple(images.shape)}")
    k = params.active.shape[1]
    prefix = torch.arange(k, device=params.active.device)[None] < params.active.sum(1, keepdim=True)
    if not torch.equal(params.active, prefix):
        raise ValueError("the active components of each image must come first (active = [True, ..., False, ...])")
    if not bool((params.sigma > 0).all()) or mask_level <= 0:
        raise ValueError("standard deviations and mask_level must be positive")
    out, masks = _paint_blobs(images, params, mask_level)
    return out, masks, blob_score(params, mask_level)


# exp() of very negative numbers gives subnormal floats, which x86 CPUs make ~4x slower (microcode
# assists; measured 72 -> 17 ms for the exponentials of 256 images); a component is cut to exactly 0
# below this exponent at the latest (e^-80 < 2e-35 of its amplitude), whatever mask_level asks
_EXPONENT_FLOOR = -80.0
# CPU: images x components x pixels computed per chunk, so that the temporaries stay near the cache
_BLOB_CHUNK_ELEMENTS = 1 << 21


def _paint_blobs(images: Tensor, params: BlobParams, mask_level: float) -> tuple[Tensor, Tensor]:
    """``images (B, C, H, W)`` + the blobs of ``params`` -> (anomalous images, masks ``(B, 1, H, W)``).

    Chunks of images; inside a chunk, the images with the same number of components go together,
    so no work is spent on unused component slots. Each output element is written once.
    """
    b, c, h, w = images.shape
    device = images.device
    cos, sin = torch.cos(params.angle), torch.sin(params.angle)
    inv_x, inv_y = 1.0 / params.sigma[..., 1] ** 2, 1.0 / params.sigma[..., 0] ** 2
    # q = A dx^2 + 2 B dx dy + C dy^2: the rotated ellipse's quadratic form
    quadratic = torch.stack([cos * cos * inv_x + sin * sin * inv_y, cos * sin * (inv_x - inv_y),
                             sin * sin * inv_x + cos * cos * inv_y], -1)           # (B, K, 3)
    counts = params.active.sum(1)
    out = torch.empty_like(images)
    masks = torch.empty(b, 1, h, w, dtype=images.dtype, device=device)
    step = max(1, _BLOB_CHUNK_ELEMENTS // max(1, params.active.shape[1] * h * w)) if device.type == "cpu" else b
    field = torch.empty(min(step, b), h, w, device=device)
    for i0 in range(0, b, step):
        chunk = slice(i0, i0 + step)
        chunk_counts = counts[chunk]
        for n in torch.unique(chunk_counts).tolist():
            which = torch.nonzero(chunk_counts == n).squeeze(1)
            if n == 0:                    # no blob: unchanged image, empty mask
                field[which], masks[i0 + which] = 0, 0
                continue
            parts = [t[chunk][which, :n] for t in (params.centre, quadratic, params.amplitude)]
            field[which], inside = _blob_field(*parts, h, w, mask_level)
            masks[i0 + which, 0] = inside.to(masks.dtype)
        g = len(chunk_counts)
        torch.addcmul(images[chunk], field[:g, None].to(images.dtype),
                      params.colour[chunk, :, None, None].to(images.dtype), out=out[chunk])
    return out, masks


def _blob_field(centre: Tensor, quadratic: Tensor, amplitude: Tensor, h: int, w: int,
                mask_level: float) -> tuple[Tensor, Tensor]:
    """``g`` images with ``k`` components each: centres ``(g, k, 2)``, quadratic forms ``(g, k, 3)``,
    amplitudes ``(g, k)`` -> field ``sum_k a_k exp(-q_k / 2)`` and "inside some ellipse" ``(g, H, W)``.

    The exponent ``-q/2 = u(y) + v(x) + s(y) x`` has a row part, a column part and one product
    term, so three passes build it; below the cut-off it is set to -inf (the component is zero
    there); the mask is one ``max`` over components, the sum one batched product.
    """
    g, k, _ = centre.shape
    ys = (torch.arange(h, device=centre.device, dtype=torch.float32) + 0.5) / h
    xs = (torch.arange(w, device=centre.device, dtype=torch.float32) + 0.5) / w
    dy = ys - centre[..., 0, None]                                     # (g, k, H)
    dx = xs - centre[..., 1, None]                                     # (g, k, W)
    coef_a, coef_b, coef_c = quadratic.unbind(-1)
    row = (-0.5 * coef_c)[..., None] * dy * dy
    column = (-0.5 * coef_a)[..., None] * dx * dx
    exponent = row[..., :, None] + column[..., None, :]               # (g, k, H, W)
    exponent.addcmul_((-coef_b[..., None] * dy)[..., :, None], dx[..., None, :])
    cut = max(-0.5 * mask_level ** 2, _EXPONENT_FLOOR)
    inside = exponent.amax(1) >= cut
    blobs = exponent.masked_fill_(exponent < cut, -math.inf).exp_().view(g, k, h * w)   # exp(-inf) = 0
    return torch.bmm(amplitude[:, None, :], blobs).view(g, h, w), inside
