"""Bad input: every mistake a user can make on the command line ends the command with exit code 2 and a single line
``robustcl: error: <what> (<where>) — <fix>`` on stderr, naming the key, file or column and how to fix it, before
anything is written: no file of an existing run, dataset or export changes, and no new file or folder appears.

The cases run in this process through ``robustcl.cli.main`` (the console script's entry point; a subprocess costs
seconds of imports per case), against one tiny finished run shared by the module; one case also goes through the
installed ``robustcl`` script to show that it prints the same line. Mixed image sizes and modes are not an error:
``test_loading.py::test_image_folder_mixed_modes_and_sizes`` checks that they load.
"""

from __future__ import annotations

import hashlib
import shutil
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import huggingface_hub.constants
import PIL.Image
import pytest
from helpers import REPO, TINY, call_main, robustcl

from robustcl import launcher

QUICK = str(REPO / "recipes" / "quickstart.yaml")
# The shared run: the smallest real pretraining (two ACL-DS steps, both checkpointed) that writes nothing optional.
RUN_SETS = [
    *TINY,
    "training.max_steps=2",
    "training.checkpoint_every=1",
    "eval.after_pretrain=false",
    "logging.progress_bar=false",
    "logging.trackers=[]",
]
ERROR = "robustcl: error: "

RunCli = Callable[..., tuple[int, str, str]]


def sets(*overrides: str) -> list[str]:
    return [arg for override in overrides for arg in ("--set", override)]


# --------------------------------------------------------------------------------------------- the workspace


def _image(color: tuple[int, int, int] = (10, 20, 30)) -> PIL.Image.Image:
    return PIL.Image.new("RGB", (8, 8), color)


def _labelled(labels: list[int], label_feature: datasets.ClassLabel | datasets.Value) -> datasets.Dataset:
    features = datasets.Features({"image": datasets.Image(), "label": label_feature})
    # Built through Arrow: ClassLabel's own encoder would refuse an out-of-range label up front.
    plain = datasets.Dataset.from_dict(
        {"image": [_image((20 * i, 0, 0)) for i in range(len(labels))], "label": labels},
        features=datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")}),
    )
    return datasets.Dataset(plain.data.table, info=datasets.DatasetInfo(features=features))


def _build_datasets(data: Path) -> None:
    two_classes, integers = datasets.ClassLabel(names=["a", "b"]), datasets.Value("int64")
    datasets.Dataset.from_dict({"text": ["a", "b"], "n": [1, 2]}).save_to_disk(str(data / "no_images"))
    datasets.Dataset.from_dict(
        {"left": [_image()] * 2, "right": [_image()] * 2, "label": [0, 1]},
        features=datasets.Features({"left": datasets.Image(), "right": datasets.Image(), "label": two_classes}),
    ).save_to_disk(str(data / "two_images"))
    _labelled([], two_classes).save_to_disk(str(data / "empty"))
    good = _labelled([0, 1, 0, 1], two_classes)
    # For evaluation (train and test splits): a bad label in the test split, a missing (-1) one in the train split,
    # and a test class the training split never shows.
    datasets.DatasetDict({"train": good, "test": _labelled([0, 1, 5, 1], two_classes)}).save_to_disk(
        str(data / "label_out_of_range")
    )
    datasets.DatasetDict(
        {"train": _labelled([0, 1, -1, 1], integers), "test": _labelled([0, 1, 0, 1], integers)}
    ).save_to_disk(str(data / "negative_label"))
    datasets.DatasetDict(
        {"train": _labelled([0, 1, 0, 1], integers), "test": _labelled([0, 1, 2, 1], integers)}
    ).save_to_disk(str(data / "unseen_test_label"))


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """``run/``: a finished tiny run (its ``encoder/`` is a complete export); ``data/``: broken datasets;
    ``exports/``: exports missing a file; ``recipes/``: broken recipe files; ``not_a_run/``: a folder of notes."""
    ws = tmp_path_factory.mktemp("bad_input")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "argv", sys.argv)  # call_main changes it
        code = call_main(["pretrain", QUICK, "-o", str(ws / "run"), *sets(*RUN_SETS)])
    assert code == 0
    (ws / "data").mkdir()
    _build_datasets(ws / "data")
    for name, missing in (("no_weights", "model.safetensors"), ("no_config", "config.json")):
        shutil.copytree(ws / "run" / "encoder", ws / "exports" / name)
        (ws / "exports" / name / missing).unlink()
    (ws / "recipes").mkdir()
    (ws / "recipes" / "not_yaml.yaml").write_text("data:\n  path: [builtin:digits\n  split: train\n")
    (ws / "recipes" / "list.yaml").write_text("- data\n- training\n")
    (ws / "recipes" / "typo.yaml").write_text("data:\n  path: builtin:digits\neval:\n  attack:\n    stepz: 3\n")
    (ws / "recipes" / "duplicate.yaml").write_text(
        "data:\n  path: builtin:digits\ntraining:\n  max_steps: 3\n  max_steps: 5\n"
    )
    (ws / "not_a_run").mkdir()
    (ws / "not_a_run" / "notes.txt").write_text("not a run\n")
    (ws / "notes.json").write_text('{"mine": true}\n')
    (ws / "dangling").symlink_to(ws / "nothing_here")
    yield ws


