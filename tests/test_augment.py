"""Tests for the batched on-device augmentations in robustcl.data.augment."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from robustcl.data import augment as A
from robustcl.data.augment import (
    SimCLRAugment,
    SimCLRAugmentParams,
    WeakAugment,
    WeakAugmentParams,
    resized_crop,
    sample_resized_crop_boxes,
)
from robustcl.data.color import (
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    color_jitter,
    hsv_to_rgb,
    rgb_to_grayscale,
    rgb_to_hsv,
    solarize,
)
from robustcl.methods.views import simclr_augment
from robustcl.recipe import Recipe

ACL = SimCLRAugmentParams(size=32, crop_scale=(0.1, 1.0))


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def images_u8(n: int = 16, c: int = 3, h: int = 32, w: int = 32, seed: int = 123) -> torch.Tensor:
    # smooth-ish content so resampling and colour ops do something visible
    g = gen(seed)
    low = torch.randint(0, 256, (n, c, h // 4, w // 4), generator=g).float()
    up = F.interpolate(low, size=(h, w), mode="bilinear", align_corners=False)
    noise = torch.randint(-20, 21, (n, c, h, w), generator=g).float()
    return (up + noise).clamp(0, 255).round().to(torch.uint8)


def no_op_params(**kw) -> SimCLRAugmentParams:
    base = dict(size=32, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_p=0.0, jitter_p=0.0, grayscale_p=0.0)
    base.update(kw)
    return SimCLRAugmentParams(**base)


# ------------------------------------------------------------------------------------------------
# SimCLRAugment end to end


def test_same_seed_same_output_different_seed_different() -> None:
    aug = SimCLRAugment(ACL)
    x = images_u8()
    a = aug(x, gen(1))
    b = aug(x, gen(1))
    c = aug(x, gen(2))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_views_differ_per_sample_in_one_batch() -> None:
    x = images_u8(n=1).expand(8, -1, -1, -1).contiguous()
    out = SimCLRAugment(ACL)(x, gen(3))
    flat = out.flatten(1)
    dist = torch.cdist(flat, flat)
    off_diag = dist[~torch.eye(8, dtype=torch.bool)]
    assert off_diag.min() > 1e-3


def test_output_dtype_shape_range_and_uint8_float_agree() -> None:
    x = images_u8(n=8, h=40, w=36)
    aug = SimCLRAugment(SimCLRAugmentParams(size=24))
    out_u8 = aug(x, gen(5))
    out_f = aug(x.float() / 255.0, gen(5))
    assert out_u8.dtype == torch.float32 and out_u8.shape == (8, 3, 24, 24)
    assert out_u8.min() >= 0.0 and out_u8.max() <= 1.0
    assert torch.allclose(out_u8, out_f, atol=1e-6)


def test_single_channel_is_repeated_to_rgb() -> None:
    gray = images_u8(n=4, c=1)
    aug = SimCLRAugment(ACL)
    out = aug(gray, gen(7))
    assert out.shape == (4, 3, 32, 32)
    assert torch.allclose(out, aug(gray.repeat(1, 3, 1, 1), gen(7)), atol=1e-6)


def test_no_op_settings_return_input() -> None:
    x = images_u8(n=6)
    out = SimCLRAugment(no_op_params())(x, gen(0))
    assert (out - x.float() / 255.0).abs().max() < 1e-6


def test_grayscale_p_one_gives_equal_channels() -> None:
    out = SimCLRAugment(SimCLRAugmentParams(size=32, grayscale_p=1.0))(images_u8(n=8), gen(0))
    assert torch.equal(out[:, 0], out[:, 1]) and torch.equal(out[:, 1], out[:, 2])


def test_generator_advances_the_same_whatever_the_probabilities() -> None:
    # resumability relies on a fixed number of draws per call
    x = images_u8(n=5)
    g1, g2 = gen(9), gen(9)
    SimCLRAugment(ACL)(x, g1)
    SimCLRAugment(no_op_params(jitter=(0.0, 0.0, 0.0, 0.0)))(x, g2)
    assert torch.equal(g1.get_state(), g2.get_state())


def test_generator_on_other_device_is_rejected() -> None:
    with pytest.raises(ValueError, match="generator is on cpu"):
        SimCLRAugment(ACL)(torch.zeros(2, 3, 32, 32, device="meta"), gen(0))


def test_bad_inputs_and_params_are_rejected() -> None:
    aug = SimCLRAugment(ACL)
    with pytest.raises(ValueError, match="channels"):
        aug(torch.zeros(2, 4, 32, 32), gen(0))
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        aug(torch.zeros(3, 32, 32), gen(0))
    with pytest.raises(ValueError, match="interpolation"):
        SimCLRAugmentParams(size=32, interpolation="nearest")
    with pytest.raises(ValueError, match="grayscale_p"):
        SimCLRAugmentParams(size=32, grayscale_p=1.5)
    p = SimCLRAugmentParams(size=32, crop_scale=[0.2, 1], jitter=[0.4, 0.4, 0.4, 0.1])  # YAML lists
    assert p.crop_scale == (0.2, 1.0) and isinstance(p.jitter, tuple)
    hash(p)


# ------------------------------------------------------------------------------------------------
# crop boxes


def reference_boxes(n, height, width, scale, ratio, generator):
    """Plain-Python torchvision get_params fed with the same uniforms the vectorised version draws."""
    u_area = torch.rand(n, 10, generator=generator)
    u_ratio = torch.rand(n, 10, generator=generator)
    u_top = torch.rand(n, generator=generator)
    u_left = torch.rand(n, generator=generator)
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    boxes = []
    for i in range(n):
        for a in range(10):
            target = area * (scale[0] + (scale[1] - scale[0]) * u_area[i, a].item())
            aspect = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * u_ratio[i, a].item())
            w = int(round(math.sqrt(target * aspect)))
            h = int(round(math.sqrt(target / aspect)))
            if 0 < w <= width and 0 < h <= height:
                top = int(u_top[i].item() * (height - h + 1))
                left = int(u_left[i].item() * (width - w + 1))
                boxes.append((top, left, h, w))
                break
        else:
            h, w = A._fallback_crop_size(height, width, ratio)
            boxes.append(((height - h) // 2, (width - w) // 2, h, w))
    return torch.tensor(boxes)


@pytest.mark.parametrize("hw,scale", [((32, 32), (0.1, 1.0)), ((30, 50), (0.08, 1.0)), ((32, 32), (0.9, 1.0))])
def test_crop_boxes_follow_torchvision_get_params(hw, scale) -> None:
    h, w = hw
    ratio = (3 / 4, 4 / 3)
    got = sample_resized_crop_boxes(2000, h, w, scale, ratio, gen(11), "cpu")
    want = reference_boxes(2000, h, w, scale, ratio, gen(11))
    # float32 here vs float64 in the reference could flip a rounding at an exact .5; allow a couple
    mismatched = (got != want).any(dim=1).sum().item()
    assert mismatched <= 2


def test_crop_boxes_inside_image_with_area_and_ratio_in_range() -> None:
    n, size = 4000, 1000  # big image: rounding to whole pixels barely moves area or ratio
    boxes = sample_resized_crop_boxes(n, size, size, (0.1, 1.0), (3 / 4, 4 / 3), gen(2), "cpu")
    top, left, h, w = boxes.unbind(1)
    assert boxes.dtype == torch.int64
    assert (top >= 0).all() and (left >= 0).all() and (h > 0).all() and (w > 0).all()
    assert (top + h <= size).all() and (left + w <= size).all()
    frac = (h * w).double() / size**2
    assert frac.min() >= 0.1 - 1e-3 and frac.max() <= 1.0
    aspect = w.double() / h.double()
    assert aspect.min() >= 3 / 4 - 2e-3 and aspect.max() <= 4 / 3 + 2e-3

    small = sample_resized_crop_boxes(n, 32, 32, (0.1, 1.0), (3 / 4, 4 / 3), gen(3), "cpu")
    t, left, hh, ww = small.unbind(1)
    assert (t >= 0).all() and (left >= 0).all() and (t + hh <= 32).all() and (left + ww <= 32).all()
    # uniform area fraction in [0.1, 1] has mean 0.55; rejections of tall/wide crops pull it a bit lower
    mean_frac = ((hh * ww).double() / 1024).mean().item()
    assert 0.45 < mean_frac < 0.6
    # offsets are random, not always centred or at the origin
    assert t.unique().numel() > 10 and left.unique().numel() > 10


def test_crop_fallback_is_centre_crop_clamped_to_ratio() -> None:
    # every attempt is too tall for a 20x60 image at full area, so all samples fall back
    boxes = sample_resized_crop_boxes(64, 20, 60, (1.0, 1.0), (3 / 4, 4 / 3), gen(0), "cpu")
    assert (boxes == torch.tensor([0, 16, 20, 27])).all()


# ------------------------------------------------------------------------------------------------
# resized crop


@pytest.mark.parametrize("mode", ["bicubic", "bilinear"])
def test_resized_crop_full_box_is_identity_and_flip_is_exact(mode) -> None:
    x = torch.rand(4, 3, 32, 32, generator=gen(0))
    full = torch.tensor([[0, 0, 32, 32]] * 4)
    assert (resized_crop(x, full, 32, mode) - x).abs().max() < 1e-5
    flipped = resized_crop(x, full, 32, mode, torch.ones(4, dtype=torch.bool))
    assert (flipped - torch.flip(x, dims=[-1])).abs().max() < 1e-5
    some = torch.tensor([True, False, True, False])
    mixed = resized_crop(x, full, 32, mode, some)
    assert (mixed[some] - torch.flip(x[some], dims=[-1])).abs().max() < 1e-5
    assert (mixed[~some] - x[~some]).abs().max() < 1e-5


@pytest.mark.parametrize("mode,size", [("bicubic", 32), ("bilinear", 32), ("bicubic", 12), ("bilinear", 20)])
def test_resized_crop_matches_torch_antialiased_interpolate(mode, size) -> None:
    # torchvision's tensor resized_crop = crop, then interpolate(..., antialias=True, align_corners=False)
    x = torch.rand(24, 3, 32, 32, generator=gen(1))
    boxes = sample_resized_crop_boxes(24, 32, 32, (0.05, 1.0), (0.5, 2.0), gen(2), "cpu")
    flip = torch.rand(24, generator=gen(3)) < 0.5
    out = resized_crop(x, boxes, size, mode, flip)
    for i, (t, left, h, w) in enumerate(boxes.tolist()):
        crop = x[i : i + 1, :, t : t + h, left : left + w]
        ref = F.interpolate(crop, size=(size, size), mode=mode, antialias=True, align_corners=False)
        ref = ref.clamp(0, 1)
        if flip[i]:
            ref = ref.flip(-1)
        assert (out[i] - ref[0]).abs().max() < 1e-5, (i, (t, left, h, w))


def test_resized_crop_matches_pil_bicubic() -> None:
    # the ACL reference code runs these transforms on PIL images
    Image = pytest.importorskip("PIL.Image")
    np = pytest.importorskip("numpy")
    x = images_u8(n=32)
    boxes = sample_resized_crop_boxes(32, 32, 32, (0.05, 1.0), (0.5, 2.0), gen(4), "cpu")
    out = resized_crop(x.float() / 255.0, boxes, 32, "bicubic") * 255.0
    diffs = []
    for i, (t, left, h, w) in enumerate(boxes.tolist()):
        pil = Image.fromarray(x[i].permute(1, 2, 0).numpy()).crop((left, t, left + w, t + h))
        ref = torch.from_numpy(np.array(pil.resize((32, 32), Image.BICUBIC))).permute(2, 0, 1).float()
        diffs.append((out[i] - ref).abs())
    diffs = torch.stack(diffs)
    # PIL works in fixed point and rounds (and clips overshoot) to uint8 between its two passes, so
    # expect ~1/4 grey level on average and a few grey levels on rare edge pixels
    assert diffs.mean() < 0.5
    assert diffs.max() <= 4.0
    assert (diffs > 1.0).float().mean() < 0.01


# ------------------------------------------------------------------------------------------------
# colour ops


def test_grayscale_formula() -> None:
    x = torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]], [[0.0, 0.5]]]])  # [1,3,1,2]
    g1 = rgb_to_grayscale(x)
    assert g1.shape == (1, 1, 1, 2)
    assert torch.allclose(g1, torch.tensor([[[[0.299, 0.587 + 0.057]]]]))
    g3 = rgb_to_grayscale(x, 3)
    assert g3.shape == (1, 3, 1, 2) and torch.equal(g3[:, 0], g3[:, 2])


def test_brightness_contrast_saturation_formulas() -> None:
    # two samples, 3x1x2 pixels, different factor per sample
    x = torch.tensor(
        [
            [[[0.2, 0.6]], [[0.4, 0.8]], [[0.1, 0.3]]],
            [[[0.5, 0.5]], [[0.9, 0.1]], [[0.0, 1.0]]],
        ]
    )
    f = torch.tensor([1.5, 0.5])

    bright = adjust_brightness(x, f)
    assert torch.allclose(bright[0], (x[0] * 1.5).clamp(0, 1))
    assert torch.allclose(bright[1], x[1] * 0.5)
    assert bright[0, 1, 0, 1] == 1.0  # 0.8 * 1.5 clipped

    gray = 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]  # [2,1,2]
    mean = gray.mean(dim=(1, 2))  # per sample, over all pixels
    contrast = adjust_contrast(x, f)
    assert torch.allclose(contrast[0], (1.5 * x[0] + (1 - 1.5) * mean[0]).clamp(0, 1), atol=1e-6)
    assert torch.allclose(contrast[1], 0.5 * x[1] + 0.5 * mean[1], atol=1e-6)
    # by hand: sample 1 grey = [0.6778, 0.3222], mean 0.5; green 0.9 -> 0.5 * 0.9 + 0.5 * 0.5
    assert contrast[1, 1, 0, 0].item() == pytest.approx(0.7, abs=1e-6)

    sat = adjust_saturation(x, f)
    assert torch.allclose(sat[0], (1.5 * x[0] + (1 - 1.5) * gray[0]).clamp(0, 1), atol=1e-6)
    assert torch.allclose(sat[1], 0.5 * x[1] + 0.5 * gray[1], atol=1e-6)
    assert torch.allclose(adjust_saturation(x, torch.zeros(2)), rgb_to_grayscale(x, 3), atol=1e-6)


def torchvision_hsv2rgb(img: torch.Tensor) -> torch.Tensor:
    """torchvision's _hsv2rgb (six-sector table), kept here as the reference."""
    h, s, v = img.unbind(dim=-3)
    i = torch.floor(h * 6.0)
    f = (h * 6.0) - i
    i = i.to(dtype=torch.int32)
    p = torch.clamp((v * (1.0 - s)), 0.0, 1.0)
    q = torch.clamp((v * (1.0 - s * f)), 0.0, 1.0)
    t = torch.clamp((v * (1.0 - s * (1.0 - f))), 0.0, 1.0)
    i = i % 6
    mask = i.unsqueeze(dim=-3) == torch.arange(6).view(-1, 1, 1)
    a1 = torch.stack((v, q, p, p, t, v), dim=-3)
    a2 = torch.stack((t, v, v, q, p, p), dim=-3)
    a3 = torch.stack((p, p, t, v, v, q), dim=-3)
    a4 = torch.stack((a1, a2, a3), dim=-4)
    return torch.einsum("...ijk, ...xijk -> ...xjk", mask.to(dtype=img.dtype), a4)


