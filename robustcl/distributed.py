"""Process-group checks shared by every command that runs under ``accelerate launch``."""

from __future__ import annotations

import os

from accelerate import Accelerator

from .errors import UserError


def check_world_size(accelerator: Accelerator) -> None:
    """Refuse to run when Accelerate started another number of processes than the launcher asked for."""
    expected = int(os.environ.get("WORLD_SIZE", "1"))
    if accelerator.num_processes != expected:
        # `accelerate launch --cpu --num_processes 2` silently starts one process; `--multi_gpu` without a GPU
        # starts independent processes. Both would compute something other than what was asked.
        raise UserError(
            f"got {accelerator.num_processes} process(es) but WORLD_SIZE={expected}",
            "launcher",
            "on CPU launch with ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes N",
        )
