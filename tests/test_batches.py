import pytest
import torch

from robustcl.data.batches import EpochBatches, step_generator
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
    g1 = step_generator(0, 5, 0, 0, torch.device("cpu"))
    g2 = step_generator(0, 5, 0, 0, torch.device("cpu"))
    assert torch.equal(torch.rand(3, generator=g1), torch.rand(3, generator=g2))


def test_bad_batch_sizes_are_user_errors():
    with pytest.raises(UserError, match="training.batch_size"):
        EpochBatches(100, 10, seed=0, num_processes=3)
    with pytest.raises(UserError, match="fewer than one batch"):
        EpochBatches(5, 10, seed=0)
