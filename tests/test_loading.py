"""robustcl.data.loading: every path kind, image normalisation, and the one-line user errors."""

from __future__ import annotations

import io
import os

# Before datasets is imported anywhere: nothing in this file may reach the network.
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import time
from pathlib import Path

import datasets
import huggingface_hub.constants
import numpy as np
import PIL.Image
import pyarrow.parquet as pq
import pytest
import torch
from helpers import user_error

from robustcl.data import builtin
from robustcl.data.loading import (
    BUILTIN_DIGITS,
    SUBSET_SEED,
    ImageData,
    check_dataset,
    detect_columns,
    load_images,
    open_split,
)

CIFAR = Path(__file__).resolve().parents[2] / "shared/datasets/cifar10"


@pytest.fixture(autouse=True)
def _offline_and_private_cache(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    # datasets reads these at import time, so the environment alone is not enough if it was imported earlier.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    # Datasets built in tmp dirs would otherwise leave one cache entry per run in the user's HF cache.
    cache = tmp_path_factory.getbasetemp() / "hf_cache"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(cache))


def _features(**columns: object) -> datasets.Features:
    return datasets.Features(columns)


def _rgb(w: int, h: int, color: tuple[int, int, int]) -> PIL.Image.Image:
    return PIL.Image.new("RGB", (w, h), color)


def _small_labelled(n: int = 6, size: int = 8) -> datasets.Dataset:
    rng = np.random.default_rng(0)
    images = [PIL.Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]
    return datasets.Dataset.from_dict(
        {"image": images, "label": [i % 3 for i in range(n)]},
        features=_features(image=datasets.Image(), label=datasets.ClassLabel(names=["a", "b", "c"])),
    )


# ------------------------------------------------------------------------------------------ image folder


def _palette_image(w: int, h: int, color: tuple[int, int, int]) -> PIL.Image.Image:
    im = PIL.Image.new("P", (w, h), 1)
    im.putpalette([0, 0, 0, *color] + [0, 0, 0] * 254)
    return im


@pytest.fixture
def image_folder(tmp_path: Path) -> tuple[Path, dict[tuple[int, int, int], str]]:
    """Class sub-folders holding constant-colour images of mixed modes and sizes; returns colour → class."""
    root = tmp_path / "imgs"
    (root / "cat").mkdir(parents=True)
    (root / "dog").mkdir(parents=True)
    expected: dict[tuple[int, int, int], str] = {}

    def save(im: PIL.Image.Image, cls: str, file: str, rgb: tuple[int, int, int], **kw: object) -> None:
        im.save(root / cls / file, **kw)
        expected[rgb] = cls

    save(PIL.Image.new("L", (20, 30), 77), "cat", "gray_20x30.png", (77, 77, 77))
    save(PIL.Image.new("RGBA", (32, 32), (10, 200, 30, 128)), "cat", "rgba_32.png", (10, 200, 30))
    save(_palette_image(64, 48, (250, 5, 100)), "dog", "palette_64x48.png", (250, 5, 100))
    save(_rgb(32, 32, (1, 2, 3)), "dog", "rgb_32.png", (1, 2, 3))
    # CMYK (0, 0, 0, 0) is white; JPEG keeps a flat white image exact.
    save(PIL.Image.new("CMYK", (40, 40), (0, 0, 0, 0)), "dog", "cmyk_40.jpg", (255, 255, 255), quality=95)
    return root, expected


def test_image_folder_mixed_modes_and_sizes(image_folder) -> None:
    root, expected = image_folder
    data = load_images(str(root), "train", resolution=16, progress=False)
    assert isinstance(data, ImageData)
    assert data.images.shape == (5, 3, 16, 16)
    assert data.images.dtype == torch.uint8 and data.images.is_contiguous()
    assert data.labels is not None and data.labels.dtype == torch.int64
    assert data.class_names == ["cat", "dog"] and data.num_classes == 2
    assert (data.image_column, data.label_column) == ("image", "label")
    assert data.source == f"{root}:train"
    seen: dict[tuple[int, int, int], str] = {}
    for image, label in zip(data.images, data.labels, strict=True):
        flat = image.reshape(3, -1)
        # Every source image is one flat colour, so conversion + bicubic resizing must keep it flat.
        assert bool((flat == flat[:, :1]).all())
        seen[tuple(int(v) for v in flat[:, 0])] = data.class_names[int(label)]
    assert seen == expected


