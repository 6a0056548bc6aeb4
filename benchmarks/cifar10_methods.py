"""Every method on real CIFAR-10 with the same small encoder and the same pretraining budget, then the same SLF
evaluation: which of them buys robustness, and at what cost?

  simclr  recipes/simclr.yaml  (no adversary: the baseline every adversarial method must beat on RA)
  acl     recipes/acl.yaml     (ACL-DS)
  dynacl  recipes/dynacl.yaml  (its 20 augmentation / weight stages squeezed into the short run)
  advcl   recipes/advcl.yaml   (pseudo-labels: k-means on the simclr run's features, computed by the run itself)
  deacl   recipes/deacl.yaml   (stage 2, teacher: the simclr run; its cost excludes the teacher's)
  acl_air     recipes/acl_air.yaml      (ACL-DS + AIR's two invariance regularisers)
  dynacl_air  recipes/dynacl_air.yaml   (DynACL as AIR's script runs it + the regularisers; stages as dynacl's)
  ainfonce    recipes/ainfonce.yaml     (AdvCL with the asymmetric InfoNCE; k-means on the simclr export's features)
  rocl        recipes/rocl.yaml         (one view attacked against the other, 7 PGD steps)
  dynacl_plus_plus  recipes/dynacl_plus_plus.yaml  (dynacl's pretraining, then DynACL++'s post-pretraining stage:
                    k-means pseudo-labels, 1 epoch of linear probing, 1 epoch of TRADES finetuning (the authors'
                    10 + 25 would take hours on a CPU); its pretraining time excludes the stage's)

Each recipe keeps its own method, views, attack, normalisation and optimiser; all share the encoder (a ResNet with
one basic block per stage, widths 16–128), the budget (--steps optimizer steps of 128 images) and a warm-up of
0.1 epochs. Each is then evaluated with `robustcl evaluate RUN --protocol slf --attack-subset N --preset P`; the
default preset, robustssl, is the RobustSSL leaderboard's SLF: a zeroed linear head on the frozen encoder trained on
all 50,000 training images with crop + flip, lr 0.01 (÷10 after epochs 10 and 20), the last of 25 epochs kept; then
clean accuracy (SA) on the 10,000 test images and PGD-20 accuracy (RA; ε 8/255, step 2/255, random start) on the
first N of them.

Usage:  python benchmarks/cifar10_methods.py [--data ../shared/datasets/cifar10] [--runs runs/cifar10_methods]
        [--steps 300] [--attack-subset 1000] [--preset robustssl] [--only simclr,acl,...]
        [--out benchmarks/results/cifar10_methods.json]
Prints the README's Results table. A run directory that already holds a summary and an SLF eval.json is reported as
it is (nothing is re-run).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from slf_runs import REPO, pretrain_and_evaluate, write_results

BATCH = 128
COMMON = [
    "model.block_layers=[1,1,1,1]",
    "model.widths=[16,32,64,128]",
    f"training.batch_size={BATCH}",
    "schedule.warmup_epochs=0.1",
    "schedule.unit=step",  # the run is shorter than an epoch: a per-epoch lr (DynACL, DeACL, SimCLR) would never move
    "training.checkpoint_every=100",
    "logging.every_steps=20",
]
# simclr first: advcl, deacl and ainfonce build on it
METHODS = ["simclr", "acl", "dynacl", "advcl", "deacl", "acl_air", "dynacl_air", "ainfonce", "rocl", "dynacl_plus_plus"]
LABELS = {
    "simclr": "SimCLR (`simclr.yaml`), no adversary",
    "acl": "ACL-DS (`acl.yaml`)",
    "dynacl": "DynACL (`dynacl.yaml`, its 20 stages within the run)",
    "advcl": "AdvCL (`advcl.yaml`, k-means on the SimCLR run's features)",
    "deacl": "DeACL (`deacl.yaml`, teacher: the SimCLR run)",
    "acl_air": "ACL-AIR (`acl_air.yaml`)",
    "dynacl_air": "DynACL-AIR (`dynacl_air.yaml`, stages as DynACL's)",
    "ainfonce": "A-InfoNCE (`ainfonce.yaml`, k-means on the SimCLR export's features)",
    "rocl": "RoCL (`rocl.yaml`)",
    "dynacl_plus_plus": "DynACL++ (`dynacl_plus_plus.yaml`: DynACL's run, then 1 + 1 epochs of its stage)",
}
# DynACL++'s stage at this budget: one epoch of each part, the authors' lr drops (epochs 10, 20 of 25) never reached.
LPAFT_BUDGET = ["lpaft.lp.epochs=1", "lpaft.aft.epochs=1", "lpaft.aft.milestones=[]"]


def _extra(name: str, runs: Path, steps: int, train_images: int) -> list[str]:
    stages = [f"method.dynacl.reload_every_epochs={steps * BATCH / train_images / 20:.6g}"]
    if name in ("dynacl", "dynacl_air"):  # the paper's 20 stages (1000 epochs / 50) over this run's length
        return stages
    if name == "dynacl_plus_plus":
        return [*stages, *LPAFT_BUDGET]
    if name == "advcl":
        return [f"method.advcl.cluster_encoder={runs / 'simclr'}"]
    if name == "ainfonce":  # the export: the simclr run directory of an earlier robustcl version has no encoder record
        return [f"method.advcl.cluster_encoder={runs / 'simclr' / 'encoder'}"]
    if name == "deacl":
        return [f"method.deacl.teacher={runs / 'simclr'}"]
    return []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # Relative paths are relative to the repository root (the commands run there).
    parser.add_argument("--data", default="../shared/datasets/cifar10")
    parser.add_argument("--runs", type=Path, default=Path("runs/cifar10_methods"))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--attack-subset", type=int, default=1000)
    parser.add_argument("--preset", default="robustssl", help="evaluation preset (robustcl evaluate --preset)")
    parser.add_argument("--only", default=",".join(METHODS), help="comma-separated subset of " + ", ".join(METHODS))
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results/cifar10_methods.json")
    args = parser.parse_args()
    chosen = [m for m in METHODS if m in args.only.split(",")]
    results = {}
    for name in chosen:
        run_dir = args.runs / name
        sets = [f"data.path={args.data}", f"training.max_steps={args.steps}", *COMMON]
        sets += _extra(name, args.runs, args.steps, 50_000)
        pretrain = ["robustcl", "pretrain", f"recipes/{name}.yaml", *[a for s in sets for a in ("--set", s)]]
        results[name] = pretrain_and_evaluate(pretrain, run_dir, args.attack_subset, args.preset)
    write_results(args.out, results)
    print("\n".join(markdown_table(results)))


def markdown_table(results: dict[str, dict]) -> list[str]:
    """The README's Results table: SA, RA and the RA curve of every row; the best SA and RA in bold."""
    best = {key: max(r[key] for r in results.values()) for key in ("SA", "RA")}

    def cell(r: dict, key: str) -> str:
        text = f"{100 * r[key]:.1f}%"
        return f"**{text}**" if r[key] == best[key] and len(results) > 1 else text

    lines = [
        "| method (recipe) | SA (10,000) | RA, PGD-20 ε 8/255 (1,000) | PGD-20 at ε 2 / 4 / 16 /255 |",
        "|---|---|---|---|",
    ]
    for name, r in results.items():
        curve = " / ".join(f"{100 * r['curve'][f'{eps}/255']:.1f}%" for eps in (2, 4, 16))
        lines.append(f"| {LABELS[name]} | {cell(r, 'SA')} | {cell(r, 'RA')} | {curve} |")
    return lines


if __name__ == "__main__":
    main()
