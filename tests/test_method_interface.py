"""The seams between the trainer and a method: a method sees no processes (the trainer shards its dataset passes),
``after_step`` follows every applied update and no skipped one, DynACL's moving average lives there and equals the
authors' update, and the trainer's messages about frozen networks name what the method declares."""

from __future__ import annotations

import ast
import copy
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate.utils import DistributedType
from helpers import REPO

from robustcl.data.images import DecodedImages
from robustcl.errors import UserError
from robustcl.methods import build_method
from robustcl.recipe import load_recipe

QUICKSTART = REPO / "recipes" / "quickstart.yaml"
SMALL = [
    "model.widths=[8,8,8,8]",
    "data.resolution=8",
    "data.max_samples=64",
    "training.batch_size=16",
    "attack.steps=1",
    "eval.after_pretrain=false",
    "logging.progress_bar=false",
    "logging.trackers=[]",
]

# What reads processes: the accelerator, ranks, barriers, torch.distributed and robustcl's own process helpers.
PROCESS_NAMES = {
    "accelerator", "Accelerator", "process_index", "local_process_index", "is_main_process",
    "is_local_main_process", "wait_for_everyone", "num_processes", "get_rank", "get_world_size", "ProcessGroup",
    "node_main_first", "distributed",
}  # fmt: skip
PROCESS_MODULES = ("torch.distributed", "accelerate", "robustcl.distributed", "distributed")


def _process_references(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        names: list[str] = []
        if isinstance(node, ast.Name):
            names = [node.id]
        elif isinstance(node, ast.Attribute):
            names = [node.attr]
        elif isinstance(node, ast.arg):
            names = [node.arg]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module or "", *(a.name for a in node.names)]
        for name in names:
            if name in PROCESS_NAMES or name.startswith(PROCESS_MODULES):
                found.append(f"{path.name}:{node.lineno} {name}")
    return found


def test_no_method_reads_processes():
    """A method is single-process code: what needs the processes (a sharded pass over the images, a file written
    once, a download once per machine) goes through the setup context the trainer gives it."""
    files = sorted((REPO / "robustcl" / "methods").glob("*.py"))
    assert len(files) >= 6
    found = [ref for path in files for ref in _process_references(path)]
    assert not found, f"methods/ reads processes: {found}"


def _session(tmp_path: Path, recipe_file: Path, *sets: str):
    from robustcl.train import open_session

    return open_session(load_recipe(recipe_file, [*SMALL, *sets]), tmp_path / "run", resume=False)


def _nan_at(method: torch.nn.Module, bad_step: int) -> None:
    """Make the method's loss NaN at optimizer step ``bad_step`` (its gradients follow)."""
    forward = method.forward

    def poisoned(images, random, indices, step):
        loss, metrics = forward(images, random, indices, step)
        return (loss * float("nan") if step == bad_step else loss), metrics

    method.forward = poisoned


def test_after_step_follows_each_applied_update_and_no_skipped_step(tmp_path):
    """``after_step(step)`` is called once per optimizer step whose update was applied, with that step, after the
    weights changed; a step skipped for a NaN loss (training.nonfinite: skip) gets none."""
    from robustcl.train import train_step

    session = _session(tmp_path, QUICKSTART, "training.nonfinite=skip")
    method = session.method
    weight = next(method.encoder.parameters())
    calls: list[tuple[int, bool]] = []
    before_step: list[torch.Tensor] = []
    method.after_step = lambda step: calls.append((step, not torch.equal(weight, before_step[-1])))
    _nan_at(method, bad_step=1)
    session.model.train()
    try:
        for step in range(3):
            before_step.append(weight.detach().clone())
            finite = train_step(session, step) is not None
            assert finite == (step != 1)
    finally:
        session.close()
    assert calls == [(0, True), (2, True)]


def _parameters(*modules: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for m in modules for p in m.parameters()]


def test_dynacl_momentum_network_is_the_ema_of_the_online_weights_each_step_saw(tmp_path):
    """Over several real training steps of two micro-batches each: every forward of a step (attack and loss, both
    micro-batches) goes through the moving-average network as it was before the step, and after the step it is
    m·k + (1 − m)·q with q the online weights before the update, the authors' order (PKU-ML/DYNACL updates between
    the forward and the optimizer step). A skipped step leaves it as it was."""
    from robustcl.train import train_step

    sets = ["data.path=builtin:digits", "model.block_layers=[1,1,1,1]", "training.micro_batch_size=8"]
    session = _session(tmp_path, REPO / "recipes" / "dynacl.yaml", *sets, "training.nonfinite=skip")
    method = session.method
    m = method.momentum
    online, ema = (method.encoder, method.projector), (method.momentum_encoder, method.momentum_projector)
    seen: list[torch.Tensor] = []
    method.momentum_encoder.register_forward_pre_hook(lambda module, args: seen.append(_parameters(module)[0]))
    _nan_at(method, bad_step=3)
    expected = _parameters(*ema)
    session.model.train()
    try:
        for step in range(4):
            before, start, seen[:] = _parameters(*online), _parameters(*ema), []
            finite = train_step(session, step) is not None
            assert finite == (step != 3)
            assert len(seen) >= 4 and all(torch.equal(k, start[0]) for k in seen), step
            if finite:
                assert not torch.equal(before[0], _parameters(*online)[0])  # the update happened
                expected = [m * k + (1 - m) * q for k, q in zip(expected, before)]
            got = _parameters(*ema)
            for k, want in zip(got, expected):
                torch.testing.assert_close(k, want, rtol=1e-6, atol=1e-7)
    finally:
        session.close()


