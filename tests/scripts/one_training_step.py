"""One real training step of a recipe, run under `accelerate launch` (or plain python for one process).

Usage: one_training_step.py RECIPE OUT.safetensors RUN_DIR [KEY=VALUE ...]

Writes the step's loss (mean over processes), every parameter's gradient after the backward (averaged over
processes by DDP) and the BN buffers, from process 0. Then it runs a second step with a 2-step attack and records
how many gradient all-reduces DDP made inside the attacks and outside them (OUT with .json).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from safetensors.torch import save_file
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

import robustcl.methods.base as method_base
from robustcl.recipe import load_recipe
from robustcl.train import accumulate_gradients, open_session


def main() -> None:
    recipe_path, out, run_dir, *sets = sys.argv[1:]
    session = open_session(load_recipe(recipe_path, sets), Path(run_dir), resume=False)
    calls = {"inside_attack": 0, "outside_attack": 0}
    attacking = [False]
    if hasattr(session.model, "register_comm_hook"):  # DDP: count the gradient all-reduces

        def counting_allreduce(state, bucket):
            calls["inside_attack" if attacking[0] else "outside_attack"] += 1
            return default_hooks.allreduce_hook(state, bucket)

        session.model.register_comm_hook(None, counting_allreduce)
    plain_pgd = method_base.pgd_attack

    def watched_pgd(*args, **kwargs):
        attacking[0] = True
        try:
            return plain_pgd(*args, **kwargs)
        finally:
            attacking[0] = False

    method_base.pgd_attack = watched_pgd

    session.model.train()
    metrics = accumulate_gradients(session, 0)
    loss = session.accelerator.reduce(metrics["loss"], "mean")
    tensors = {"loss": loss.reshape(1).cpu()}
    for name, p in session.method.named_parameters():
        if p.grad is not None:
            tensors[f"grad.{name}"] = p.grad.detach().cpu().clone()
    for name, b in session.method.named_buffers():
        if b.is_floating_point():
            tensors[f"buffer.{name}"] = b.detach().cpu().clone()  # the second step moves them

    session.optimisation.optimizer.zero_grad(set_to_none=True)
    session.method.recipe.attack.steps = 2
    accumulate_gradients(session, 1)
    if session.accelerator.is_main_process:
        save_file(tensors, out)
        Path(out).with_suffix(".json").write_text(json.dumps({**calls, "processes": session.data.plan.processes}))
    session.accelerator.wait_for_everyone()
    session.accelerator.end_training()


if __name__ == "__main__":
    main()