def test_hsv_round_trip_and_reference() -> None:
    x = torch.rand(8, 3, 16, 16, generator=gen(4))
    x[0, :, :4] = 0.5  # grey pixels: hue undefined, must survive
    x[1, :, :2] = torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1)
    hsv = rgb_to_hsv(x)
    assert hsv.min() >= 0 and hsv.max() <= 1
    assert (hsv_to_rgb(hsv) - x).abs().max() <= 1e-5
    assert (hsv_to_rgb(hsv) - torchvision_hsv2rgb(hsv)).abs().max() <= 1e-5


def test_hue_shift() -> None:
    x = torch.rand(6, 3, 8, 8, generator=gen(5))
    assert (adjust_hue(x, torch.zeros(6)) - x).abs().max() <= 1e-5
    half = torch.full((6,), 0.5)
    assert (adjust_hue(adjust_hue(x, half), half) - x).abs().max() <= 1e-5
    # per-sample factors: sample 0 unchanged, sample 1 shifted
    mixed = adjust_hue(x[:2], torch.tensor([0.0, 0.25]))
    assert (mixed[0] - x[0]).abs().max() <= 1e-5 and (mixed[1] - x[1]).abs().max() > 0.05

    red = torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1).expand(2, 3, 2, 2)
    green = adjust_hue(red, torch.tensor([1 / 3, -2 / 3 + 1]))  # both are a third of the circle
    assert (green - torch.tensor([0.0, 1.0, 0.0]).view(1, 3, 1, 1)).abs().max() <= 1e-5
    blue = adjust_hue(red, torch.tensor([-1 / 3, -1 / 3]))
    assert (blue - torch.tensor([0.0, 0.0, 1.0]).view(1, 3, 1, 1)).abs().max() <= 1e-5


