"""RoCL: one training step against the authors' step, written out again here from Kim-Minseon/RoCL (read at its
default branch, not copied): src/rocl_train.py ``train`` (the batch [view 1, view 2, adversarial view], loss =
contrastive + regulariser), src/attack_lib.py ``RepresentationAdv.get_loss`` (the instance-wise attack in eval
mode and the regulariser in train mode), src/loss.py ``pairwise_similarity`` (norm + 1e-8, the detached right factor)
and ``NT_xent`` ('None', 'Rep'), src/models/resnet.py (no normalisation, one BN) and src/models/projector.py.
How the comparison works: tests/test_reference_parity.py's docstring and tests/parity.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from parity import WIDTHS, RefResNet, Step, assert_same_buffers, assert_same_step, common, load_reference
from torch import nn

# argument.py parser(): --epsilon 0.0314, --alpha 0.007, --k 7, --lamda 256, --temperature 0.5 (the attack's and
# the regulariser's 0.5 are written into attack_lib.py).
EPSILON, ALPHA, STEPS, LAMDA, TEMPERATURE = 0.0314, 0.007, 7, 256.0, 0.5
HIDDEN, OUT = 32, 8  # projector.py's 2048 and 128, at this test's width


class RefRoCLNet(nn.Module):
    """The authors' ResNet (no input normalisation, one BatchNorm per layer) and their ``Projector``
    (Linear → ReLU → Linear, both with bias), applied one after the other as rocl_train.py does."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = RefResNet([], [0.0] * 3, [1.0] * 3)
        self.projector = nn.Sequential(nn.Linear(WIDTHS[-1], HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, OUT))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projector(self.backbone(x))


TABLE = [("encoder.backbone.", "backbone."), ("projector.fc1.", "projector.0."), ("projector.fc2.", "projector.2.")]


def similarity(outputs: torch.Tensor, detach: bool) -> torch.Tensor:
    """``pairwise_similarity``: rows divided by (their norm + 1e-8), the matrix of their dot products over the
    temperature; the authors detach the right factor (``detach`` False: the paper's, for the option's test)."""
    unit = outputs / (outputs.norm(dim=1, keepdim=True) + 1e-8)
    right = unit.t().detach() if detach else unit.t()
    return unit @ right / TEMPERATURE


def rocl_nt_xent(sim: torch.Tensor, views: int) -> torch.Tensor:
    """``NT_xent`` for 'None' (2 views) and 'Rep' (3): exp of the similarities with the diagonal zeroed; row-wise
    probabilities (row sum + 1e-8), −log(p + 1e-8); the sum of the blocks' diagonals for every ordered pair of
    distinct views, divided by the row count."""
    rows = len(sim)
    n = rows // views
    e = torch.exp(sim) * (1 - torch.eye(rows))
    nll = -torch.log(e / (e.sum(dim=1, keepdim=True) + 1e-8) + 1e-8)
    blocks = [nll[a * n : (a + 1) * n, b * n : (b + 1) * n] for a in range(views) for b in range(views) if a != b]
    return sum(block.diagonal().sum() for block in blocks) / rows


def rocl_reference(step: Step, opts: dict) -> tuple[torch.Tensor, RefRoCLNet]:
    """rocl_train.py's step: ``Rep.get_loss`` attacks view 1 (x = clamp(view 1 + U(−ε, ε), 0, 1), then 7 times
    x += α·sign(∇x NT_xent([x; target])), clamp to [0, 1], project onto view 1's ε-ball; model and projector in eval
    mode), then in train mode the regulariser NT_xent([x; view 2 or 1]) / lamda; then one train-mode pass of
    [view 1; view 2; x] and NT_xent 'Rep' + the regulariser."""
    net = load_reference(RefRoCLNet(), step.before, TABLE, [])
    view1 = step.method.augment(step.images, step.random)
    view2 = step.method.augment(step.images, step.random)
    target = view2 if opts["attack_to"] == "other" else view1
    detach = opts["detach_keys"]
    # uniform_(−ε, ε) as robustcl rounds it (parity.pgd_start says why), at RoCL's ε.
    x = (view1 + (step.noise(view1) * 2 - 1) * EPSILON).clamp(0, 1)
    net.eval()
    for _ in range(STEPS):
        x.requires_grad_(True)
        (grad,) = torch.autograd.grad(rocl_nt_xent(similarity(net(torch.cat([x, target])), detach), 2), x)
        x = (x.detach() + ALPHA * grad.sign()).clamp(0, 1)
        x = torch.max(torch.min(x, view1 + EPSILON), view1 - EPSILON)
    net.train()
    paired = view2 if opts["regularize_to"] == "other" else view1
    regularizer = rocl_nt_xent(similarity(net(torch.cat([x, paired])), detach), 2) / LAMDA
    loss = rocl_nt_xent(similarity(net(torch.cat([view1, view2, x])), detach), 3) + regularizer
    loss.backward()
    return loss, net


AUTHORS = {"attack_to": "other", "regularize_to": "other", "detach_keys": True}
OTHERS = {"attack_to": "original", "regularize_to": "original", "detach_keys": False}


def rocl_sets(parity_data: Path, opts: dict) -> list[str]:
    return [
        *common(parity_data), "method.name=rocl", f"method.temperature={TEMPERATURE}", f"method.rocl.lamda={LAMDA}",
        *(f"method.rocl.{key}={value}" for key, value in opts.items()),
        f"method.rocl.projector_hidden_dim={HIDDEN}", f"method.rocl.projector_dim={OUT}",
        f"attack.epsilon={EPSILON}", f"attack.step_size={ALPHA}", f"attack.steps={STEPS}", "attack.clamp_start=true",
        "attack.bn_mode=eval", "model.image_mean=[0.0,0.0,0.0]", "model.image_std=[1.0,1.0,1.0]",
        "model.stem_padding=1",
    ]  # fmt: skip


@pytest.mark.parametrize("opts", [AUTHORS, OTHERS], ids=["authors", "paper-options"])
def test_rocl_step_equals_the_authors_representation_attack_step(tmp_path, parity_data, opts):
    """RoCL: same loss and gradients as Kim-Minseon/RoCL's step (view 1 attacked 7 steps against view 2 in eval
    mode, regulariser / 256 and the three-view loss in train mode, anchor-side gradients only), and the same BN
    statistics after it (two train-mode passes, the regulariser's first). The second case turns every option to its
    other value (attack and regulariser against view 1's clean image, gradients through both sides)."""
    step = Step(tmp_path, "rocl.yaml", rocl_sets(parity_data, opts), step=1)
    loss, net = rocl_reference(step, opts)
    assert_same_step(step, loss, net, TABLE, [])
    assert_same_buffers(step.method.state_dict(), net, TABLE, [])
