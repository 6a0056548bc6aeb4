"""Evaluation at scale: feature extraction and finetuning are shared between processes (each row encoded once, each
global batch split over the processes with its gradients summed), N processes give the figures of one, and an
unlabelled test split (ImageNet's) is replaced by the validation split."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from helpers import BIN, REPO, cli_env
from safetensors.torch import load_file

SETS = [
    "eval.preset=robustcl",  # SLF on features computed once (unaugmented), the epoch picked on a validation split
    "data.path=builtin:digits",
    "data.resolution=8",
    "eval.data.max_train=200",  # 180 finetuning + 20 validation images
    "eval.data.max_test=101",  # odd, so the 2-process loader pads its last batch
    "eval.slf.epochs=10",
    "eval.slf.batch_size=64",
    "eval.slf.lr=0.5",  # the head learns something (validation accuracy ~60%): predictions worth comparing
    "eval.aff.epochs=2",
    "eval.aff.batch_size=51",  # odd: the processes get 26 and 25 rows of a batch, 14 and 13 of the last one
    "eval.aff.attack_steps=2",
    "eval.attack.steps=3",
    "eval.attack.batch_size=16",
    "eval.attack.curve_epsilons=[0,4/255]",
]
N_FIT, N_VAL = 180, 20

# Runs both protocols in one launch (imports cost seconds per process) and records, per process, how many image rows
# went through the encoder while each finetuning ran.
SCRIPT = """
import json, os, sys
from pathlib import Path
from robustcl.evaluation import run
from robustcl.encoder_loading import FeatureEncoder

out, model, sets = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
rows = [0]
forward = FeatureEncoder.forward
def counting_forward(self, pixels):
    rows[0] += len(pixels)
    return forward(self, pixels)
FeatureEncoder.forward = counting_forward
finetune, finetuned = run.finetune, []
def counting_finetune(*args, **kwargs):
    before = rows[0]
    result = finetune(*args, **kwargs)
    finetuned.append(rows[0] - before)
    return result
run.finetune = counting_finetune
for protocol in ("slf", "aff"):
    run.evaluate(model, protocol=protocol, overrides=sets, output=out / protocol, progress=False)
