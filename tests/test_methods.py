"""Each method's loss on a tiny batch against an independent computation, and the properties its paper relies on."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from robustcl.data.frequency import high_frequency
from robustcl.data.images import DecodedImages
from robustcl.errors import UserError
from robustcl.fingerprint import images_fingerprint
from robustcl.losses import multi_positive_nt_xent, nt_xent
from robustcl.method_registry import METHODS
from robustcl.methods import build_method, method_class
from robustcl.models import RobustCLResNetModel
from robustcl.pseudo_labels import PseudoLabels, save_pseudo_labels
from robustcl.recipe import load_recipe
from robustcl.setup_context import SetupContext

SMALL = ["model.widths=[8,16,32,64]", "model.block_layers=[1,1,1,1]", "data.resolution=16"]
NO_ATTACK = ["attack.steps=0", "attack.epsilon=0"]


def _recipe(name, *sets):
    return load_recipe(f"recipes/{name}.yaml", [*SMALL, *sets])


def _images(n=8, seed=0):
    return torch.randint(0, 256, (n, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def _run(tmp_path, images, steps_per_epoch=1, total_steps=1):
    return SetupContext(tmp_path, DecodedImages(images), steps_per_epoch, total_steps)


def test_registry_names_every_method_with_its_paper():
    assert set(METHODS) == {"acl", "simclr", "advcl", "deacl", "dynacl", "acl_air", "dynacl_air", "rocl", "ainfonce"}
    classes = {name: method_class(name) for name in METHODS}
    for name, cls in classes.items():
        assert cls.paper is not None and cls.paper.url.startswith("https://arxiv.org/")
        assert "".join(c for c in cls.display_name.lower() if c.isalnum()) == name.replace("_", "")  # ACL-AIR
    assert [n for n, c in classes.items() if not c.adversarial] == ["simclr"]


def test_simclr_loss_is_nt_xent_of_its_projected_views_and_it_has_no_adversary(tmp_path):
    torch.manual_seed(0)
    method = build_method(_recipe("simclr", "method.simclr.bn_per_view=false")).train()
    assert method.projector.num_layers == 2 and not method.bn_branches
    images = _images()
    loss, _ = method(images, torch.Generator().manual_seed(1), torch.arange(8), 0)
    g = torch.Generator().manual_seed(1)
    views = torch.cat([method.augments[0](images, g), method.augments[1](images, g)])
    z1, z2 = method.projector(method.encoder(views).pooler_output).chunk(2)
    assert torch.isclose(loss, nt_xent(z1, z2, 0.2))


def _has_batch_norm(module):
    return any("BatchNorm" in type(m).__name__ for m in module.modules())


def test_simclr_projector_without_bn_is_solo_learns_linear_relu_linear_and_the_loss_stays_nt_xent():
    """method.simclr.projector_bn: false is solo-learn's projector (solo/methods/simclr.py): Linear → ReLU → Linear,
    both with biases, no BatchNorm; the shipped recipe uses it, and the loss is NT-Xent of its outputs."""
    assert load_recipe("recipes/simclr.yaml").method.simclr.projector_bn is False
    torch.manual_seed(0)
    method = build_method(_recipe("simclr", "method.simclr.projector_bn=false")).train()
    head = method.projector
    assert not _has_batch_norm(head)
    assert [n for n, _ in head.named_parameters()] == ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]
    assert (head.fc1.in_features, head.fc1.out_features, head.fc2.out_features) == (64, 2048, 256)
    x = torch.randn(4, 64)
    assert torch.equal(head(x), head.fc2(torch.relu(head.fc1(x))))
    images = _images()
    loss, _ = method(images, torch.Generator().manual_seed(1), torch.arange(8), 0)
    g = torch.Generator().manual_seed(1)
    views = [method.augments[0](images, g), method.augments[1](images, g)]
    z1, z2 = (head(method.encoder(v).pooler_output) for v in views)  # the recipe encodes each view alone
    assert torch.isclose(loss, nt_xent(z1, z2, 0.2))


def test_simclr_projector_bn_defaults_to_the_bn_projector_of_earlier_runs():
    # Runs recorded before the key existed re-read their recipe with the default: it must build their projector.
    method = build_method(_recipe("simclr", "method.simclr.projector_bn=true"))
    assert _has_batch_norm(method.projector) and hasattr(method.projector, "bn1")
    assert load_recipe("recipes/quickstart.yaml", ["method.name=simclr"]).method.simclr.projector_bn is True


def test_simclr_bn_per_view_encodes_each_view_alone_as_solo_learn():
    """method.simclr.bn_per_view: each view is its own forward pass (solo-learn BaseMethod.training_step), so its
    BatchNorm statistics are the view's own; the recipe follows solo-learn, the default keeps one 2N pass."""
    assert load_recipe("recipes/simclr.yaml").method.simclr.bn_per_view is True
    assert load_recipe("recipes/quickstart.yaml", ["method.name=simclr"]).method.simclr.bn_per_view is False
    torch.manual_seed(0)
    method = build_method(_recipe("simclr", "method.simclr.bn_per_view=true")).train()
    images = _images()
    loss, _ = method(images, torch.Generator().manual_seed(1), torch.arange(8), 0)
    g = torch.Generator().manual_seed(1)
    views = [method.augments[0](images, g), method.augments[1](images, g)]
    z1, z2 = (method.projector(method.encoder(v).pooler_output) for v in views)
    assert torch.isclose(loss, nt_xent(z1, z2, 0.2))
    joint = method.projector(method.encoder(torch.cat(views)).pooler_output).chunk(2)
    assert not torch.isclose(loss, nt_xent(*joint, 0.2))