def test_color_jitter_masks_identity_and_order() -> None:
    x = torch.rand(32, 3, 8, 8, generator=gen(6))
    none = torch.zeros(32, dtype=torch.bool)
    assert torch.equal(color_jitter(x, 0.4, 0.4, 0.4, 0.1, none, gen(0)), x)
    every = torch.ones(32, dtype=torch.bool)
    assert torch.equal(color_jitter(x, 0.0, 0.0, 0.0, 0.0, every, gen(0)), x)

    mask = torch.arange(32) % 3 != 0
    out = color_jitter(x, 0.4, 0.4, 0.4, 0.1, mask, gen(8))
    assert torch.equal(out[~mask], x[~mask])

    # reference: same draws, ops applied one sample at a time in that sample's order
    order = torch.rand(32, 4, generator=(g := gen(8))).argsort(dim=1)
    ranges = [(0.6, 1.4), (0.6, 1.4), (0.6, 1.4), (-0.1, 0.1)]
    factors = [lo + (hi - lo) * torch.rand(32, generator=g) for lo, hi in ranges]
    ops = [adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue]
    for i in range(32):
        want = x[i : i + 1]
        if mask[i]:
            for k in order[i].tolist():
                want = ops[k](want, factors[k][i : i + 1])
        assert (out[i] - want[0]).abs().max() <= 1e-5
    # the random order is really random: more than one permutation in use
    assert order.unique(dim=0).shape[0] > 5


