"""The views methods build from the recipe's augment section: SimCLR views (optionally weakened) and weak views."""

from __future__ import annotations

from dataclasses import replace

from ..data.augment import SimCLRAugment, SimCLRAugmentParams, WeakAugment, WeakAugmentParams
from ..data.crops import CropPlan
from ..errors import UserError
from ..recipe import Recipe


def simclr_augment(recipe: Recipe, strength: float = 1.0) -> SimCLRAugment:
    """The recipe's SimCLR views; ``strength`` < 1 weakens them as DynACL does: the crop's lower area bound moves
    towards 1 (1 − (1 − low)·s), jitter strengths and the jitter / grayscale probabilities scale by s."""
    a = recipe.augment
    low, high = a.crop_scale
    return SimCLRAugment(
        SimCLRAugmentParams(
            size=recipe.data.resolution,
            crop_scale=(low if strength == 1 else 1 - (1 - low) * strength, high),
            crop_ratio=tuple(a.crop_ratio),
            interpolation=a.interpolation,
            flip_p=a.flip_p,
            jitter=tuple(v * strength for v in a.jitter),
            jitter_p=a.jitter_p * strength,
            grayscale_p=a.grayscale_p * strength,
        )
    )


def simclr_view_pair(recipe: Recipe) -> tuple[SimCLRAugment, SimCLRAugment]:
    """The two views' pipelines: the recipe's SimCLR views, each with its own ``augment.blur_p`` and
    ``augment.solarize_p`` (solo-learn builds one pipeline per view)."""
    a = recipe.augment
    base = replace(simclr_augment(recipe).params, blur_sigma=tuple(a.blur_sigma))
    first, second = (replace(base, blur_p=b, solarize_p=s) for b, s in zip(a.blur_p, a.solarize_p))
    return SimCLRAugment(first), SimCLRAugment(second)


def weak_augment(recipe: Recipe) -> WeakAugment:
    """RandomCrop(resolution, padding=augment.weak_padding) + horizontal flip (augment.flip_p)."""
    return WeakAugment(
        WeakAugmentParams(
            size=recipe.data.resolution, padding=recipe.augment.weak_padding, flip_p=recipe.augment.flip_p
        )
    )


def original_crop_plan(recipe: Recipe, views: int) -> CropPlan | None:
    """The crops the data workers take from the original images (``augment.crop_on: original``) for a method that
    takes ``views`` SimCLR views a step (its ``original_crops``); None when the crop is taken on the device."""
    a = recipe.augment
    if a.crop_on != "original":
        return None
    if views == 0:
        raise UserError(
            f"augment.crop_on: original is not available for method {recipe.method.name} (its views need the "
            "decoded image: weak views or crops annealed during training)",
            "augment.crop_on",
            "use augment.crop_on: decoded, or method acl or simclr",
        )
    if recipe.data.loading == "decoded":
        raise UserError(
            "augment.crop_on: original crops the original images as they stream; data.loading: decoded keeps none",
            "data.loading",
            "set data.loading to streamed or auto",
        )
    resolution, seed = recipe.data.resolution, recipe.training.seed
    return CropPlan(views, tuple(a.crop_scale), tuple(a.crop_ratio), resolution, seed, a.interpolation)
