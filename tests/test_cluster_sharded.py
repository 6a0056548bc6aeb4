"""AdvCL's clustering sharded over the training processes: each process encodes its block of rows, k-means combines
per-shard sums, and the labels equal those of one process computing everything."""

from __future__ import annotations

import subprocess

import pytest
import torch
from helpers import BIN, REPO, call_main, cli_env, end_spawned_worker, with_sets
from safetensors import safe_open

import robustcl.kmeans as km
from robustcl.collectives import shard_range
from robustcl.errors import UserError
from robustcl.kmeans import OneProcess, ProcessGroup, kmeans

# 6 distinct points, 10 copies each, then 150 noisy points around 3 centres.
CLUSTERS = (1, 4, 9, 23)


def _points() -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    copies = (torch.randn(6, 5, generator=g) * 4).repeat(10, 1)
    centres = torch.randn(3, 5, generator=g) * 6
    noisy = centres[torch.arange(150) % 3] + torch.randn(150, 5, generator=g)
    return torch.cat([copies, noisy])


def _duplicates() -> torch.Tensor:
    """3 distinct points, 4 copies each: K=5 seeds two centres on copies, so clusters empty and the rule runs."""
    return torch.tensor([[float(i % 3), 0.0] for i in range(12)])


def _sharded_worker(rank: int, init_file: str, out: str) -> None:
    """One of two gloo processes: k-means on its block of rows, labels gathered on rank 0; then a failure on rank 1
    only, which both processes must raise."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    group = ProcessGroup()
    results = {}
    for name, x, ks in (("points", _points(), CLUSTERS), ("duplicates", _duplicates(), (5,))):
        rows = shard_range(len(x), group.rank, group.size)
        for k in ks:
            result = kmeans(x[rows.start : rows.stop], k, seed=1, group=group)
            results[f"{name}.k{k}.labels"] = group.gather_rows(result.labels)
            results[f"{name}.k{k}.centroids"] = result.centroids
            results[f"{name}.k{k}.inertia"] = torch.tensor(result.inertia)

    def fail_on_rank_1() -> int:
        if group.rank == 1:
            raise UserError("image 7 cannot be decoded", "data.path", "repair the file")
        return 0

    try:
        group.agree(fail_on_rank_1, "encoding the images")
    except UserError as err:
        results["error"] = (str(err), err.exit_code)
    if rank == 0:
        torch.save(results, out)
    else:
        torch.save({"error": results.get("error")}, out + ".1")
    dist.destroy_process_group()
    end_spawned_worker()


def test_shard_range_splits_rows_into_contiguous_blocks():
    assert [shard_range(10, r, 3) for r in range(3)] == [range(0, 3), range(3, 6), range(6, 10)]
    assert [shard_range(1, r, 2) for r in range(2)] == [range(0, 0), range(0, 1)]
    # Aligned to the feature batch: each image is encoded in the batch one process would encode it in.
    assert [shard_range(1437, r, 2, align=512) for r in range(2)] == [range(0, 512), range(512, 1437)]
    assert [shard_range(60, r, 2, align=512) for r in range(2)] == [range(0, 0), range(0, 60)]


def test_two_gloo_processes_cluster_like_one_and_share_a_failure(tmp_path, monkeypatch):
    """The property the acceptance asks for: sharded k-means (seeding, Lloyd steps, empty-cluster rule) gives the
    labels of one process exactly and its centroids to 1e-5; and a failure on one process reaches both."""
    out = tmp_path / "sharded.pt"
    torch.multiprocessing.spawn(_sharded_worker, args=(str(tmp_path / "init"), str(out)), nprocs=2)
    two = torch.load(out, weights_only=True)

    emptied = []
    original = km._fill_empty
    monkeypatch.setattr(km, "_fill_empty", lambda *a, **kw: emptied.append(1) or original(*a, **kw))
    for name, x, ks in (("points", _points(), CLUSTERS), ("duplicates", _duplicates(), (5,))):
        for k in ks:
            one = kmeans(x, k, seed=1, group=OneProcess())
            assert torch.equal(two[f"{name}.k{k}.labels"], one.labels), (name, k)
            assert torch.allclose(two[f"{name}.k{k}.centroids"], one.centroids, atol=1e-5, rtol=0), (name, k)
            assert abs(float(two[f"{name}.k{k}.inertia"]) - one.inertia) <= 1e-5 * max(one.inertia, 1.0)
            assert torch.bincount(one.labels, minlength=k).min() >= 1  # every cluster kept a point
    assert emptied, "no case emptied a cluster: the empty-cluster rule went untested"

    message = "image 7 cannot be decoded (data.path) — repair the file"
    assert two["error"] == (message, 2)
    assert torch.load(str(out) + ".1", weights_only=True)["error"] == (message, 2)


# A tiny AdvCL run on the embedded digits (1,437 images): one optimizer step after the clustering.
ADVCL = [
    "method.name=advcl",
    "method.advcl.clusters=[3,7]",
    "model.widths=[8,8,8,8]",
    "data.resolution=8",
    "training.batch_size=16",
    "training.max_steps=1",
    "training.checkpoint_every=0",
    "attack.steps=1",
    "eval.after_pretrain=false",
    "logging.progress_bar=false",
]


@pytest.fixture(scope="module")
def cluster_encoder(tmp_path_factory):
    from robustcl.models import RobustCLResNetConfig, RobustCLResNetModel

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("encoder") / "encoder"
    RobustCLResNetModel(RobustCLResNetConfig(block_layers=[1, 1, 1, 1], widths=[8, 8, 8, 8])).save_pretrained(path)
    return path


def _tensors(path):
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


@pytest.mark.slow
def test_two_process_advcl_pretrain_writes_the_labels_of_one_and_encodes_one_shard_each(
    tmp_path, cluster_encoder, monkeypatch
):
    sets = [*ADVCL, f"method.advcl.cluster_encoder={cluster_encoder}"]
    one_log, two_log = tmp_path / "one.log", tmp_path / "two.log"
    monkeypatch.setattr("sys.argv", ["robustcl"])
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("ROBUSTCL_ENCODED_ROWS_LOG", str(one_log))
    assert call_main(["pretrain", "recipes/quickstart.yaml", "-o", str(tmp_path / "one"), *with_sets(*sets)]) == 0

    args = ["launch", "--cpu", "--gpus", "2", "--", "pretrain", "recipes/quickstart.yaml", "-o", str(tmp_path / "two")]
    res = subprocess.run([str(BIN / "robustcl"), *args, *with_sets(*sets)], cwd=REPO, capture_output=True, text=True,
                         env=cli_env(ROBUSTCL_ENCODED_ROWS_LOG=str(two_log)), timeout=300)  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    assert "2 process(es)" in res.stdout

    one, one_meta = _tensors(tmp_path / "one" / "pseudo_labels.safetensors")
    two, two_meta = _tensors(tmp_path / "two" / "pseudo_labels.safetensors")
    assert sorted(one) == ["k3", "k7"] and one["k7"].shape == (1437,)
    assert all(torch.equal(one[k], two[k]) for k in one) and one_meta == two_meta
    assert len(one["k7"].unique()) == 7
    # Each process encoded its own block of rows, and only that.
    assert one_log.read_text().splitlines() == ["process 0 of 1 encoded rows 0..1437"]
    assert sorted(two_log.read_text().splitlines()) == [
        "process 0 of 2 encoded rows 0..512",
        "process 1 of 2 encoded rows 512..1437",
    ]


@pytest.mark.slow
def test_an_unreadable_image_in_the_second_shard_ends_both_processes_with_its_one_line_error(tmp_path, cluster_encoder):
    """Process 1 alone meets the broken image (its block is the one 512-image feature batch; process 0's is empty):
    process 0 must not wait for it in a collective, and both end with the image's one-line error, no traceback."""
    from test_streamed_data import _photos

    data = _photos(tmp_path / "photos", broken=(50,))
    sets = [*ADVCL, f"method.advcl.cluster_encoder={cluster_encoder}", f"data.path={data}", "data.resolution=12",
            "data.loading=streamed", "data.workers=0", "training.batch_size=12"]  # fmt: skip
    args = ["launch", "--cpu", "--gpus", "2", "--", "pretrain", "recipes/quickstart.yaml", "-o", str(tmp_path / "run")]
    res = subprocess.run([str(BIN / "robustcl"), *args, *with_sets(*sets)], cwd=REPO, capture_output=True, text=True,
                         env=cli_env(), timeout=300)  # fmt: skip
    errors = [line for line in res.stderr.splitlines() if line.startswith("robustcl: error:")]
    assert res.returncode == 2 and len(errors) == 1, res.stderr[-3000:]
    assert "row 50 of column 'image' is not a readable image (file img_050.jpg)" in errors[0]
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