def test_color_jitter_subset_and_where_paths_agree() -> None:
    x = torch.rand(16, 3, 8, 8, generator=gen(10))
    ranges = A._jitter_ranges(0.4, 0.4, 0.4, 0.1)
    order, factors = A._sample_jitter(16, ranges, gen(1), torch.device("cpu"))
    mask = torch.rand(16, generator=gen(2)) < 0.8
    a = A._apply_jitter(x, order, factors, ranges, mask, subsets=True)
    b = A._apply_jitter(x, order, factors, ranges, mask, subsets=False)
    assert (a - b).abs().max() <= 1e-6


# ------------------------------------------------------------------------------------------------
# WeakAugment


def find_shift(src: torch.Tensor, out: torch.Tensor, pad: int) -> tuple[int, int, bool] | None:
    padded = F.pad(src, (pad,) * 4)
    size = out.shape[-1]
    for flip in (False, True):
        for top in range(2 * pad + 1):
            for left in range(2 * pad + 1):
                crop = padded[:, top : top + size, left : left + size]
                if flip:
                    crop = crop.flip(-1)
                if torch.equal(crop, out):
                    return top - pad, left - pad, flip
    return None


def test_weak_augment_is_shifted_flipped_copy() -> None:
    x = images_u8(n=12).clamp(min=1)  # no zeros in the image, so zeros can only come from padding
    aug = WeakAugment(WeakAugmentParams(size=32))
    out = aug(x, gen(0))
    assert out.shape == (12, 3, 32, 32) and out.dtype == torch.float32
    assert torch.equal(out, aug(x, gen(0)))
    assert not torch.equal(out, aug(x, gen(1)))
    xf = x.float() / 255.0
    shifts = [find_shift(xf[i], out[i], 4) for i in range(12)]
    assert all(s is not None for s in shifts)
    assert len(set(shifts)) > 3
    for (dy, dx, _), o in zip(shifts, out):
        assert max(abs(dy), abs(dx)) <= 4
        zero_rows = (o == 0).all(dim=0).all(dim=1).sum().item()
        zero_cols = (o == 0).all(dim=0).all(dim=0).sum().item()
        assert zero_rows == abs(dy) and zero_cols == abs(dx)


