"""Training under DeepSpeed (ZeRO stages 0–3 through Accelerate): what the trainer does differently.

- The batch keys of the DeepSpeed config are the recipe's: micro-batch per process, accumulation steps and the
  global batch are filled in from the run's batch plan (the shipped configs in launch/ say "auto"). No gradient
  clipping unless the config names a value (Accelerate would otherwise fill in 1.0).
- The engine takes the optimizer step inside the last micro-batch's backward and scales the loss itself.
- LARS needs each layer's weight and gradient norms; ZeRO stages ≥ 1 hand the optimizer one flat partition per
  parameter group, so LARS would compute norms over arbitrary slices: refused, with the fix.
- DeepSpeed's checkpoint engine loads its files with ``weights_only=False``; robustcl loads them with
  ``weights_only=True``, allowing only the three plain DeepSpeed classes its optimizer states contain.
- ZeRO-3 partitions every parameter, frozen ones included, so the method's own update of a frozen network in its
  weights (a moving-average copy, see ``Method.frozen_networks``) would silently do nothing: refused.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType

from .errors import UserError
from .recipe import Recipe


def deepspeed_requested() -> bool:
    """Whether the launcher asked for DeepSpeed (``accelerate launch --use_deepspeed`` / ``robustcl launch
    --deepspeed``)."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "").strip().lower() in ("1", "true", "yes")


def uses_deepspeed(accelerator: Accelerator) -> bool:
    return accelerator.distributed_type == DistributedType.DEEPSPEED


def zero_stage(accelerator: Accelerator) -> int:
    if not uses_deepspeed(accelerator):
        return 0
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    return int(config.get("zero_optimization", {}).get("stage", 0))


def configure_deepspeed(
    accelerator: Accelerator, recipe: Recipe, micro_batch: int, accumulation: int, frozen: list[str]
) -> None:
    """Before ``accelerator.prepare``: the recipe's batch plan into the DeepSpeed config, and refuse what ZeRO
    would silently change. ``frozen``: the method's frozen networks in its weights, by name."""
    if not uses_deepspeed(accelerator):
        return
    config: dict[str, Any] = accelerator.state.deepspeed_plugin.deepspeed_config
    config["train_micro_batch_size_per_gpu"] = micro_batch
    config["gradient_accumulation_steps"] = accumulation
    config["train_batch_size"] = recipe.training.batch_size
    # Accelerate turns a missing or "auto" gradient_clipping into 1.0: the recipes clip nothing, so neither does
    # DeepSpeed unless its config names a number.
    if not isinstance(config.get("gradient_clipping"), (int, float)):
        config["gradient_clipping"] = 0.0
    stage = zero_stage(accelerator)
    if stage >= 1 and recipe.optimizer.name == "lars":
        raise UserError(
            f"LARS cannot run under DeepSpeed ZeRO stage {stage}: ZeRO gives the optimizer flat parameter "
            "partitions, so its per-layer trust ratios would be computed over arbitrary slices",
            "optimizer.name",
            "train with --set optimizer.name=sgd (and an SGD learning rate, e.g. --set optimizer.lr=0.5), or with "
            "a DeepSpeed config whose zero_optimization.stage is 0",
        )
    if stage == 3 and frozen:
        name = recipe.method.name
        raise UserError(
            f"method {name} updates its frozen networks ({', '.join(frozen)}) itself, which ZeRO stage 3 cannot do "
            "(it partitions their parameters: the updates would silently do nothing)",
            f"method.{name}",
            f"use launch/zero2.json, or method.{name} options without these networks",
        )


@contextmanager
def safe_checkpoint_loading() -> Iterator[None]:
    """DeepSpeed's checkpoint reads with ``torch.load(weights_only=True)`` (it passes False itself), allowing the
    plain classes its ZeRO optimizer states pickle: the loss-scaler record, the stage enum, fragment addresses."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    def load(self: Any, path: str, map_location: Any = None) -> Any:
        with torch.serialization.safe_globals([LossScaler, ZeroStageEnum, fragment_address]):
            return torch.load(path, map_location=map_location, weights_only=True)

    original = TorchCheckpointEngine.load
    TorchCheckpointEngine.load = load
    try:
        yield
    finally:
        TorchCheckpointEngine.load = original
