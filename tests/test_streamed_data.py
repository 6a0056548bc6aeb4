"""The streamed data path (images kept encoded, decoded per micro-batch by worker processes) computes what the
decode-once path computes: the same pixels and rows for every (seed, step, micro, process), each image of a global
batch decoded once across processes, the same trained weights; chosen automatically when the decoded split would
exceed its budget, without ever decoding the split; unreadable images stop the run or are replaced, as asked."""

from __future__ import annotations

import io
import json
from pathlib import Path

import datasets
import numpy as np
import PIL.Image
import pytest
import torch
from helpers import TINY, with_sets
from safetensors.torch import load_file

from robustcl.data import loading
from robustcl.data.batches import EpochBatches
from robustcl.data.decode import ColumnDecoder
from robustcl.data.images import EncodedImages
from robustcl.data.loading import open_images
from robustcl.data.placement import DeviceImages
from robustcl.data.streamed import DecodingFeed

CPU = torch.device("cpu")
ROWS = 60


def _jpeg(rng: np.random.Generator, width: int, height: int) -> bytes:
    small = PIL.Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    small.resize((width, height), PIL.Image.Resampling.BICUBIC).save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()


def _photos(path: Path, rows: int = ROWS, broken: tuple[int, ...] = ()) -> str:
    """JPEGs of assorted sizes and aspect ratios (resized and centre-cropped on decoding), some rows broken."""
    rng = np.random.default_rng(0)
    sizes = [(40, 30), (30, 40), (16, 16), (64, 48), (20, 12)]
    images = []
    for i in range(rows):
        data = _jpeg(rng, *sizes[i % len(sizes)])
        images.append({"bytes": data[: len(data) // 3] if i in broken else data, "path": f"img_{i:03d}.jpg"})
    ds = datasets.Dataset.from_dict(
        {"image": images, "label": [i % 3 for i in range(rows)]},
        features=datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=3)}),
    )
    ds.save_to_disk(str(path))
    return str(path)


def test_streamed_micro_batches_equal_decoded_ones_and_split_the_global_batch(tmp_path, monkeypatch):
    opened = open_images(_photos(tmp_path / "photos"), "train", resolution=12, progress=False)
    decoded = opened.decode(progress=False)
    decoded_rows: dict[int, list[int]] = {0: [], 1: []}
    process = [0]
    original = ColumnDecoder.decode_rows

    def counting(self, rows, skip_bad=False):
        decoded_rows[process[0]].extend(int(r) for r in rows)
        return original(self, rows, skip_bad)

    monkeypatch.setattr(ColumnDecoder, "decode_rows", counting)  # seen in this process: workers=0
    order = [(s, m) for s in range(7) for m in range(2)]  # 7 steps of 2 micro-batches: past an epoch
    order += [(2, 1), (3, 0), (3, 1), (6, 0)]  # a resume mid-step, then a jump
    for rank in (0, 1):
        process[0] = rank
        batches = EpochBatches(ROWS, 24, seed=5, num_processes=2, process_index=rank, grad_accum=2)
        device = DeviceImages(decoded, batches, CPU)
        streamed = DecodingFeed(opened.encoded(), batches, CPU, workers=0, total_steps=7)
        for key in order:
            (want, want_rows), (got, got_rows) = device.batch(*key), streamed.batch(*key)
            assert torch.equal(got_rows, want_rows) and torch.equal(got, want), key
        streamed.close()
    # Across the two processes every image of a global micro-batch was decoded exactly once (in the ordered pass).
    for s, m in order[:14]:
        both = [EpochBatches(ROWS, 24, 5, 2, r, 2).indices(s, m).tolist() for r in (0, 1)]
        assert not set(both[0]) & set(both[1]) and len(both[0] + both[1]) == 12
    first_pass = sum(len(EpochBatches(ROWS, 24, 5, 2, 0, 2).indices(s, m)) for s, m in order[:14])
    for rank in (0, 1):
        global_rows = [EpochBatches(ROWS, 24, 5, 2, rank, 2).indices(s, m).tolist() for s, m in order[:14]]
        assert decoded_rows[rank][:first_pass] == [r for rows in global_rows for r in rows]