def test_simclr_blurs_and_solarises_each_view_with_its_own_probability():
    """augment.blur_p / solarize_p [p1, p2]: view 1 with p1, view 2 with p2 (solo-learn's per-view pipelines)."""
    no_op = ["augment.crop_scale=[1.0, 1.0]", "augment.crop_ratio=[1.0, 1.0]", "augment.flip_p=0.0"]
    no_op += ["augment.jitter_p=0.0", "augment.grayscale_p=0.0", "augment.solarize_p=[0.0, 1.0]"]
    no_op += ["augment.blur_p=[1.0, 0.0]", "augment.blur_sigma=[0.5, 1.5]"]
    method = build_method(_recipe("simclr", *no_op))
    assert [a.params.solarize_p for a in method.augments] == [0.0, 1.0]
    assert [(a.params.blur_p, a.params.blur_sigma) for a in method.augments] == [(1.0, (0.5, 1.5)), (0.0, (0.5, 1.5))]
    images = _images()
    g = torch.Generator().manual_seed(3)
    first, second = method.augments[0](images, g), method.augments[1](images, g)
    x = images.float() / 255

    def variation(v):
        return (v[..., 1:] - v[..., :-1]).abs().mean(dim=(1, 2, 3))

    assert (variation(first) < 0.8 * variation(x)).all()  # every image blurred
    assert ((first - x).mean(dim=(1, 2, 3)).abs() < 0.02).all()  # and none solarised
    assert torch.allclose(second, torch.where(images >= 128, 1 - x, x), atol=1e-6, rtol=0)


def _advcl(tmp_path, images, *sets):
    labels = {k: torch.randint(0, k, (len(images),), generator=torch.Generator().manual_seed(k)) for k in (2, 10)}
    found = PseudoLabels(labels, images_fingerprint(images), "x", 0, True)
    path = save_pseudo_labels(tmp_path / "labels.safetensors", found)
    recipe = _recipe("advcl", "method.advcl.clusters=[2,10]", f"method.advcl.pseudo_labels={path}", *sets)
    method = build_method(recipe).train()
    method.setup(_run(tmp_path, images))
    return method, labels


