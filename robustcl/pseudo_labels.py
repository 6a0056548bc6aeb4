"""Pseudo-labels for AdvCL: features of the pretraining images from any encoder, k-means per K, one file.

The file (safetensors) holds ``k{K}`` int64 [N] for each K, and metadata: the SHA-256 of the decoded uint8
images they were computed on (so a label file cannot silently be used with another dataset, split, order or
resolution), the encoder reference, the seed and whether features were L2-normalised. The AdvCL authors' pickle
(``.pkl``) is accepted too, read by :mod:`robustcl.pseudo_label_pickle`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .atomic_write import atomic_file
from .data.images import ImageRows
from .errors import UserError
from .features import CHUNK
from .kmeans import OneProcess, kmeans
from .pseudo_label_pickle import PICKLE_SUFFIXES, read_label_pickle
from .setup_context import RowBlock, encode_block


@dataclass
class PseudoLabels:
    labels: dict[int, torch.Tensor]  # K → int64 [N]
    fingerprint: str
    encoder: str
    seed: int
    normalized: bool


def check_cluster_counts(clusters: Sequence[int], images: int) -> None:
    """Refuse a K above the image count (before the feature pass, which is the slow part)."""
    for k in clusters:
        if k > images:
            raise UserError(f"cannot form {k} clusters from {images} images", "method.advcl.clusters")


def cluster_labels(
    features: RowBlock,
    clusters: Sequence[int],
    *,
    seed: int = 0,
    normalize: bool = True,
    progress: bool = True,
    max_iter: int = 100,
    tol: float = 1e-4,
) -> dict[int, torch.Tensor]:
    """k-means labels (int64, host) of the feature rows for every K, in dataset order on every process: the blocks
    of all processes are clustered together (k-means combines per-block sums), L2-normalised when ``normalize``;
    ``max_iter`` and ``tol`` are k-means' stopping rule (:func:`~robustcl.kmeans.kmeans`)."""
    rows = torch.nn.functional.normalize(features.rows, dim=1) if normalize else features.rows
    labels = {}
    for k in tqdm(list(clusters), desc="k-means", unit="K", disable=not progress):
        found = kmeans(rows, int(k), seed=seed, max_iter=max_iter, tol=tol, group=features.collectives).labels
        labels[int(k)] = features.gather(found).cpu()
    return labels


def compute_pseudo_labels(
    encoder: torch.nn.Module,
    reference: str,
    images: ImageRows,
    clusters: Sequence[int],
    *,
    seed: int = 0,
    normalize: bool = True,
    device: torch.device | None = None,
    batch_size: int = CHUNK,
    progress: bool = True,
) -> PseudoLabels:
    """Cluster ``images`` (uint8, dataset order) by the features of ``encoder`` (pixels in [0, 1] → features; its
    ``reference`` is recorded in the file) for every K, in this process (``robustcl cluster``; training clusters
    through its setup context, sharded over its processes)."""
    check_cluster_counts(clusters, len(images))
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    features = encode_block(encoder, images, device, OneProcess(), batch_size=batch_size, progress=progress)
    labels = cluster_labels(features, clusters, seed=seed, normalize=normalize, progress=progress)
    return PseudoLabels(labels, images.identity(), str(reference), seed, normalize)


def check_labels_output(path: Path, where: str) -> None:
    """``robustcl cluster`` writes safetensors: never under a pickle's name, where it would replace the authors'
    file and then be read as a pickle."""
    if Path(path).suffix.lower() in PICKLE_SUFFIXES:
        raise UserError(
            f"robustcl cluster writes a safetensors labels file, not a pickle: {Path(path).name} would be replaced "
            "and then misread",
            where,
            "give the labels file a .safetensors name with -o FILE.safetensors",
        )


def save_pseudo_labels(path: Path, result: PseudoLabels) -> Path:
    """Write atomically (a temporary file renamed into place)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {
        "images_sha256": result.fingerprint,
        "encoder": result.encoder,
        "seed": str(result.seed),
        "normalized": str(result.normalized).lower(),
    }
    with atomic_file(path) as tmp:
        save_file({f"k{k}": v.contiguous() for k, v in result.labels.items()}, str(tmp), metadata=metadata)
    return path


def load_pseudo_labels(path: Path, clusters: Sequence[int], images: ImageRows) -> torch.Tensor:
    """Labels [len(clusters), N] for these exact images, or a UserError that says what does not match. A ``.pkl``
    file is read as the AdvCL authors' pickle (:mod:`robustcl.pseudo_label_pickle`)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(
            "pseudo-label file not found",
            str(path),
            "write it with robustcl cluster RECIPE --encoder MODEL, or unset method.advcl.pseudo_labels and set "
            "method.advcl.cluster_encoder to compute them at the start of pretraining",
        )
    if path.suffix.lower() in PICKLE_SUFFIXES:
        # The authors' file: rows in dataset order, no image fingerprint to compare (only the count is checked).
        stacked = read_label_pickle(path, clusters, len(images))
    else:
        stacked = _read_label_file(path, clusters, images)
    for k, row in zip(clusters, stacked):
        if int(row.min()) < 0 or int(row.max()) >= k:
            raise UserError(f"pseudo-labels for K = {k} are outside 0..{k - 1}", str(path), "re-create the file")
    return stacked


def _read_label_file(path: Path, clusters: Sequence[int], images: ImageRows) -> torch.Tensor:
    """The labels of a robustcl cluster file, checked to belong to exactly these images."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            available = set(f.keys())
            missing = [k for k in clusters if f"k{k}" not in available]
            if missing:
                have = sorted(int(k[1:]) for k in available if k.startswith("k") and k[1:].isdigit())
                raise UserError(
                    f"pseudo-label file has no labels for K = {missing} (it has {have})",
                    str(path),
                    "re-run robustcl cluster with the recipe's method.advcl.clusters",
                )
            stacked = torch.stack([f.get_tensor(f"k{k}").long() for k in clusters])
    except (OSError, ValueError, RuntimeError, SafetensorError):  # safetensors raises these on a damaged file
        raise UserError("cannot read the pseudo-label file", str(path), "re-create it with robustcl cluster") from None
    if stacked.shape[1] != len(images) or metadata.get("images_sha256") != images.identity():
        raise UserError(
            f"pseudo-labels were computed on other images ({stacked.shape[1]} labels, {len(images)} images, or the "
            "same count in another order / resolution)",
            str(path),
            "re-run robustcl cluster with this recipe's data section",
        )
    return stacked
