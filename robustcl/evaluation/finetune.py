"""Finetuning protocols (SLF / ALF / AFF): a linear head on a frozen or trainable encoder, trained clean, on PGD
examples or with TRADES; the weights kept are the last epoch's, or the epoch's picked on a validation split carved from
the training split. How each reference script sets them up is in :mod:`.presets`.

SLF (frozen encoder, clean data, no augmentation) trains the head on features computed once; the other protocols
go through the encoder every step. Under several processes the work is shared, not repeated (:mod:`.sharding`):
each SLF feature is computed by one process and kept there, in :data:`FEATURE_DTYPE`; every batch of the other
protocols is split between the processes, with BatchNorm statistics over the whole batch (AFF) and the gradients
summed, so N processes train what one does.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..attacks import module_mode, pgd_attack
from ..collectives import convert_sync_batchnorm, world
from ..data.augment import WeakAugment, WeakAugmentParams
from ..data.batches import BatchRandom, RandomSource
from ..encoder_loading import FeatureEncoder
from ..errors import UserError
from ..features import CHUNK, pixels
from ..models.resnet import MultiBatchNorm, multi_batch_norms, set_bn_branch
from ..recipe import FinetuneConfig
from .measure import unit_starts
from .rows import Pixels, RowView, read_batches, resolution
from .sharding import batch_random, batch_share, owned_rows, sum_gradients, sum_over_processes

# SLF's training features, kept on the host: bfloat16 halves float32's memory (ImageNet's 1.15M finetuning images
# × 2048 ResNet-50 features: 4.7 GB instead of 9.4 GB, split between the processes) and keeps its range, so no
# backbone's features can overflow (float16 stops at 65504); its 8-bit mantissa (relative error ≤ 2⁻⁹) is noise far
# below SGD's. Validation features stay float32: the accuracy that picks the epoch is the returned classifier's.
FEATURE_DTYPE = torch.bfloat16

_TRADES_START_STD = 0.001  # TRADES starts its KL attack from x + 0.001·N(0, 1)


@dataclass
class LabelledImages:
    images: Pixels  # uint8 [N, 3, R, R] CPU tensor, or rows decoded when read (see .rows)
    labels: torch.Tensor  # int64 [N], CPU

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, index: torch.Tensor) -> LabelledImages:
        if isinstance(self.images, torch.Tensor):
            return LabelledImages(self.images[index], self.labels[index])
        return LabelledImages(RowView(self.images, index), self.labels[index])


def split_validation(data: LabelledImages, fraction: float, seed: int) -> tuple[LabelledImages, LabelledImages]:
    """A seeded random ``fraction`` of the training split becomes the validation split (at least one image each);
    ``fraction`` 0: none, every image trains (the last epoch is kept, nothing picks one)."""
    n = len(data)
    if fraction <= 0:
        return data.take(torch.arange(n)), data.take(torch.arange(0))
    n_val = min(max(1, round(n * fraction)), n - 1)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return data.take(order[n_val:].sort().values), data.take(order[:n_val].sort().values)


class Classifier(nn.Module):
    """Feature encoder + linear head: pixels in [0, 1] → logits. In train mode the encoder's BatchNorm runs in train
    mode only with ``bn_train`` (by default: when the encoder trains)."""

    def __init__(self, encoder: FeatureEncoder, head: nn.Linear, frozen: bool, bn_train: bool | None = None) -> None:
        super().__init__()
        self.encoder, self.head, self.frozen = encoder, head, frozen
        self.bn_train = not frozen if bn_train is None else bn_train
        self.encoder.requires_grad_(not frozen)

    def train(self, mode: bool = True) -> Classifier:
        super().train(mode)
        self.encoder.train(mode and self.bn_train)
        return self

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(pixels))


@dataclass
class FinetuneResult:
    classifier: Classifier
    selected_epoch: int
    val_accuracy: float | None  # None: the last epoch kept, no validation split
    history: list[dict[str, Any]] = field(default_factory=list)


# Dual BN (``dual_bn``): every BatchNorm of the encoder becomes two, clean images going through CLEAN_BRANCH and
# adversarial ones through ADV_BRANCH, the branch the returned classifier keeps (RobustSSL_Benchmark utils.py /
# DynACL utils.py trades_loss_dual; their 'normal' and 'pgd').
CLEAN_BRANCH, ADV_BRANCH = "normal", "pgd"


def dual_batchnorm(encoder: nn.Module, clean: nn.Module | None = None) -> None:
    """Give each BatchNorm of ``encoder`` a second branch, in place: ADV_BRANCH is the BatchNorm as it is,
    CLEAN_BRANCH a copy of ``clean``'s BatchNorm of the same name (a model of the same layout), else of itself."""
    clean_modules = dict(clean.named_modules()) if clean is not None else {}
    for name, module in list(encoder.named_modules()):
        for child_name, child in list(module.named_children()):
            if not isinstance(child, nn.modules.batchnorm._BatchNorm):
                continue
            path = f"{name}.{child_name}" if name else child_name
            dual = MultiBatchNorm(child.num_features, [CLEAN_BRANCH, ADV_BRANCH], dim=2)
            dual.branches = nn.ModuleDict(
                {CLEAN_BRANCH: copy.deepcopy(clean_modules.get(path, child)), ADV_BRANCH: child}
            )
            dual.active_branch = ADV_BRANCH
            setattr(module, child_name, dual)


