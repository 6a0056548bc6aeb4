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
        # Unreadable values and odd keys (control characters) still give one line.
        ("training:\n  seed: " + "9" * 5000 + "\n", "recipe cannot be read: Exceeds the limit (4300 digits)"),
        ("training: " + "[" * 5000 + "\n", "recipe cannot be read: nested too deeply"),
        ("data:\n  name: 2024-13-01\n", "recipe cannot be read: month must be in 1..12"),
        ('training:\n  "batch\\nsize": 8\n', "unknown recipe key 'training.batch\\nsize'"),
        ('"\\u2028": 1\n', "unknown recipe key '\\u2028'"),
    ],
)
def test_bad_recipes_name_key_and_file(tmp_path, text, expected):
    path = _write(tmp_path, text)
    with pytest.raises(UserError) as info:
        load_recipe(path)
    assert expected in str(info.value) and str(path) in str(info.value), str(info.value)
    assert len(str(info.value).splitlines()) == 1


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


def test_a_run_resumes_with_other_logging_settings():
    # A tracker added to a running run, one that failed to start left out, or a run recorded with the old default
    # (trackers: [tensorboard]) resumed under the new one ([]): none changes what a step computes.
    r = load_recipe(RECIPES / "acl.yaml", ["logging.trackers=[tensorboard]"])
    other = load_recipe(
        RECIPES / "acl.yaml", ["logging.trackers=[wandb]", "logging.project=p", "logging.every_steps=7"]
    )
    assert recipe_differences(r, other) == []


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
    for name in ("acl_air", "dynacl_air"):
        with pytest.raises(UserError, match=f"AIR regularises ACL-DS: .* with method.name {name} "):
            load_recipe(RECIPES / f"{name}.yaml", ["method.acl.variant=a2s"])
    with pytest.raises(UserError, match="method.dynacl.momentum must be null with method.name dynacl_air"):
        load_recipe(RECIPES / "dynacl_air.yaml", ["method.dynacl.momentum=0.9"])
    with pytest.raises(UserError, match="distinct numbers of clusters"):
        load_recipe(RECIPES / "advcl.yaml", ["method.advcl.clusters=[10,10]"])
    from robustcl.recipe import describe_keys

    described = describe_keys()
    for key in ["method.simclr.projector_dim", "method.advcl.temperature_scale", "method.advcl.cluster_encoder",
                "method.deacl.teacher", "method.dynacl.momentum", "augment.weak_padding"]:  # fmt: skip
        line = next(line for line in described.splitlines() if line.startswith(key + " = "))
        assert len(line.split("# ", 1)[1]) > 20, line


def test_described_defaults_are_what_a_recipe_without_the_key_gets():
    """`recipe show --describe` lists the value a recipe that leaves a key out ends up with, also in sections a
    default factory builds (eval.slf: the default preset's; lpaft.lp / lpaft.aft: the DynACL++ authors')."""
    from robustcl.recipe import LpaftConfig, describe_keys, recipe_from_dict

    recipe = recipe_from_dict({}).model_copy(update={"lpaft": LpaftConfig()})
    checked = 0
    for line in describe_keys().splitlines():
        key, _, rest = line.partition(" = ")
        if key.startswith("method."):  # every method's keys, while the default recipe holds one method
            continue
        value = recipe
        for part in key.split("."):
            value = getattr(value, part)
        assert repr(value) == rest.split("  # ", 1)[0], key
        checked += 1
    assert checked > 200


