"""What the CIFAR-10 experiments share: pretrain + SLF-evaluate one run (skipped when already done), and read its
figures back into one record of the results file."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]


def _run(cmd: list[str]) -> None:
    print("$", " ".join(cmd), flush=True)
    subprocess.run([str(Path(sys.executable).parent / cmd[0]), *cmd[1:]], cwd=REPO, check=True)


def pretrain_and_evaluate(
    pretrain: list[str], run_dir: Path, attack_subset: int, preset: str | None = None
) -> dict[str, Any]:
    """Run ``pretrain`` (a robustcl command without --output-dir) into ``run_dir`` (relative to the repository
    root) and `robustcl evaluate RUN --protocol slf --attack-subset N [--preset P]`, unless the run directory already
    holds a summary and an SLF eval.json; return the record of its figures."""
    files = REPO / run_dir
    evaluate = ["robustcl", "evaluate", str(run_dir), "--protocol", "slf", "--attack-subset", str(attack_subset)]
    evaluate += ["--preset", preset] if preset else []
    if not ((files / "summary.json").is_file() and (files / "eval" / "slf" / "eval.json").is_file()):
        _run([*pretrain, "--output-dir", str(run_dir)])
        _run(evaluate)
    summary = json.loads((files / "summary.json").read_text())
    report = json.loads((files / "eval" / "slf" / "eval.json").read_text())
    return {
        "pretrain_command": " ".join(pretrain),
        "evaluate_command": " ".join(evaluate),
        "steps": summary["steps"],
        "images_seen": summary["images_seen"],
        "SA": report["SA"],
        "SA_attacked_subset": report["SA_attacked_subset"],
        "RA": report["RA"],
        "curve": {f"{p['epsilon'] * 255:g}/255": p["accuracy"] for p in report["curve"]},
        "preset": report.get("preset"),
        "split_sizes": report["split_sizes"],
        "selected_epoch": report["finetune"]["selected_epoch"],
        "pretrain_wall_time_s": round(summary["wall_time_s"], 1),
        "eval_wall_time_s": round(report["wall_time_s"], 1),
    }


def write_results(path: Path, results: dict[str, Any]) -> None:
    out = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, CPU",
        "torch": torch.__version__,
        "results": results,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
