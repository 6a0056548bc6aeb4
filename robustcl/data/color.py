"""Batched, per-sample colour operations: grayscale, brightness / contrast / saturation / hue, RGB <-> HSV
and torchvision's ``ColorJitter`` with a random per-sample order of its four ops.

Images are float ``[N, 3, H, W]`` in [0, 1] and every sample gets its own factor, with no Python loop over
images, so the ops run on the GPU next to the model.  Random numbers come from a caller-supplied
:class:`torch.Generator` in a fixed order.  The values follow torchvision's tensor implementations (the
ITU-R 601-2 luma weights of PIL's "L" mode, ``_blend``, ``_rgb2hsv`` / ``_hsv2rgb``).

This module also owns the small random-number helpers (:func:`_check_generator`, :func:`_rand`) that
:mod:`robustcl.data.augment` imports for its crop / flip pipelines.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from robustcl.data.batches import RandomSource, uniform

__all__ = [
    "adjust_brightness",
    "adjust_contrast",
    "adjust_hue",
    "adjust_saturation",
    "color_jitter",
    "hsv_to_rgb",
    "rgb_to_grayscale",
    "rgb_to_hsv",
    "solarize",
]

_GRAY_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R 601-2 luma, as torchvision and PIL "L" mode
# PIL's ImageOps.solarize(image) inverts grey levels ≥ 128 (its default threshold, the one solo-learn's Solarization
# uses). Float pixels here are what PIL would have rounded to a grey level: the cut lies half-way, at 127.5.
_SOLARIZE_THRESHOLD = 127.5 / 255


# --------------------------------------------------------------------------------------------------
# shared helpers


def _check_generator(generator: RandomSource, device: torch.device | str) -> None:
    """Raise if the generator cannot produce numbers directly on ``device``."""
    device = torch.device(device)
    gen_device = generator.device
    same = gen_device.type == device.type and (
        gen_device.index is None or device.index is None or gen_device.index == device.index
    )
    if not same:
        raise ValueError(
            f"generator is on {gen_device} but the images are on {device}; "
            f"create it with torch.Generator(device={str(device)!r})"
        )


def _rand(n: int | tuple[int, ...], generator: RandomSource, device: torch.device) -> Tensor:
    return uniform((n,) if isinstance(n, int) else n, generator, device)


def _per_sample(factor: Tensor | float, x: Tensor) -> Tensor:
    """Factor of shape [N] (or a scalar) -> [N,1,1,1] broadcastable against ``x``."""
    return torch.as_tensor(factor, dtype=x.dtype, device=x.device).reshape(-1, 1, 1, 1)


def _blend(img1: Tensor, img2: Tensor, ratio: Tensor) -> Tensor:
    # same expression as torchvision's _blend so float results agree to rounding
    return (ratio * img1 + (1.0 - ratio) * img2).clamp(0.0, 1.0)


# --------------------------------------------------------------------------------------------------
# colour


def rgb_to_grayscale(x: Tensor, num_output_channels: int = 1) -> Tensor:
    """Luma ``0.299 R + 0.587 G + 0.114 B`` as ``[N, num_output_channels, H, W]`` (1 or 3 channels).

    With 3 output channels the result is an expanded view of one plane; clone it before writing in place.
    """
    if num_output_channels not in (1, 3):
        raise ValueError(f"num_output_channels must be 1 or 3, got {num_output_channels}")
    if x.shape[-3] == 1:
        gray = x
    else:
        r, g, b = x.unbind(dim=-3)
        gray = (_GRAY_WEIGHTS[0] * r + _GRAY_WEIGHTS[1] * g + _GRAY_WEIGHTS[2] * b).unsqueeze(-3)
    if num_output_channels == 3:
        gray = gray.expand(*gray.shape[:-3], 3, *gray.shape[-2:])
    return gray


def solarize(x: Tensor) -> Tensor:
    """PIL's ``ImageOps.solarize`` (threshold 128): a pixel of grey level ≥ 128 becomes 255 − level, i.e. ``1 − x``.

    Exact on images of whole grey levels (k / 255); between levels the cut is at 127.5 / 255, where PIL's rounding
    to uint8 would put it.
    """
    return torch.where(x >= _SOLARIZE_THRESHOLD, 1.0 - x, x)


def adjust_brightness(x: Tensor, factor: Tensor | float) -> Tensor:
    """Per-sample brightness: blend with black, ``clamp(f * x, 0, 1)``; ``factor`` is ``[N]``."""
    return _blend(x, torch.zeros_like(x), _per_sample(factor, x))


def adjust_contrast(x: Tensor, factor: Tensor | float) -> Tensor:
    """Per-sample contrast: blend with the mean grey level of the same sample."""
    mean = rgb_to_grayscale(x).mean(dim=(-3, -2, -1), keepdim=True)
    return _blend(x, mean, _per_sample(factor, x))


def adjust_saturation(x: Tensor, factor: Tensor | float) -> Tensor:
    """Per-sample saturation: blend with the grayscale version of the same sample."""
    return _blend(x, rgb_to_grayscale(x), _per_sample(factor, x))


def rgb_to_hsv(x: Tensor) -> Tensor:
    """RGB in [0,1] -> HSV with hue in [0,1) (torchvision's ``_rgb2hsv``)."""
    r, g, b = x.unbind(dim=-3)
    maxc = x.amax(dim=-3)
    minc = x.amin(dim=-3)
    eqc = maxc == minc
    cr = maxc - minc
    ones = torch.ones_like(maxc)
    # grey pixels have no hue; the divisor swap avoids 0/0 and gives h = s = 0 there
    s = cr / torch.where(eqc, ones, maxc)
    cr_divisor = torch.where(eqc, ones, cr)
    rc = (maxc - r) / cr_divisor
    gc = (maxc - g) / cr_divisor
    bc = (maxc - b) / cr_divisor
    hr = (maxc == r) * (bc - gc)
    hg = ((maxc == g) & (maxc != r)) * (2.0 + rc - bc)
    hb = ((maxc != g) & (maxc != r)) * (4.0 + gc - rc)
    h = torch.fmod((hr + hg + hb) / 6.0 + 1.0, 1.0)
    return torch.stack((h, s, maxc), dim=-3)


def hsv_to_rgb(x: Tensor) -> Tensor:
    """HSV (hue in [0,1)) -> RGB in [0,1]; same values as torchvision's ``_hsv2rgb`` up to float rounding.

    Uses the closed form ``c = v - v s clamp(min(k, 4 - k), 0, 1)`` with ``k = (n + 6h) mod 6`` and
    n = 5, 3, 1 for R, G, B, which equals torchvision's six-sector table but needs no per-sector stacks.
    """
    h, s, v = x.split(1, dim=-3)
    n = torch.arange(5.0, 0.0, -2.0, dtype=x.dtype, device=x.device).view(3, 1, 1)  # made on the device: no copy
    k = torch.remainder(n + h * 6.0, 6.0)
    ramp = torch.minimum(k, 4.0 - k).clamp(0.0, 1.0)
    return (v - v * s * ramp).clamp(0.0, 1.0)


def adjust_hue(x: Tensor, factor: Tensor | float) -> Tensor:
    """Per-sample hue rotation by ``factor`` (in [-0.5, 0.5], fraction of the colour circle)."""
    hsv = rgb_to_hsv(x)
    h, s, v = hsv.unbind(dim=-3)
    h = (h + _per_sample(factor, x).squeeze(1)) % 1.0
    return hsv_to_rgb(torch.stack((h, s, v), dim=-3))


def _jitter_range(
    value: float | Sequence[float], name: str, centre: float, bounds: tuple[float, float]
) -> tuple[float, float]:
    """torchvision ColorJitter._check_input: a scalar v means [max(0, centre - v), centre + v]."""
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError(f"{name} must be non-negative, got {value}")
        lo, hi = centre - value, centre + value
        if name != "hue":
            lo = max(lo, 0.0)
    else:
        lo, hi = (float(v) for v in value)
    if not bounds[0] <= lo <= hi <= bounds[1]:
        raise ValueError(f"{name} range must lie in [{bounds[0]}, {bounds[1]}], got ({lo}, {hi})")
    return float(lo), float(hi)


_JITTER_OPS: tuple[Callable[[Tensor, Tensor], Tensor], ...] = (
    adjust_brightness,
    adjust_contrast,
    adjust_saturation,
    adjust_hue,
)


def _sample_jitter(
    n: int,
    ranges: Sequence[tuple[float, float]],
    generator: RandomSource,
    device: torch.device,
) -> tuple[Tensor, Tensor]:
    """Draw a per-sample op order ``[n, 4]`` and factors ``[4, n]``; always 5 draws of size n or n x 4."""
    order = _rand((n, 4), generator, device).argsort(dim=1)  # uniform random permutation per sample
    factors = torch.stack([lo + (hi - lo) * _rand(n, generator, device) for lo, hi in ranges])
    return order, factors


def _apply_jitter(
    x: Tensor,
    order: Tensor,
    factors: Tensor,
    ranges: Sequence[tuple[float, float]],
    apply_mask: Tensor,
    subsets: bool | None = None,
) -> Tensor:
    identity = (1.0, 1.0, 1.0, 0.0)
    # an op whose range is the single identity value is skipped (torchvision leaves it out as None)
    active = [k for k, (lo, hi) in enumerate(ranges) if not lo == hi == identity[k]]
    if not active:
        return x
    n = x.shape[0]
    apply_mask = apply_mask.to(device=x.device, dtype=torch.bool)
    if subsets is None:
        subsets = x.device.type == "cpu"
    if subsets:
        # on CPU, running each op only on the samples that pick it is ~4x cheaper; on accelerators the
        # data-dependent indexing would force a host sync per op, so they evaluate every op on every
        # sample and select with torch.where (same values: all ops are per-sample)
        out = x
        for round_ in range(4):
            chosen = order[:, round_]
            result = out.clone()
            for k in active:
                idx = ((chosen == k) & apply_mask).nonzero().squeeze(1)
                if idx.numel():
                    result[idx] = _JITTER_OPS[k](out[idx], factors[k][idx])
            out = result
        return out
    out = x
    for round_ in range(4):
        chosen = order[:, round_].view(n, 1, 1, 1)
        result = out
        for k in active:
            result = torch.where(chosen == k, _JITTER_OPS[k](out, factors[k]), result)
        out = result
    return torch.where(apply_mask.view(n, 1, 1, 1), out, x)


def color_jitter(
    x: Tensor,
    brightness: float | Sequence[float],
    contrast: float | Sequence[float],
    saturation: float | Sequence[float],
    hue: float | Sequence[float],
    apply_mask: Tensor,
    generator: RandomSource,
) -> Tensor:
    """torchvision ``ColorJitter`` with per-sample factors and a per-sample random order of the four ops.

    A scalar strength v gives factors uniform in ``[max(0, 1 - v), 1 + v]`` (hue: ``[-v, v]``); a pair
    gives the range directly.  Round r applies each sample's r-th op.  Samples whose ``apply_mask`` is
    False are returned unchanged.  Draws, in order: ``[N,4]`` for the order, then ``[N]`` per factor.
    """
    _check_generator(generator, x.device)
    ranges = _jitter_ranges(brightness, contrast, saturation, hue)
    order, factors = _sample_jitter(x.shape[0], ranges, generator, x.device)
    return _apply_jitter(x, order, factors, ranges, apply_mask.to(x.device))


def _jitter_ranges(
    brightness: float | Sequence[float],
    contrast: float | Sequence[float],
    saturation: float | Sequence[float],
    hue: float | Sequence[float],
) -> list[tuple[float, float]]:
    return [
        _jitter_range(brightness, "brightness", 1.0, (0.0, math.inf)),
        _jitter_range(contrast, "contrast", 1.0, (0.0, math.inf)),
        _jitter_range(saturation, "saturation", 1.0, (0.0, math.inf)),
        _jitter_range(hue, "hue", 0.0, (-0.5, 0.5)),
    ]