def _deepspeed_accelerator(stage: int) -> SimpleNamespace:
    plugin = SimpleNamespace(deepspeed_config={"zero_optimization": {"stage": stage}})
    return SimpleNamespace(distributed_type=DistributedType.DEEPSPEED, state=SimpleNamespace(deepspeed_plugin=plugin))


def _slow_copy_method(recipe):
    """A method defined here: its encoder and a frozen copy kept in its weights, and a frozen network outside them."""
    from robustcl.methods.base import Method, encoder_config
    from robustcl.models import RobustCLResNetModel

    class SlowCopy(Method):
        display_name = "SlowCopy"

        def __init__(self, recipe) -> None:
            super().__init__(recipe)
            self.bn_branches = []
            self.encoder = RobustCLResNetModel(encoder_config(recipe.model, []))
            self.slow_encoder = copy.deepcopy(self.encoder).requires_grad_(False)
            self._outside = [copy.deepcopy(self.encoder).requires_grad_(False)]

        def frozen_networks(self):
            return {"slow_encoder": self.slow_encoder, "reference": self._outside[0]}

    return SlowCopy(recipe)


def test_zero3_refuses_the_frozen_networks_a_method_declares_by_their_names():
    """The trainer names the networks the method declares frozen (those in its weights, which ZeRO-3 partitions),
    whatever the method; a frozen parameter no declaration covers is a method's bug, caught before training."""
    from robustcl.deepspeed_support import configure_deepspeed
    from robustcl.train import frozen_in_weights

    recipe = load_recipe(QUICKSTART, [*SMALL, "optimizer.name=sgd"])
    method = _slow_copy_method(recipe)
    frozen = frozen_in_weights(method)
    assert frozen == ["slow_encoder"]  # the network outside the weights is not partitioned
    configure_deepspeed(_deepspeed_accelerator(2), recipe, 8, 1, frozen)
    with pytest.raises(UserError) as err:
        configure_deepspeed(_deepspeed_accelerator(3), recipe, 8, 1, frozen)
    message = str(err.value)
    assert "(slow_encoder)" in message and "ZeRO stage 3" in message and "launch/zero2.json" in message
    assert "DynACL" not in message and "momentum" not in message and "\n" not in message

    dynacl = build_method(load_recipe(REPO / "recipes" / "dynacl.yaml", SMALL))
    assert frozen_in_weights(dynacl) == ["momentum_encoder", "momentum_projector"]
    next(method.encoder.parameters()).requires_grad_(False)  # frozen, but declared nowhere
    with pytest.raises(RuntimeError, match="outside the networks its frozen_networks"):
        frozen_in_weights(method)


def test_a_methods_dataset_pass_in_one_process_is_robustcl_clusters(tmp_path):
    """AdvCL's clustering through a single-process setup context writes the labels ``robustcl cluster`` computes
    from the same encoder and images."""
    from safetensors.torch import load_file

    from robustcl.encoder_loading import load_encoder
    from robustcl.models import RobustCLResNetConfig, RobustCLResNetModel
    from robustcl.pseudo_labels import compute_pseudo_labels
    from robustcl.setup_context import SetupContext

    torch.manual_seed(0)
    encoder = RobustCLResNetModel(RobustCLResNetConfig(block_layers=[1, 1, 1, 1], widths=[8, 8, 8, 8]))
    encoder.save_pretrained(tmp_path / "encoder")
    images = DecodedImages(torch.randint(0, 256, (40, 3, 12, 12), dtype=torch.uint8))
    sets = ["method.name=advcl", "method.advcl.clusters=[2,5]", f"method.advcl.cluster_encoder={tmp_path / 'encoder'}"]
    method = build_method(load_recipe(QUICKSTART, [*SMALL, *sets]))
    method.setup(SetupContext(tmp_path / "run", images, steps_per_epoch=2, total_steps=4, progress=False))
    written = load_file(tmp_path / "run" / "pseudo_labels.safetensors")
    cluster_encoder = load_encoder(str(tmp_path / "encoder")).encoder  # as robustcl cluster loads it
    reference = compute_pseudo_labels(cluster_encoder, "x", images, [2, 5], device=torch.device("cpu"), progress=False)
    assert written.keys() == {"k2", "k5"}
    assert all(torch.equal(written[f"k{k}"], labels) for k, labels in reference.labels.items())
    assert torch.equal(method.pseudo_labels, torch.stack([reference.labels[2], reference.labels[5]]))