def test_weak_augment_no_padding_no_flip_is_identity() -> None:
    x = images_u8(n=4)
    out = WeakAugment(WeakAugmentParams(size=32, padding=0, flip_p=0.0))(x, gen(0))
    assert torch.equal(out, x.float() / 255.0)
    with pytest.raises(ValueError, match="larger than the padded image"):
        WeakAugment(WeakAugmentParams(size=48))(x, gen(0))


# ------------------------------------------------------------------------------------------------
# crop distribution as configured, the recipe key, per-sample parameters


def ks_uniform(values: torch.Tensor, low: float, high: float) -> float:
    """Kolmogorov–Smirnov statistic of ``values`` against Uniform(low, high)."""
    s = values.double().sort().values
    n = s.numel()
    cdf = ((s - low) / (high - low)).clamp(0, 1)
    i = torch.arange(1, n + 1, dtype=torch.float64)
    return torch.maximum(i / n - cdf, cdf - (i - 1) / n).max().item()


def test_crop_area_fraction_is_uniform_on_the_configured_scale() -> None:
    # square crops (ratio 1) never leave a square image, so no attempt is rejected and the area fraction is
    # exactly the uniform draw, up to rounding the side to whole pixels (±0.2 % on a 1024-pixel image)
    n, size = 20_000, 1024
    boxes = sample_resized_crop_boxes(n, size, size, (0.3, 0.9), (1.0, 1.0), gen(21), "cpu")
    top, left, h, w = boxes.unbind(1)
    assert torch.equal(h, w) and (top + h <= size).all() and (left + w <= size).all()
    frac = (h * w).double() / size**2
    assert frac.min() >= 0.3 - 0.01 and frac.max() <= 0.9 + 0.01
    assert abs(frac.mean().item() - 0.6) < 0.01
    # the 1 % critical value for n = 20 000 is 0.0115; an area range off by 0.02 at one end gives ~0.035
    assert ks_uniform(frac, 0.3, 0.9) < 0.02


