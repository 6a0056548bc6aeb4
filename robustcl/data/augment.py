"""Batched, on-device image augmentation for contrastive (SimCLR-style) and weak (crop + flip) views.

Everything works on a whole batch ``[N, C, H, W]`` at once: each sample gets its own random parameters,
but there is no Python loop over images, so the augmentation can run on the GPU next to the model.
All random numbers come from a caller-supplied :class:`torch.Generator` (or, in training, a
:class:`~robustcl.data.batches.BatchRandom`: this process's rows of the global batch's draws) and are drawn in a
fixed order (the number of draws depends only on the batch size), so the same seed gives the same views.

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

The colour steps (``ColorJitter``, ``RandomGrayscale``) are implemented in :mod:`robustcl.data.color`;
this module holds the crop / resampling / flip and the two pipelines built from them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from pydantic.dataclasses import dataclass
from torch import Tensor

from robustcl.data.batches import RandomSource, integers
from robustcl.data.color import (
    _apply_jitter,
    _check_generator,
    _jitter_ranges,
    _rand,
    _sample_jitter,
    rgb_to_grayscale,
    solarize,
)
from robustcl.recipe import (
    BlurSigma,
    CropRatio,
    CropScale,
    Interpolation,
    Jitter,
    NonNegativeInt,
    PositiveInt,
    Probability,
)

__all__ = [
    "CroppedViews",
    "box_blur_matrix",
    "gaussian_blur",
    "pil_box_radius",
    "SimCLRAugment",
    "SimCLRAugmentParams",
    "WeakAugment",
    "WeakAugmentParams",
    "resized_crop",
    "sample_resized_crop_boxes",
]

_CROP_ATTEMPTS = 10  # torchvision RandomResizedCrop.get_params


# --------------------------------------------------------------------------------------------------
# parameters


@dataclass(frozen=True)
class SimCLRAugmentParams:
    """Plain-value parameters of :class:`SimCLRAugment` (recipes map onto these fields one to one), checked by the
    same rules as the recipe's augment section (a ValueError names the field)."""

    size: PositiveInt
    crop_scale: CropScale = (0.08, 1.0)
    crop_ratio: CropRatio = (3 / 4, 4 / 3)
    interpolation: Interpolation = "bicubic"
    flip_p: Probability = 0.5
    jitter: Jitter = (0.4, 0.4, 0.4, 0.1)  # brightness, contrast, saturation, hue
    jitter_p: Probability = 0.8
    grayscale_p: Probability = 0.2
    blur_p: Probability = 0.0  # solo-learn's RandomApply([GaussianBlur()], p), after grayscale
    blur_sigma: BlurSigma = (0.1, 2.0)  # its σ ~ U(low, high), PIL's GaussianBlur radius
    solarize_p: Probability = 0.0  # solo-learn's RandomApply([Solarization()], p), after the blur


@dataclass(frozen=True)
class WeakAugmentParams:
    """Parameters of :class:`WeakAugment`: zero-padded random crop plus horizontal flip."""

    size: PositiveInt
    padding: NonNegativeInt = 4
    flip_p: Probability = 0.5


# --------------------------------------------------------------------------------------------------
# input conversion


def to_float_rgb(images: Tensor) -> Tensor:
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


# --------------------------------------------------------------------------------------------------
# random resized crop + flip


