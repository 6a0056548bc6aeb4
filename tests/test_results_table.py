"""The README's Results table is the one the CIFAR-10 benchmark prints from its results file."""

from __future__ import annotations

import json

from helpers import REPO


def test_readme_results_table_is_the_benchmark_results_file(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    from cifar10_methods import METHODS, markdown_table

    results = json.loads((REPO / "benchmarks/results/cifar10_methods.json").read_text())["results"]
    assert list(results) == METHODS, "re-run python benchmarks/cifar10_methods.py: a method has no row"
    table = "\n".join(markdown_table(results))
    assert table in (REPO / "README.md").read_text(), "paste the table python benchmarks/cifar10_methods.py prints"
