"""A run's encoder is a standalone artifact: every checkpoint records the downstream encoder's config (BN branches
included), where its tensors sit in the checkpoint's weights file, the branch exports keep and the method's card
facts. Export, evaluation and model cards read that record and the weights, so they never build a training
``Method`` and import nothing from ``methods/`` or ``train.py``; a checkpoint without the record is refused in one
line."""

from __future__ import annotations

import ast
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import REPO, TINY, call_main, cli_env, with_sets
from safetensors.torch import load_file

from robustcl.methods import build_method
from robustcl.methods.base import Method
from robustcl.run_dir import latest_checkpoint, read_run_recipe
from robustcl.run_layout import COMPLETE_MARKER, TRAIN_STATE

PACKAGE = REPO / "robustcl"
# What the acceptance names: evaluation, export, model cards and publishing.
ARTIFACT_FILES = [
    *sorted((PACKAGE / "evaluation").glob("*.py")),
    *(PACKAGE / f for f in ("export.py", "model_card.py", "hub.py")),
]
TRAINING = ("robustcl.methods", "robustcl.train")
EVAL_SETS = with_sets("eval.slf.epochs=1", "eval.data.max_train=64", "eval.data.max_test=32", "eval.attacks=[]")
ERROR = "robustcl: error: "


def _training(name: str) -> bool:
    return any(name == t or name.startswith(t + ".") for t in TRAINING)


