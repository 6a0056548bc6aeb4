"""Cold start-up of the command line and of ``import robustcl``: wall-clock seconds of fresh processes.

Each case runs N times in a new process (the console script or ``python -c``); min and median are reported. The
acceptance bar is ``robustcl --help`` under one second (tests/test_startup.py asserts it, best of three).

  python benchmarks/startup.py            # 5 runs of each case
  python benchmarks/startup.py --runs 10 --out benchmarks/results/startup.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

BIN = Path(sys.executable).parent
CASES = {
    "robustcl --help": [str(BIN / "robustcl"), "--help"],
    "robustcl pretrain --help": [str(BIN / "robustcl"), "pretrain", "--help"],
    "python -m robustcl --help": [sys.executable, "-m", "robustcl", "--help"],
    "import robustcl": [sys.executable, "-c", "import robustcl"],
    # What registration costs once transformers is used: the Auto classes plus robustcl's model classes.
    "import robustcl; from transformers import AutoModel": [
        sys.executable,
        "-c",
        "import robustcl\nfrom transformers import AutoModel",
    ],
}


def seconds(command: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--out", type=Path, help="write the figures as JSON here")
    args = parser.parse_args()
    results = {}
    for name, command in CASES.items():
        times = [seconds(command) for _ in range(args.runs)]
        results[name] = {"min_s": round(min(times), 3), "median_s": round(statistics.median(times), 3)}
        print(f"{name:55s} min {min(times):6.2f} s   median {statistics.median(times):6.2f} s")
    if args.out:
        record = {"runs": args.runs, "python": sys.version.split()[0], "machine": platform.platform(), **results}
        args.out.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