def single_batchnorm(encoder: nn.Module, branch: str = ADV_BRANCH) -> None:
    """Undo :func:`dual_batchnorm`, in place: each two-branch BatchNorm is replaced by its ``branch``."""
    for module in list(encoder.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, MultiBatchNorm):
                setattr(module, child_name, child.branches[branch])


@contextmanager
def _branch(model: nn.Module, branch: str) -> Iterator[None]:
    """Run ``model``'s two-branch BatchNorms on ``branch`` (nothing to do for a model without them)."""
    with set_bn_branch(model, branch) if multi_batch_norms(model) else nullcontext():
        yield


def _ce_attack(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    cfg: FinetuneConfig,
    random: RandomSource | None = None,
    start: torch.Tensor | None = None,
    steps: int | None = None,
) -> torch.Tensor:
    """PGD on the summed CE (each row's gradient is its own): from ``start``, else uniform noise from ``random``;
    ``steps`` (default: the training attack's)."""
    with module_mode(model, False):
        return pgd_attack(
            lambda z: F.cross_entropy(model(z), y, reduction="sum"),
            x,
            epsilon=cfg.epsilon,
            step_size=cfg.step_size,
            steps=cfg.attack_steps if steps is None else steps,
            random_start=True,
            random=random,
            start=start,
            clamp_start=cfg.clamp_start,
        )


def _normal(shape: torch.Size, source: RandomSource, device: torch.device) -> torch.Tensor:
    """Standard normal noise; from a :class:`BatchRandom`, drawn for the whole batch and this process's rows kept."""
    if isinstance(source, BatchRandom):
        draw = torch.randn((source.total, *shape[1:]), generator=source.generator, device=source.device)
        return draw[source.offset : source.offset + source.local]
    return torch.randn(shape, generator=source, device=device)


def trades_loss(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    cfg: FinetuneConfig,
    random: RandomSource,
    total: int | None = None,
) -> torch.Tensor:
    """TRADES (Zhang et al., 2019): CE(f(x), y) + β·KL(f(x) ‖ f(x_adv)), x_adv maximising that KL (eval-mode BN),
    from x + 0.001·N(0, 1) (``trades_random_start``) or x. With two-branch BatchNorms (``dual_bn``) clean images
    go through CLEAN_BRANCH, adversarial ones through ADV_BRANCH; with ``trades_target`` 'separate' the KL target
    comes from one more clean pass (DeACL trades/trades.py).

    Both terms are sums over the rows divided by ``total`` (default: the rows given), the size of the global batch
    these rows are part of: summed over the processes, the batch mean."""
    total = len(x) if total is None else total
    with module_mode(model, False):
        with torch.no_grad(), _branch(model, CLEAN_BRANCH):
            clean_probs = F.softmax(model(x), dim=1)
        start = _normal(x.shape, random, x.device) * _TRADES_START_STD if cfg.trades_random_start else None
        x_adv = pgd_attack(
            lambda z: F.kl_div(F.log_softmax(model(z), dim=1), clean_probs, reduction="sum"),
            x,
            epsilon=cfg.epsilon,
            step_size=cfg.step_size,
            steps=cfg.attack_steps,
            random_start=False,
            start=start,
            clamp_start=cfg.clamp_start,
        )
    with _branch(model, CLEAN_BRANCH):
        logits = model(x)
    adv_logits = model(x_adv)
    if cfg.trades_target == "separate":
        with _branch(model, CLEAN_BRANCH):
            target = model(x)
    else:
        target = logits
    robust = F.kl_div(F.log_softmax(adv_logits, dim=1), F.softmax(target, dim=1), reduction="sum")
    return (F.cross_entropy(logits, y, reduction="sum") + cfg.trades_beta * robust) / total