def test_workers_decode_ahead_in_training_order_and_restart_on_a_jump(tmp_path):
    opened = open_images(_photos(tmp_path / "photos"), "train", resolution=12, progress=False)
    decoded = opened.decode(progress=False)
    batches = EpochBatches(ROWS, 20, seed=1)
    device = DeviceImages(decoded, batches, CPU)
    feed = DecodingFeed(opened.encoded(), batches, CPU, workers=2, total_steps=9)
    try:
        for step in [0, 1, 2, 3, 7, 8, 4]:
            (want, _), (got, _) = device.batch(step, 0), feed.batch(step, 0)
            assert torch.equal(got, want), step
    finally:
        feed.close()
    assert feed._running is None


def _pretrain(cli, run: Path, data: str, *sets: str) -> tuple[int, str, str]:
    args = [*TINY, f"data.path={data}", "data.resolution=12", "training.batch_size=12", "training.max_steps=4",
            "training.micro_batch_size=6", "eval.after_pretrain=false", "logging.progress_bar=false",
            *sets]  # fmt: skip
    return cli("pretrain", "recipes/quickstart.yaml", "-o", str(run), *with_sets(*args))


def test_a_streamed_run_ends_with_the_weights_of_a_decoded_run(tmp_path, cli):
    data = _photos(tmp_path / "photos")
    code, out, err = _pretrain(cli, tmp_path / "decoded", data, "data.loading=decoded")
    assert code == 0 and "data decoded, on the device" in out, err[-2000:]
    code, out, err = _pretrain(cli, tmp_path / "streamed", data, "data.loading=streamed", "data.workers=1")
    assert code == 0 and "data streamed (decoded per batch by 1 worker process(es))" in out, err[-2000:]
    final = "checkpoints/step-00000004/model.safetensors"
    a, b = load_file(tmp_path / "decoded" / final), load_file(tmp_path / "streamed" / final)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_auto_streams_a_split_over_its_budget_without_decoding_it(tmp_path, cli, monkeypatch):
    def no_decoding(self, *args, **kwargs):
        raise AssertionError("the whole split was decoded")

    monkeypatch.setattr(loading.OpenedSplit, "decode", no_decoding)
    data = _photos(tmp_path / "photos")
    code, out, err = _pretrain(cli, tmp_path / "run", data, "data.decoded_max_gb=0.00001")  # 10 kB < 60 × 432 B
    assert code == 0, err[-2000:]
    assert "data streamed" in out


def test_auto_decodes_a_split_within_its_budget(tmp_path, cli):
    code, out, err = _pretrain(cli, tmp_path / "run", _photos(tmp_path / "photos"))
    assert code == 0 and "data decoded, on the device" in out, err[-2000:]


def test_an_unreadable_image_met_mid_run_stops_it_naming_row_and_file(tmp_path, cli):
    data = _photos(tmp_path / "photos", broken=(17,))
    code, _, err = _pretrain(cli, tmp_path / "run", data, "data.loading=streamed", "data.workers=1")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err[-2000:]
    assert "row 17 of column 'image' is not a readable image (file img_017.jpg)" in lines[0], lines[0]


def test_skipped_unreadable_images_are_replaced_counted_and_the_same_for_both_paths(tmp_path, cli):
    data = _photos(tmp_path / "photos", broken=(17, 40))
    skip = "data.bad_images=skip"
    code, out, err = _pretrain(cli, tmp_path / "streamed", data, "data.loading=streamed", "data.workers=1", skip)
    assert code == 0, err[-2000:]
    assert "unreadable image(s) in row(s) 17" in err and "replaced by the next readable row" in err
    records = [json.loads(line) for line in (tmp_path / "streamed" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["replaced_images"] >= 1
    code, out, err = _pretrain(cli, tmp_path / "decoded", data, "data.loading=decoded", skip)
    assert code == 0 and "2 unreadable image(s) replaced by the next readable row (rows 17, 40)" in out, err
    final = "checkpoints/step-00000004/model.safetensors"
    a, b = load_file(tmp_path / "decoded" / final), load_file(tmp_path / "streamed" / final)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_worker_error_reaches_the_trainer_as_itself(tmp_path):
    opened = open_images(_photos(tmp_path / "photos", broken=(3,)), "train", resolution=12, progress=False)
    feed = DecodingFeed(EncodedImages(opened.decoder(), opened.fingerprint), EpochBatches(ROWS, 60, 0), CPU, 1, 1)
    with pytest.raises(Exception) as info:
        feed.batch(0, 0)
    assert type(info.value).__name__ == "UserError" and "row 3 of column 'image'" in str(info.value)
    assert feed._running is None
