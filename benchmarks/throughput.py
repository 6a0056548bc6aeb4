"""Training throughput of any recipe: images/s, ms/step, MFU, peak memory, overhead factor, augmentation share.

Runs the real training step (robustcl.train.train_step: augmentation, attacks, forward/backward, optimizer) on the
recipe's data, W warm-up steps then N timed steps, and reports:

  images/s, ms/step      median step time over the N timed steps (device synchronised around each step)
  FLOPs, MFU             matrix-product and convolution FLOPs of one step (torch's FLOP counter, forward and
                         backward, attacks included) over the step time, against the device's peak: the data sheet's
                         dense bf16 / TF32 peak on known GPUs, a measured matmul peak elsewhere (CPUs)
  peak memory            GPU: peak allocated; CPU: peak resident memory of the process
  overhead factor        median step time / median time of the same step's model passes replayed alone (each
                         network call of the step with its backward, on random inputs of the same shapes, mode and
                         precision, one after another; one replay after each timed step); everything else in a step
                         is overhead (augmentation, random draws, losses, PGD's sign/clip, optimizer, Python)
  augmentation, attack   share of the step spent in the view augmentation / inside the PGD attacks (timed in
                         extra steps, device synchronised around each call)

Examples (CPU, small width):
  python benchmarks/throughput.py recipes/acl.yaml --set data.path=../shared/datasets/cifar10 \\
      --set data.max_samples=4096 --set model.widths=[16,32,64,128] --set training.batch_size=128
GPU, the paper's setting (ResNet-18, batch 512, PGD-5):
  python benchmarks/throughput.py recipes/acl.yaml --set data.path=../shared/datasets/cifar10
Writes a JSON result (--out) with every figure and the exact command.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from robustcl.data.augment import SimCLRAugment, WeakAugment
from robustcl.errors import UserError
from robustcl.methods.base import Method
from robustcl.recipe import load_recipe
from robustcl.step_profile import (
    count_flops,
    median_ms,
    peak_memory_mib,
    peak_tflops,
    record_model_passes,
    replay_passes,
    step_networks,
    synchronize,
    timed_methods,
)
from robustcl.train import Session, open_session, train_step

PHASES = {
    "augmentation": [(SimCLRAugment, "__call__"), (WeakAugment, "__call__")],
    "attack": [(Method, "attack")],
}


def cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return f"CPU ({platform.machine()})"


def timed_step(session: Session, step: int) -> float:
    """Seconds of one training step, the device synchronised before and after."""
    device = session.accelerator.device
    synchronize(device)
    start = time.perf_counter()
    train_step(session, step)
    synchronize(device)
    return time.perf_counter() - start


def measure(recipe_path: str, overrides: list[str], steps: int, warmup: int, phase_steps: int) -> dict:
    recipe = load_recipe(recipe_path, overrides)
    recipe.logging.progress_bar = False
    recipe.logging.trackers = []
    with tempfile.TemporaryDirectory() as tmp:
        session = open_session(recipe, Path(tmp) / "run", resume=False)
        device, method, plan = session.accelerator.device, session.method, session.data.plan
        images_per_step = plan.global_batch // plan.processes  # this process's share
        # The peak first: compilation later leaves worker processes that would share the CPU with the measurement.
        peak, peak_source = peak_tflops(device, session.accelerator.mixed_precision)
        session.model.train()
        step = 0
        for _ in tqdm(range(warmup), desc="warm-up", unit="step", leave=False):
            train_step(session, step)
            step += 1
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

        # Each timed step is followed by a replay of its model passes alone, so both see the same machine state.
        networks = step_networks(method)
        with record_model_passes(networks, device) as calls:
            train_step(session, step)
            step += 1
        passes = [c.freeze() for c in calls]
        times, alone = [], []
        for _ in tqdm(range(steps), desc="timed", unit="step", leave=False):
            times.append(timed_step(session, step))
            step += 1
            alone.append(replay_passes(networks, passes, device))
        memory, memory_kind = peak_memory_mib(device)
        ms, alone_ms = median_ms(times), median_ms(alone)

        with timed_methods(PHASES, device) as phase_totals:
            phase_times = []
            for _ in range(phase_steps):
                phase_times.append(timed_step(session, step))
                step += 1
        phase_share = {k: v / sum(phase_times) for k, v in phase_totals.items()}

        flops = count_flops(lambda: train_step(session, step))
        probe = torch.rand(1, 3, recipe.data.resolution, recipe.data.resolution, device=device)
        branch = method.encoder_record().export_branch
        encoder_flops = count_flops(lambda: method.encoder(probe, bn_branch=branch))
        mixed = session.accelerator.mixed_precision
        achieved = flops / (ms / 1e3) / 1e12
        session.close()
        return {
            "command": shlex.join(["python", *sys.argv]),
            "recipe": recipe_path,
            "overrides": overrides,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "processes": plan.processes,
            "global_batch": plan.global_batch,
            "micro_batch": plan.micro_batch,
            "mixed_precision": mixed,
            "attack_precision": recipe.attack.precision,
            "compile": recipe.training.compile,
            "channels_last": recipe.training.channels_last,
            "data_placement": session.data.feed.placement,
            "warmup_steps": warmup,
            "timed_steps": steps,
            "ms_per_step": ms,
            "ms_per_step_all": [t * 1e3 for t in times],
            "images_per_s": images_per_step / (ms / 1e3) * plan.processes,
            "step_gflop": flops / 1e9,
            "encoder_gflop_per_image": encoder_flops / 1e9,
            "forward_equivalents_per_image": flops / (encoder_flops * images_per_step),
            "achieved_tflops": achieved,
            "peak_tflops": peak,
            "peak_source": peak_source,
            "mfu": achieved / peak,
            "peak_memory_mib": memory,
            "memory_kind": memory_kind,
            "model_passes": len(passes),
            "passes_alone_ms": alone_ms,
            "passes_alone_ms_all": [t * 1e3 for t in alone],
            "overhead_factor": ms / alone_ms,
            "augmentation_share": phase_share["augmentation"],
            "attack_share": phase_share["attack"],
        }


def report(r: dict) -> str:
    return "\n".join(
        [
            f"device            {r['device']} ({r['processes']} process(es), {r['threads']} threads), "
            f"{r['mixed_precision']} mixed precision, attack {r['attack_precision']}, data {r['data_placement']}",
            f"batch             {r['global_batch']} images ({r['micro_batch']} per pass)",
            f"step              {r['ms_per_step']:.1f} ms (median of {r['timed_steps']}), "
            f"{r['images_per_s']:.1f} images/s",
            f"FLOPs             {r['step_gflop']:.1f} GFLOP/step = {r['forward_equivalents_per_image']:.1f} encoder "
            f"forwards/image × {r['encoder_gflop_per_image']:.4f} GFLOP",
            f"MFU               {100 * r['mfu']:.1f}% ({r['achieved_tflops']:.3g} of {r['peak_tflops']:.3g} TFLOP/s, "
            f"{r['peak_source']})",
            f"peak memory       {r['peak_memory_mib']:.0f} MiB ({r['memory_kind']})",
            f"overhead factor   {r['overhead_factor']:.3f} (step {r['ms_per_step']:.1f} ms / its {r['model_passes']} "
            f"model passes alone {r['passes_alone_ms']:.1f} ms, medians)",
            f"augmentation      {100 * r['augmentation_share']:.1f}% of the step",
            f"attack            {100 * r['attack_share']:.1f}% of the step",
        ]
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", help="recipe YAML, e.g. recipes/acl.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--steps", type=int, default=10, help="timed steps (default 10)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation, caches)")
    parser.add_argument("--phase-steps", type=int, default=3, help="steps timed for the augmentation/attack shares")
    parser.add_argument("--out", type=Path, help="write the result as JSON here")
    args = parser.parse_args()
    if min(args.steps, args.phase_steps) < 1 or args.warmup < 0:
        parser.error("--steps and --phase-steps must be ≥ 1, --warmup ≥ 0")
    try:
        result = measure(args.recipe, args.overrides, args.steps, args.warmup, args.phase_steps)
    except UserError as e:
        print(f"robustcl: error: {e}", file=sys.stderr)
        return 2
    print(report(result))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