def _training_loss(
    model: Classifier, x: torch.Tensor, y: torch.Tensor, cfg: FinetuneConfig, random: RandomSource, total: int
) -> torch.Tensor:
    """The protocol's loss of these rows: their sum divided by ``total``, the global batch size."""
    if cfg.train_attack == "trades":
        return trades_loss(model, x, y, cfg, random, total)
    if cfg.train_attack == "pgd":
        x = _ce_attack(model, x, y, cfg, random)
    return F.cross_entropy(model(x), y, reduction="sum") / total


@torch.no_grad()
def _encode_rows(
    encoder: nn.Module,
    images: Pixels,
    rows: torch.Tensor,
    device: torch.device,
    dtype: torch.dtype,
    workers: int = 0,
    progress: bool = False,
) -> torch.Tensor:
    """Features of ``rows`` in ``dtype`` on the host, written into one preallocated tensor (never twice in memory);
    shape [0, 0] when there are no rows."""
    out = torch.empty((0, 0), dtype=dtype)
    done = 0
    chunks = list(rows.split(CHUNK))
    bar = tqdm(total=len(rows), desc="features", unit="img", dynamic_ncols=True, disable=not progress)
    with module_mode(encoder, False):
        for part in read_batches(images, chunks, workers):
            features = encoder(pixels(part, device)).to("cpu", dtype)
            if done == 0:
                out = torch.empty((len(rows), features.shape[1]), dtype=dtype)
            out[done : done + len(features)] = features
            done += len(features)
            bar.update(len(features))
    bar.close()
    return out


def train_features(
    encoder: nn.Module,
    train: LabelledImages,
    rows: torch.Tensor,
    device: torch.device = torch.device("cpu"),
    workers: int = 0,
    progress: bool = False,
) -> torch.Tensor:
    """SLF's training features of ``rows`` (this process's own), in the compact :data:`FEATURE_DTYPE`."""
    return _encode_rows(encoder, train.images, rows, device, FEATURE_DTYPE, workers, progress)


@torch.no_grad()
def _feature_dim(encoder: nn.Module, images: Pixels, features: torch.Tensor | None, device: torch.device) -> int:
    """The encoder's feature width: from this process's features, else from one blank image (a process may hold no
    row of the split at all)."""
    if features is not None and features.shape[1]:
        return int(features.shape[1])
    r = resolution(images)
    with module_mode(encoder, False):
        return int(encoder(torch.zeros((1, 3, r, r), device=device)).shape[1])


def _correct_fraction(correct: int, n: int, device: torch.device) -> float:
    """The share of ``n`` validation images judged right, ``correct`` being this process's count."""
    return int(sum_over_processes(torch.tensor([correct], device=device, dtype=torch.long)).item()) / n


def _val_accuracy(
    model: Classifier, val: LabelledImages, cfg: FinetuneConfig, device: torch.device, seed: int, workers: int
) -> float:
    """Clean or robust (the training attack's PGD with CE) validation accuracy, each process judging its own rows;
    an image's attack starts from noise seeded by its index, the same each epoch and on any process."""
    correct = 0
    chunks = list(owned_rows(len(val)).split(CHUNK))
    with module_mode(model, False):
        for rows, images in zip(chunks, read_batches(val.images, chunks, workers)):
            x, y = pixels(images, device), val.labels[rows].to(device)
            if cfg.select_by == "robust":
                start = unit_starts(rows, x.shape[1:], seed + 1).to(device) * cfg.epsilon
                x = _ce_attack(model, x, y, cfg, start=start, steps=_select_steps(cfg))
            with torch.no_grad():
                correct += (model(x).argmax(1) == y).sum().item()
    return _correct_fraction(correct, len(val), device)