@pytest.fixture
def run_cli(
    workspace: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> RunCli:
    """``robustcl ARGS`` in this process, from an empty working directory (so that a default output folder would
    show up in ``tmp_path``), offline, never starting processes: (exit code, stdout, stderr)."""
    monkeypatch.chdir(tmp_path)
    for name in ("RANK", "WORLD_SIZE", "ACCELERATE_USE_CPU"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(launcher, "run_launch", lambda plan: pytest.fail(f"started processes: {plan.shell()}"))
    monkeypatch.setattr(sys, "argv", sys.argv)
    capfd.readouterr()

    def run(*args: str) -> tuple[int, str, str]:
        code = call_main(list(args))
        out = capfd.readouterr()
        return code, out.out, out.err

    return run


Snapshot = dict[str, tuple[str, int] | None]


def snapshot(root: Path) -> Snapshot:
    """Every file (content hash, mtime) and folder under ``root``, by relative path."""
    tree: Snapshot = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_file() and not path.is_symlink():
            tree[rel] = (hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns)
        else:
            tree[rel] = None
    return tree


def differences(before: Snapshot, after: Snapshot) -> list[str]:
    return [
        f"{'added' if rel not in before else 'removed' if rel not in after else 'changed'}: {rel}"
        for rel in sorted(before.keys() | after.keys())
        if before.get(rel, "absent") != after.get(rel, "absent")
    ]


# ----------------------------------------------------------------------------------------------------- cases


@dataclass(frozen=True)
class Case:
    """``argv`` may name ``{ws}`` (the workspace), ``{run}`` (the finished run) and ``{fresh}`` (a folder that does
    not exist and must not be created); ``problem`` are parts of the message, ``fix`` a part of the text after
    " — "."""

    argv: tuple[str, ...]
    problem: tuple[str, ...]
    fix: str


def case(*argv: str, problem: tuple[str, ...] | str, fix: str, id: str) -> Any:
    """One row of the table: a pytest parameter named ``id``."""
    return pytest.param(Case(argv, (problem,) if isinstance(problem, str) else problem, fix), id=id)


VALIDATE = ("recipe", "validate", QUICK)
PRETRAIN_FRESH = ("pretrain", QUICK, "-o", "{fresh}", *sets(*RUN_SETS))
EVALUATE = ("evaluate", "{run}")
EXPORT_DIR = "{run}/encoder"

CASES = [
    # ---- the command line itself
    case(
        "pretrain",
        problem="Missing argument 'RECIPE' (robustcl pretrain)",
        fix="see robustcl pretrain --help",
        id="missing-argument",
    ),
    case(
        "pretrain",
        QUICK,
        "--sett",
        "training.max_steps=3",
        problem=("No such option: --sett", "--set"),
        fix="see robustcl pretrain --help",
        id="misspelled-option",
    ),
    case(
        "pretrian",
        QUICK,
        problem=("No such command 'pretrian'", "Did you mean 'pretrain'?"),
        fix="--help",
        id="misspelled-command",
    ),
    case(
        *EVALUATE,
        "--attack-subset",
        "0",
        problem=("Invalid value for '--attack-subset'", "greater than or equal to 1"),
        fix="see robustcl evaluate --help",
        id="option-out-of-range",
    ),
    # ---- recipe keys, types and ranges
    case(
        *VALIDATE,
        *sets("colour.mode=rgb"),
        problem="unknown recipe key 'colour'",
        fix="valid keys here: attack",
        id="unknown-top-level-key",
    ),
    case(
        *VALIDATE,
        *sets("training.foo=8"),
        problem="unknown recipe key 'training.foo'",
        fix="batch_size",
        id="unknown-nested-key",
    ),
    case(
        *VALIDATE,
        *sets("training.batch_sise=8"),
        problem=("unknown recipe key 'training.batch_sise'", "--set training.batch_sise=8"),
        fix="did you mean 'training.batch_size'?",
        id="misspelled-key",
    ),
    case(
        "recipe",
        "show",
        "{ws}/recipes/typo.yaml",
        problem=("unknown recipe key 'eval.attack.stepz'", "typo.yaml"),
        fix="did you mean 'eval.attack.steps'?",
        id="misspelled-key-in-recipe-file",
    ),
    case(
        *EVALUATE,
        *sets("eval.slf.epocs=3"),
        problem=("unknown recipe key 'eval.slf.epocs'", "evaluation settings of"),
        fix="did you mean 'eval.slf.epochs'?",
        id="misspelled-eval-key",
    ),
    case(
        *VALIDATE,
        *sets("training.batch_size=eight"),
        problem=("invalid value for 'training.batch_size'", "valid integer", "'eight'"),
        fix="fix the value",
        id="string-for-int",
    ),
    case(
        "recipe",
        "show",
        QUICK,
        *sets("attack.epsilon=[1,2]"),
        problem=("invalid value for 'attack.epsilon'", "valid number", "[1, 2]"),
        fix="fix the value",
        id="list-for-float",
    ),
    case(
        *PRETRAIN_FRESH,
        *sets("attack.epsilon=-1/255"),
        problem=("invalid value for 'attack.epsilon'", "greater than or equal to 0"),
        fix="fix the value",
        id="negative-epsilon",
    ),
    case(
        *PRETRAIN_FRESH,
        *sets("training.max_steps=0"),
        problem=("invalid value for 'training.max_steps'", "greater than 0", "(got 0)"),
        fix="fix the value",
        id="zero-steps",
    ),
    case(
        *VALIDATE,
        *sets("training.batch_size=0"),
        problem=("invalid value for 'training.batch_size'", "greater than 0"),
        fix="fix the value",
        id="zero-batch",
    ),
    case(
        *VALIDATE,
        *sets("data.max_samples=0"),
        problem=("invalid value for 'data.max_samples'", "greater than 0"),
        fix="fix the value",
        id="zero-max-samples",
    ),
    case(
        *VALIDATE,
        *sets("training.max_steps"),
        problem="malformed override 'training.max_steps'",
        fix="KEY=VALUE",
        id="malformed-set",
    ),
    case(
        *PRETRAIN_FRESH,
        *sets("training.micro_batch_size=12"),
        problem=(
            "training.micro_batch_size 12 does not divide the per-process batch 32",
            "(training.micro_batch_size)",
        ),
        fix="use a divisor of the per-process batch",
        id="micro-batch-not-dividing",
    ),
    case(
        "launch",
        "--cpu",
        "--gpus",
        "3",
        "--",
        *PRETRAIN_FRESH,
        *sets("training.batch_size=32"),
        problem="training.batch_size 32 is not divisible by the 3 processes",
        fix="use a multiple of 3",
        id="batch-not-divisible-by-processes",
    ),
    case(
        "launch",
        "--cpu",
        "--gpus",
        "2",
        "--",
        *PRETRAIN_FRESH,
        *sets("training.batch_size=2"),
        problem="training.batch_size 2 over 2 processes gives each 1 image per forward pass",
        fix="use a batch size of at least 4",
        id="one-image-per-process",
    ),
    case(
        *VALIDATE,
        *sets("training.max_steps=true"),
        problem=("invalid value for 'training.max_steps'", "expected a number, got a boolean"),
        fix="fix the value",
        id="boolean-for-a-number",
    ),
    case(
        *PRETRAIN_FRESH,
        *sets("data.resolution=100000"),
        problem=("invalid value for 'data.resolution'", "less than or equal to 4096"),
        fix="fix the value",
        id="resolution-too-large",
    ),
    case(
        *PRETRAIN_FRESH,
        *sets("data.max_samples=16"),
        problem=("the dataset has 16 images, fewer than one batch of 32", "(training.batch_size)"),
        fix="use a batch size ≤ 16",
        id="batch-larger-than-the-dataset",
    ),
    # ---- recipe files
    case(
        "recipe",
        "validate",
        "{ws}/recipes/duplicate.yaml",
        problem=("recipe key 'max_steps' is written twice in one section", "duplicate.yaml:5"),
        fix="keep one of them",
        id="duplicate-recipe-key",
    ),
    case(
        "pretrain",
        "{ws}/nope.yaml",
        "-o",
        "{fresh}",
        problem=("recipe file not found", "nope.yaml"),
        fix="YAML",
        id="recipe-file-missing",
    ),
    case(
        "recipe",
        "validate",
        "{ws}/recipes/not_yaml.yaml",
        problem=("recipe is not valid YAML", "not_yaml.yaml:"),
        fix="check indentation",
        id="recipe-not-yaml",
    ),
    case(
        "recipe",
        "validate",
        "{ws}/recipes/list.yaml",
        problem=("recipe must be a mapping of sections", "list.yaml"),
        fix="'data:'",
        id="recipe-not-a-mapping",
    ),
    case(
        *EVALUATE,
        "--recipe",
        "{ws}/nope.yaml",
        problem=("recipe file not found", "nope.yaml"),
        fix="YAML",
        id="evaluate-recipe-missing",
    ),
    # ---- datasets
    case(
        *VALIDATE,
        *sets("data.path={ws}/no/such/dataset"),
        problem=("dataset path not found", "data.path: ", "no/such/dataset"),
        fix="check the path",
        id="dataset-path-missing",
    ),
    case(
        *VALIDATE,
        *sets("data.path={ws}/data/no_images"),
        problem=("no image column in", "'text' (string), 'n' (int64)", "(data.image_column)"),
        fix="set data.image_column",
        id="no-image-column",
    ),
    case(
        *PRETRAIN_FRESH,
        *sets("data.path={ws}/data/no_images"),
        problem=("no image column in", "(data.image_column)"),
        fix="set data.image_column",
        id="pretrain-on-no-image-column",
    ),
    case(
        *VALIDATE,
        *sets("data.path={ws}/data/two_images"),
        problem=("several image columns in", "'left', 'right'"),
        fix="set data.image_column to one of: left, right",
        id="several-image-columns",
    ),
    case(
        *VALIDATE,
        *sets("data.image_column=picture"),
        problem=("image column 'picture' not found in builtin:digits", "(data.image_column)"),
        fix="one of: image, label",
        id="image-column-not-found",
    ),
    case(
        *VALIDATE,
        *sets("data.split=validation"),
        problem=("split 'validation' not found", "'train', 'test'", "(data.split)"),
        fix="set data.split to one of: train, test",
        id="split-not-found",
    ),
    case(
        *VALIDATE,
        *sets("data.path={ws}/data/empty"),
        problem=("has no rows", "(data.path / data.split)"),
        fix="a split that contains images",
        id="empty-dataset",
    ),
    case(
        *EVALUATE,
        *sets("eval.data.path={ws}/data/empty"),
        problem=("has no rows", "(eval.data.path / eval.data.split)"),
        fix="a split that contains images",
        id="evaluate-on-empty-dataset",
    ),
    case(
        *EVALUATE,
        *sets("eval.data.path=builtin:nothing"),
        problem=("unknown built-in dataset 'builtin:nothing'", "(eval.data.path)"),
        fix="builtin:digits",
        id="evaluate-unknown-builtin-dataset",
    ),
    case(
        *EVALUATE,
        *sets("eval.data.path={ws}/data/label_out_of_range"),
        problem=("label 5 in row 2 of column 'label' is outside 0..1", "label_out_of_range:test"),
        fix="fix the labels",
        id="label-out-of-range",
    ),
    case(
        *EVALUATE,
        *sets("eval.data.path={ws}/data/negative_label", "eval.data.label_column=label"),
        problem=("label -1 in row 2 of column 'label' is negative", "missing label", "negative_label:train"),
        fix="fix the labels",
        id="negative-label",
    ),
    case(
        *EVALUATE,
        *sets("eval.data.path={ws}/data/unseen_test_label", "eval.data.label_column=label"),
        problem=("has labels the training split does not (2 ≥ 2)", "(eval.data.test_split)"),
        fix="train and test splits of the same dataset",
        id="test-label-unseen-in-training",
    ),
    case(
        *EVALUATE,
        *sets("eval.data.path={ws}/data/unseen_test_label"),
        problem=("evaluation needs class labels", "has no label column"),
        fix="--set eval.data.label_column=NAME",
        id="no-label-column",
    ),
    # ---- run directories
    case(
        "pretrain",
        QUICK,
        "-o",
        "{run}",
        *sets(*RUN_SETS, "optimizer.lr=0.1"),
        problem=("holds a run with a different recipe (differs in: optimizer.lr)", "run/recipe.yaml"),
        fix="use the run's own recipe",
        id="resume-with-incompatible-recipe",
    ),
    case(
        "pretrain",
        QUICK,
        "-o",
        "{run}",
        "--no-resume",
        *sets(*RUN_SETS),
        problem="output directory already holds a run with checkpoints",
        fix="resume it (--resume, the default) or choose another --output-dir",
        id="no-resume-over-checkpoints",
    ),
    case(
        "pretrain",
        QUICK,
        "-o",
        "{ws}/not_a_run",
        *sets(*RUN_SETS),
        problem=("output directory is not empty and holds no robustcl run", "not_a_run"),
        fix="choose another --output-dir",
        id="output-dir-holds-something-else",
    ),
    # ---- models and exports
    case(
        "evaluate",
        EXPORT_DIR,
        "--protocol",
        "lfs",
        problem="unknown protocol 'lfs' (--protocol)",
        fix="choose one of slf, alf, aff",
        id="unknown-protocol",
    ),
    case(
        "evaluate",
        EXPORT_DIR,
        "--attack",
        "pgd20,fgsm",
        problem="unknown attack 'fgsm' (--attack)",
        fix="pgd20, autoattack",
        id="unknown-attack",
    ),
    case(
        "evaluate",
        "{ws}/nowhere",
        problem=("model folder not found", "nowhere"),
        fix="a run directory",
        id="model-not-found",
    ),
    case(
        "cluster",
        QUICK,
        "--encoder",
        "{ws}/nowhere",
        "-o",
        "{fresh}/labels.safetensors",
        problem=("model folder not found", "nowhere"),
        fix="a run directory",
        id="cluster-encoder-not-found",
    ),
    case(
        "cluster",
        QUICK,
        "--encoder",
        "{ws}/nowhere",
        "-o",
        "{fresh}/authors_labels.pkl",
        problem=("writes a safetensors labels file, not a pickle", "--output"),
        fix="-o FILE.safetensors",
        id="cluster-output-named-as-a-pickle",
    ),
    case(
        "evaluate",
        "{ws}/exports/no_config",
        problem=("not a run directory or a model export (no config.json)", "no_config"),
        fix="robustcl export",
        id="export-without-config",
    ),
    case(
        "evaluate",
        "{ws}/exports/no_weights",
        problem=("cannot load the model", "model.safetensors", "no_weights"),
        fix="export it again",
        id="export-without-weights",
    ),
    case(
        "evaluate",
        EXPORT_DIR,
        "--bn-branch",
        "pgd",
        problem="--bn-branch only applies to run directories",
        fix="robustcl export --bn-branch",
        id="bn-branch-of-an-export",
    ),
    case(
        "export",
        "{run}",
        "{fresh}",
        "--bn-branch",
        "nope",
        problem="BN branch 'nope' does not exist",
        fix="choose one of normal, pgd",
        id="unknown-bn-branch",
    ),
    case(
        "export",
        "{run}",
        "{fresh}",
        "--classifier",
        "slf",
        problem=("no SLF classifier in the run directory", "eval/slf/classifier"),
        fix="--protocol slf first",
        id="export-classifier-never-finetuned",
    ),
    case(
        "export",
        "{run}",
        "{fresh}",
        "--classifier",
        "xyz",
        problem="unknown protocol 'xyz' (--classifier)",
        fix="choose one of slf, alf, aff",
        id="export-unknown-classifier",
    ),
    case(
        "export",
        "{ws}/not_a_run",
        "{fresh}",
        problem=("not a robustcl run directory (no recipe.yaml)", "not_a_run"),
        fix="--output-dir of a robustcl pretrain run",
        id="export-from-a-folder-that-is-no-run",
    ),
    case(
        "export",
        "{run}",
        "{ws}/not_a_run",
        problem=("output folder exists and is not a robustcl export", "not_a_run"),
        fix="choose a new or empty folder",
        id="export-over-a-foreign-folder",
    ),
    case(
        "export",
        "{run}",
        "{ws}/notes.json",
        problem=("the output path is a file, not a folder", "notes.json"),
        fix="give a folder path",
        id="export-to-a-file",
    ),
    case(
        "export",
        "{run}",
        "{ws}/dangling",
        problem=("the output folder is a symbolic link to no folder", "dangling"),
        fix="make the link point to one",
        id="export-to-a-dangling-link",
    ),
    # ---- evaluation outputs: never over a run's, an export's or anyone's files
    case(
        *EVALUATE,
        "-o",
        "{run}/recipe.json",
        problem=("the output would be written among the run directory's own files", "--output"),
        fix="leave --output out",
        id="evaluate-output-among-the-runs-files",
    ),
    case(
        *EVALUATE,
        "-o",
        "{run}/recipe.yaml",
        problem="the evaluation report is JSON: the output must be a .json file or a folder",
        fix="recipe.json",
        id="evaluate-output-not-json",
    ),
    case(
        *EVALUATE,
        "-o",
        EXPORT_DIR + "/config.json",
        problem=("the output would be written into the model folder", "among its own files"),
        fix="write evaluations outside model folders",
        id="evaluate-output-into-an-export",
    ),
    case(
        *EVALUATE,
        "-o",
        "{ws}/notes.json",
        problem=("the output file exists and is not an evaluation report robustcl wrote", "notes.json"),
        fix="choose a new file or folder",
        id="evaluate-output-over-a-foreign-file",
    ),
    # ---- publishing (all refused before any network call)
    case(
        "push-to-hub",
        "{ws}/exports/no_weights",
        "my-org/acl",
        problem=("incomplete export, missing model.safetensors", "no_weights"),
        fix="re-run robustcl export",
        id="push-incomplete-export",
    ),
    case(
        "push-to-hub",
        "{run}",
        "my-org/acl",
        problem=("not part of a robustcl export: checkpoints/", "run"),
        fix="publish the folder exactly as robustcl export wrote it",
        id="push-a-run-directory",
    ),
    case(
        "push-to-hub",
        "{ws}/nowhere",
        "my-org/acl",
        problem=("export folder not found", "nowhere"),
        fix="a folder written by robustcl export",
        id="push-missing-folder",
    ),
    case(
        "push-to-hub",
        EXPORT_DIR,
        "my org/acl",
        problem=("invalid repo id", "'my org/acl'"),
        fix="NAMESPACE/NAME",
        id="push-malformed-repo-id",
    ),
    case(
        "push-to-hub",
        EXPORT_DIR,
        "acl",
        problem="the repo id needs a namespace (acl)",
        fix="NAMESPACE/NAME",
        id="push-repo-id-without-namespace",
    ),
]


@pytest.mark.parametrize("bad", CASES)
def test_bad_input_fails_in_one_line_and_changes_nothing(bad: Case, run_cli: RunCli, workspace: Path, tmp_path):
    fresh = tmp_path / "fresh"
    argv = [arg.format(ws=workspace, run=workspace / "run", fresh=fresh) for arg in bad.argv]
    before = snapshot(workspace)

    code, out, err = run_cli(*argv)

    assert code == 2, err
    assert "Traceback" not in out + err and out == "", out
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(ERROR), err
    what, sep, fix = lines[0].removeprefix(ERROR).partition(" — ")
    assert sep and fix.strip(), f"no fix after ' — ': {err}"
    for part in bad.problem:
        assert part in what, (part, err)
    assert bad.fix in fix, (bad.fix, err)

    assert differences(before, snapshot(workspace)) == []
    # The working directory: where {fresh} and any default output folder would appear.
    # (A refused pretrain must not even leave its recipe.yaml: that would refuse the corrected recipe later.)
    created = sorted(snapshot(tmp_path))
    assert created == [], f"the failed command wrote {created}"


def test_the_console_script_prints_the_same_single_line(run_cli: RunCli):
    argv = ["recipe", "validate", QUICK, "--set", "training.batch_sise=8"]
    code, _, err = run_cli(*argv)
    assert code == 2 and err.count("\n") == 1 and "did you mean 'training.batch_size'" in err
    res = robustcl(*argv)
    assert res.returncode == 2 and res.stdout == ""
    assert res.stderr == err  # nothing else on stderr either: no warning, no traceback


def test_a_refused_run_still_resumes_when_only_its_length_changes(run_cli: RunCli, workspace: Path, tmp_path):
    """The refusals above leave the run usable: extending it (training length may change) continues it."""
    run = tmp_path / "run"
    shutil.copytree(workspace / "run", run)
    extended = [s for s in RUN_SETS if not s.startswith("training.max_steps=")] + ["training.max_steps=3"]
    code, out, err = run_cli("pretrain", QUICK, "-o", str(run), *sets(*extended))
    assert code == 0, err
    assert "resumed from" in out + err and (run / "checkpoints" / "step-00000003" / "COMPLETE").is_file()
