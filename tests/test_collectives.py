"""Cross-process negatives and SyncBN on two real gloo processes equal one process holding the whole batch."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import end_spawned_worker
from torch import nn

from robustcl.collectives import SyncBatchNorm, convert_sync_batchnorm, gather_with_grad
from robustcl.losses import multi_positive_nt_xent

N, D, C = 8, 5, 3


def _data() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "views": torch.randn(3, N, D, generator=g),
        "images": torch.randn(N, C, 4, 4, generator=g) * 2 + 1,
        "weight": torch.randn(N, C, 4, 4, generator=g),
    }


def _loss_and_grads(views: torch.Tensor, across: bool | str) -> tuple[torch.Tensor, torch.Tensor]:
    views = views.clone().requires_grad_(True)
    loss = multi_positive_nt_xent(list(views), temperature=0.5, scale=1.7, across_processes=across)
    loss.backward()
    return loss.detach(), views.grad


def _bn_step(images: torch.Tensor, weight: torch.Tensor) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    bn = convert_sync_batchnorm(nn.Sequential(nn.BatchNorm2d(C)))
    with torch.no_grad():
        bn[0].weight.uniform_(0.5, 1.5)
        bn[0].bias.uniform_(-0.5, 0.5)
    x = images.clone().requires_grad_(True)
    out = bn(x)
    (out * weight).sum().backward()
    return {
        "out": out.detach(),
        "x_grad": x.grad,
        "w_grad": bn[0].weight.grad,
        "b_grad": bn[0].bias.grad,
        "running_mean": bn[0].running_mean,
        "running_var": bn[0].running_var,
    }


def _worker(rank: int, world: int, store: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        data, n = _data(), N // world
        rows = slice(rank * n, (rank + 1) * n)
        loss, grad = _loss_and_grads(data["views"][:, rows], across=True)
        local_loss, _ = _loss_and_grads(data["views"][:, rows], across=False)
        # The gather's backward hands each process the gradient of every process's loss w.r.t. its rows; the
        # whole batch's loss is the mean of the processes' losses (DDP averages), hence / world.
        results = {"loss": loss, "local_loss": local_loss, "grad": grad / world}
        # An attack's loss: this process's share of the whole batch's; its input gradient needs no averaging.
        results["share_loss"], results["share_grad"] = _loss_and_grads(data["views"][:, rows], across="share")
        bn = _bn_step(data["images"][rows], data["weight"][rows])
        # The parameter gradients are per process: summed over processes they are the whole batch's.
        for key in ("w_grad", "b_grad"):
            dist.all_reduce(bn[key])
        results.update({f"bn_{k}": v for k, v in bn.items()})
        results["gathered"] = gather_with_grad(torch.full((2,), float(rank)))
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()
    end_spawned_worker()


def test_two_processes_equal_one_with_the_whole_batch(tmp_path):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.start_processes(_worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, start_method="spawn")
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    data = _data()

    loss, grad = _loss_and_grads(data["views"], across=False)
    # Each process's loss is the mean over its own anchors; their mean is the whole batch's loss.
    assert torch.allclose((ranks[0]["loss"] + ranks[1]["loss"]) / 2, loss, atol=1e-6)
    assert torch.allclose(torch.cat([r["grad"] for r in ranks], dim=1), grad, atol=1e-6)
    # "share" (attacks): the processes' losses sum to the whole batch's, and each process's gradient w.r.t. its rows
    # is the whole batch's loss's, as it is (nothing averages an attack's input gradient over processes).
    assert torch.allclose(ranks[0]["share_loss"] + ranks[1]["share_loss"], loss, atol=1e-6)
    assert torch.allclose(torch.cat([r["share_grad"] for r in ranks], dim=1), grad, atol=1e-6)
    # Without the gather each process contrasts only its own 4 images: a different (smaller) loss.
    assert not torch.allclose((ranks[0]["local_loss"] + ranks[1]["local_loss"]) / 2, loss, atol=1e-3)

    whole = _bn_step(data["images"], data["weight"])
    for key in ("out", "x_grad"):
        assert torch.allclose(torch.cat([r[f"bn_{key}"] for r in ranks]), whole[key], atol=1e-5), key
    for rank in ranks:
        for key in ("w_grad", "b_grad", "running_mean", "running_var"):
            assert torch.allclose(rank[f"bn_{key}"], whole[key], atol=1e-5), key
    assert ranks[0]["gathered"].tolist() == ranks[1]["gathered"].tolist() == [0.0, 0.0, 1.0, 1.0]


def test_sync_batchnorm_is_plain_batchnorm_in_one_process_and_keeps_the_state_dict():
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(64, 6), nn.BatchNorm1d(6))
    keys = plain.state_dict().keys()
    reference = {k: v.clone() for k, v in plain.state_dict().items()}
    x = torch.randn(5, 3, 6, 6)
    expected = plain(x)
    plain.load_state_dict(reference)
    converted = convert_sync_batchnorm(plain)
    assert isinstance(converted[1], SyncBatchNorm) and isinstance(converted[4], SyncBatchNorm)
    assert converted.state_dict().keys() == keys
    assert torch.equal(converted(x), expected)