def test_crop_log_aspect_ratio_within_range_and_symmetric() -> None:
    n, size = 20_000, 1024
    boxes = sample_resized_crop_boxes(n, size, size, (0.3, 0.9), (3 / 4, 4 / 3), gen(22), "cpu")
    _, _, h, w = boxes.unbind(1)
    log_ratio = (w.double() / h.double()).log()
    # sides of ≥ 470 pixels: rounding moves the log-ratio by < 0.005
    assert log_ratio.min() >= math.log(3 / 4) - 0.005 and log_ratio.max() <= math.log(4 / 3) + 0.005
    # log-uniform in [3/4, 4/3] is symmetric about ratio 1, and so are the rejections of too-wide / too-tall
    # crops; the standard error of the mean is ~0.001
    assert abs(log_ratio.mean().item()) < 0.01
    assert log_ratio.std().item() > 0.12  # spread over the range (uniform: 0.166), not collapsed to square
    assert (log_ratio > 0.2).float().mean() > 0.05 and (log_ratio < -0.2).float().mean() > 0.05


def test_recipe_crop_scale_drives_simclr_augment() -> None:
    recipe = Recipe.model_validate({"augment": {"crop_scale": [0.3, 0.9]}, "data": {"resolution": 24}})
    aug = simclr_augment(recipe)
    assert aug.params.crop_scale == (0.3, 0.9)
    assert aug.params == SimCLRAugmentParams(size=24, crop_scale=(0.3, 0.9))  # every other key at its default
    # DynACL's weakening moves only the lower bound towards 1: 1 - (1 - 0.3) * 0.5
    assert simclr_augment(recipe, 0.5).params.crop_scale == pytest.approx((0.65, 0.9))
    # and the views follow it: same seed, another scale, other crops
    x = images_u8(n=8)
    default = simclr_augment(Recipe.model_validate({"data": {"resolution": 24}}))
    assert default.params.crop_scale == (0.08, 1.0)
    assert torch.equal(aug(x, gen(4)), SimCLRAugment(SimCLRAugmentParams(size=24, crop_scale=(0.3, 0.9)))(x, gen(4)))
    assert not torch.allclose(aug(x, gen(4)), default(x, gen(4)))


def test_crop_alone_differs_per_sample() -> None:
    x = images_u8(n=1).expand(16, -1, -1, -1).contiguous()
    crop_only = SimCLRAugmentParams(size=32, crop_scale=(0.1, 1.0), flip_p=0.0, jitter_p=0.0, grayscale_p=0.0)
    out = SimCLRAugment(crop_only)(x, gen(5)).flatten(1)
    dist = torch.cdist(out, out)
    assert dist[~torch.eye(16, dtype=torch.bool)].min() > 1e-3


def test_flip_alone_mirrors_about_half_the_samples() -> None:
    n = 2000
    x = images_u8(n=1, h=16, w=16).expand(n, -1, -1, -1).contiguous()
    src = x[0].float() / 255.0
    assert (src - src.flip(-1)).abs().max() > 0.1  # the image is not its own mirror
    out = SimCLRAugment(no_op_params(size=16, flip_p=0.5))(x, gen(6))
    as_is = (out - src).flatten(1).abs().amax(1) < 1e-5
    mirrored = (out - src.flip(-1)).flatten(1).abs().amax(1) < 1e-5
    assert (as_is ^ mirrored).all()  # every output is exactly one of the two
    assert 0.4 < mirrored.float().mean().item() < 0.6


def test_grayscale_alone_greys_about_its_probability() -> None:
    n = 2000
    x = images_u8(n=1, h=16, w=16).expand(n, -1, -1, -1).contiguous()
    src = x[0].float() / 255.0
    out = SimCLRAugment(no_op_params(size=16, grayscale_p=0.3))(x, gen(7))
    grey = (out[:, 0] == out[:, 1]).flatten(1).all(1) & (out[:, 1] == out[:, 2]).flatten(1).all(1)
    assert 0.25 < grey.float().mean().item() < 0.35
    assert (out[grey] - rgb_to_grayscale(src[None], 3)).abs().max() < 1e-5
    assert (out[~grey] - src).abs().max() < 1e-5  # the others are untouched (and the input is not grey)


# ------------------------------------------------------------------------------------------------
# solarisation (solo-learn's per-view RandomApply([Solarization()], p): PIL's ImageOps.solarize, threshold 128)


def _draws_before_solarisation(n: int, g: torch.Generator) -> None:
    """Advance ``g`` past the draws SimCLRAugment makes before its solarisation draw (its documented order)."""
    for size in [(n, 10), (n, 10), (n,), (n,), (n,), (n,), (n, 4), (n,), (n,), (n,), (n,), (n,)]:
        torch.rand(size, generator=g)