def test_advcl_loss_is_four_view_supcon_plus_pseudo_label_cross_entropy(tmp_path):
    torch.manual_seed(0)
    images = _images()
    method, labels = _advcl(tmp_path, images, *NO_ATTACK)  # no attack: x_cl = x_ce = the weak view
    indices = torch.tensor([3, 1, 4, 0, 5, 2, 7, 6])
    loss, metrics = method(images, torch.Generator().manual_seed(1), indices, 0)

    g = torch.Generator().manual_seed(1)
    x1, x2, weak = method.augment(images, g), method.augment(images, g), method.weak(images, g)

    def z(x, branch):
        return F.normalize(method.projector(method.encoder(x, bn_branch=branch).pooler_output), dim=1)

    hf = high_frequency(weak, 8)
    contrastive = multi_positive_nt_xent([z(weak, "pgd"), z(x1, "normal"), z(x2, "normal"), z(hf, "normal")], 0.5)
    features = method.encoder(weak, bn_branch="pgd_ce").pooler_output
    ce = [F.cross_entropy(method.pseudo_heads[f"k{k}"](features), labels[k][indices]) for k in (2, 10)]
    expected = (0.5 / 0.07) * contrastive + 0.2 * (ce[0] + ce[1]) / 2
    assert torch.isclose(loss, expected, rtol=1e-5)
    assert torch.isclose(metrics["loss_contrastive"], (0.5 / 0.07) * contrastive, rtol=1e-5)


def test_advcl_attacks_raise_both_of_their_losses(tmp_path):
    torch.manual_seed(0)
    images = _images()
    method, _ = _advcl(tmp_path, images, "attack.steps=3", "attack.epsilon=16/255", "attack.step_size=4/255")
    clean, _ = _advcl(tmp_path / "clean", images, *NO_ATTACK)
    clean.load_state_dict(method.state_dict())
    _, attacked = method(images, torch.Generator().manual_seed(1), torch.arange(8), 0)
    _, unattacked = clean(images, torch.Generator().manual_seed(1), torch.arange(8), 0)
    assert attacked["loss_contrastive"] > unattacked["loss_contrastive"]
    assert attacked["loss_pseudo_label"] > unattacked["loss_pseudo_label"]


def test_advcl_refuses_labels_of_other_images(tmp_path):
    images = _images()
    method, _ = _advcl(tmp_path, images)
    with pytest.raises(UserError, match="computed on other images"):
        method.setup(_run(tmp_path, _images(seed=1)))
    labels_file = tmp_path / "labels.safetensors"
    bad = _recipe("advcl", "method.advcl.clusters=[2,50]", f"method.advcl.pseudo_labels={labels_file}")
    with pytest.raises(UserError, match=r"no labels for K = \[50\]"):
        build_method(bad).setup(_run(tmp_path, images))
    with pytest.raises(UserError, match="needs pseudo-labels"):
        build_method(_recipe("advcl", "method.advcl.cluster_encoder=null")).setup(_run(tmp_path, images))


def _teacher(tmp_path):
    torch.manual_seed(5)
    encoder = build_method(load_recipe("recipes/simclr.yaml", SMALL)).encoder
    encoder.save_pretrained(tmp_path / "teacher")
    return tmp_path / "teacher"


def test_deacl_student_starts_as_the_teacher_which_gets_no_gradient_and_never_changes(tmp_path):
    teacher_dir = _teacher(tmp_path)
    method = build_method(_recipe("deacl", f"method.deacl.teacher={teacher_dir}", "attack.steps=2")).train()
    method.setup(_run(tmp_path, _images()))
    teacher = method.teacher
    saved = RobustCLResNetModel.from_pretrained(teacher_dir).state_dict()
    assert all(torch.equal(v, method.encoder.state_dict()[k]) for k, v in saved.items())
    assert not any(p is q for p in method.parameters() for q in teacher.parameters())  # not trained by the optimizer

    optimizer = torch.optim.SGD(method.parameters(), lr=0.5, momentum=0.9)
    for step in range(3):
        loss, _ = method(_images(seed=step), torch.Generator().manual_seed(step), torch.arange(8), step)
        loss.backward()
        assert all(p.grad is None for p in teacher.parameters())
        optimizer.step()
        optimizer.zero_grad()
    after = teacher.backbone.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in saved.items())  # weights and BN statistics
    assert not teacher.training
    assert not all(torch.equal(v, method.encoder.state_dict()[k]) for k, v in saved.items())  # the student learnt


