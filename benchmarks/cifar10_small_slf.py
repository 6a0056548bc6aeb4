"""Does ACL buy robustness on real CIFAR-10? Two small encoders with the same budget, then the same SLF evaluation:

  acl        recipes/cifar10_small.yaml as shipped (ACL-DS, PGD-5 at eps 8/255 inside pretraining)
  no_attack  the same with attack.steps=0 and attack.epsilon=0 (both streams clean: no adversary)

Each encoder is pretrained for 500 steps of 128 images (1.3 epochs), then evaluated with
`robustcl evaluate RUN --protocol slf --attack-subset N`: a linear head on frozen features of the 45,000
training images (5,000 held out to pick the epoch), clean accuracy on the 10,000 test images and PGD-20
accuracy (eps 8/255, step 2/255, random start) on the first N of them.

Usage:  python benchmarks/cifar10_small_slf.py [--data ../shared/datasets/cifar10] [--runs runs/cifar10_small]
        [--attack-subset 1000] [--out benchmarks/results/cifar10_small_slf.json]
A run directory that already holds a summary and an SLF eval.json is reported as it is (nothing is re-run).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from slf_runs import REPO, pretrain_and_evaluate, write_results

VARIANTS = {
    "acl": [],
    "no_attack": ["--set", "attack.steps=0", "--set", "attack.epsilon=0"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # Relative paths are relative to the repository root (the commands run there).
    parser.add_argument("--data", default="../shared/datasets/cifar10")
    parser.add_argument("--runs", type=Path, default=Path("runs/cifar10_small"))
    parser.add_argument("--attack-subset", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results/cifar10_small_slf.json")
    args = parser.parse_args()
    results = {}
    for name, extra in VARIANTS.items():
        run_dir = args.runs / name
        pretrain = ["robustcl", "pretrain", "recipes/cifar10_small.yaml", "--set", f"data.path={args.data}", *extra]
        results[name] = pretrain_and_evaluate(pretrain, run_dir, args.attack_subset)
    write_results(args.out, results)
    for name, r in results.items():
        print(f"{name:10s} SA {100 * r['SA']:5.1f}%  RA (PGD-20) {100 * r['RA']:5.1f}%")


if __name__ == "__main__":
    main()
