from pathlib import Path

import pytest

from robustcl.errors import UserError
from robustcl.recipe import load_recipe, recipe_differences

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def _write(tmp_path, text):
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return p


def test_shipped_recipes_load_and_acl_has_the_paper_settings():
    r = load_recipe(RECIPES / "acl.yaml")
    assert (r.method.name, r.method.acl.variant, r.method.temperature) == ("acl", "ds", 0.5)
    assert r.data.path == "uoft-cs/cifar10" and r.model.widths == [64, 128, 256, 512]
    assert (r.attack.steps, round(r.attack.epsilon * 255), round(r.attack.step_size * 255)) == (5, 8, 2)
    assert (r.optimizer.name, r.optimizer.lr, r.training.batch_size, r.training.epochs) == (
        "lars",
        5.0,
        512,
        1000,
    )
    assert r.augment.crop_scale == (0.1, 1.0)
    for path in RECIPES.glob("*.yaml"):
        load_recipe(path)


def test_overrides_convert_types_and_fractions(tmp_path):
    r = load_recipe(
        RECIPES / "acl.yaml",
        [
            "training.max_steps=7",
            "attack.epsilon=4/255",
            "model.widths=[8,16,32,64]",
            "data.path=../shared/datasets/cifar10",
            "method.acl.variant=a2a",
        ],
    )
    assert r.training.max_steps == 7 and abs(r.attack.epsilon - 4 / 255) < 1e-12
    assert r.model.widths == [8, 16, 32, 64] and r.data.path == "../shared/datasets/cifar10"
    assert r.method.acl.variant == "a2a"


@pytest.mark.parametrize(
    "text, expected",
    [
        ("training:\n  batch_sise: 3\n", "did you mean 'training.batch_size'"),
        ("trainig:\n  seed: 1\n", "did you mean 'training'"),
        ("training:\n  batch_size: many\n", "invalid value for 'training.batch_size'"),
        ("attack:\n  epsilon: -0.1\n", "invalid value for 'attack.epsilon'"),
        ("training:\n  max_steps: 0\n", "invalid value for 'training.max_steps'"),
        ("method:\n  name: nope\n", "invalid value for 'method.name'"),
        ("training: [1, 2\n", "not valid YAML"),
    ],
)
def test_bad_recipes_name_key_and_file(tmp_path, text, expected):
    path = _write(tmp_path, text)
    with pytest.raises(UserError) as info:
        load_recipe(path)
    assert expected in str(info.value) and str(path) in str(info.value)
    assert "\n" not in str(info.value)


def test_malformed_override_and_missing_file(tmp_path):
    with pytest.raises(UserError, match="KEY=VALUE"):
        load_recipe(RECIPES / "acl.yaml", ["training.max_steps"])
    with pytest.raises(UserError, match="recipe file not found"):
        load_recipe(tmp_path / "missing.yaml")


def test_resolved_yaml_round_trips_and_differences_ignore_training_length(tmp_path):
    r = load_recipe(RECIPES / "acl.yaml")
    again = load_recipe(_write(tmp_path, r.to_yaml()))
    assert again == r
    longer = load_recipe(RECIPES / "acl.yaml", ["training.max_steps=50", "training.epochs=3"])
    assert recipe_differences(r, longer) == []
    other = load_recipe(RECIPES / "acl.yaml", ["optimizer.lr=1.0", "training.seed=4"])
    assert recipe_differences(r, other) == ["optimizer.lr", "training.seed"]


def test_method_recipes_carry_the_papers_settings_and_quirks():
    advcl = load_recipe(RECIPES / "advcl.yaml")
    assert advcl.method.advcl.clusters == [2, 10, 50, 100, 500] and advcl.method.advcl.ce_weight == 0.2
    assert abs(advcl.method.advcl.temperature_scale - 0.5 / 0.07) < 1e-9 and advcl.attack.bn_mode == "train"
    assert advcl.model.image_mean == [0, 0, 0] and advcl.augment.crop_scale == (0.2, 1.0)
    assert (advcl.optimizer.name, advcl.optimizer.lr, advcl.optimizer.weight_decay) == ("sgd", 0.5, 1e-4)
    simclr, deacl = load_recipe(RECIPES / "simclr.yaml"), load_recipe(RECIPES / "deacl.yaml")
    assert simclr.model == deacl.model and deacl.model.stem_padding == 2  # the student is a copy of the teacher
    assert simclr.augment.jitter == (0.8, 0.8, 0.8, 0.2) and simclr.method.temperature == 0.2
    assert deacl.method.deacl.teacher == "runs/simclr" and deacl.method.deacl.adversarial_weight == 2.0
    assert (deacl.training.epochs, deacl.training.batch_size, deacl.optimizer.weight_decay) == (100, 256, 5e-4)
    dynacl = load_recipe(RECIPES / "dynacl.yaml")
    assert dynacl.method.dynacl.reload_every_epochs == 50 and dynacl.method.dynacl.momentum == 0.99


def test_method_options_are_checked_and_documented(tmp_path):
    with pytest.raises(UserError, match="DynACL is dual-stream"):
        load_recipe(RECIPES / "dynacl.yaml", ["method.acl.variant=a2a"])
    with pytest.raises(UserError, match="distinct numbers of clusters"):
        load_recipe(RECIPES / "advcl.yaml", ["method.advcl.clusters=[10,10]"])
    from robustcl.recipe import describe_keys

    described = describe_keys()
    for key in ["method.simclr.projector_dim", "method.advcl.temperature_scale", "method.advcl.cluster_encoder",
                "method.deacl.teacher", "method.dynacl.momentum", "augment.weak_padding"]:  # fmt: skip
        line = next(line for line in described.splitlines() if line.startswith(key + " = "))
        assert len(line.split("# ", 1)[1]) > 20, line