@torch.no_grad()
def _feature_val_accuracy(head: nn.Linear, features: torch.Tensor, labels: torch.Tensor, n: int, device) -> float:
    correct = 0
    for part, y in zip(features.split(CHUNK), labels.split(CHUNK)):
        correct += (head(part.to(device)).argmax(1) == y.to(device)).sum().item()
    return _correct_fraction(correct, n, device)


def _select_steps(cfg: FinetuneConfig) -> int:
    return cfg.attack_steps if cfg.select_attack_steps is None else cfg.select_attack_steps


def _check_shares(n: int, cfg: FinetuneConfig, key: str) -> None:
    """BatchNorm in train mode (AFF, bn_mode train) gathers statistics from every process at every training forward:
    each needs rows."""
    _, size = world()
    if cfg.drop_last and n < cfg.batch_size:
        raise UserError(
            f"{n} training images make no full batch of {cfg.batch_size}, and {key}.drop_last leaves out partial ones",
            f"{key}.batch_size",
            f"choose a batch size of at most {n}, or set {key}.drop_last: false",
        )
    last = 0 if cfg.drop_last else n % cfg.batch_size
    smallest = min(cfg.batch_size, n) if last == 0 else last
    if cfg.encoder_bn_train() and smallest < size:
        raise UserError(
            f"a finetuning batch of {smallest} images (of {n}, in batches of {cfg.batch_size}) leaves some of the "
            f"{size} processes without images, and BatchNorm in train mode needs every process in each batch",
            f"{key}.batch_size",
            f"choose a batch size whose last batch (of {n} images) holds 0 or at least {size} images",
        )


def _step(optimizer: torch.optim.Optimizer, params: list[nn.Parameter], loss: torch.Tensor | None) -> None:
    """One SGD step on the global batch: this process's share of its loss, gradients summed over the processes."""
    optimizer.zero_grad(set_to_none=True)
    if loss is not None:
        loss.backward()
    sum_gradients(params)
    optimizer.step()


def finetune(
    encoder: FeatureEncoder,
    train: LabelledImages,
    val: LabelledImages,
    num_classes: int,
    cfg: FinetuneConfig,
    *,
    device: torch.device,
    seed: int,
    desc: str = "finetune",
    progress: bool = True,
    workers: int = 0,
    key: str = "eval.finetune",
    clean_bn: nn.Module | None = None,
    head: nn.Linear | None = None,
) -> FinetuneResult:
    """Train a linear head (and the encoder when ``cfg.train_encoder``) by SGD with a step schedule; keep the
    weights of the last epoch (``select_by`` final: ``val`` is not used) or of the epoch with the best validation
    accuracy (earliest on ties).

    Under several processes (a torch.distributed group) they share the work and train the same weights; ``workers``
    decode streamed images; ``key`` names the protocol's recipe section in errors; ``clean_bn``, a model laid out
    as ``encoder``, starts the clean BatchNorm branch of ``dual_bn``; ``head``, a trained head, is trained on (DynACL++
    carries its linear probe's head into the finetuning) in place of a new one."""
    _check_shares(len(train), cfg, key)
    torch.manual_seed(seed)
    encoder = encoder.to(device)
    _prepare_batchnorm(encoder, cfg, clean_bn)
    cached = _cached_features(encoder, train, val, cfg, device, workers, progress)
    features = cached.train if cached is not None else None
    if head is None:
        head = _new_head(_feature_dim(encoder, train.images, features, device), num_classes, cfg, device)
    head = head.to(device)
    model = Classifier(encoder, head, frozen=not cfg.train_encoder, bn_train=cfg.encoder_bn_train())
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=cfg.milestones, gamma=cfg.gamma)
    order = torch.Generator().manual_seed(seed)
    augment = WeakAugment(WeakAugmentParams(size=resolution(train.images))) if cfg.augment else None
    run = _Finetuning(
        model, params, optimizer, scheduler, train, val, cfg, device, seed, workers, cached, order, augment
    )
    history, best = _train_epochs(run, desc, progress)
    return _finish(run, history, best)