def test_deacl_loss_is_minus_teacher_cosine_minus_lambda(tmp_path):
    teacher_dir = _teacher(tmp_path)
    method = build_method(_recipe("deacl", f"method.deacl.teacher={teacher_dir}", *NO_ATTACK)).train()
    method.setup(_run(tmp_path, _images()))
    images = _images()
    loss, _ = method(images, torch.Generator().manual_seed(1), torch.arange(8), 0)
    x = method.augment(images, torch.Generator().manual_seed(1))
    student = method.encoder(x).pooler_output  # [x; x] has the batch statistics of x
    expected = -F.cosine_similarity(student, method.teacher(x), dim=1).mean() - 2.0  # cos(s_adv, s) = 1
    assert torch.isclose(loss, expected, atol=1e-5)


def test_deacl_refuses_a_teacher_of_another_architecture(tmp_path):
    teacher_dir = _teacher(tmp_path)  # stem padding 2, as the recipes
    recipe = _recipe("deacl", f"method.deacl.teacher={teacher_dir}", "model.stem_padding=1")
    with pytest.raises(UserError, match=r"architecture differs from the teacher's \(model.stem_padding\)"):
        build_method(recipe).setup(_run(tmp_path, _images()))
    # The same network spelt two ways is not another architecture: null is the CIFAR stem's default padding, 1.
    torch.manual_seed(5)
    build_method(load_recipe("recipes/simclr.yaml", [*SMALL, "model.stem_padding=1"])).encoder.save_pretrained(
        tmp_path / "padding-1"
    )
    recipe = _recipe("deacl", f"method.deacl.teacher={tmp_path / 'padding-1'}", "model.stem_padding=null")
    build_method(recipe).setup(_run(tmp_path, _images()))


def _reference_strength(epoch1, total, every):  # the authors' code, 1-based epochs
    reload = (epoch1 - 1) // every * every + 1
    return 1 - (reload - 1) / total


