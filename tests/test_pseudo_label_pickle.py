"""method.advcl.pseudo_labels accepts the AdvCL authors' pickle (LijieFan/AdvCL data/*_pseudo_labels.pkl: a dict of
numpy int arrays ``pseudo_train_{K}`` / ``pseudo_test_{K}``, read by pretraining_advCL.py with pickle.load) without
ever running code from the file: only numpy arrays and plain containers are rebuilt."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch
from helpers import user_error

from robustcl.data.images import DecodedImages
from robustcl.pseudo_labels import load_pseudo_labels

CLUSTERS = [2, 10, 50]


def _images(n: int) -> DecodedImages:
    return DecodedImages(torch.zeros(n, 3, 4, 4, dtype=torch.uint8))


def _authors_labels(n: int, clusters=CLUSTERS, seed: int = 0) -> dict[str, np.ndarray]:
    """The authors' layout: int32 arrays for the train rows and the test rows of every K."""
    rng = np.random.default_rng(seed)
    out = {}
    for k in clusters:
        out[f"pseudo_train_{k}"] = rng.integers(0, k, n).astype(np.int32)
        out[f"pseudo_test_{k}"] = rng.integers(0, k, n // 5).astype(np.int32)
    return out


def _write(path, obj, protocol=3):
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=protocol)  # the authors' file is protocol 3
    return path


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_the_authors_layout_loads_to_the_same_labels(tmp_path, protocol):
    labels = _authors_labels(40)
    path = _write(tmp_path / "cifar10_pseudo_labels.pkl", labels, protocol)
    stacked = load_pseudo_labels(path, CLUSTERS, _images(40))
    assert stacked.dtype == torch.int64 and stacked.shape == (3, 40)
    for row, k in zip(stacked, CLUSTERS):
        assert np.array_equal(row.numpy(), labels[f"pseudo_train_{k}"])
    # The heads the recipe asks for, in its order: a subset of the file's Ks is fine.
    assert torch.equal(load_pseudo_labels(path, [50, 2], _images(40)), stacked[[2, 0]])


def test_numpy_1_global_names_load_as_well(tmp_path):
    """Files written by numpy 1.x name numpy.core.multiarray._reconstruct (numpy 2: numpy._core...); the
    authors' file does. Both spellings are accepted, and nothing else."""
    labels = _authors_labels(12)
    data = pickle.dumps(labels, protocol=3)
    for new, old in [(b"numpy._core.multiarray", b"numpy.core.multiarray")]:
        data = data.replace(new, old)
    assert b"numpy.core.multiarray\n_reconstruct" in data
    path = tmp_path / "old.pkl"
    path.write_bytes(data)
    stacked = load_pseudo_labels(path, CLUSTERS, _images(12))
    assert np.array_equal(stacked[1].numpy(), labels["pseudo_train_10"])


class _Planted:
    """An object whose unpickling would run a command (here a harmless one that writes a marker file)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _PlantedEval:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (eval, (f"open({self.marker!r}, 'w').close()",))


class _PlantedCodec:
    """The one non-numpy global protocol 2 needs, _codecs.encode, asked for another codec (a lookup by name)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        import codecs

        return (codecs.encode, (self.marker, "rot13"))


@pytest.mark.parametrize("planted", [_Planted, _PlantedEval, _PlantedCodec])
def test_a_planted_object_is_refused_unrun(tmp_path, planted):
    marker = tmp_path / "marker"
    labels = _authors_labels(20)
    labels["pseudo_train_10"] = planted(str(marker))
    path = _write(tmp_path / "evil.pkl", labels)
    message = user_error(load_pseudo_labels, path, CLUSTERS, _images(20))
    assert not marker.exists()
    assert "refused" in message and str(path) in message, message


def test_an_object_array_and_a_non_dict_are_refused(tmp_path):
    labels = _authors_labels(20)
    labels["pseudo_train_2"] = np.array([None] * 20, dtype=object)
    message = user_error(load_pseudo_labels, _write(tmp_path / "objects.pkl", labels), CLUSTERS, _images(20))
    assert "pseudo_train_2" in message and "integer" in message, message
    message = user_error(load_pseudo_labels, _write(tmp_path / "list.pkl", [1, 2]), CLUSTERS, _images(20))
    assert "dict" in message, message
    (tmp_path / "cut.pkl").write_bytes(pickle.dumps(_authors_labels(20), protocol=3)[:100])
    message = user_error(load_pseudo_labels, tmp_path / "cut.pkl", CLUSTERS, _images(20))
    assert "cannot read" in message, message


def test_wrong_row_count_is_refused(tmp_path):
    path = _write(tmp_path / "labels.pkl", _authors_labels(40))
    message = user_error(load_pseudo_labels, path, CLUSTERS, _images(39))
    assert "40 labels" in message and "39 images" in message and "pseudo_train_2" in message, message


def test_missing_or_too_large_clusters_are_refused(tmp_path):
    path = _write(tmp_path / "labels.pkl", _authors_labels(40))
    message = user_error(load_pseudo_labels, path, [2, 500], _images(40))
    assert "K = [500]" in message and "[2, 10, 50]" in message and "method.advcl.clusters" in message, message
    labels = _authors_labels(40)
    labels["pseudo_train_10"][3] = 10  # a label outside 0..K-1: the head would be of another K
    message = user_error(load_pseudo_labels, _write(tmp_path / "k.pkl", labels), CLUSTERS, _images(40))
    assert "K = 10" in message and "outside 0..9" in message, message


def test_a_damaged_label_file_of_either_kind_is_one_line(tmp_path):
    """A file that is not safetensors (here, a pickle under the other name) fails in one line, not a traceback."""
    path = tmp_path / "labels.safetensors"
    path.write_bytes(pickle.dumps(_authors_labels(20), protocol=3))
    message = user_error(load_pseudo_labels, path, CLUSTERS, _images(20))
    assert "cannot read the pseudo-label file" in message, message