def sample_resized_crop_boxes(
    n: int,
    height: int,
    width: int,
    scale: Sequence[float],
    ratio: Sequence[float],
    generator: RandomSource,
    device: torch.device | str,
) -> Tensor:
    """Per-sample crop boxes as in torchvision's ``RandomResizedCrop.get_params``.

    Each sample gets up to 10 attempts (area fraction uniform in ``scale``, log aspect ratio uniform in
    ``log(ratio)``); the first attempt that fits inside the image wins, its position is uniform over the
    valid offsets.  Samples with no fitting attempt fall back to a centre crop clamped to the ratio range.
    ``scale`` and ``ratio`` are ranges as :class:`SimCLRAugmentParams` checks them.

    Draws, in order: ``[n,10]`` area fractions, ``[n,10]`` log-ratios, ``[n]`` top, ``[n]`` left.

    Returns:
        int64 tensor ``[n, 4]`` of (top, left, h, w) in pixels.
    """
    device = torch.device(device)
    _check_generator(generator, device)
    u_area = _rand((n, _CROP_ATTEMPTS), generator, device)
    u_ratio = _rand((n, _CROP_ATTEMPTS), generator, device)
    u_top = _rand(n, generator, device)
    u_left = _rand(n, generator, device)
    sizes = torch.tensor([height, width], device=device).expand(n, 2)
    # One size for all: the fallback is known on the host (no device sync to find the distinct sizes).
    fallback = torch.tensor(_fallback_crop_size(height, width, ratio), device=device).expand(n, 2)
    return crop_boxes_from_uniforms(u_area, u_ratio, u_top, u_left, sizes, scale, ratio, fallback)