def _prepare_batchnorm(encoder: nn.Module, cfg: FinetuneConfig, clean_bn: nn.Module | None) -> None:
    """Give the encoder, in place, the BatchNorms the protocol trains with."""
    if cfg.dual_bn:
        dual_batchnorm(encoder, clean_bn)
    if cfg.encoder_bn_train() and world()[1] > 1:
        convert_sync_batchnorm(encoder)  # statistics of the global batch, as one process computes them


@dataclass
class _CachedFeatures:
    """SLF's features, computed once: of this process's rows of the training split (``own``), and of its rows of the
    validation split (``own_val``) when the epoch is picked on clean accuracy."""

    own: torch.Tensor
    train: torch.Tensor
    own_val: torch.Tensor
    val: torch.Tensor | None


def _cached_features(
    encoder: nn.Module,
    train: LabelledImages,
    val: LabelledImages,
    cfg: FinetuneConfig,
    device: torch.device,
    workers: int,
    progress: bool,
) -> _CachedFeatures | None:
    """Frozen encoder in eval mode + clean, unaugmented inputs: the features never change, so compute them once.
    None for every other protocol."""
    own, own_val = owned_rows(len(train)), owned_rows(len(val))
    if cfg.train_encoder or cfg.train_attack != "none" or cfg.augment or cfg.encoder_bn_train():
        return None
    features = train_features(encoder, train, own, device, workers, progress)
    if cfg.select_by != "clean":
        return _CachedFeatures(own, features, own_val, None)
    val_features = _encode_rows(encoder, val.images, own_val, device, torch.float32, workers)
    return _CachedFeatures(own, features, own_val, val_features)


def _new_head(features: int, num_classes: int, cfg: FinetuneConfig, device: torch.device) -> nn.Linear:
    """The linear head: nn.Linear's initialisation from the seeded global generator, or zeros (``head_init``)."""
    head = nn.Linear(features, num_classes).to(device)
    if cfg.head_init == "zeros":
        nn.init.zeros_(head.weight)
        nn.init.zeros_(head.bias)
    return head