def test_check_dataset_on_image_folder(image_folder) -> None:
    root, _ = image_folder
    assert check_dataset(str(root), "train") == ("image", "label")
    message = user_error(check_dataset, str(root), "test")
    assert message.startswith(f"split 'test' not found in {root}; available splits: 'train' (data.split)")


def test_image_folder_with_split_folders(tmp_path: Path) -> None:
    for split, n in (("train", 3), ("test", 2)):
        for cls in ("ant", "bee"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(n):
                _rgb(8, 8, (i, 0, 0)).save(tmp_path / split / cls / f"{i}.png")
    data = load_images(str(tmp_path), "test", resolution=8, progress=False)
    assert data.images.shape == (4, 3, 8, 8) and data.class_names == ["ant", "bee"]
    assert sorted(data.labels.tolist()) == [0, 0, 1, 1]


def test_non_square_images_are_resized_on_the_short_side_and_centre_cropped(tmp_path: Path) -> None:
    pixels = np.zeros((30, 60, 3), dtype=np.uint8)  # h=30, w=60: only the middle half survives the crop
    pixels[:, :15] = (255, 0, 0)
    pixels[:, 15:45] = (0, 255, 0)
    pixels[:, 45:] = (0, 0, 255)
    source = PIL.Image.fromarray(pixels)
    ds = datasets.Dataset.from_dict({"image": [source]}, features=_features(image=datasets.Image()))
    ds.save_to_disk(str(tmp_path / "wide"))
    data = load_images(str(tmp_path / "wide"), "train", resolution=10, progress=False)
    assert data.labels is None and data.num_classes is None and data.label_column is None
    reference = np.asarray(source.resize((20, 10), PIL.Image.Resampling.BICUBIC).crop((5, 0, 15, 10)))
    got = data.images[0].permute(1, 2, 0).numpy()
    assert np.abs(got.astype(int) - reference.astype(int)).max() <= 1
    assert (got[:, 3:7] == (0, 255, 0)).all()


def test_16_bit_grayscale_is_scaled_not_clipped(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "x"
    path.mkdir(parents=True)
    PIL.Image.fromarray(np.full((8, 8), 65535 // 2, dtype=np.uint16)).save(path / "a.png")
    data = load_images(str(tmp_path / "deep"), "train", resolution=8, progress=False)
    assert int(data.images[0, 0, 0, 0]) == 127 and bool((data.images == 127).all())


# ---------------------------------------------------------------------------------- save_to_disk / parquet


def test_save_to_disk_dataset_keeps_pixels_exactly(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
    ds = datasets.Dataset.from_dict(
        {"pic": [PIL.Image.fromarray(p) for p in pixels], "y": [0, 1, 1, 0]},
        features=_features(pic=datasets.Image(), y=datasets.ClassLabel(names=["no", "yes"])),
    )
    ds.save_to_disk(str(tmp_path / "saved"))
    data = load_images(str(tmp_path / "saved"), "train", resolution=16, progress=False)
    assert torch.equal(data.images, torch.from_numpy(pixels).permute(0, 3, 1, 2))
    assert data.labels.tolist() == [0, 1, 1, 0] and data.class_names == ["no", "yes"]
    assert (data.image_column, data.label_column) == ("pic", "y")


def test_save_to_disk_dataset_remembers_its_split(tmp_path: Path) -> None:
    ds = _small_labelled()
    ds = datasets.Dataset(ds.data, info=ds.info, split=datasets.NamedSplit("train"))
    ds.save_to_disk(str(tmp_path / "train_only"))
    message = user_error(open_split, str(tmp_path / "train_only"), "test")
    assert "'train'" in message and "data.split" in message


def test_save_to_disk_dataset_dict(tmp_path: Path) -> None:
    dd = datasets.DatasetDict({"train": _small_labelled(6), "validation": _small_labelled(3)})
    dd.save_to_disk(str(tmp_path / "dd"))
    data = load_images(str(tmp_path / "dd"), "validation", resolution=8, progress=False)
    assert data.images.shape == (3, 3, 8, 8)
    message = user_error(load_images, str(tmp_path / "dd"), "test", resolution=8)
    assert "'train'" in message and "'validation'" in message and "data.split" in message


def test_parquet_hub_layout_folder(tmp_path: Path) -> None:
    root = tmp_path / "hub_layout"
    _small_labelled(6).to_parquet(str(root / "data" / "train-00000-of-00001.parquet"))
    _small_labelled(4).to_parquet(str(root / "data" / "test-00000-of-00001.parquet"))
    data = load_images(str(root), "test", resolution=12, progress=False)
    assert data.images.shape == (4, 3, 12, 12)
    assert data.class_names == ["a", "b", "c"] and data.labels.tolist() == [0, 1, 2, 0]
    assert len(open_split(str(root), "train[:2]")) == 2
    message = user_error(open_split, str(root), "validation", key_prefix="eval.data")
    assert "eval.data.split" in message and "'train'" in message and "'test'" in message


def test_single_parquet_file(tmp_path: Path) -> None:
    _small_labelled(5).to_parquet(str(tmp_path / "one.parquet"))
    data = load_images(str(tmp_path / "one.parquet"), "train", resolution=8, progress=False)
    assert data.images.shape[0] == 5


def test_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    message = user_error(open_split, str(tmp_path / "empty"), "train")
    assert "data.path" in message and "empty" in message


# ------------------------------------------------------------------------------------------------- columns


def test_no_image_column_names_the_columns_and_the_key(tmp_path: Path) -> None:
    ds = datasets.Dataset.from_dict({"pixels_as_text": ["a", "b"], "target": [0, 1]})
    ds.save_to_disk(str(tmp_path / "noimg"))
    message = user_error(load_images, str(tmp_path / "noimg"), "train", resolution=8)
    assert "pixels_as_text" in message and "target" in message and "data.image_column" in message


def test_several_image_columns_are_listed() -> None:
    ds = datasets.Dataset.from_dict(
        {"left": [_rgb(4, 4, (0, 0, 0))], "right": [_rgb(4, 4, (0, 0, 0))]},
        features=_features(left=datasets.Image(), right=datasets.Image()),
    )
    message = user_error(detect_columns, ds, None, None, "pairs:train")
    assert "'left'" in message and "'right'" in message and "data.image_column" in message
    assert detect_columns(ds, "right", None, "pairs:train") == ("right", None)


def test_given_columns_must_exist_and_fit() -> None:
    ds = _small_labelled(2)
    message = user_error(detect_columns, ds, "img", None, "x:train", key_prefix="eval.data")
    assert "'img'" in message and "eval.data.image_column" in message and "image, label" in message
    message = user_error(detect_columns, ds, None, "target", "x:train")
    assert "'target'" in message and "data.label_column" in message
    message = user_error(detect_columns, ds, "label", None, "x:train")
    assert "not images" in message


def test_several_class_label_columns_are_listed() -> None:
    ds = datasets.Dataset.from_dict(
        {"image": [_rgb(4, 4, (0, 0, 0))], "coarse": [0], "fine": [1]},
        features=_features(
            image=datasets.Image(),
            coarse=datasets.ClassLabel(names=["x", "y"]),
            fine=datasets.ClassLabel(names=["p", "q"]),
        ),
    )
    message = user_error(detect_columns, ds, None, None, "c:train")
    assert "'coarse'" in message and "'fine'" in message and "data.label_column" in message
    assert detect_columns(ds, None, "fine", "c:train") == ("image", "fine")


def test_array_image_columns_need_to_be_named(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    chw = rng.integers(0, 256, (3, 3, 8, 8), dtype=np.uint8)
    ds = datasets.Dataset.from_dict(
        {"chw": chw, "hwc": chw.transpose(0, 2, 3, 1).copy(), "gray": chw[:, 0].copy(), "label": [0, 1, 2]},
        features=_features(
            chw=datasets.Array3D((3, 8, 8), "uint8"),
            hwc=datasets.Array3D((8, 8, 3), "uint8"),
            gray=datasets.Array2D((8, 8), "uint8"),
            label=datasets.Value("int64"),
        ),
    )
    ds.save_to_disk(str(tmp_path / "arrays"))
    path = str(tmp_path / "arrays")
    assert "data.image_column" in user_error(load_images, path, "train", resolution=8)
    for column in ("chw", "hwc"):
        data = load_images(path, "train", resolution=8, image_column=column, label_column="label", progress=False)
        assert torch.equal(data.images, torch.from_numpy(chw))
        assert data.num_classes == 3 and data.class_names is None
    gray = load_images(path, "train", resolution=4, image_column="gray", progress=False)
    assert gray.images.shape == (3, 3, 4, 4)
    assert torch.equal(gray.images[:, 0], gray.images[:, 2])


def test_string_and_integer_label_columns(tmp_path: Path) -> None:
    ds = datasets.Dataset.from_dict(
        {"image": [_rgb(4, 4, (i, i, i)) for i in range(3)], "kind": ["dog", "cat", "dog"], "n": [2, 0, 5]},
        features=_features(image=datasets.Image(), kind=datasets.Value("string"), n=datasets.Value("int32")),
    )
    ds.save_to_disk(str(tmp_path / "s"))
    data = load_images(str(tmp_path / "s"), "train", resolution=4, label_column="kind", progress=False)
    assert data.class_names == ["cat", "dog"] and data.labels.tolist() == [1, 0, 1]
    data = load_images(str(tmp_path / "s"), "train", resolution=4, label_column="n", progress=False)
    assert data.num_classes == 6 and data.labels.tolist() == [2, 0, 5]


# -------------------------------------------------------------------------------------- labels and rows


def test_label_out_of_range(tmp_path: Path) -> None:
    ds = datasets.Dataset.from_dict(
        {"image": [_rgb(4, 4, (0, 0, 0))] * 3, "label": [0, 7, 1]},
        features=_features(image=datasets.Image(), label=datasets.Value("int64")),
    )
    # Cast through Arrow only: ClassLabel's own encoder would refuse the bad value up front.
    two_classes = _features(image=datasets.Image(), label=datasets.ClassLabel(names=["a", "b"]))
    ds = datasets.Dataset(ds.data.table, info=datasets.DatasetInfo(features=two_classes))
    ds.save_to_disk(str(tmp_path / "bad"))
    for fn, kwargs in ((load_images, {"resolution": 4}), (check_dataset, {})):
        message = user_error(fn, str(tmp_path / "bad"), "train", **kwargs)
        assert "label 7" in message and "row 1" in message and "'label'" in message and "0..1" in message
        assert "data.label_column" in message


def test_negative_integer_label(tmp_path: Path) -> None:
    ds = datasets.Dataset.from_dict(
        {"image": [_rgb(4, 4, (0, 0, 0))] * 2, "y": [0, -1]},
        features=_features(image=datasets.Image(), y=datasets.Value("int64")),
    )
    ds.save_to_disk(str(tmp_path / "neg"))
    message = user_error(load_images, str(tmp_path / "neg"), "train", resolution=4, label_column="y")
    assert "label -1" in message and "missing" in message


def test_empty_dataset_and_max_samples(tmp_path: Path) -> None:
    empty = datasets.Dataset.from_dict(
        {"image": [], "label": []},
        features=_features(image=datasets.Image(), label=datasets.ClassLabel(names=["a"])),
    )
    empty.save_to_disk(str(tmp_path / "empty"))
    assert "no rows" in user_error(load_images, str(tmp_path / "empty"), "train", resolution=8)
    assert "no rows" in user_error(check_dataset, str(tmp_path / "empty"), "train")
    _small_labelled(6).save_to_disk(str(tmp_path / "six"))
    six = str(tmp_path / "six")
    assert "data.max_samples" in user_error(load_images, six, "train", resolution=8, max_samples=0)
    full = load_images(six, "train", resolution=8, progress=False)
    assert load_images(six, "train", resolution=8, max_samples=99, progress=False).images.shape[0] == 6
    # max_samples: the same seeded random rows every time, kept in dataset order.
    subsets = [load_images(six, "train", resolution=8, max_samples=4, progress=False) for _ in range(2)]
    rows = [i for i in range(6) if any(torch.equal(full.images[i], im) for im in subsets[0].images)]
    assert len(rows) == 4 and torch.equal(subsets[0].images, full.images[rows])
    assert torch.equal(subsets[0].images, subsets[1].images)
    assert subsets[0].labels.tolist() == full.labels[rows].tolist()


def test_max_samples_draws_from_every_class(tmp_path: Path) -> None:
    # An image folder is sorted by class: 100 rows of each of 10 classes. The first 100 rows would hold one class.
    labels = [c for c in range(10) for _ in range(100)]
    ds = datasets.Dataset.from_dict(
        {"image": np.zeros((1000, 2, 2, 3), dtype=np.uint8).tolist(), "label": labels},
        features=_features(image=datasets.Array3D((2, 2, 3), "uint8"), label=datasets.ClassLabel(num_classes=10)),
    )
    ds.save_to_disk(str(tmp_path / "sorted"))
    subset = load_images(
        str(tmp_path / "sorted"), "train", resolution=2, image_column="image", max_samples=100, progress=False
    )
    counts = subset.labels.bincount(minlength=10)
    assert counts.min() >= 4, counts.tolist()  # a uniform draw: ~10 per class


def test_unreadable_image_names_the_row(tmp_path: Path) -> None:
    ds = datasets.Dataset.from_dict(
        {"image": [{"bytes": b"not an image", "path": None}]}, features=_features(image=datasets.Image())
    )
    ds.save_to_disk(str(tmp_path / "broken"))
    for fn, kwargs in ((load_images, {"resolution": 4}), (check_dataset, {})):
        message = user_error(fn, str(tmp_path / "broken"), "train", **kwargs)
        assert "row 0" in message and "not a readable image" in message and "'image'" in message


def test_bad_resolution() -> None:
    assert "resolution" in user_error(load_images, BUILTIN_DIGITS, "train", resolution=0)


# ------------------------------------------------------------------------------------------ paths / Hub


@pytest.mark.parametrize("path", ["./no/such/folder", "/no/such/folder", "~/no-such-robustcl-folder", "a/b/c"])
def test_missing_local_path(path: str) -> None:
    message = user_error(load_images, path, "train", resolution=8)
    assert message == (
        f"dataset path not found (data.path: {path}) — check the path, or give a Hub dataset id like uoft-cs/cifar10"
    )


def test_hub_id_offline_is_one_line() -> None:
    message = user_error(open_split, "robustcl-test-owner/no-such-dataset", "train")
    assert message.startswith("cannot load dataset 'robustcl-test-owner/no-such-dataset' from the Hugging Face Hub: ")
    assert "(data.path) — check the id and your network, or point data.path to a local copy" in message


def test_unknown_builtin() -> None:
    assert BUILTIN_DIGITS in user_error(open_split, "builtin:nope", "train")


# ------------------------------------------------------------------------------------------ builtin digits


def test_builtin_digits() -> None:
    builtin._digits_dataset_dict.cache_clear()
    start = time.perf_counter()
    splits = {s: open_split(BUILTIN_DIGITS, s) for s in ("train", "test")}
    assert time.perf_counter() - start < 1.0
    assert {s: len(d) for s, d in splits.items()} == {"train": 1437, "test": 360}
    assert check_dataset(BUILTIN_DIGITS, "train") == ("image", "label")
    for resolution in (16, 32):
        train = load_images(BUILTIN_DIGITS, "train", resolution=resolution, progress=False)
        test = load_images(BUILTIN_DIGITS, "test", resolution=resolution, progress=False)
        assert train.images.shape == (1437, 3, resolution, resolution)
        assert test.images.shape == (360, 3, resolution, resolution)
        assert train.num_classes == 10 and train.class_names == [str(d) for d in range(10)]
        assert set(test.labels.tolist()) == set(range(10))
        assert train.source == "builtin:digits:train"
    # Deterministic across rebuilds, and the two splits are disjoint and cover all 1,797 images.
    builtin._digits_dataset_dict.cache_clear()
    again = load_images(BUILTIN_DIGITS, "train", resolution=32, progress=False)
    assert torch.equal(again.images, train.images) and torch.equal(again.labels, train.labels)
    raw = open_split(BUILTIN_DIGITS, "train").with_format("arrow")[:]["image"].to_pylist()
    raw += open_split(BUILTIN_DIGITS, "test").with_format("arrow")[:]["image"].to_pylist()
    assert len({r["bytes"] for r in raw}) >= 1790  # a handful of the real digits are exact duplicates
    assert "'train'" in user_error(open_split, BUILTIN_DIGITS, "validation")


def test_builtin_digits_pixels_match_sklearn() -> None:
    pytest.importorskip("sklearn")
    from sklearn.datasets import load_digits

    digits = load_digits()
    data = load_images(BUILTIN_DIGITS, "test", resolution=8, progress=False)
    gray = data.images[:, 0].numpy().astype(np.float64)
    expected = np.rint(digits.images * 255.0 / 16.0)
    # Each test image is one of sklearn's, with its label.
    for image, label in zip(gray[:20], data.labels[:20].tolist(), strict=True):
        matches = np.flatnonzero((expected == image).all(axis=(1, 2)))
        assert matches.size and (digits.target[matches] == label).any()


# ------------------------------------------------------------------------------------------------ CIFAR-10


@pytest.mark.skipif(not CIFAR.is_dir(), reason=f"CIFAR-10 not present at {CIFAR}")
def test_cifar10_subset(monkeypatch: pytest.MonkeyPatch) -> None:
    # The real dataset is worth caching across runs, unlike the tmp ones.
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", datasets.config.DEFAULT_HF_DATASETS_CACHE)
    data = load_images(str(CIFAR), "test", resolution=32, max_samples=512, progress=False)
    assert data.images.shape == (512, 3, 32, 32) and data.images.dtype == torch.uint8
    assert data.labels.shape == (512,) and 0 <= int(data.labels.min()) and int(data.labels.max()) <= 9
    assert data.num_classes == 10 and data.class_names[0] == "airplane"
    assert (data.image_column, data.label_column) == ("img", "label")
    first_row = int(np.sort(np.random.default_rng(SUBSET_SEED).choice(10_000, 512, replace=False))[0])
    table = pq.read_table(CIFAR / "plain_text" / "test-00000-of-00001.parquet").slice(first_row, 1).to_pylist()[0]
    first = np.array(PIL.Image.open(io.BytesIO(table["img"]["bytes"])).convert("RGB"))
    assert torch.equal(data.images[0], torch.from_numpy(first).permute(2, 0, 1))
    assert int(data.labels[0]) == table["label"]
    assert check_dataset(str(CIFAR), "train") == ("img", "label")


# ------------------------------------------------------------------------------------- more user errors


def test_more_user_errors(tmp_path: Path) -> None:
    saved = tmp_path / "saved"
    _small_labelled(3).save_to_disk(str(saved))
    assert "data.name" in user_error(open_split, str(saved), "train", name="plain_text")
    assert "data.name" in user_error(open_split, BUILTIN_DIGITS, "train", name="x")
    (tmp_path / "notes.md").write_text("hello")
    assert "is a file, not a dataset" in user_error(open_split, str(tmp_path / "notes.md"), "train")
    parquet = tmp_path / "pq"
    _small_labelled(3).to_parquet(str(parquet / "data" / "train-00000-of-00001.parquet"))
    assert "eval.data.name" in user_error(open_split, str(parquet), "train", name="nope", key_prefix="eval.data")
    assert "data.split" in user_error(open_split, str(parquet), "train[:nope]")
    assert "cannot also be the labels" in user_error(
        load_images, str(saved), "train", resolution=8, label_column="image"
    )


def test_bad_values_in_columns(tmp_path: Path) -> None:
    ds = datasets.Dataset.from_dict(
        {
            "image": [_rgb(4, 4, (0, 0, 0)), None],
            "score": [0.5, 1.5],
            "maybe": [1, None],
            "floaty": [np.zeros((4, 4), np.float32)] * 2,
            "wide": [np.full((4, 4), 300, np.int32)] * 2,
            "odd": [np.zeros((5, 5, 7), np.uint8)] * 2,
        },
        features=_features(
            image=datasets.Image(),
            score=datasets.Value("float32"),
            maybe=datasets.Value("int64"),
            floaty=datasets.Array2D((4, 4), "float32"),
            wide=datasets.Array2D((4, 4), "int32"),
            odd=datasets.Array3D((5, 5, 7), "uint8"),
        ),
    )
    ds.save_to_disk(str(tmp_path / "bad"))
    path = str(tmp_path / "bad")
    assert "row 1 of column 'image' has no image" in user_error(load_images, path, "train", resolution=4)
    assert "not class labels" in user_error(load_images, path, "train", resolution=4, label_column="score")
    assert "are empty" in user_error(load_images, path, "train", resolution=4, label_column="maybe")
    assert "not images" in user_error(load_images, path, "train", resolution=4, image_column="floaty")
    assert "outside 0..255" in user_error(load_images, path, "train", resolution=4, image_column="wide")
    assert "(5, 5, 7)" in user_error(check_dataset, path, "train", image_column="odd")
    # A subset's rows are named by their row in the split: max_samples=1 draws row 1 here.
    assert "row 1 of column 'image' has no image" in user_error(load_images, path, "train", resolution=4, max_samples=1)


def test_empty_parquet_split(tmp_path: Path) -> None:
    empty = _small_labelled(2).select([])
    empty.to_parquet(str(tmp_path / "empty.parquet"))
    message = user_error(load_images, str(tmp_path / "empty.parquet"), "train", resolution=4)
    assert "has no rows" in message and "data.split" in message
    assert "has no rows" in user_error(check_dataset, str(tmp_path / "empty.parquet"), "train")


def test_float_grayscale_images(tmp_path: Path) -> None:
    (tmp_path / "f" / "x").mkdir(parents=True)
    PIL.Image.fromarray(np.full((4, 4), 0.5, np.float32)).save(tmp_path / "f" / "x" / "a.tiff")
    data = load_images(str(tmp_path / "f"), "train", resolution=4, progress=False)
    assert bool((data.images == 128).all())
