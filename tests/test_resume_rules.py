"""What a run directory accepts when a command is started again: a refused start leaves nothing behind (the corrected
command then runs), a resume on changed training data is refused unless asked for, a finished run is left as it is,
and a run stopped between its last checkpoint and its summary is finished with the run's true totals."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import PIL.Image
from helpers import TINY, with_sets

from robustcl.json_files import to_json
from robustcl.run_layout import DATA_FINGERPRINT_FILE

QUICK = "recipes/quickstart.yaml"
SETS = [*TINY, "eval.after_pretrain=false", "logging.progress_bar=false", "logging.trackers=[]"]


def _files(root: Path) -> dict[str, tuple[str, int]]:
    return {
        p.relative_to(root).as_posix(): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _strict_json(path: Path) -> dict:
    def refuse(constant: str):
        raise AssertionError(f"{path} holds the non-JSON literal {constant}")

    return json.loads(path.read_text(), parse_constant=refuse)


def _pretrain(cli, run: Path, *sets: str) -> tuple[int, str, str]:
    return cli("pretrain", QUICK, "-o", str(run), *with_sets(*SETS, *sets))


def _image_folder(root: Path, classes: dict[str, int], shade: int = 0) -> None:
    for c, (name, count) in enumerate(classes.items()):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            PIL.Image.new("RGB", (8, 8), (40 * c + shade, 3 * i, 100)).save(root / name / f"{i:03d}.png")


def test_a_refused_start_leaves_nothing_and_the_corrected_command_runs(tmp_path: Path, cli, exported: Path):
    run = tmp_path / "run"
    deacl = ["method.name=deacl", "training.max_steps=1"]
    # Refused when the teacher loads, after the data: nothing of the refused recipe may stay in the run directory.
    code, _, err = _pretrain(cli, run, *deacl, f"method.deacl.teacher={tmp_path / 'nowhere'}")
    assert code == 2 and "model folder not found" in err, err
    code, _, err = _pretrain(cli, run, "training.max_steps=1", "data.max_samples=16")  # batch 32 > 16 images
    assert code == 2 and "fewer than one batch" in err, err
    assert sorted(tmp_path.iterdir()) == [], "a refused start wrote files"
    code, _, err = _pretrain(cli, run, *deacl, f"method.deacl.teacher={exported / 'encoder'}")
    assert code == 0, err


def test_a_resume_on_changed_data_is_refused_unless_asked_for(tmp_path: Path, cli):
    data, run = tmp_path / "data", tmp_path / "run"
    _image_folder(data, {"cat": 20, "dog": 20})
    sets = [f"data.path={data}", "data.resolution=8", "training.batch_size=16", "training.checkpoint_every=1"]
    assert _pretrain(cli, run, *sets, "training.max_steps=1")[0] == 0
    stored = _strict_json(run / DATA_FINGERPRINT_FILE)
    assert stored["rows"] == 40 and stored["sampled_rows"] == 40

    _image_folder(data, {"cat": 20, "dog": 20, "zebra": 40})  # 40 → 80 images, a new class
    before = _files(run)
    code, _, err = _pretrain(cli, run, *sets, "training.max_steps=2")
    assert code == 2, err
    assert err.startswith("robustcl: error: the training data changed since this run started (40 rows then, 80 now")
    assert err.count("\n") == 1 and "--allow-data-change" in err and DATA_FINGERPRINT_FILE in err
    assert _files(run) == before

    _image_folder(data, {"cat": 20, "dog": 20})
    for extra in (data / "zebra").iterdir():
        extra.unlink()
    (data / "zebra").rmdir()
    PIL.Image.new("RGB", (8, 8), (255, 0, 0)).save(data / "dog" / "007.png")  # same count, one image replaced
    code, _, err = _pretrain(cli, run, *sets, "training.max_steps=2")
    assert code == 2 and "other images among the 40 rows compared" in err, err

    code, out, err = cli(
        "pretrain", QUICK, "-o", str(run), "--allow-data-change", *with_sets(*SETS, *sets, "training.max_steps=2")
    )
    assert code == 0 and "resumed from" in out + err, err
    assert _strict_json(run / DATA_FINGERPRINT_FILE) != stored  # the run now records the data it trained on
    assert _pretrain(cli, run, *sets, "training.max_steps=3")[0] == 0  # and resumes on it without the flag


def test_a_finished_run_started_again_changes_nothing(tmp_path: Path, cli):
    run = tmp_path / "run"
    assert _pretrain(cli, run, "training.max_steps=2")[0] == 0
    before = _files(run)
    summary = _strict_json(run / "summary.json")

    code, out, err = _pretrain(cli, run, "training.max_steps=2")

    assert code == 0, err
    assert f"{run} already finished (2 steps in" in out and "nothing changed" in out
    assert _files(run) == before
    assert summary["steps"] == 2 and summary["images_seen"] == 64 and math.isfinite(summary["final_loss"])


def test_a_run_stopped_before_its_summary_is_finished_with_the_runs_totals(tmp_path: Path, cli):
    run = tmp_path / "run"
    assert _pretrain(cli, run, "training.max_steps=2")[0] == 0
    summary = _strict_json(run / "summary.json")
    (run / "summary.json").unlink()  # as if killed after the last checkpoint, before the end

    code, out, err = _pretrain(cli, run, "training.max_steps=2")

    assert code == 0, err
    again = _strict_json(run / "summary.json")
    assert {k: again[k] for k in ("steps", "images_seen", "wall_time_s", "final_loss")} == {
        k: summary[k] for k in ("steps", "images_seen", "wall_time_s", "final_loss")
    }
    assert "trained 2 steps" in out


def test_json_written_by_robustcl_has_no_nan_literals():
    text = to_json({"loss": float("nan"), "history": [1.0, float("inf")], "ok": 2})
    assert json.loads(text) == {"loss": None, "history": [1.0, None], "ok": 2}