def test_solarize_inverts_pixels_from_128_up_as_pils_solarize() -> None:
    import numpy as np
    import PIL.Image
    import PIL.ImageOps

    levels = torch.arange(256, dtype=torch.uint8)[torch.randperm(256, generator=gen(0))]
    x = levels.reshape(1, 16, 16, 1).expand(-1, -1, -1, 3).contiguous()  # [1, H, W, 3]: every grey level
    pil = PIL.ImageOps.solarize(PIL.Image.fromarray(x[0].numpy()))
    expected = torch.from_numpy(np.array(pil)).permute(2, 0, 1)[None].float() / 255
    out = solarize(x.permute(0, 3, 1, 2).float() / 255)
    assert (out - expected).abs().max() <= 1e-6


def test_solarize_p_is_one_draw_per_image_after_the_others_from_the_seeded_stream() -> None:
    n, x = 400, images_u8(n=400, h=8, w=8)
    g = gen(11)
    out = SimCLRAugment(no_op_params(size=8, solarize_p=0.3))(x, g)
    expected_g = gen(11)
    _draws_before_solarisation(n, expected_g)
    chosen = torch.rand(n, generator=expected_g) < 0.3
    assert torch.equal(g.get_state(), expected_g.get_state())
    src = x.float() / 255
    assert torch.allclose(out, torch.where(chosen.view(n, 1, 1, 1), solarize(src), src), atol=1e-6, rtol=0)
    assert 0.25 < chosen.float().mean().item() < 0.35


def test_without_solarisation_the_random_stream_is_the_one_before_it_existed() -> None:
    # Runs recorded before solarize_p existed resume with the same views: p = 0 makes no draw.
    g, expected_g = gen(12), gen(12)
    SimCLRAugment(ACL)(images_u8(n=6), g)
    _draws_before_solarisation(6, expected_g)
    assert torch.equal(g.get_state(), expected_g.get_state())


def test_solarised_and_blurred_views_are_the_same_whichever_process_holds_the_images() -> None:
    from robustcl.data.batches import batch_random

    x = images_u8(n=8)
    aug = SimCLRAugment(SimCLRAugmentParams(size=32, solarize_p=0.5, blur_p=0.5))
    whole = aug(x, batch_random(3, 17, 0, torch.device("cpu"), local=8))
    halves = [aug(x[r * 4 : r * 4 + 4], batch_random(3, 17, 0, torch.device("cpu"), 4, r, 2)) for r in (0, 1)]
    assert torch.allclose(torch.cat(halves), whole, atol=1e-6, rtol=0)
    assert not torch.allclose(whole, SimCLRAugment(SimCLRAugmentParams(size=32))(x, batch_random(3, 17, 0, "cpu", 8)))


def test_blur_and_solarisation_on_crops_from_the_data_workers_equal_the_decoded_path() -> None:
    # augment.crop_on: original hands SimCLRAugment crops taken by the workers; the rest of the pipeline, blur and
    # solarisation included, must draw and do what it does on the decoded path (a full-image crop: equal inputs).
    x = images_u8(n=12)
    params = no_op_params(
        flip_p=0.5, jitter_p=0.8, jitter=(0.4, 0.4, 0.4, 0.1), grayscale_p=0.2, blur_p=0.5, solarize_p=0.5
    )
    decoded = SimCLRAugment(params)(x, gen(13))
    streamed = SimCLRAugment(params)(A.CroppedViews(x[None]), gen(13))
    assert torch.allclose(decoded, streamed, atol=1e-5, rtol=0)


def test_solarize_p_is_checked() -> None:
    with pytest.raises(ValueError, match="solarize_p"):
        SimCLRAugmentParams(size=32, solarize_p=1.5)
    simclr = {"method": {"name": "simclr"}}
    recipe = Recipe.model_validate({"augment": {"solarize_p": [0.0, 0.2]}, **simclr})
    assert recipe.augment.solarize_p == (0.0, 0.2)
    assert Recipe().augment.solarize_p == (0.0, 0.0)
    # one number is both views' (solo-learn replicates a single value to every pipeline)
    both = Recipe.model_validate({"augment": {"solarize_p": 0.2, "blur_p": [0.5]}, **simclr})
    assert both.augment.solarize_p == (0.2, 0.2)
    for bad in ([0.0, 1.5], [0.1, 0.2, 0.3], True):
        with pytest.raises(ValueError, match="solarize_p"):
            Recipe.model_validate({"augment": {"solarize_p": bad}, **simclr})