rank = os.environ.get("RANK", "0")
(out / f"rows-{rank}.json").write_text(json.dumps(dict(zip(("slf", "aff"), finetuned))))
"""


@pytest.fixture(scope="module")
def launched(tmp_path_factory, tiny_export) -> dict[int, Path]:
    """Output folders of the same two evaluations (SLF, AFF) run by 1 process and by 2 gloo processes."""
    root = tmp_path_factory.mktemp("sharded")
    script = root / "evaluate_both.py"
    script.write_text(SCRIPT)
    outputs = {}
    for processes in (1, 2):
        out = root / f"p{processes}"
        args = ["--multi_gpu"] if processes > 1 else []
        cmd = [
            str(BIN / "accelerate"), "launch", *args, "--num_processes", str(processes), "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", str(script), str(out), str(tiny_export), *SETS,
        ]  # fmt: skip
        env = {"ACCELERATE_USE_CPU": "true"} if processes > 1 else {}
        env["OMP_NUM_THREADS"] = "1"  # the same float reduction order inside each process in both runs
        res = subprocess.run(cmd, cwd=REPO, env=cli_env(**env), capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, res.stderr[-4000:]
        outputs[processes] = out
    return outputs


def _report(out: Path, protocol: str) -> dict:
    return json.loads((out / protocol / "eval.json").read_text())


def _weights(out: Path, protocol: str) -> dict[str, torch.Tensor]:
    return load_file(out / protocol / "classifier" / "model.safetensors")


def _rows(out: Path, processes: int) -> list[dict[str, int]]:
    return [json.loads((out / f"rows-{rank}.json").read_text()) for rank in range(processes)]


# Float32 reduction order is all that differs between 1 and 2 processes (a batch's gradient summed as two partial
# sums, BatchNorm statistics combined from two halves). SLF: the head's weights differ by ~1e-6 after its 30 steps at
# lr 0.5, where a row missing from (or counted twice in) a batch of 64 would change a step by ~2%. AFF: its PGD steps
# follow the gradient's sign, which such differences flip for the odd near-zero pixel, so weights drift by ~6e-5
# (train loss ~2e-5 relative) after its 8 steps. A sharding mistake is orders of magnitude larger: AFF with BatchNorm
# statistics of each process's half batch instead of the whole (measured) moves BN statistics by 6e-2 and the
# train loss by 2e-3 relative.
TOLERANCE = {"slf": 1e-5, "aff": 1e-3}
LOSS_REL = 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("protocol", ["slf", "aff"])
def test_two_processes_give_the_figures_and_weights_of_one(launched, protocol):
    one, two = _report(launched[1], protocol), _report(launched[2], protocol)
    assert (one["num_processes"], two["num_processes"]) == (1, 2)
    for key in ("SA", "RA", "SA_attacked_subset", "curve", "split_sizes"):
        assert one[key] == two[key], key
    assert one["finetune"]["selected_epoch"] == two["finetune"]["selected_epoch"]
    for a, b in zip(one["finetune"]["history"], two["finetune"]["history"], strict=True):
        assert a["val_accuracy"] == b["val_accuracy"]
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=LOSS_REL)
    w1, w2 = _weights(launched[1], protocol), _weights(launched[2], protocol)
    assert w1.keys() == w2.keys()
    for name in w1:
        difference = (w1[name] - w2[name]).abs().max().item()
        assert difference <= TOLERANCE[protocol], (name, difference)


@pytest.mark.slow
def test_slf_encodes_each_row_once_across_processes(launched):
    """SLF's features are computed once per image: the 2 processes together encode the 180 + 20 images one process
    encodes, each about half of them."""
    (one,) = _rows(launched[1], 1)
    two = _rows(launched[2], 2)
    assert one["slf"] == N_FIT + N_VAL
    assert sum(p["slf"] for p in two) == N_FIT + N_VAL
    assert all(p["slf"] <= (N_FIT + N_VAL) // 2 + 1 for p in two), two


@pytest.mark.slow
def test_aff_splits_every_batch_between_the_processes(launched):
    """AFF attacks and trains through the encoder: each process runs its share of every batch (training, attacks and
    the robust validation), so the two together push exactly the rows one process does, each about half (besides
    the one image each process encodes to learn the feature size)."""
    (one,) = _rows(launched[1], 1)
    two = _rows(launched[2], 2)
    assert sum(p["aff"] - 1 for p in two) == one["aff"] - 1
    assert all(p["aff"] < 0.55 * one["aff"] for p in two), (one, two)


def test_slf_keeps_training_features_compact():
    """Training features are kept in FEATURE_DTYPE (2 bytes a value), computed for the asked rows only."""
    from robustcl.evaluation.finetune import FEATURE_DTYPE, LabelledImages, train_features

    images = torch.randint(0, 256, (10, 3, 8, 8), dtype=torch.uint8)
    encoder = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 5))
    rows = torch.tensor([2, 3, 7])
    features = train_features(encoder, LabelledImages(images, torch.zeros(10, dtype=torch.long)), rows)
    assert FEATURE_DTYPE.itemsize == 2 and features.dtype == FEATURE_DTYPE and features.shape == (3, 5)
    with torch.no_grad():
        expected = encoder(images[rows].float() / 255)
    assert torch.allclose(features.float(), expected, rtol=2**-8, atol=1e-6)


# ------------------------------------------------------------------------------- unlabelled test split


def _digits_dict(folder: Path, test_labels: str | None, validation: bool) -> Path:
    """A save_to_disk DatasetDict of digit images: a labelled train split, a test split whose labels are all -1
    (``"missing"``, as ImageNet-1k's on the Hub) or absent (None), and optionally a labelled validation split."""
    rng = np.random.default_rng(0)
    names = [str(i) for i in range(4)]

    def split(n: int, labels: np.ndarray | None) -> datasets.Dataset:
        columns = {"image": [rng.integers(0, 256, (8, 8, 3), dtype=np.uint8) for _ in range(n)]}
        features = {"image": datasets.Image()}
        if labels is not None:
            columns["label"], features["label"] = labels.tolist(), datasets.ClassLabel(names=names)
        return datasets.Dataset.from_dict(columns, features=datasets.Features(features))

    parts = {"train": split(60, np.arange(60) % 4)}
    parts["test"] = split(10, np.full(10, -1) if test_labels == "missing" else None)
    if validation:
        parts["validation"] = split(12, np.arange(12) % 4)
    datasets.DatasetDict(parts).save_to_disk(folder)
    return folder


FALLBACK_SETS = ["eval.slf.epochs=1", "eval.attack.steps=1", "eval.attack.curve_epsilons=[]", "data.resolution=8"]


def _sets(*sets: str) -> list[str]:
    return [arg for s in sets for arg in ("--set", s)]


@pytest.mark.parametrize("test_labels", ["missing", None], ids=["labels-minus-one", "no-label-column"])
def test_unlabelled_test_split_is_replaced_by_the_validation_split(cli, tmp_path, tiny_export, test_labels):
    data = _digits_dict(tmp_path / "digits", test_labels, validation=True)
    out = tmp_path / "report"
    code, stdout, stderr = cli(
        "evaluate", str(tiny_export), "--output", str(out), *_sets(*FALLBACK_SETS, f"eval.data.path={data}")
    )
    assert code == 0, stderr
    report = json.loads((out / "eval.json").read_text())
    assert report["dataset"]["test_split"] == "validation" and report["split_sizes"]["test"] == 12
    assert report["dataset"]["requested_test_split"] == "test"
    assert "has no labels" in report["dataset"]["test_split_note"]
    assert "measured on the 'validation' split: the 'test' split has no labels" in stdout


def test_unlabelled_test_split_without_validation_split_is_a_one_line_error(cli, tmp_path, tiny_export):
    data = _digits_dict(tmp_path / "digits", "missing", validation=False)
    code, _, stderr = cli(
        "evaluate", str(tiny_export), "--output", str(tmp_path / "r"), *_sets(*FALLBACK_SETS, f"eval.data.path={data}")
    )
    lines = stderr.strip().splitlines()
    assert code == 2 and len(lines) == 1, stderr
    assert "has no labels" in lines[0] and "split 'validation' not found" in lines[0]
    assert "(eval.data.test_split)" in lines[0] and "--set eval.data.test_split=" in lines[0]


def test_a_process_holding_no_training_row_still_sizes_the_head():
    # SLF with fewer finetuning rows than processes: a process owns no row and decoded none.
    from robustcl.evaluation.finetune import _feature_dim
    from robustcl.evaluation.rows import HeldRows

    encoder = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 5))
    nothing = HeldRows(torch.empty((0, 3, 8, 8), dtype=torch.uint8), torch.empty(0, dtype=torch.long))
    assert _feature_dim(encoder, nothing, torch.empty((0, 0)), torch.device("cpu")) == 5
