"""Does adversarial pretraining buy robustness? The quickstart recipe three ways, same data, model and evaluation:

  acl_ds      recipes/quickstart.yaml as shipped (ACL-DS, PGD-5 at eps 8/255 inside pretraining)
  no_attack   the same with attack.epsilon=0 (both streams clean: contrastive learning without adversaries)
  untrained   one step of training (close to the random initialisation)

Each run ends with the recipe's evaluation (eval.after_pretrain): SLF, a linear head on frozen features of the
1,437 training digits (10% held out to pick the epoch), then clean (SA) and PGD-20 (RA, eps 8/255) accuracy on
the 360 held-out digits.
Usage:  python benchmarks/quickstart_ablation.py [--out benchmarks/results/quickstart_ablation.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
VARIANTS = {
    "acl_ds": [],
    "no_attack": ["--set", "attack.epsilon=0"],
    "untrained": ["--set", "training.max_steps=1"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results/quickstart_ablation.json")
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, extra in VARIANTS.items():
            run_dir = Path(tmp) / name
            cmd = ["robustcl", "pretrain", "recipes/quickstart.yaml", *extra, "--output-dir", str(run_dir)]
            print("$", " ".join(cmd), flush=True)
            subprocess.run([str(Path(sys.executable).parent / cmd[0]), *cmd[1:]], cwd=REPO, check=True)
            summary = json.loads((run_dir / "summary.json").read_text())
            results[name] = {
                "command": " ".join(cmd[:-2]),
                "steps": summary["steps"],
                "wall_time_s": round(summary["wall_time_s"], 1),
                "SA": summary["evaluation"]["SA"],
                "RA": summary["evaluation"]["RA"],
            }
    report = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, CPU",
        "torch": torch.__version__,
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    for name, r in results.items():
        print(f"{name:10s} SA {100 * r['SA']:5.1f}%  RA (PGD-20) {100 * r['RA']:5.1f}%")


if __name__ == "__main__":
    main()
