"""What an evaluation leaves behind: ``eval.json``, a printed table and the accuracy-vs-ε curve as a PNG."""

from __future__ import annotations

import importlib.metadata
import platform
from pathlib import Path

from ..atomic_write import atomic_file
from ..eval_report import EvalReport
from .corruptions import corruption_lines

_PACKAGES = ("robustcl", "torch", "transformers", "accelerate", "datasets", "pyautoattack")


def software_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def _eps(value: float) -> str:
    return f"{value * 255:g}/255"


def _rows(report: EvalReport) -> list[tuple[str, float | None, int, str]]:
    """(metric, accuracy, images, attack) of each figure measured."""
    sizes, pgd = report.split_sizes, report.attack.pgd
    rows = [("SA", report.SA, sizes.test, "clean")]
    if report.RA is not None:
        attack = f"PGD-{pgd.steps} CE, eps {_eps(pgd.epsilon)}, step {_eps(pgd.step_size)}"
        rows.append(("RA", report.RA, sizes.attacked, attack))
    aa = report.attack.autoattack
    if report.AA is not None and aa is not None:
        rows.append(("AA", report.AA, sizes.attacked, f"AutoAttack {aa.version}, eps {_eps(aa.epsilon)}"))
    return rows


def format_table(report: EvalReport) -> str:
    """The figures people read first, as aligned text."""
    sizes, ft = report.split_sizes, report.finetune
    preset = f", preset {report.preset}" if report.preset else ""  # absent from earlier reports
    if ft.select_by == "final":
        kept = f"last epoch ({ft.epochs}) kept, no validation split"
    else:
        validation = f"validation {ft.select_by} accuracy {_pct(ft.val_accuracy)}"
        kept = f"selected epoch {ft.selected_epoch} of {ft.epochs} ({validation})"
    lines = [
        f"{report.protocol.upper()} evaluation of {report.model} on {report.dataset.source}{preset}",
        f"  train {sizes.train} / val {sizes.val} / test {sizes.test} images; {kept}",
        f"  {'metric':<6} {'accuracy':>9} {'images':>7}  attack",
    ]
    note = report.dataset.test_split_note  # absent from reports of earlier versions
    if note:
        lines.insert(1, f"  {note}")
    lines += [f"  {name:<6} {_pct(value):>9} {count:>7}  {what}" for name, value, count, what in _rows(report)]
    lines += corruption_lines(report.corruptions)  # absent from reports of earlier versions
    return "\n".join(lines)


def plot_curve(report: EvalReport, path: Path) -> None:
    """Accuracy vs ε under PGD, one line, written as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    eps = [p.epsilon * 255 for p in report.curve]
    acc = [100 * p.accuracy for p in report.curve]
    fig, ax = plt.subplots(figsize=(5, 3.6), dpi=120)
    ax.plot(eps, acc, marker="o")
    for x, y in zip(eps, acc):
        ax.annotate(f"{y:.1f}", (x, y), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8)
    ax.set_xlabel("L∞ radius ε (×1/255)")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 108)  # headroom for the labels of points near 100%
    ax.set_yticks(range(0, 101, 20))
    ax.set_xticks(eps)
    ax.grid(alpha=0.3)
    title = f"{report.protocol.upper()}, PGD-{report.attack.pgd.steps}, {report.split_sizes.attacked} test images"
    ax.set_title(title, fontsize=9)
    fig.suptitle(Path(report.model).name or report.model, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_file(path) as tmp:
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)
