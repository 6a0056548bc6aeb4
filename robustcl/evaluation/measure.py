"""SA / RA / AA on the test split, sharded over processes.

Each test image is judged on its own: the PGD loss is summed (not averaged) over the batch and its random start
comes from a generator seeded by (seed, image index), so an image's result does not depend on which batch or
process it landed in. Per-image results are gathered with ``gather_for_metrics``, which drops the padding the
sharded loader adds, so 1 and N processes give the same figures.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from tqdm.auto import tqdm

from ..attacks import module_mode, pgd_attack
from ..data.images import pixels_of
from ..errors import UserError
from ..features import pixels
from ..recipe import EvalAttackConfig
from .rows import Pixels

NOT_ATTACKED = -1  # flag value of images outside --attack-subset
AUTOATTACK_INSTALL = 'pip install "robustcl[autoattack]"  (or: pip install pyautoattack)'


@dataclass
class Measurement:
    """Per-test-image results in test-set order: 1 correct, 0 wrong, NOT_ATTACKED outside the attacked subset."""

    clean: torch.Tensor
    pgd: torch.Tensor | None
    autoattack: torch.Tensor | None
    curve: dict[float, torch.Tensor]
    attacked: int

    @staticmethod
    def accuracy(flags: torch.Tensor) -> float:
        measured = flags[flags != NOT_ATTACKED]
        return measured.float().mean().item() if len(measured) else float("nan")


def unit_starts(indices: torch.Tensor, shape: torch.Size, seed: int) -> torch.Tensor:
    """Uniform noise in [-1, 1] for each test image, from a generator seeded by (seed, image index)."""
    out = torch.empty((len(indices), *shape))
    for row, index in enumerate(indices.tolist()):
        out[row].uniform_(-1, 1, generator=torch.Generator().manual_seed(seed * 1_000_003 + index))
    return out


def require_autoattack() -> type:
    """The AutoAttack class of ``pyautoattack``, or a one-line error that says how to install it."""
    try:
        from pyautoattack import AutoAttack
    except ImportError:
        raise UserError(
            "AutoAttack needs the optional package pyautoattack",
            "--attack autoattack",
            f"install it with: {AUTOATTACK_INSTALL}",
        ) from None
    return AutoAttack


def _autoattack(model: nn.Module, cfg: EvalAttackConfig, num_classes: int, device: torch.device, seed: int):
    if num_classes < 4:
        raise UserError(
            f"AutoAttack's targeted attacks need at least 4 classes (the dataset has {num_classes})",
            "--attack autoattack",
            "measure RA with --attack pgd20 only",
        )
    attack = require_autoattack()(
        model, norm="Linf", eps=cfg.epsilon, version=cfg.autoattack_version, device=device, seed=seed
    )
    # Standard AA targets the 9 most likely wrong classes; with fewer classes, all of them.
    targets = min(9, num_classes - 1)
    attack.apgd_targeted.n_target_classes = targets
    attack.fab.n_target_classes = targets
    return attack


def pgd_curve_step(cfg: EvalAttackConfig, epsilon: float) -> float:
    """PGD step at another radius: the RA step scaled with ε (2/255 at 8/255 becomes 4/255 at 16/255)."""
    return cfg.step_size * epsilon / cfg.epsilon if cfg.epsilon > 0 else cfg.step_size


def _flags(
    model: nn.Module, x_adv: torch.Tensor | None, labels: torch.Tensor, chosen: torch.Tensor, batch: int
) -> torch.Tensor:
    """Per-image flags of a batch: 1/0 for the attacked images (``chosen``), NOT_ATTACKED for the rest."""
    flags = torch.full((batch,), NOT_ATTACKED, dtype=torch.long, device=chosen.device)
    if x_adv is not None:
        with torch.no_grad():
            flags[chosen] = (model(x_adv.to(chosen.device)).argmax(1) == labels).long()
    return flags


def measure(
    model: nn.Module,
    images: Pixels,
    labels: torch.Tensor,
    cfg: EvalAttackConfig,
    attacks: list[str],
    accelerator: Accelerator,
    *,
    num_classes: int,
    seed: int,
    attack_subset: int | None = None,
    progress: bool = True,
) -> Measurement:
    """Clean accuracy on every test image; PGD (RA), AutoAttack (AA) and the ε-curve on the first
    ``attack_subset`` images (all when None). ``model`` maps pixels in [0, 1] to logits. Each process reads (and,
    for encoded images, decodes) only the images of its batches."""
    device = accelerator.device
    model = model.to(device)
    n = len(images)
    plan = _plan_attacks(model, cfg, attacks, n, attack_subset, num_classes, device, seed)
    loader = accelerator.prepare_data_loader(
        DataLoader(TensorDataset(torch.arange(n)), batch_size=cfg.batch_size, shuffle=False)
    )
    gathered: dict[str, list[torch.Tensor]] = {}
    bar = tqdm(loader, desc="attack", unit="batch", dynamic_ncols=True, disable=not progress)
    with module_mode(model, False):
        for (index,) in bar:
            results = _judge_batch(model, images, labels, index, plan, device)
            for key, value in accelerator.gather_for_metrics(results).items():
                gathered.setdefault(key, []).append(value.cpu())
    bar.close()
    return _measurement(_in_test_order(gathered, n), plan, attacks)


@dataclass
class _AttackPlan:
    """What every test batch is measured with."""

    cfg: EvalAttackConfig
    attacked: int  # the first ``attacked`` test images are attacked
    curve_eps: list[float]  # the ε-curve's radii, ascending
    pgd_eps: list[float]  # PGD's radii, ascending: the curve's above 0, and RA's
    autoattack: Any | None  # AutoAttack, when measured
    seed: int  # seeds each image's PGD start (unit_starts)


def _plan_attacks(
    model: nn.Module,
    cfg: EvalAttackConfig,
    attacks: list[str],
    n: int,
    attack_subset: int | None,
    num_classes: int,
    device: torch.device,
    seed: int,
) -> _AttackPlan:
    attacked = n if attack_subset is None else min(attack_subset, n)
    curve_eps = sorted(set(cfg.curve_epsilons))
    pgd_eps = sorted({e for e in curve_eps if e > 0} | ({cfg.epsilon} if "pgd20" in attacks else set()))
    autoattack = _autoattack(model, cfg, num_classes, device, seed) if "autoattack" in attacks else None
    return _AttackPlan(cfg, attacked, curve_eps, pgd_eps, autoattack, seed)


def _judge_batch(
    model: nn.Module,
    images: Pixels,
    labels: torch.Tensor,
    index: torch.Tensor,
    plan: _AttackPlan,
    device: torch.device,
) -> dict[str, torch.Tensor]:
    """This process's share of one test batch: its image indices and, per image, the flags of the clean, PGD (at each
    radius) and AutoAttack judgements."""
    cpu_index = index.cpu()
    x, y = pixels(pixels_of(images, cpu_index), device), labels[cpu_index].to(device)
    results = {"index": index}
    with torch.no_grad():
        results["clean"] = (model(x).argmax(1) == y).long()
    chosen = (cpu_index < plan.attacked).to(device)
    xa, ya = x[chosen], y[chosen]
    starts = unit_starts(cpu_index[chosen.cpu()], x.shape[1:], plan.seed).to(device) if plan.pgd_eps else None
    for eps in plan.pgd_eps:
        x_adv = _pgd(model, xa, ya, eps, starts, plan.cfg) if len(xa) else None
        results[f"pgd@{eps!r}"] = _flags(model, x_adv, ya, chosen, len(y))
    if plan.autoattack is not None:
        x_adv = plan.autoattack.run_standard_evaluation(xa, ya, batch_size=len(xa))[0] if len(xa) else None
        results["autoattack"] = _flags(model, x_adv, ya, chosen, len(y))
    return results


def _pgd(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, starts: torch.Tensor, cfg: EvalAttackConfig
) -> torch.Tensor:
    """PGD on the summed CE at radius ``eps`` (RA's step scaled with it), from each image's own unit start × ε."""
    return pgd_attack(
        lambda z: F.cross_entropy(model(z), y, reduction="sum"),
        x,
        epsilon=eps,
        step_size=pgd_curve_step(cfg, eps),
        steps=cfg.steps,
        random_start=False,
        start=starts * eps if cfg.random_start else None,
    )


def _in_test_order(gathered: dict[str, list[torch.Tensor]], n: int) -> dict[str, torch.Tensor]:
    """The gathered batches as one column per judgement, in test-set order; every image exactly once."""
    columns = {key: torch.cat(values) for key, values in gathered.items()}
    order = columns["index"].argsort()
    if not torch.equal(columns["index"][order], torch.arange(n)):
        raise RuntimeError("sharded evaluation lost or duplicated test images")
    return {key: value[order] for key, value in columns.items()}


def _measurement(columns: dict[str, torch.Tensor], plan: _AttackPlan, attacks: list[str]) -> Measurement:
    """The per-image columns as a Measurement: the curve's ε = 0 point is clean accuracy on the attacked images."""
    clean = columns["clean"]
    subset_clean = torch.where(torch.arange(len(clean)) < plan.attacked, clean, torch.full_like(clean, NOT_ATTACKED))
    curve = {eps: subset_clean if eps == 0 else columns[f"pgd@{eps!r}"] for eps in plan.curve_eps}
    return Measurement(
        clean=clean,
        pgd=columns.get(f"pgd@{plan.cfg.epsilon!r}") if "pgd20" in attacks else None,
        autoattack=columns.get("autoattack"),
        curve=curve,
        attacked=plan.attacked,
    )
