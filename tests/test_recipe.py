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