@pytest.mark.parametrize("key", ["blur_p", "solarize_p"])
def test_per_view_blur_and_solarisation_are_refused_for_methods_that_would_ignore_them(key) -> None:
    # Only SimCLR builds the per-view pipelines: another method would train without them, silently.
    with pytest.raises(ValueError, match=f"augment.{key} is read by method simclr only"):
        Recipe.model_validate({"augment": {key: 0.5}, "method": {"name": "acl"}})


# ------------------------------------------------------------------------------------------------
# Gaussian blur (solo-learn's RandomApply([GaussianBlur()], p): PIL ImageFilter.GaussianBlur(radius=σ), σ ~ U(0.1, 2))

SIGMAS = [0.1, 0.37, 0.8, 1.0, 1.5, 2.0, 30.0]  # the last: a box wider than the image


def _pil_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    import numpy as np
    import PIL.Image
    import PIL.ImageFilter

    img = PIL.Image.fromarray(x.permute(1, 2, 0).numpy()).filter(PIL.ImageFilter.GaussianBlur(radius=sigma))
    return torch.from_numpy(np.array(img)).permute(2, 0, 1)


def test_box_blur_matrices_are_pils_box_blur_exactly() -> None:
    """Three passes of box_blur_matrix along the width, then three along the height, each rounded to a grey level
    as PIL rounds, are PIL's GaussianBlur pixel for pixel: the same box radius, 24-bit weights and repeated edges."""
    x = images_u8(n=1, h=20, w=24)[0]
    for sigma in SIGMAS:
        radius = A.pil_box_radius(torch.tensor([sigma]))
        bw, bh = A.box_blur_matrix(radius, 24)[0].double(), A.box_blur_matrix(radius, 20)[0].double()
        y = x.double()
        for _ in range(3):
            y = torch.floor(y @ bw.T + 0.5)
        for _ in range(3):
            y = torch.floor(bh @ y + 0.5)
        assert torch.equal(y.to(torch.uint8), _pil_blur(x, sigma)), sigma


def test_gaussian_blur_is_pils_without_its_rounding_between_passes() -> None:
    x = images_u8(n=len(SIGMAS))
    out = A.gaussian_blur(x.float() / 255, torch.tensor(SIGMAS))
    pil = torch.stack([_pil_blur(img, s) for img, s in zip(x, SIGMAS)]).float() / 255
    diff = (out - pil).abs().flatten(1)
    # PIL rounds to a grey level after each of its 6 passes (and its 24-bit weights round ties one way)
    assert diff.max() <= 3 / 255 and diff.mean(1).max() < 1 / 255


def test_blur_p_draws_apply_then_sigma_after_grayscale_and_blurs_those_images() -> None:
    n, x = 300, images_u8(n=300, h=8, w=8)
    g = gen(14)
    out = SimCLRAugment(no_op_params(size=8, blur_p=0.5, blur_sigma=(0.1, 2.0)))(x, g)
    expected_g = gen(14)
    _draws_before_solarisation(n, expected_g)
    chosen = torch.rand(n, generator=expected_g) < 0.5
    sigma = 0.1 + 1.9 * torch.rand(n, generator=expected_g)
    assert torch.equal(g.get_state(), expected_g.get_state())
    src = x.float() / 255
    expected = torch.where(chosen.view(n, 1, 1, 1), A.gaussian_blur(src, sigma), src)
    assert torch.allclose(out, expected, atol=1e-6, rtol=0)
    assert 0.4 < chosen.float().mean().item() < 0.6


def test_blur_keeps_a_flat_image_and_commutes_with_the_flip() -> None:
    # solo-learn blurs before its flip, robustcl flips first: the box blur is symmetric, edges included.
    x = images_u8(n=4).float() / 255
    sigma = torch.tensor([0.1, 0.9, 1.4, 2.0])
    assert torch.allclose(A.gaussian_blur(x.flip(-1), sigma), A.gaussian_blur(x, sigma).flip(-1), atol=1e-6)
    flat = torch.full((2, 3, 9, 9), 0.3)
    assert torch.allclose(A.gaussian_blur(flat, torch.tensor([0.5, 2.0])), flat, atol=1e-6)


def test_blur_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="blur_p"):
        SimCLRAugmentParams(size=32, blur_p=-0.1)
    with pytest.raises(ValueError, match="blur_sigma"):
        SimCLRAugmentParams(size=32, blur_sigma=(2.0, 0.1))
    assert Recipe().augment.blur_p == (0.0, 0.0) and Recipe().augment.blur_sigma == (0.1, 2.0)
    for bad in ({"blur_p": [0.5, 0.5, 0.5]}, {"blur_sigma": [2.0, 0.1]}, {"blur_sigma": [-1.0, 2.0]}):
        with pytest.raises(ValueError, match="blur_"):
            Recipe.model_validate({"augment": bad})