# Regressions found by tests/test_recipe_mutations.py (and the review around it): each of these once loaded into a
# recipe that failed inside the first training step, or raised something other than a one-line UserError.
@pytest.mark.parametrize(
    "sets, expected",
    [
        (["attack.bn_mode=\r"], "--set attack.bn_mode=\\r)"),  # control characters stay escaped on one line
        (["training.seed=" + "9" * 5000], "invalid value for 'training.seed'"),  # YAML cannot make that int
        (["attack.epsilon=1/0"], "invalid value for 'attack.epsilon': division by zero"),
        (["attack.epsilon=1" + "0" * 400 + "/1"], "invalid value for 'attack.epsilon': the fraction is too large"),
        (["attack.epsilon=.inf"], "invalid value for 'attack.epsilon': Input should be a finite number"),
        (["optimizer.lr=.nan"], "invalid value for 'optimizer.lr': Input should be a finite number"),
        (["model.image_mean=[.nan, 0, 0]"], "invalid value for 'model.image_mean.0'"),
        (["augment.crop_scale=[0, 1]"], "invalid value for 'augment.crop_scale.0'"),
        (["augment.crop_scale=[0.5, 2]"], "invalid value for 'augment.crop_scale.1'"),
        (["augment.crop_scale=[0.6, 0.3]"], "invalid value for 'augment.crop_scale': must be [low, high] with low ≤"),
        (["augment.crop_ratio=[2, 1]"], "invalid value for 'augment.crop_ratio': must be [low, high] with low ≤"),
        (["augment.crop_ratio=[0, 1]"], "invalid value for 'augment.crop_ratio.0'"),
        (["augment.jitter=[0, 0, 0, 0.6]"], "invalid value for 'augment.jitter.3'"),
        (["augment.jitter=[-0.1, 0, 0, 0]"], "invalid value for 'augment.jitter.0'"),
        (["model.widths=[]", "model.block_layers=[]"], "invalid value for 'model.block_layers'"),
        (["model.widths=[0, 1, 2, 3]"], "invalid value for 'model.widths.0'"),
        (["model.block_layers=[0, 1, 1, 1]"], "invalid value for 'model.block_layers.0'"),
        (["model.image_std=[0, 1, 1]"], "invalid value for 'model.image_std.0'"),
        (["model.image_std=[1, 1]"], "invalid value for 'model.image_std'"),
        (["model.image_mean=[0.5, 0.5, 0.5, 0.5]"], "invalid value for 'model.image_mean'"),
        (["optimizer.name=sgd", "optimizer.nesterov=true", "optimizer.momentum=0"], "optimizer.nesterov needs"),
        (["training.seed=18446744073709551616"], "invalid value for 'training.seed'"),
        (["training.seed=-1"], "invalid value for 'training.seed'"),
        (["eval.seed=4294967296"], "invalid value for 'eval.seed'"),
        (["data.resolution=1", "model.stem=imagenet", "model.stem_padding=0"], "needs data.resolution + 2 ×"),
        (["eval.data.resolution=2", "model.stem=imagenet", "model.stem_padding=1"], "needs eval.data.resolution"),
        (["training.batch_size=1"], "invalid value for 'training.batch_size'"),
        (["training.micro_batch_size=1"], "invalid value for 'training.micro_batch_size'"),
        (["method.name=dynacl", "augment.crop_scale=[0.2, 0.5]"], "augment.crop_scale must end at 1.0"),
        (["eval.attack.curve_epsilons=[0, -8/255]"], "invalid value for 'eval.attack.curve_epsilons.1'"),
    ],
)
def test_values_a_step_cannot_use_are_refused_on_one_line(sets, expected):
    with pytest.raises(UserError) as info:
        load_recipe(RECIPES / "quickstart.yaml", sets)
    assert expected in str(info.value), str(info.value)
    assert len(str(info.value).splitlines()) == 1


def test_values_at_the_edges_of_the_valid_ranges_load():
    r = load_recipe(
        RECIPES / "quickstart.yaml",
        ["augment.crop_scale=[1, 1]", "augment.jitter=[0, 0, 0, 0.5]", "training.seed=4294967295",
         "data.resolution=1", "model.stem=imagenet", "training.batch_size=2", "optimizer.nesterov=true"],
    )  # fmt: skip
    assert r.augment.crop_scale == (1.0, 1.0) and r.training.seed == 2**32 - 1 and r.model.stem == "imagenet"


def test_values_too_long_to_print_are_described():
    from robustcl.recipe import recipe_from_dict

    with pytest.raises(UserError, match="got an integer too long to print"):
        recipe_from_dict({"data": {"path": 10**5000}})
    with pytest.raises(UserError) as info:
        recipe_from_dict({"data": {"path": ["x" * 10_000]}})
    assert "(got ['xxx" in str(info.value) and len(str(info.value)) < 300
