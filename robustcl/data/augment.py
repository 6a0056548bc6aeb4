"""Batched, on-device image augmentation for contrastive (SimCLR-style) and weak (crop + flip) views.

Everything works on a whole batch ``[N, C, H, W]`` at once: each sample gets its own random parameters,
but there is no Python loop over images, so the augmentation can run on the GPU next to the model.
All random numbers come from a caller-supplied :class:`torch.Generator` and are drawn in a fixed order
(the number of draws depends only on the batch size), so the same seed gives the same views and a trainer
can resume an epoch by restoring the generator state.

The semantics follow the torchvision transforms used by the ACL reference code::

    RandomResizedCrop(size, scale, ratio, interpolation=BICUBIC)
    RandomHorizontalFlip(p)
    RandomApply([ColorJitter(b, c, s, h)], p)
    RandomGrayscale(p)
    ToTensor()

The resize reproduces ``torch.nn.functional.interpolate(crop, antialias=True, align_corners=False)``,
which is what torchvision's ``F.resized_crop`` does on tensors and which in turn was written to match
PIL's resampling (Keys cubic with a = -0.5, filter support clipped to the crop and renormalised).
Pixels stay in float32 throughout, whereas PIL rounds to uint8 after every step; the difference is
below one grey level per step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "SimCLRAugmentParams",
    "SimCLRAugment",
    "WeakAugmentParams",
    "WeakAugment",
    "sample_resized_crop_boxes",
    "resized_crop",
    "rgb_to_grayscale",
    "adjust_brightness",
    "adjust_contrast",
    "adjust_saturation",
    "adjust_hue",
    "rgb_to_hsv",
    "hsv_to_rgb",
    "color_jitter",
]

INTERPOLATIONS = ("bicubic", "bilinear")
_GRAY_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R 601-2 luma, as torchvision and PIL "L" mode
_CROP_ATTEMPTS = 10  # torchvision RandomResizedCrop.get_params


# --------------------------------------------------------------------------------------------------
# parameters


@dataclass(frozen=True)
class SimCLRAugmentParams:
    """Plain-value parameters of :class:`SimCLRAugment` (recipes map onto these fields one to one)."""

    size: int
    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    interpolation: str = "bicubic"  # "bicubic" | "bilinear"
    flip_p: float = 0.5
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1)  # brightness, contrast, saturation, hue
    jitter_p: float = 0.8
    grayscale_p: float = 0.2

    def __post_init__(self) -> None:
        # recipes arrive as YAML lists; store tuples so the frozen object stays hashable
        object.__setattr__(self, "crop_scale", tuple(float(v) for v in self.crop_scale))
        object.__setattr__(self, "crop_ratio", tuple(float(v) for v in self.crop_ratio))
        object.__setattr__(self, "jitter", tuple(float(v) for v in self.jitter))
        _check_positive_int(self.size, "size")
        _check_range(self.crop_scale, "crop_scale")
        _check_range(self.crop_ratio, "crop_ratio")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {self.interpolation!r}")
        if len(self.jitter) != 4:
            raise ValueError(f"jitter must be (brightness, contrast, saturation, hue), got {self.jitter}")
        if min(self.jitter) < 0 or self.jitter[3] > 0.5:
            raise ValueError(f"jitter strengths must be >= 0 and hue <= 0.5, got {self.jitter}")
        for name in ("flip_p", "jitter_p", "grayscale_p"):
            _check_probability(getattr(self, name), name)


@dataclass(frozen=True)
class WeakAugmentParams:
    """Parameters of :class:`WeakAugment`: zero-padded random crop plus horizontal flip."""

    size: int
    padding: int = 4
    flip_p: float = 0.5

    def __post_init__(self) -> None:
        _check_positive_int(self.size, "size")
        if int(self.padding) != self.padding or self.padding < 0:
            raise ValueError(f"padding must be a non-negative integer, got {self.padding!r}")
        _check_probability(self.flip_p, "flip_p")


def _check_positive_int(value: int, name: str) -> None:
    if int(value) != value or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _check_range(values: tuple[float, ...], name: str) -> None:
    if len(values) != 2 or not 0 < values[0] <= values[1]:
        raise ValueError(f"{name} must be (low, high) with 0 < low <= high, got {values}")


def _check_probability(p: float, name: str) -> None:
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {p}")


# --------------------------------------------------------------------------------------------------
# shared helpers


def _check_generator(generator: torch.Generator, device: torch.device | str) -> None:
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


def _rand(n: int | tuple[int, ...], generator: torch.Generator, device: torch.device) -> Tensor:
    size = (n,) if isinstance(n, int) else n
    return torch.rand(size, generator=generator, device=device, dtype=torch.float32)


def _to_float_rgb(images: Tensor) -> Tensor:
    """uint8 [0,255] or float [0,1] ``[N,C,H,W]`` with C in {1,3} -> float32 ``[N,3,H,W]`` in [0,1]."""
    if not isinstance(images, Tensor) or images.dim() != 4:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"expected images as a [N, C, H, W] tensor, got {shape}")
    if images.shape[1] not in (1, 3):
        raise ValueError(f"expected 1 or 3 channels, got {images.shape[1]} (shape {tuple(images.shape)})")
    if images.dtype == torch.uint8:
        x = images.to(torch.float32) / 255.0
    elif images.is_floating_point():
        x = images.to(torch.float32)
    else:
        raise ValueError(f"expected uint8 or floating point images, got {images.dtype}")
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return x


def _per_sample(factor: Tensor | float, x: Tensor) -> Tensor:
    """Factor of shape [N] (or a scalar) -> [N,1,1,1] broadcastable against ``x``."""
    return torch.as_tensor(factor, dtype=x.dtype, device=x.device).reshape(-1, 1, 1, 1)


def _blend(img1: Tensor, img2: Tensor, ratio: Tensor) -> Tensor:
    # same expression as torchvision's _blend so float results agree to rounding
    return (ratio * img1 + (1.0 - ratio) * img2).clamp(0.0, 1.0)


# --------------------------------------------------------------------------------------------------
# random resized crop + flip


def sample_resized_crop_boxes(
    n: int,
    height: int,
    width: int,
    scale: Sequence[float],
    ratio: Sequence[float],
    generator: torch.Generator,
    device: torch.device | str,
) -> Tensor:
    """Per-sample crop boxes as in torchvision's ``RandomResizedCrop.get_params``.

    Each sample gets up to 10 attempts (area fraction uniform in ``scale``, log aspect ratio uniform in
    ``log(ratio)``); the first attempt that fits inside the image wins, its position is uniform over the
    valid offsets.  Samples with no fitting attempt fall back to a centre crop clamped to the ratio range.

    Draws, in order: ``[n,10]`` area fractions, ``[n,10]`` log-ratios, ``[n]`` top, ``[n]`` left.

    Returns:
        int64 tensor ``[n, 4]`` of (top, left, h, w) in pixels.
    """
    device = torch.device(device)
    _check_generator(generator, device)
    _check_range(tuple(scale), "scale")
    _check_range(tuple(ratio), "ratio")
    u_area = _rand((n, _CROP_ATTEMPTS), generator, device)
    u_ratio = _rand((n, _CROP_ATTEMPTS), generator, device)
    u_top = _rand(n, generator, device)
    u_left = _rand(n, generator, device)

    area = float(height * width)
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    target_area = area * (scale[0] + (scale[1] - scale[0]) * u_area)
    aspect = torch.exp(log_lo + (log_hi - log_lo) * u_ratio)
    # torch.round is round-half-to-even, the same as Python's round() used by torchvision
    w_try = torch.round(torch.sqrt(target_area * aspect))
    h_try = torch.round(torch.sqrt(target_area / aspect))
    fits = (w_try > 0) & (w_try <= width) & (h_try > 0) & (h_try <= height)
    attempt = torch.arange(_CROP_ATTEMPTS, device=device).expand(n, -1)
    first = torch.where(fits, attempt, _CROP_ATTEMPTS).min(dim=1, keepdim=True).values
    accepted = first.squeeze(1) < _CROP_ATTEMPTS
    first = first.clamp(max=_CROP_ATTEMPTS - 1)
    h_acc = h_try.gather(1, first).squeeze(1).long()
    w_acc = w_try.gather(1, first).squeeze(1).long()

    fb_h, fb_w = _fallback_crop_size(height, width, ratio)
    h = torch.where(accepted, h_acc, fb_h)
    w = torch.where(accepted, w_acc, fb_w)
    # randint(0, H - h + 1) via one uniform per sample; clamp guards float rounding up to the bound
    top_rand = torch.minimum((u_top * (height - h + 1)).long(), height - h)
    left_rand = torch.minimum((u_left * (width - w + 1)).long(), width - w)
    top = torch.where(accepted, top_rand, (height - h) // 2)
    left = torch.where(accepted, left_rand, (width - w) // 2)
    return torch.stack([top, left, h, w], dim=1)


def _fallback_crop_size(height: int, width: int, ratio: Sequence[float]) -> tuple[int, int]:
    in_ratio = width / height
    if in_ratio < min(ratio):
        w = width
        h = int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        h = height
        w = int(round(h * max(ratio)))
    else:
        h, w = height, width
    return h, w


def _cubic_filter(x: Tensor) -> Tensor:
    # Keys cubic with a = -0.5: PIL's BICUBIC and torch's antialiased bicubic (not -0.75 of grid_sample)
    a = -0.5
    x = x.abs()
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a
    return torch.where(x < 1.0, near, torch.where(x < 2.0, far, torch.zeros_like(x)))


def _linear_filter(x: Tensor) -> Tensor:
    return (1.0 - x.abs()).clamp(min=0.0)


_FILTERS: dict[str, Callable[[Tensor], Tensor]] = {"bicubic": _cubic_filter, "bilinear": _linear_filter}


def _resample_matrix(
    offset: Tensor, length: Tensor, in_size: int, out_size: int, interpolation: str, flip: Tensor | None
) -> Tensor:
    """``[n, out_size, in_size]`` weights that crop ``[offset, offset+length)`` and resize it along one axis.

    Same weights as ATen's antialiased upsampling (``_compute_indices_min_size_weights_aa``): output
    pixel i samples the crop at ``scale * (i + 0.5)``; when shrinking, the filter is stretched by the
    scale; taps outside the crop get weight zero and each row is renormalised to sum to one.
    """
    filt = _FILTERS[interpolation]
    dev = offset.device
    scale = length.to(torch.float32) / out_size  # [n]
    inv_support_scale = 1.0 / scale.clamp(min=1.0)
    centre = scale[:, None] * (torch.arange(out_size, device=dev, dtype=torch.float32) + 0.5)  # [n, out]
    pos = torch.arange(in_size, device=dev)[None, :] - offset[:, None]  # tap position inside the crop
    dist = (pos.to(torch.float32)[:, None, :] + 0.5 - centre[:, :, None]) * inv_support_scale[:, None, None]
    weights = filt(dist)
    inside = (pos >= 0) & (pos < length[:, None])
    weights = weights * inside[:, None, :]
    weights = weights / weights.sum(dim=-1, keepdim=True)
    if flip is not None:
        weights = torch.where(flip[:, None, None], weights.flip(1), weights)
    return weights


def resized_crop(
    images_float: Tensor,
    boxes: Tensor,
    size: int,
    interpolation: str = "bicubic",
    flip_mask: Tensor | None = None,
) -> Tensor:
    """Crop each image to its box (top, left, h, w), resize to ``size x size`` and optionally mirror it.

    The crop and resize are separable, so each sample is two small matrix products
    ``Wy @ image @ Wx^T`` with per-sample weight matrices (see :func:`_resample_matrix`); this matches
    ``F.interpolate(image[..., t:t+h, l:l+w], size, mode, antialias=True)`` - i.e. torchvision's tensor
    ``resized_crop`` and, up to uint8 rounding, PIL - including the edges, where only pixels inside the
    crop are used.  A horizontal flip reverses the rows of ``Wx`` and so costs nothing.  A full-image box
    at the input size gives identity matrices and therefore the input exactly (in full float32 matmul
    precision; with TF32 matmuls enabled on a GPU expect ~1e-3 deviations).

    ``grid_sample`` is not used on purpose: its bicubic kernel is a = -0.75 rather than PIL's -0.5, it
    reads pixels outside the crop at the crop edges, and it cannot antialias when shrinking.

    Args:
        images_float: float ``[N, C, H, W]`` in [0, 1].
        boxes: ``[N, 4]`` integer (top, left, h, w), each box inside the image.
        size: output height and width.
        interpolation: ``"bicubic"`` or ``"bilinear"``.
        flip_mask: optional bool ``[N]``; True mirrors that sample horizontally.

    Returns:
        ``[N, C, size, size]`` clamped to [0, 1] (bicubic overshoots at edges).
    """
    if interpolation not in _FILTERS:
        raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}")
    if not images_float.is_floating_point():
        raise ValueError(f"resized_crop expects float images, got {images_float.dtype}")
    _, _, height, width = images_float.shape
    boxes = boxes.to(device=images_float.device).long()
    top, left, h, w = boxes.unbind(dim=1)
    flip = None if flip_mask is None else flip_mask.to(device=images_float.device, dtype=torch.bool)
    wy = _resample_matrix(top, h, height, size, interpolation, None).to(images_float.dtype)
    wx = _resample_matrix(left, w, width, size, interpolation, flip).to(images_float.dtype)
    out = torch.matmul(torch.matmul(wy[:, None], images_float), wx.transpose(1, 2)[:, None])
    return out.clamp(0.0, 1.0)


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
    n = torch.tensor([5.0, 3.0, 1.0], dtype=x.dtype, device=x.device).view(3, 1, 1)
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
    generator: torch.Generator,
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
    generator: torch.Generator,
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


# --------------------------------------------------------------------------------------------------
# pipelines


class SimCLRAugment:
    """RandomResizedCrop -> HorizontalFlip -> RandomApply(ColorJitter) -> RandomGrayscale, per sample.

    Random draws per call, in order: crop boxes (see :func:`sample_resized_crop_boxes`), ``[N]`` flip,
    ``[N]`` jitter apply, jitter order and factors (see :func:`color_jitter`), ``[N]`` grayscale.  They
    are drawn even when a probability is 0, so the generator advances by the same amount every call.
    """

    def __init__(self, params: SimCLRAugmentParams) -> None:
        self.params = params
        self._jitter_ranges = _jitter_ranges(*params.jitter)

    def __repr__(self) -> str:
        return f"SimCLRAugment({self.params})"

    def __call__(self, images: Tensor, generator: torch.Generator) -> Tensor:
        """images: uint8 [N,C,H,W] (or float in [0,1]) on any device -> float32 [N,3,size,size] in [0,1].

        ``generator`` must live on the images' device (ValueError otherwise).
        """
        p = self.params
        x = _to_float_rgb(images)
        device = x.device
        _check_generator(generator, device)
        n, _, height, width = x.shape

        boxes = sample_resized_crop_boxes(n, height, width, p.crop_scale, p.crop_ratio, generator, device)
        flip = _rand(n, generator, device) < p.flip_p
        jitter_apply = _rand(n, generator, device) < p.jitter_p
        order, factors = _sample_jitter(n, self._jitter_ranges, generator, device)
        gray = _rand(n, generator, device) < p.grayscale_p

        x = resized_crop(x, boxes, p.size, p.interpolation, flip)
        if p.jitter_p > 0:
            x = _apply_jitter(x, order, factors, self._jitter_ranges, jitter_apply)
        if p.grayscale_p > 0:
            x = torch.where(gray.view(n, 1, 1, 1), rgb_to_grayscale(x, 3), x)
        return x


class WeakAugment:
    """torchvision ``RandomCrop(size, padding)`` (zero fill) followed by ``RandomHorizontalFlip``.

    Shifts are whole pixels, so the output is an exact copy of part of the padded image.  Draws per
    call, in order: ``[N]`` top offsets, ``[N]`` left offsets, ``[N]`` flip.
    """

    def __init__(self, params: WeakAugmentParams) -> None:
        self.params = params

    def __repr__(self) -> str:
        return f"WeakAugment({self.params})"

    def __call__(self, images: Tensor, generator: torch.Generator) -> Tensor:
        """images: uint8 [N,C,H,W] (or float in [0,1]); returns float32 [N,3,size,size] in [0,1]."""
        p = self.params
        x = _to_float_rgb(images)
        device = x.device
        _check_generator(generator, device)
        n, c, height, width = x.shape
        padded_h, padded_w = height + 2 * p.padding, width + 2 * p.padding
        if padded_h < p.size or padded_w < p.size:
            raise ValueError(
                f"crop size {p.size} is larger than the padded image {padded_h}x{padded_w}; "
                f"increase padding or reduce size"
            )
        top = torch.randint(0, padded_h - p.size + 1, (n,), generator=generator, device=device)
        left = torch.randint(0, padded_w - p.size + 1, (n,), generator=generator, device=device)
        flip = _rand(n, generator, device) < p.flip_p

        padded = F.pad(x, (p.padding,) * 4)
        steps = torch.arange(p.size, device=device)
        rows = top[:, None] + steps  # [n, size]
        cols = left[:, None] + steps
        cols = torch.where(flip[:, None], cols.flip(1), cols)
        out = padded.gather(2, rows[:, None, :, None].expand(n, c, p.size, padded_w))
        return out.gather(3, cols[:, None, None, :].expand(n, c, p.size, p.size))
