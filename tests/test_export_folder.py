"""What `robustcl export` does to its output folder: in an earlier export (a git clone of the Hub repo, say) it
replaces only the export's own files and keeps everything else; every file it writes is readable as the umask
allows; a disk that refuses the write leaves the folder as it was, with one line and exit code 1; a symbolic link
to a folder exports into that folder."""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from robustcl.export_layout import export_files

pytestmark = pytest.mark.slow


def _tree(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_export_into_a_clone_of_its_repo_replaces_only_the_export_files(tmp_path: Path, run: Path, exported, cli):
    clone = tmp_path / "acl-r18"
    shutil.copytree(exported / "encoder", clone)
    (clone / ".git" / "objects").mkdir(parents=True)
    (clone / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (clone / "notes.md").write_text("my notes\n")
    (clone / "eval" / "alf").mkdir()
    (clone / "eval" / "alf" / "eval.json").write_text("{}")  # an evaluation this export no longer ships
    (clone / "model.safetensors").write_bytes(b"stale weights")
    kept = {rel: digest for rel, digest in _tree(clone).items() if rel.startswith(".git/") or rel == "notes.md"}

    code, out, err = cli("export", str(run), str(clone), "--repo-id", "my-org/digits-acl")

    assert code == 0, err
    assert {rel: d for rel, d in _tree(clone).items() if rel.startswith(".git/") or rel == "notes.md"} == kept
    assert not (clone / "eval" / "alf").exists()
    # The export's files are exactly a fresh export's.
    fresh = tmp_path / "fresh"
    assert cli("export", str(run), str(fresh), "--repo-id", "my-org/digits-acl")[0] == 0
    ours = {rel: d for rel, d in _tree(clone).items() if not rel.startswith(".git/") and rel != "notes.md"}
    assert ours == _tree(fresh)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary or lock files left behind"


def test_exported_files_are_readable_as_the_umask_allows(tmp_path: Path, run: Path, cli):
    previous = os.umask(0o022)
    try:
        assert cli("export", str(run), str(tmp_path / "out"))[0] == 0
    finally:
        os.umask(previous)
    modes = {rel: oct((tmp_path / "out" / rel).stat().st_mode & 0o777) for rel in export_files(tmp_path / "out")}
    assert set(modes.values()) == {"0o644"}, modes


@pytest.mark.parametrize(
    "failure, message",
    [(errno.ENOSPC, "the disk is full"), (errno.EROFS, "Read-only file system"), (errno.EACCES, "Permission denied")],
)
def test_a_refused_write_keeps_the_earlier_export_and_says_so_in_one_line(
    tmp_path: Path, run: Path, exported, cli, monkeypatch: pytest.MonkeyPatch, failure: int, message: str
):
    out = tmp_path / "out"
    shutil.copytree(exported / "encoder", out)
    before = _tree(out)
    if failure == errno.ENOSPC:
        from transformers import PreTrainedModel

        def full(self, folder, **kwargs):
            Path(folder, "model.safetensors").write_bytes(b"partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(PreTrainedModel, "save_pretrained", full)
    else:

        def refused(*args, **kwargs):
            raise OSError(failure, os.strerror(failure))

        monkeypatch.setattr(tempfile, "mkdtemp", refused)  # the folder beside OUT cannot be written

    code, out_text, err = cli("export", str(run), str(out))

    assert code == 1 and out_text == "", err
    assert err.count("\n") == 1 and err.startswith(f"robustcl: error: could not write the export: {message}"), err
    assert "Traceback" not in err and f"({out})" in err
    assert _tree(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_symbolic_link_to_a_folder_exports_into_that_folder(tmp_path: Path, run: Path, cli):
    real = tmp_path / "real"
    real.mkdir()
    link = tmp_path / "link"
    link.symlink_to(real)
    code, _, err = cli("export", str(run), str(link))
    assert code == 0, err
    assert link.is_symlink() and export_files(real)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]