def _module(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _file(module: str) -> Path | None:
    """The source file of a robustcl module, None for anything else."""
    base = REPO.joinpath(*module.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if module.startswith("robustcl") and path.is_file():
            return path
    return None


def _type_checking_only(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and "TYPE_CHECKING" in {getattr(test, "id", None), getattr(test, "attr", None)}


def _import_nodes(node: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """The import statements under ``node`` that run: anywhere (module level, functions, try blocks) except the
    body of an ``if TYPE_CHECKING:``, which only type checkers read."""
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        return [node]
    children = node.orelse if _type_checking_only(node) else ast.iter_child_nodes(node)
    return [found for child in children for found in _import_nodes(child)]


def _imports(path: Path) -> set[str]:
    """Every module an import statement in ``path`` names, relative ones resolved; ``from X import y`` names X and
    X.y (y may be a submodule)."""
    package = _module(path) if path.name == "__init__.py" else _module(path).rpartition(".")[0]
    names: set[str] = set()
    for node in _import_nodes(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
            continue
        base = node.module or ""
        if node.level:
            parents = package.split(".")[: len(package.split(".")) - node.level + 1]
            base = ".".join([*parents, base] if base else parents)
        names |= {base, *(f"{base}.{alias.name}" for alias in node.names)}
    return names


def test_evaluation_export_model_cards_and_hub_import_nothing_from_training_not_even_lazily():
    """The import graph from these files, followed through every robustcl module they reach (function-level imports
    included), never reaches methods/ or train.py."""
    reached = {_module(path): [_module(path)] for path in ARTIFACT_FILES}  # module → the chain that reached it
    todo = list(reached)
    offending = []
    while todo:
        module = todo.pop()
        for name in sorted(_imports(_file(module))):
            if _training(name):
                offending.append(" → ".join([*reached[module], name]))
            elif _file(name) is not None and name not in reached:
                reached[name] = [*reached[module], name]
                todo.append(name)
    assert not offending, offending


def test_a_fresh_process_importing_them_loads_no_training_module():
    modules = sorted({_module(path) for path in ARTIFACT_FILES})
    script = (
        "import importlib, json, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        f"print(json.dumps(sorted(m for m in sys.modules if m.startswith({TRAINING!r}))))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=cli_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two-step runs on the embedded digits: ACL-DS (dual BN, the 'pgd' branch exported) and DynACL (its
    moving-average encoder exported, which differs from the online one after two steps)."""
    root = tmp_path_factory.mktemp("runs")
    sets = [*TINY, "data.path=builtin:digits", "training.max_steps=2", "eval.after_pretrain=false"]
    sets += ["logging.progress_bar=false", "logging.trackers=[]"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "argv", sys.argv)
        for name, recipe in (("acl", "quickstart"), ("dynacl", "dynacl")):
            argv = ["pretrain", str(REPO / "recipes" / f"{recipe}.yaml"), "-o", str(root / name), *with_sets(*sets)]
            assert call_main(argv) == 0
    return root


def _trained_method(run: Path) -> Method:
    """The run's training method with its newest checkpoint's weights, as training held it."""
    method = build_method(read_run_recipe(run))
    method.load_state_dict(load_file(latest_checkpoint(run) / "model.safetensors"))
    return method.eval()


def _refuse_methods(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(self, *args, **kwargs):
        raise AssertionError(f"a {type(self).__name__} was built")

    monkeypatch.setattr(Method, "__init__", refuse)


def test_export_and_evaluate_of_a_run_build_no_method(runs, tmp_path, cli, monkeypatch):
    _refuse_methods(monkeypatch)
    code, out, err = cli("export", str(runs / "acl"), str(tmp_path / "export"))
    assert code == 0, err[-3000:]
    assert (tmp_path / "export" / "model.safetensors").is_file()
    code, out, err = cli("evaluate", str(runs / "acl"), "--output", str(tmp_path / "eval.json"), *EVAL_SETS)
    assert code == 0, err[-3000:]
    assert json.loads((tmp_path / "eval.json").read_text())["model_kind"] == "run_dir"


@pytest.mark.parametrize("name, attribute", [("acl", "encoder"), ("dynacl", "momentum_encoder")])
def test_the_encoder_read_from_a_run_is_the_methods_downstream_encoder_bit_for_bit(runs, name, attribute):
    from robustcl.encoder_loading import load_run, single_branch_encoder

    method = _trained_method(runs / name)
    assert method.downstream_encoder is getattr(method, attribute)
    if name == "dynacl":  # else the test could not tell the two encoders apart
        online, ema = method.encoder.state_dict(), method.momentum_encoder.state_dict()
        assert not all(torch.equal(online[k], ema[k]) for k in online)
    run = load_run(runs / name)
    assert run.record == method.encoder_record()
    expected, got = method.downstream_encoder.state_dict(), run.encoder.state_dict()
    assert got.keys() == expected.keys()
    assert all(got[k].dtype == expected[k].dtype and torch.equal(got[k], expected[k]) for k in expected)
    assert run.encoder.config.to_dict() == method.downstream_encoder.config.to_dict()
    assert run.encoder.config.bn_branches == ["normal", "pgd"]

    model, branch = run.single_branch(None)
    assert branch == method.encoder_record().export_branch == "pgd"
    reference = single_branch_encoder(method.downstream_encoder, "pgd").state_dict()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in reference.items())
    x = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(x).pooler_output, method.downstream_encoder(x, bn_branch="pgd").pooler_output)


def _without_record(run: Path) -> Path:
    """Strip the encoder record from the newest checkpoint's train_state.json, as robustcl wrote it before the
    record existed (the COMPLETE marker vouching for the file); returns that file."""
    checkpoint = latest_checkpoint(run)
    path = checkpoint / TRAIN_STATE
    state = json.loads(path.read_text())
    del state["encoder"]
    path.write_text(json.dumps(state))
    marker = json.loads((checkpoint / COMPLETE_MARKER).read_text())
    data = path.read_bytes()
    marker["files"][TRAIN_STATE] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (checkpoint / COMPLETE_MARKER).write_text(json.dumps(marker))
    return path


def test_a_checkpoint_written_before_the_record_is_refused_in_one_line_naming_it(runs, tmp_path, cli):
    run = tmp_path / "old-run"
    shutil.copytree(runs / "acl", run)
    state_file = _without_record(run)
    for argv in (
        ["export", str(run), str(tmp_path / "export")],
        ["evaluate", str(run), "--output", str(tmp_path / "eval.json"), *EVAL_SETS],
    ):
        code, out, err = cli(*argv)
        assert code == 2, err[-3000:]
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith(ERROR) and "Traceback" not in out + err, err[-3000:]
        assert "does not record its encoder" in lines[0] and f"({state_file})" in lines[0], lines[0]
        assert f"{run / 'encoder'}" in lines[0]  # the fix names the run's own export, which still loads
    assert not (tmp_path / "export").exists() and not (tmp_path / "eval.json").exists()


def test_exporting_a_run_loads_no_training_module_at_all(runs, tmp_path):
    """At run time too (recipes, the registry, lazy imports): robustcl export of a run directory, in a fresh
    process, ends without a module of methods/ or train.py loaded."""
    script = (
        "import json, sys\n"
        "from robustcl.cli import main\n"
        f"sys.argv = ['robustcl', 'export', {str(runs / 'acl')!r}, {str(tmp_path / 'export')!r}]\n"
        "try:\n"
        "    main()\n"
        "except SystemExit as exit:\n"
        "    assert not exit.code, exit.code\n"
        f"print(json.dumps(sorted(m for m in sys.modules if m.startswith({TRAINING!r}))))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=cli_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []
    assert (tmp_path / "export" / "model.safetensors").is_file()