def crop_boxes_from_uniforms(
    u_area: Tensor,
    u_ratio: Tensor,
    u_top: Tensor,
    u_left: Tensor,
    sizes: Tensor,
    scale: Sequence[float],
    ratio: Sequence[float],
    fallback: Tensor | None = None,
) -> Tensor:
    """torchvision's ``RandomResizedCrop.get_params`` for images of per-sample ``sizes`` (int ``[n, 2]``: height,
    width), from the uniforms :func:`sample_resized_crop_boxes` draws: ``[n, 10]`` area fractions, ``[n, 10]``
    log-ratios, ``[n]`` top, ``[n]`` left. ``fallback`` (int ``[n, 2]``), when known, is each image's crop when no
    attempt fits (:func:`_fallback_crop_size`). Returns int64 ``[n, 4]`` (top, left, h, w)."""
    device = u_area.device
    height, width = sizes[:, 0].to(device), sizes[:, 1].to(device)
    area = (height * width).to(torch.float32)[:, None]
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    target_area = area * (scale[0] + (scale[1] - scale[0]) * u_area)
    aspect = torch.exp(log_lo + (log_hi - log_lo) * u_ratio)
    # torch.round is round-half-to-even, the same as Python's round() used by torchvision
    w_try = torch.round(torch.sqrt(target_area * aspect))
    h_try = torch.round(torch.sqrt(target_area / aspect))
    fits = (w_try > 0) & (w_try <= width[:, None]) & (h_try > 0) & (h_try <= height[:, None])
    attempt = torch.arange(_CROP_ATTEMPTS, device=device).expand(len(u_area), -1)
    first = torch.where(fits, attempt, _CROP_ATTEMPTS).min(dim=1, keepdim=True).values
    accepted = first.squeeze(1) < _CROP_ATTEMPTS
    first = first.clamp(max=_CROP_ATTEMPTS - 1)
    h_acc = h_try.gather(1, first).squeeze(1).long()
    w_acc = w_try.gather(1, first).squeeze(1).long()

    if fallback is None:
        fallback = _fallback_crop_sizes(sizes, ratio).to(device)
    fb_h, fb_w = fallback[:, 0], fallback[:, 1]
    h = torch.where(accepted, h_acc, fb_h)
    w = torch.where(accepted, w_acc, fb_w)
    # randint(0, H - h + 1) via one uniform per sample; clamp guards float rounding up to the bound
    top_rand = torch.minimum((u_top * (height - h + 1)).long(), height - h)
    left_rand = torch.minimum((u_left * (width - w + 1)).long(), width - w)
    top = torch.where(accepted, top_rand, (height - h) // 2)
    left = torch.where(accepted, left_rand, (width - w) // 2)
    return torch.stack([top, left, h, w], dim=1)


def _fallback_crop_sizes(sizes: Tensor, ratio: Sequence[float]) -> Tensor:
    """:func:`_fallback_crop_size` of each (height, width) row of ``sizes``: the same Python arithmetic, once per
    distinct size."""
    distinct, inverse = sizes.cpu().unique(dim=0, return_inverse=True)
    fallbacks = torch.tensor([_fallback_crop_size(int(h), int(w), ratio) for h, w in distinct.tolist()])
    return fallbacks[inverse]


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
    # An extreme ratio would round one side to 0 pixels (NaN views); a 1-pixel side is the closest real crop.
    return min(max(h, 1), height), min(max(w, 1), width)


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
        raise ValueError(f"interpolation must be one of {tuple(_FILTERS)}, got {interpolation!r}")
    if not images_float.is_floating_point():
        raise ValueError(f"resized_crop expects float images, got {images_float.dtype}")
    _, _, height, width = images_float.shape
    boxes = boxes.to(device=images_float.device).long()
    top, left, h, w = boxes.unbind(dim=1)
    flip = None if flip_mask is None else flip_mask.to(device=images_float.device, dtype=torch.bool)
    wy = _resample_matrix(top, h, height, size, interpolation, None).to(images_float.dtype)
    wx = _resample_matrix(left, w, width, size, interpolation, flip).to(images_float.dtype)
    # Views are pixels, not activations: under a mixed-precision step they stay in the input's precision.
    with torch.autocast(images_float.device.type, enabled=False):
        out = torch.matmul(torch.matmul(wy[:, None], images_float), wx.transpose(1, 2)[:, None])
    return out.clamp(0.0, 1.0)


# --------------------------------------------------------------------------------------------------
# Gaussian blur (PIL's: three extended box blurs per axis)

_BLUR_PASSES = 3  # PIL's ImageFilter.GaussianBlur → ImagingGaussianBlur(..., passes=3)
_FIXED_ONE = float(1 << 24)  # PIL's box blur weighs pixels in 24-bit fixed point


def pil_box_radius(sigma: Tensor) -> Tensor:
    """The fractional box radius PIL's GaussianBlur(radius=σ) blurs with, per sample (``_gaussian_blur_radius`` in
    Pillow's BoxBlur.c: three passes whose variances add up to σ², Gwosdek et al. 2011), in float32 as Pillow."""
    var = sigma.to(torch.float32) ** 2 / _BLUR_PASSES
    length = torch.sqrt(12.0 * var + 1.0)
    whole = torch.floor((length - 1.0) / 2.0)
    frac = (2 * whole + 1) * (whole * (whole + 1) - 3 * var) / (6 * (var - (whole + 1) * (whole + 1)))
    return whole + frac


def box_blur_matrix(radius: Tensor, size: int) -> Tensor:
    """``[n, size, size]``: one pass of PIL's box blur of fractional ``radius`` r = l + a along an axis of ``size``.

    Output pixel x averages pixels x − l … x + l with weight w = 1 / (2r + 1) each, and x ± (l + 1) with
    (1 − (2l + 1)·w) / 2; a position outside the image reads the edge pixel (Pillow's ImagingLineBoxBlur), so the
    taps that fall off an edge add their weight to the edge column. The weights are PIL's 24-bit fixed-point ones.
    """
    radius = radius.to(torch.float32)[:, None, None]  # [n, 1, 1]
    whole = torch.floor(radius)
    ww = torch.floor(_FIXED_ONE / (radius * 2 + 1))
    fw = torch.floor((_FIXED_ONE - (whole * 2 + 1) * ww) / 2)
    pos = torch.arange(size, device=radius.device, dtype=torch.float32)[None, :, None]  # [1, size, 1]
    # a tap's weight by its distance from the output pixel (0 … size − 1)
    taps = torch.where(pos <= whole, ww, torch.where(pos == whole + 1, fw, 0.0)).squeeze(2) / _FIXED_ONE
    index = torch.arange(size, device=radius.device)
    out = taps[:, (index[None, :] - index[:, None]).abs()]  # [n, x, j]
    # Taps past the left edge (x + k < 0) read column 0, past the right edge column size − 1: per output pixel x,
    # the number of near taps off each edge and whether its far tap is.
    off_left = ww * (whole - pos).clamp(min=0) + fw * (pos - whole - 1 < 0)
    off_right = ww * (pos + whole - (size - 1)).clamp(min=0) + fw * (pos + whole + 1 > size - 1)
    out[:, :, 0] += off_left.squeeze(2) / _FIXED_ONE
    out[:, :, -1] += off_right.squeeze(2) / _FIXED_ONE
    return out


def gaussian_blur(x: Tensor, sigma: Tensor) -> Tensor:
    """PIL's ``ImageFilter.GaussianBlur(radius=σ)`` of each image of float ``[N, C, H, W]`` with its own σ ``[N]``:
    three box blurs along the width and three along the height (:func:`box_blur_matrix`), as one matrix product per
    axis. PIL rounds to a grey level after each of its six passes; here pixels stay float (≤ 3 grey levels apart,
    < 1 on average; TF32 matmuls on a GPU add ~1e-3, as in :func:`resized_crop`)."""
    radius = pil_box_radius(sigma.to(x.device))
    _, _, height, width = x.shape
    bw = box_blur_matrix(radius, width)
    bh = box_blur_matrix(radius, height)
    with torch.autocast(x.device.type, enabled=False):
        bw3 = bw @ bw @ bw
        bh3 = bh @ bh @ bh
        return torch.matmul(torch.matmul(bh3[:, None], x), bw3.transpose(1, 2)[:, None]).clamp(0.0, 1.0)


# --------------------------------------------------------------------------------------------------
# pipelines


class CroppedViews:
    """Crops the data workers took from the original images (``augment.crop_on: original``): uint8
    ``[views, N, C, R, R]``. Each :class:`SimCLRAugment` call takes the next view and applies the rest of its
    pipeline (flip, colour jitter, grayscale) on the device."""

    def __init__(self, crops: Tensor) -> None:
        self.crops = crops
        self.taken = 0

    @property
    def device(self) -> torch.device:
        return self.crops.device

    def __len__(self) -> int:
        return self.crops.shape[1]

    def next(self) -> Tensor:
        if self.taken == len(self.crops):
            raise RuntimeError(f"the method asked for more than the {len(self.crops)} views the data workers cropped")
        self.taken += 1
        return self.crops[self.taken - 1]


class SimCLRAugment:
    """RandomResizedCrop -> HorizontalFlip -> RandomApply(ColorJitter) -> RandomGrayscale -> RandomApply(GaussianBlur)
    -> RandomApply(Solarize), per sample.

    Random draws per call, in order: crop boxes (see :func:`sample_resized_crop_boxes`), ``[N]`` flip,
    ``[N]`` jitter apply, jitter order and factors (see :func:`color_jitter`), ``[N]`` grayscale, then ``[N]`` blur
    apply and ``[N]`` blur σ only when ``blur_p > 0``, and ``[N]`` solarise only when ``solarize_p > 0``.  The first
    ones are drawn even when a probability is 0, so the generator advances by the same amount every call (DynACL
    scales jitter_p and grayscale_p down during a run).  Blur and solarisation are fixed settings of a run: leaving
    their draws out at 0 keeps the random stream, and so the views, of runs recorded before they existed.  solo-learn
    flips last; a flip commutes with these colour steps and with the (symmetric) blur.
    """

    def __init__(self, params: SimCLRAugmentParams) -> None:
        self.params = params
        self._jitter_ranges = _jitter_ranges(*params.jitter)

    def __repr__(self) -> str:
        return f"SimCLRAugment({self.params})"

    def __call__(self, images: Tensor | CroppedViews, generator: RandomSource) -> Tensor:
        """images: uint8 [N,C,H,W] (or float in [0,1]) on any device -> float32 [N,3,size,size] in [0,1].

        ``generator`` must live on the images' device (ValueError otherwise). With :class:`CroppedViews` the crop
        was taken from the original image already: the next view is used as it is (its crop draws are still made,
        so every later draw stays where it was).
        """
        p = self.params
        cropped = isinstance(images, CroppedViews)
        x = to_float_rgb(images.next() if cropped else images)
        device = x.device
        _check_generator(generator, device)
        n, _, height, width = x.shape

        boxes = sample_resized_crop_boxes(n, height, width, p.crop_scale, p.crop_ratio, generator, device)
        flip = _rand(n, generator, device) < p.flip_p
        jitter_apply = _rand(n, generator, device) < p.jitter_p
        order, factors = _sample_jitter(n, self._jitter_ranges, generator, device)
        gray = _rand(n, generator, device) < p.grayscale_p
        blur = self._draw_blur(n, generator, device)
        solar = _rand(n, generator, device) < p.solarize_p if p.solarize_p > 0 else None

        if cropped:
            x = torch.where(flip.view(n, 1, 1, 1), x.flip(-1), x)
        else:
            x = resized_crop(x, boxes, p.size, p.interpolation, flip)
        if p.jitter_p > 0:
            x = _apply_jitter(x, order, factors, self._jitter_ranges, jitter_apply)
        if p.grayscale_p > 0:
            x = torch.where(gray.view(n, 1, 1, 1), rgb_to_grayscale(x, 3), x)
        if blur is not None:
            chosen, sigma = blur
            x = torch.where(chosen.view(n, 1, 1, 1), gaussian_blur(x, sigma), x)
        if solar is not None:
            x = torch.where(solar.view(n, 1, 1, 1), solarize(x), x)
        return x

    def _draw_blur(self, n: int, generator: RandomSource, device: torch.device) -> tuple[Tensor, Tensor] | None:
        """Which images are blurred and their σ, uniform in ``blur_sigma`` (none drawn when ``blur_p`` is 0)."""
        p = self.params
        if p.blur_p == 0:
            return None
        chosen = _rand(n, generator, device) < p.blur_p
        low, high = p.blur_sigma
        return chosen, low + (high - low) * _rand(n, generator, device)


class WeakAugment:
    """torchvision ``RandomCrop(size, padding)`` (zero fill) followed by ``RandomHorizontalFlip``.

    Shifts are whole pixels, so the output is an exact copy of part of the padded image.  Draws per
    call, in order: ``[N]`` top offsets, ``[N]`` left offsets, ``[N]`` flip.
    """

    def __init__(self, params: WeakAugmentParams) -> None:
        self.params = params

    def __repr__(self) -> str:
        return f"WeakAugment({self.params})"

    def __call__(self, images: Tensor, generator: RandomSource) -> Tensor:
        """images: uint8 [N,C,H,W] (or float in [0,1]); returns float32 [N,3,size,size] in [0,1]."""
        p = self.params
        x = to_float_rgb(images)
        device = x.device
        _check_generator(generator, device)
        n, c, height, width = x.shape
        padded_h, padded_w = height + 2 * p.padding, width + 2 * p.padding
        if padded_h < p.size or padded_w < p.size:
            raise ValueError(
                f"crop size {p.size} is larger than the padded image {padded_h}x{padded_w}; "
                f"increase padding or reduce size"
            )
        top = integers(0, padded_h - p.size + 1, (n,), generator, device)
        left = integers(0, padded_w - p.size + 1, (n,), generator, device)
        flip = _rand(n, generator, device) < p.flip_p

        padded = F.pad(x, (p.padding,) * 4)
        steps = torch.arange(p.size, device=device)
        rows = top[:, None] + steps  # [n, size]
        cols = left[:, None] + steps
        cols = torch.where(flip[:, None], cols.flip(1), cols)
        out = padded.gather(2, rows[:, None, :, None].expand(n, c, p.size, padded_w))
        return out.gather(3, cols[:, None, None, :].expand(n, c, p.size, p.size))
