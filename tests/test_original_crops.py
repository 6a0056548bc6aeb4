"""augment.crop_on: original — RandomResizedCrop sampled on each image's own width × height by the data workers, as
torchvision's PIL pipeline does on ImageNet: the same boxes and pixels as torchvision's get_params + crop + resize for
the same uniforms, the same crops for an image whichever process holds it and after a resume, and refused where a
method needs the decoded image."""

from __future__ import annotations

import io
import math
from pathlib import Path

import datasets
import numpy as np
import PIL.Image
import pytest
import torch
from helpers import TINY, with_sets
from safetensors.torch import load_file

from robustcl.data.batches import EpochBatches
from robustcl.data.crops import CROP_DRAWS, CropPlan, crop_uniforms
from robustcl.data.loading import open_images
from robustcl.data.streamed import DecodingFeed

CPU = torch.device("cpu")
SIZES = [(50, 30), (30, 50), (40, 40), (64, 21), (17, 45)]  # (width, height)
SCALE, RATIO = (0.08, 1.0), (3 / 4, 4 / 3)


def _dataset(path: Path, rows: int = 24, fmt: str = "PNG", sizes=SIZES) -> str:
    rng = np.random.default_rng(0)
    images = []
    for i in range(rows):
        w, h = sizes[i % len(sizes)]
        buffer = io.BytesIO()
        PIL.Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buffer, format=fmt)
        images.append({"bytes": buffer.getvalue(), "path": None})
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=2)})
    ds = datasets.Dataset.from_dict({"image": images, "label": [i % 2 for i in range(rows)]}, features=features)
    ds.save_to_disk(str(path))
    return str(path)


