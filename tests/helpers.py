"""Shared pieces of the end-to-end tests: running the real CLI in subprocesses on small, real data."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CIFAR10 = REPO.parent / "shared" / "datasets" / "cifar10"
BIN = Path(sys.executable).parent

# A model and schedule small enough for a CPU test yet the real ACL-DS step (dual BN, PGD, LARS).
TINY = [
    "model.widths=[8,16,32,64]",
    "model.block_layers=[1,1,1,1]",
    "data.resolution=8",
    "training.batch_size=32",
    "attack.steps=2",
    "logging.every_steps=1",
    "eval.data.max_train=300",
    "eval.data.max_test=100",
    "eval.slf.epochs=5",
    "eval.attack.steps=5",
    "eval.attack.curve_epsilons=[0,8/255]",
]


def end_spawned_worker() -> None:
    """End a spawned worker of a test once its results are on disk and its process group is destroyed, skipping
    interpreter finalisation: torch's worker threads can still abort a healthy process there ("terminate called
    without an active exception", pytorch/pytorch#190489), which fails a test whose results were right."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def cli_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", TQDM_DISABLE="1", PYTHONUNBUFFERED="1")
    env.pop("WORLD_SIZE", None)
    env.update(extra)
    return env


def robustcl(*args: str, cwd: Path = REPO, timeout: float = 600, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "robustcl"), *args],
        cwd=cwd,
        env=cli_env(**env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def start_robustcl(*args: str, cwd: Path = REPO, **env: str) -> subprocess.Popen:
    """``robustcl ARGS`` started in the background (as :func:`robustcl` runs it), its output piped: for tests that
    signal or kill the process while it works."""
    return subprocess.Popen(
        [str(BIN / "robustcl"), *args], cwd=cwd, env=cli_env(**env), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip


def call_main(argv: list[str]) -> int:
    """``robustcl ARGV`` in this process, through the console script's entry point: the exit code (the caller
    patches sys.argv back and captures the output). Cheaper than a subprocess by seconds of imports."""
    import pytest

    from robustcl import cli

    sys.argv = ["robustcl", *argv]
    with pytest.raises(SystemExit) as exited:
        cli.main()
    return exited.value.code or 0


def user_error(fn, *args, **kwargs) -> str:
    """The message of the UserError ``fn(*args, **kwargs)`` raises, checked to be one line."""
    import pytest

    from robustcl.errors import UserError

    with pytest.raises(UserError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message, message
    return message


def with_sets(*sets: str) -> list[str]:
    out: list[str] = []
    for s in sets:
        out += ["--set", s]
    return out


def read_tree(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` by POSIX relative path, without the ``.cache`` folder snapshot_download adds."""
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in Path(root).rglob("*")
        if p.is_file() and ".cache" not in p.relative_to(root).parts
    }


def _requirement_closure(roots: list[str]) -> set[str]:
    """Installed distributions ``roots`` need (required dependencies only, markers evaluated, extras skipped)."""
    from importlib.metadata import PackageNotFoundError, distribution

    from packaging.requirements import Requirement

    seen: set[str] = set()
    queue = list(roots)
    while queue:
        name = queue.pop().lower().replace("_", "-")
        if name in seen:
            continue
        try:
            dist = distribution(name)
        except PackageNotFoundError:
            continue
        seen.add(name)
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                queue.append(req.name)
    return seen


def bare_python(folder: Path, packages: tuple[str, ...] = ("torch", "transformers", "safetensors")) -> Path:
    """A fresh virtual environment that sees only ``packages`` and their required dependencies (linked from this
    environment, not reinstalled): what a downstream user without robustcl has. Returns its python."""
    import venv
    from importlib.metadata import distribution

    venv.EnvBuilder(with_pip=False, symlinks=True).create(folder)
    python = folder / "bin" / "python"
    site = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    linked = folder / "linked"
    linked.mkdir()
    for name in _requirement_closure(list(packages)):
        dist = distribution(name)
        base = Path(dist.locate_file(""))
        for top in {Path(str(f)).parts[0] for f in dist.files or [] if not str(f).startswith("..")}:
            source, target = base / top, linked / top
            if source.exists() and not target.exists() and not top.endswith(".pth"):
                target.symlink_to(source)
    (site / "linked.pth").write_text(f"{linked}\n")
    return python
