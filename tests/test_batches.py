import pytest
import torch

from robustcl.attacks import pgd_attack
from robustcl.data.augment import SimCLRAugment, SimCLRAugmentParams, WeakAugment, WeakAugmentParams
from robustcl.data.batches import BatchRandom, EpochBatches, batch_random
from robustcl.errors import UserError


def test_each_image_once_per_epoch_across_processes_and_micro_batches():
    n, batch = 103, 24  # 4 steps per epoch, 7 images dropped
    shards = [EpochBatches(n, batch, seed=3, num_processes=2, process_index=r, grad_accum=2) for r in range(2)]
    assert shards[0].steps_per_epoch == 4 and shards[0].micro_batch == 6
    for epoch in range(2):
        seen = torch.cat([s.indices(epoch * 4 + k, m) for k in range(4) for s in shards for m in range(2)])
        assert len(seen) == 96 and len(set(seen.tolist())) == 96
    e0 = torch.cat([shards[0].indices(k) for k in range(4)])
    e1 = torch.cat([shards[0].indices(4 + k) for k in range(4)])
    assert not torch.equal(e0, e1)  # reshuffled per epoch


def test_order_is_a_function_of_seed_and_step_only():
    a = EpochBatches(50, 10, seed=1)
    b = EpochBatches(50, 10, seed=1)
    assert torch.equal(a.indices(7), b.indices(7))  # b jumps straight to step 7, as a resumed run does
    assert not torch.equal(a.indices(7), EpochBatches(50, 10, seed=2).indices(7))
    r1 = batch_random(0, 5, 0, torch.device("cpu"), local=3)
    r2 = batch_random(0, 5, 0, torch.device("cpu"), local=3)
    assert torch.equal(r1.rand((3,)), r2.rand((3,)))
    assert not torch.equal(r1.rand((3,)), batch_random(0, 6, 0, torch.device("cpu"), local=3).rand((3,)))


def _shares(processes: int, local: int, step: int = 2) -> list[BatchRandom]:
    cpu = torch.device("cpu")
    return [batch_random(7, step, 0, cpu, local, process_index=r, num_processes=processes) for r in range(processes)]


def test_an_image_gets_the_same_random_numbers_on_any_process():
    (whole,) = _shares(1, 12)
    halves = _shares(2, 6)
    # Two stacked views ([view 1; view 2] of the local images): each view's rows come from that view's global draw.
    expected = whole.rand((24, 5)).view(2, 12, 5)
    got = torch.stack([h.rand((12, 5)).view(2, 6, 5) for h in halves], dim=1).view(2, 12, 5)
    assert torch.equal(got, expected)
    assert torch.equal(torch.cat([h.randint(0, 9, (6,)) for h in halves]), whole.randint(0, 9, (12,)))
    with pytest.raises(ValueError, match="multiple of 6"):
        halves[0].rand((7,))


def test_views_and_attack_starts_of_a_split_batch_equal_the_whole_batch():
    images = torch.randint(0, 256, (8, 3, 12, 12), dtype=torch.uint8)
    simclr = SimCLRAugment(SimCLRAugmentParams(size=12))
    weak = WeakAugment(WeakAugmentParams(size=12, padding=2))

    def run(x: torch.Tensor, random: BatchRandom) -> list[torch.Tensor]:
        views = torch.cat([simclr(x, random), simclr(x, random)])
        start = pgd_attack(lambda v: v.sum(), views, epsilon=0.1, step_size=0.0, steps=0, random=random)
        return [views, start, weak(x, random)]

    (whole,) = _shares(1, 8)
    one = run(images, whole)
    parts = [run(images[r * 4 : (r + 1) * 4], share) for r, share in enumerate(_shares(2, 4))]
    stacked = [torch.cat([p[k].view(-1, 4, 3, 12, 12) for p in parts], dim=1).flatten(0, 1) for k in range(3)]
    for a, b in zip(one, stacked):
        assert torch.allclose(a, b, atol=1e-6)


def test_bad_batch_sizes_are_user_errors():
    with pytest.raises(UserError, match="training.batch_size"):
        EpochBatches(100, 10, seed=0, num_processes=3)
    with pytest.raises(UserError, match="fewer than one batch"):
        EpochBatches(5, 10, seed=0)