@dataclass
class _Finetuning:
    """One finetuning set up: the classifier, what trains it, and SLF's cached features (None: every step goes
    through the encoder)."""

    model: Classifier
    params: list[nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.MultiStepLR
    train: LabelledImages
    val: LabelledImages
    cfg: FinetuneConfig
    device: torch.device
    seed: int
    workers: int
    cached: _CachedFeatures | None
    order: torch.Generator  # draws the order of the training images, each epoch
    augment: WeakAugment | None

    def kept(self) -> nn.Module:
        """What the selected epoch's weights are taken from: the encoder changes when it trains, and its BatchNorm
        statistics when they run in train mode; else only the head does."""
        return self.model if self.cfg.train_encoder or self.model.bn_train else self.model.head

    def train_epoch(self, epoch: int) -> float:
        """One epoch in a new random order, then the schedule's step; returns the mean training loss."""
        self.model.train()
        batches = torch.randperm(len(self.train), generator=self.order).split(self.cfg.batch_size)
        if self.cfg.drop_last and len(batches[-1]) < self.cfg.batch_size:
            batches = batches[:-1]
        if self.cached is not None:
            head, features, own = self.model.head, self.cached.train, self.cached.own
            total = _feature_epoch(
                head, features, own, self.train.labels, batches, self.optimizer, self.params, self.device
            )
        else:
            run = _EpochRun(
                self.model, self.augment, self.cfg, self.device, self.seed, epoch, self.optimizer, self.params
            )
            total = run.run(self.train, batches, self.workers)
        summed = sum_over_processes(torch.tensor([total], dtype=torch.float64, device=self.device))
        train_loss = float(summed) / sum(len(index) for index in batches)
        self.scheduler.step()
        return train_loss

    def val_accuracy(self) -> float:
        """This epoch's validation accuracy, on the cached features when there are."""
        cached = self.cached
        if cached is not None and cached.val is not None:
            labels = self.val.labels[cached.own_val]
            return _feature_val_accuracy(self.model.head, cached.val, labels, len(self.val), self.device)
        return _val_accuracy(self.model, self.val, self.cfg, self.device, self.seed, self.workers)


@dataclass
class _BestEpoch:
    """The epoch picked so far on validation accuracy (``select_by`` clean / robust), with its weights."""

    epoch: int = 0
    accuracy: float = -1.0
    state: dict[str, Any] | None = None


def _train_epochs(run: _Finetuning, desc: str, progress: bool) -> tuple[list[dict[str, Any]], _BestEpoch]:
    """Every epoch, each validated unless the last one is kept; returns the history and the best epoch."""
    cfg = run.cfg
    best = _BestEpoch()
    history: list[dict[str, Any]] = []
    bar = tqdm(range(1, cfg.epochs + 1), desc=desc, unit="epoch", dynamic_ncols=True, disable=not progress)
    for epoch in bar:
        train_loss = run.train_epoch(epoch)
        if cfg.select_by == "final":
            history.append({"epoch": epoch, "train_loss": train_loss, "val_accuracy": None})
            bar.set_postfix(loss=f"{train_loss:.4f}")
            continue
        val_acc = run.val_accuracy()
        history.append({"epoch": epoch, "train_loss": train_loss, "val_accuracy": val_acc})
        bar.set_postfix(loss=f"{train_loss:.4f}", val=f"{100 * val_acc:.1f}%")
        if val_acc > best.accuracy:
            best = _BestEpoch(epoch, val_acc, copy.deepcopy(run.kept().state_dict()))
    bar.close()
    return history, best


def _finish(run: _Finetuning, history: list[dict[str, Any]], best: _BestEpoch) -> FinetuneResult:
    """The classifier with the kept epoch's weights and one BatchNorm branch (ADV_BRANCH), in eval mode."""
    if run.cfg.select_by == "final":
        epoch, accuracy = run.cfg.epochs, None
    else:
        epoch, accuracy = best.epoch, best.accuracy
        run.kept().load_state_dict(best.state)
    if run.cfg.dual_bn:
        single_batchnorm(run.model.encoder, ADV_BRANCH)
    return FinetuneResult(run.model.eval(), epoch, accuracy, history)


def _feature_epoch(
    head: nn.Linear,
    features: torch.Tensor,
    own: torch.Tensor,
    labels: torch.Tensor,
    batches: tuple[torch.Tensor, ...],
    optimizer: torch.optim.Optimizer,
    params: list[nn.Parameter],
    device: torch.device,
) -> float:
    """One SLF epoch on cached features: each process takes the rows of each batch it owns (their features are
    here). Returns this process's summed loss."""
    first, stop = (int(own[0]), int(own[-1]) + 1) if len(own) else (0, 0)
    total = 0.0
    for index in batches:
        mine = index[(index >= first) & (index < stop)]
        loss = None
        if len(mine):
            x = features[mine - first].to(device).float()
            loss = F.cross_entropy(head(x), labels[mine].to(device), reduction="sum") / len(index)
            total += loss.item() * len(index)
        _step(optimizer, params, loss)
    return total


@dataclass
class _EpochRun:
    """One epoch through the encoder (ALF / AFF, or SLF with augmentation or attacks): each process runs its share
    of every batch, with the batch's random numbers drawn as one process would (:class:`BatchRandom`)."""

    model: Classifier
    augment: WeakAugment | None
    cfg: FinetuneConfig
    device: torch.device
    seed: int
    epoch: int
    optimizer: torch.optim.Optimizer
    params: list[nn.Parameter]

    def run(self, train: LabelledImages, batches: tuple[torch.Tensor, ...], workers: int) -> float:
        """Returns this process's summed loss."""
        shares = [batch_share(index) for index in batches]
        total = 0.0
        pixels_of = read_batches(train.images, [rows for rows, _ in shares], workers)
        for number, (index, (rows, offset), images) in enumerate(zip(batches, shares, pixels_of)):
            loss = self._loss(number, index, rows, offset, images, train.labels[rows]) if len(rows) else None
            if loss is not None:
                total += loss.item() * len(index)
            _step(self.optimizer, self.params, loss)
        return total

    def _loss(self, number, index, rows, offset, images, labels) -> torch.Tensor:
        random = batch_random(self.seed, self.epoch, number, self.device, len(rows), offset, len(index))
        images = images.to(self.device)
        x = self.augment(images, random) if self.augment is not None else pixels(images, self.device)
        return _training_loss(self.model, x, labels.to(self.device), self.cfg, random, len(index))
