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
from robustcl.methods import METHODS, TrainingRun, build_method
from robustcl.models import RobustCLResNetModel
from robustcl.pseudo_labels import PseudoLabels, save_pseudo_labels
from robustcl.recipe import load_recipe
from robustcl.train import load_encoder

SMALL = ["model.widths=[8,16,32,64]", "model.block_layers=[1,1,1,1]", "data.resolution=16"]
NO_ATTACK = ["attack.steps=0", "attack.epsilon=0"]


def _recipe(name, *sets):
    return load_recipe(f"recipes/{name}.yaml", [*SMALL, *sets])


def _images(n=8, seed=0):
    return torch.randint(0, 256, (n, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def _run(tmp_path, images, steps_per_epoch=1, total_steps=1):
    return TrainingRun(tmp_path, DecodedImages(images), steps_per_epoch, total_steps, load_encoder=load_encoder)


def test_registry_names_every_method_with_its_paper():
    assert set(METHODS) == {"acl", "simclr", "advcl", "deacl", "dynacl"}
    for name, cls in METHODS.items():
        assert cls.paper is not None and cls.paper.url.startswith("https://arxiv.org/")
        assert cls.display_name.lower() == name
    assert [n for n, c in METHODS.items() if not c.adversarial] == ["simclr"]


def test_simclr_loss_is_nt_xent_of_its_projected_views_and_it_has_no_adversary(tmp_path):
    torch.manual_seed(0)
    method = build_method(_recipe("simclr")).train()
    assert method.projector.num_layers == 2 and not method.bn_branches
    images = _images()
    loss, _ = method(images, torch.Generator().manual_seed(1), torch.arange(8), 0)
    g = torch.Generator().manual_seed(1)
    views = torch.cat([method.augment(images, g), method.augment(images, g)])
    z1, z2 = method.projector(method.encoder(views).pooler_output).chunk(2)
    assert torch.isclose(loss, nt_xent(z1, z2, 0.2))


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
    method.setup(TrainingRun(None, DecodedImages(_images()), steps_per_epoch=10, total_steps=10_000))  # 1000 epochs
    for epoch in [0, 1, 48, 49, 50, 51, 99, 100, 500, 949, 950, 999]:
        for step in (epoch * 10, epoch * 10 + 9):
            assert math.isclose(method.strength(step), _reference_strength(epoch + 1, 1000, 50)), epoch
            assert math.isclose(method.adversarial_weight(step), _reference_weight(epoch + 1, 1000, 50)), epoch
    assert math.isclose(method.strength(9999), 0.05) and math.isclose(method.adversarial_weight(9999), 1 + 2 / 3)


def test_dynacl_momentum_encoder_is_an_ema_of_the_online_one_and_not_trained():
    torch.manual_seed(0)
    method = build_method(_recipe("dynacl", *NO_ATTACK)).train()
    method.setup(TrainingRun(None, DecodedImages(_images()), steps_per_epoch=10, total_steps=100))
    with torch.no_grad():
        for p in method.encoder.parameters():
            p.add_(torch.randn_like(p))
    online = [p.detach().clone() for p in method.encoder.parameters()]
    ema = [p.detach().clone() for p in method.momentum_encoder.parameters()]
    loss, _ = method(_images(), torch.Generator().manual_seed(1), torch.arange(8), 0)
    for q_before, p, q in zip(ema, online, method.momentum_encoder.parameters()):
        torch.testing.assert_close(q, 0.99 * q_before + 0.01 * p)
    loss.backward()
    assert all(p.grad is None for p in method.momentum_encoder.parameters())
    # A second micro-batch of the same optimizer step does not move it again.
    before = [p.clone() for p in method.momentum_encoder.parameters()]
    method(_images(), torch.Generator().manual_seed(2), torch.arange(8), 0)
    assert all(torch.equal(a, b) for a, b in zip(before, method.momentum_encoder.parameters()))


def test_dynacl_without_momentum_starts_as_acl_ds():
    torch.manual_seed(0)
    dyn = build_method(_recipe("dynacl", "method.dynacl.momentum=null", "attack.steps=2")).train()
    dyn.setup(TrainingRun(None, DecodedImages(_images()), steps_per_epoch=10, total_steps=10_000))
    acl = build_method(load_recipe("recipes/acl.yaml", [*SMALL, "attack.steps=2"])).train()
    acl.setup(TrainingRun(None, DecodedImages(_images()), steps_per_epoch=10, total_steps=10_000))
    acl.load_state_dict(dyn.state_dict())
    images = _images()
    loss_dyn, _ = dyn(images, torch.Generator().manual_seed(1), torch.arange(8), 0)  # strength 1, weight 1
    loss_acl, _ = acl(images, torch.Generator().manual_seed(1), torch.arange(8), 0)
    assert torch.isclose(loss_dyn, loss_acl, rtol=1e-5)
    # Late in training the views are weaker and the adversarial term weighs more.
    assert dyn.strength(9_999) < 0.1 and dyn.adversarial_weight(9_999) > 1.6