def _torchvision_box(u: list[float], height: int, width: int, scale=SCALE, ratio=RATIO) -> tuple[int, int, int, int]:
    """RandomResizedCrop.get_params as torchvision writes it, fed with these uniforms instead of its own draws."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for attempt in range(10):
        target_area = area * (scale[0] + (scale[1] - scale[0]) * u[attempt])
        aspect_ratio = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * u[10 + attempt])
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            return int(u[20] * (height - h + 1)), int(u[21] * (width - w + 1)), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def _plan(views: int = 2, resolution: int = 16) -> CropPlan:
    return CropPlan(views, SCALE, RATIO, resolution, seed=3)


def test_crops_equal_torchvision_crop_and_resize_of_the_original(tmp_path):
    opened = open_images(_dataset(tmp_path / "png"), "train", resolution=16, progress=False)
    plan = _plan()
    rows = list(range(10))
    uniforms = torch.stack([crop_uniforms(3, 0, 0, v, len(rows)) for v in range(plan.views)])
    crops, replaced = opened.encoded().take_crops(torch.tensor(rows), uniforms, plan)
    assert crops.shape == (2, 10, 3, 16, 16) and replaced == []
    for i, row in enumerate(rows):
        original = PIL.Image.open(io.BytesIO(_raw(opened, row))).convert("RGB")
        width, height = original.size
        for v in range(plan.views):
            top, left, h, w = _torchvision_box(uniforms[v, i].tolist(), height, width)
            want = original.crop((left, top, left + w, top + h)).resize((16, 16), PIL.Image.Resampling.BICUBIC)
            assert torch.equal(crops[v, i], torch.from_numpy(np.array(want)).permute(2, 0, 1)), (row, v)


def _raw(opened, row: int) -> bytes:
    return opened.ds.select_columns(["image"]).with_format("arrow")[row : row + 1].column("image")[0]["bytes"].as_py()


def test_every_process_crops_an_image_as_one_process_does_and_a_resume_repeats_them(tmp_path):
    opened = open_images(_dataset(tmp_path / "png", rows=40), "train", resolution=16, progress=False)
    plan = _plan()
    # One process and two take the same micro-batches (the accumulation is part of the recipe, not of the launch).
    one_batches = EpochBatches(40, 16, seed=1, grad_accum=2)
    one = DecodingFeed(opened.encoded(), one_batches, CPU, workers=0, total_steps=4, crops=plan)
    reference = {(s, m): one.batch(s, m) for s in range(4) for m in range(2)}
    for rank in (0, 1):
        batches = EpochBatches(40, 16, seed=1, num_processes=2, process_index=rank, grad_accum=2)
        feed = DecodingFeed(opened.encoded(), batches, CPU, workers=1, total_steps=4, crops=plan)
        for step, micro in [(0, 0), (0, 1), (1, 0), (3, 1), (2, 0)]:  # in order, then a jump (a resume)
            views, rows = feed.batch(step, micro)
            want_views, want_rows = reference[step, micro]
            assert torch.equal(rows, want_rows[rank * 4 : rank * 4 + 4])
            assert torch.equal(views.crops, want_views.crops[:, rank * 4 : rank * 4 + 4]), (rank, step, micro)
        feed.close()


def test_a_large_jpeg_is_decoded_reduced_and_still_gives_the_crop_at_full_resolution(tmp_path):
    path = _dataset(tmp_path / "jpeg", rows=4, fmt="JPEG", sizes=[(800, 600)])
    opened = open_images(path, "train", resolution=16, progress=False)
    plan = CropPlan(1, (0.5, 0.5), (1.0, 1.0), 16, seed=0)  # 490 × 490 crops: a 1/8 DCT reduction still leaves 61
    uniforms = crop_uniforms(0, 0, 0, 0, 4)[None]
    crops, _ = opened.encoded().take_crops(torch.arange(4), uniforms, plan)
    for row in range(4):
        original = PIL.Image.open(io.BytesIO(_raw(opened, row))).convert("RGB")
        top, left, h, w = _torchvision_box(uniforms[0, row].tolist(), 600, 800, (0.5, 0.5), (1.0, 1.0))
        assert (h, w) == (490, 490)
        full = original.crop((left, top, left + w, top + h)).resize((16, 16), PIL.Image.Resampling.BICUBIC)
        difference = (crops[0, row].permute(1, 2, 0).float() - torch.from_numpy(np.array(full)).float()).abs()
        # Random pixels are the worst case for a DCT reduction; photos differ far less.
        assert difference.mean() < 12, float(difference.mean())


def _pretrain(cli, run: Path, data: str, *sets: str) -> tuple[int, str, str]:
    args = [*TINY, f"data.path={data}", "data.resolution=16", "training.batch_size=12", "augment.crop_on=original",
            "eval.after_pretrain=false", "logging.progress_bar=false", "data.workers=1", *sets]  # fmt: skip
    return cli("pretrain", "recipes/quickstart.yaml", "-o", str(run), *with_sets(*args))


def test_a_run_cropping_originals_resumes_exactly(tmp_path, cli):
    data = _dataset(tmp_path / "png", rows=36)
    code, out, err = _pretrain(cli, tmp_path / "straight", data, "training.max_steps=4")
    assert code == 0 and "data streamed" in out, err[-2000:]
    code, _, err = _pretrain(cli, tmp_path / "resumed", data, "training.max_steps=2")
    assert code == 0, err[-2000:]
    code, out, err = _pretrain(cli, tmp_path / "resumed", data, "training.max_steps=4")
    assert code == 0 and "resumed from" in out, err[-2000:]
    final = "checkpoints/step-00000004/model.safetensors"
    a, b = load_file(tmp_path / "straight" / final), load_file(tmp_path / "resumed" / final)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    "sets,message",
    [
        (["method.name=dynacl"], "augment.crop_on: original is not available for method dynacl"),
        (["method.name=advcl"], "augment.crop_on: original is not available for method advcl"),
        (["data.loading=decoded"], "data.loading: decoded keeps none"),
    ],
)
def test_cropping_originals_is_refused_where_it_cannot_work(tmp_path, cli, sets, message):
    code, _, err = _pretrain(cli, tmp_path / "run", _dataset(tmp_path / "png"), "training.max_steps=1", *sets)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run").exists()
    # `recipe validate` says so before any run starts.
    code, _, err = cli("recipe", "validate", "recipes/quickstart.yaml", "--no-check-data",
                       *with_sets("augment.crop_on=original", *sets))  # fmt: skip
    assert code == 2 and message in err, err


def test_crop_uniforms_are_fixed_by_seed_step_micro_and_view():
    a = crop_uniforms(0, 5, 1, 0, 8)
    assert a.shape == (8, CROP_DRAWS) and torch.equal(a, crop_uniforms(0, 5, 1, 0, 8))
    for other in [(1, 5, 1, 0), (0, 6, 1, 0), (0, 5, 0, 0), (0, 5, 1, 1)]:
        assert not torch.equal(a, crop_uniforms(*other, 8))


def test_evaluation_centre_crop_follows_the_resize_256_crop_224_convention(tmp_path):
    path = _dataset(tmp_path / "png", rows=5, sizes=[(300, 200), (200, 300), (256, 256), (97, 61), (64, 64)])
    opened = open_images(path, "train", resolution=28, center_crop=0.875, progress=False)  # 28 / 0.875 = 32
    decoded = opened.decode(progress=False)
    for row in range(5):
        im = PIL.Image.open(io.BytesIO(_raw(opened, row))).convert("RGB")
        w, h = im.size
        scale = 32 / min(w, h)
        resized = im.resize((max(32, round(w * scale)), max(32, round(h * scale))), PIL.Image.Resampling.BICUBIC)
        left, top = (resized.size[0] - 28) // 2, (resized.size[1] - 28) // 2
        want = torch.from_numpy(np.array(resized.crop((left, top, left + 28, top + 28)))).permute(2, 0, 1)
        # One resample of the box instead of a resize and a crop: the same up to rounding.
        assert (decoded[row].int() - want.int()).abs().max() <= 1, row


def test_an_unreadable_image_is_replaced_by_the_next_row_cropped_with_its_own_draws(tmp_path):
    path = _dataset(tmp_path / "png", rows=6)
    ds = datasets.load_from_disk(path)
    broken = ds.cast_column("image", datasets.Image(decode=False)).map(
        lambda row, i: {
            "image": {"bytes": row["image"]["bytes"][:20] if i == 2 else row["image"]["bytes"], "path": None}
        },
        with_indices=True,
    )
    broken.cast_column("image", datasets.Image()).save_to_disk(str(tmp_path / "broken"))
    plan = _plan()
    uniforms = torch.stack([crop_uniforms(3, 0, 0, v, 3) for v in range(plan.views)])
    images = open_images(str(tmp_path / "broken"), "train", resolution=16, progress=False).encoded(skip_bad=True)
    crops, replaced = images.take_crops(torch.tensor([1, 2, 4]), uniforms, plan)
    assert replaced == [2]
    clean = open_images(path, "train", resolution=16, progress=False).encoded()
    # Row 2's place holds row 3 cropped with row 2's uniforms; the other rows are untouched.
    want, _ = clean.take_crops(torch.tensor([1, 3, 4]), uniforms, plan)
    assert torch.equal(crops, want)
    with pytest.raises(Exception, match="row 2 of column 'image' is not a readable image"):
        open_images(str(tmp_path / "broken"), "train", resolution=16, progress=False).encoded().take_crops(
            torch.tensor([1, 2, 4]), uniforms, plan
        )