def _reference_weight(epoch1, total, every, slope=2 / 3):
    return min(1.0 + (epoch1 // every) * (every / total) * slope, 2)


def test_dynacl_schedules_follow_the_authors_code():
    method = build_method(_recipe("dynacl"))
    method.setup(SetupContext(None, DecodedImages(_images()), steps_per_epoch=10, total_steps=10_000))  # 1000 epochs
    for epoch in [0, 1, 48, 49, 50, 51, 99, 100, 500, 949, 950, 999]:
        for step in (epoch * 10, epoch * 10 + 9):
            assert math.isclose(method.strength(step), _reference_strength(epoch + 1, 1000, 50)), epoch
            assert math.isclose(method.adversarial_weight(step), _reference_weight(epoch + 1, 1000, 50)), epoch
    assert math.isclose(method.strength(9999), 0.05) and math.isclose(method.adversarial_weight(9999), 1 + 2 / 3)


def test_dynacl_momentum_encoder_is_an_ema_of_the_online_one_and_not_trained():
    torch.manual_seed(0)
    method = build_method(_recipe("dynacl", *NO_ATTACK)).train()
    method.setup(SetupContext(None, DecodedImages(_images()), steps_per_epoch=10, total_steps=100))
    with torch.no_grad():
        for p in method.encoder.parameters():
            p.add_(torch.randn_like(p))
    online = [p.detach().clone() for p in method.encoder.parameters()]
    ema = [p.detach().clone() for p in method.momentum_encoder.parameters()]
    method.before_step(0)
    loss, _ = method(_images(), torch.Generator().manual_seed(1), torch.arange(8), 0)
    loss.backward()
    assert all(p.grad is None for p in method.momentum_encoder.parameters())
    # A second micro-batch of the same optimizer step does not move it: only the step's end does.
    method(_images(), torch.Generator().manual_seed(2), torch.arange(8), 0)
    assert all(torch.equal(a, b) for a, b in zip(ema, method.momentum_encoder.parameters()))
    method.after_step(0)
    for q_before, p, q in zip(ema, online, method.momentum_encoder.parameters()):
        torch.testing.assert_close(q, 0.99 * q_before + 0.01 * p)


def test_dynacl_without_momentum_starts_as_acl_ds():
    torch.manual_seed(0)
    dyn = build_method(_recipe("dynacl", "method.dynacl.momentum=null", "attack.steps=2")).train()
    dyn.setup(SetupContext(None, DecodedImages(_images()), steps_per_epoch=10, total_steps=10_000))
    # The same crop resampling: DynACL's recipe crops bilinearly (the authors' code), ACL's bicubically.
    acl_sets = [*SMALL, "attack.steps=2", "augment.interpolation=bilinear"]
    acl = build_method(load_recipe("recipes/acl.yaml", acl_sets)).train()
    acl.setup(SetupContext(None, DecodedImages(_images()), steps_per_epoch=10, total_steps=10_000))
    acl.load_state_dict(dyn.state_dict())
    images = _images()
    loss_dyn, _ = dyn(images, torch.Generator().manual_seed(1), torch.arange(8), 0)  # strength 1, weight 1
    loss_acl, _ = acl(images, torch.Generator().manual_seed(1), torch.arange(8), 0)
    assert torch.isclose(loss_dyn, loss_acl, rtol=1e-5)
    # Late in training the views are weaker and the adversarial term weighs more.
    assert dyn.strength(9_999) < 0.1 and dyn.adversarial_weight(9_999) > 1.6


def _dynacl_run(tmp_path, *sets):
    """A 2-step DynACL pretrain on the embedded digits (in process), exported as pretrain does at the end."""
    from helpers import TINY, call_main, with_sets

    run = tmp_path / "dynacl"
    argv = ["pretrain", "recipes/dynacl.yaml", "-o", str(run)]
    argv += with_sets(*TINY, "data.path=builtin:digits", "training.max_steps=2", "eval.after_pretrain=false", *sets)
    assert call_main(argv) == 0
    return run


@pytest.mark.parametrize("choice, attribute", [("momentum", "momentum_encoder"), ("online", "encoder")])
def test_dynacl_exports_the_encoder_its_recipe_names(tmp_path, monkeypatch, choice, attribute):
    """The authors evaluate and finetune model_encoder_k.pt (their moving-average encoder): the default export is
    that encoder, and export_encoder: online hands over the trained one instead. Both are compared with the
    checkpoint's weights, which differ after two steps (an EMA with momentum 0.99 lags the online encoder)."""
    import sys

    from safetensors.torch import load_file

    from robustcl.encoder_loading import single_branch_encoder
    from robustcl.run_dir import latest_checkpoint, read_run_recipe

    monkeypatch.setattr(sys, "argv", sys.argv)
    sets = [] if choice == "momentum" else ["method.dynacl.export_encoder=online"]
    run = _dynacl_run(tmp_path, *sets)
    method = build_method(read_run_recipe(run))
    method.load_state_dict(load_file(latest_checkpoint(run) / "model.safetensors"))
    exported = load_file(run / "encoder" / "model.safetensors")
    expected = single_branch_encoder(getattr(method, attribute), "pgd").state_dict()
    other = single_branch_encoder(method.momentum_encoder if choice == "online" else method.encoder, "pgd")
    assert exported.keys() == expected.keys()
    assert all(torch.equal(exported[k], expected[k]) for k in expected)
    assert not all(torch.equal(exported[k], v) for k, v in other.state_dict().items())


def test_dynacl_without_momentum_exports_its_only_encoder():
    """momentum: null leaves no moving-average encoder: whatever export_encoder says, the online one is handed over
    (a run's saved recipe lists every key, so refusing the combination would refuse re-reading such a run)."""
    for choice in ("momentum", "online"):
        sets = ["method.dynacl.momentum=null", f"method.dynacl.export_encoder={choice}"]
        method = build_method(_recipe("dynacl", *sets))
        assert method.downstream_encoder is method.encoder
    method = build_method(_recipe("dynacl"))
    assert method.downstream_encoder is method.momentum_encoder
