"""Each method owns its options: a method defined here, with its own options class and one registry entry, trains
from a recipe without any change to robustcl/recipe.py; a resolved recipe carries only the chosen method's block, so
resuming a run compares only what its method reads (run directories written before still load and resume); another
method's keys are refused on one line."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import pytest
import yaml
from helpers import TINY, user_error, with_sets
from pydantic import Field

from robustcl import method_registry
from robustcl.methods.base import Method, encoder_config
from robustcl.models import RobustCLResNetModel
from robustcl.recipe import MethodOptions, Recipe, Section, describe_keys, load_recipe, recipe_from_dict

QUICK = "recipes/quickstart.yaml"
SETS = [*TINY, "eval.after_pretrain=false", "logging.progress_bar=false", "logging.trackers=[]"]
BUILT_IN = ["acl", "simclr", "advcl", "deacl", "dynacl"]  # the methods of run directories with the old layout
SCALES_SEEN: list[float] = []  # method.tiny.scale of every Tiny built in this process


class TinySection(Section):
    """The tiny method's own sub-section."""

    scale: float = Field(1.0, gt=0, description="multiplier of the tiny loss")


class TinyOptions(MethodOptions):
    name: Literal["tiny"] = "tiny"
    tiny: TinySection = Field(default_factory=TinySection)

    def check_recipe(self, recipe: Recipe) -> None:
        super().check_recipe(recipe)
        if recipe.attack.steps != 0:
            raise ValueError(f"method tiny trains without an attack: attack.steps must be 0, got {recipe.attack.steps}")


class Tiny(Method):
    """Pulls every feature towards 0: no views, no attack, just enough to train."""

    display_name = "Tiny"
    adversarial = False
    contrastive = False

    def __init__(self, recipe: Recipe) -> None:
        super().__init__(recipe)
        self.bn_branches = []
        self.encoder = RobustCLResNetModel(encoder_config(recipe.model, self.bn_branches))
        self.scale = recipe.method.tiny.scale
        SCALES_SEEN.append(self.scale)

    def describe(self) -> str:
        return f"tiny: {self.scale:g} × mean squared feature"

    def forward(self, images, generator, indices, step):  # type: ignore[override]
        loss = self.scale * self.encoder(images.float() / 255).pooler_output.pow(2).mean()
        return loss, {}


@pytest.fixture
def tiny_registered(monkeypatch: pytest.MonkeyPatch) -> None:
    entry = method_registry.Registered(options=f"{__name__}:TinyOptions", method=f"{__name__}:Tiny")
    monkeypatch.setitem(method_registry.METHODS, "tiny", entry)


def _pretrain(cli, run: Path, *sets: str) -> tuple[int, str, str]:
    return cli("pretrain", QUICK, "-o", str(run), *with_sets(*SETS, *sets))


def test_a_method_defined_outside_the_package_trains_with_its_own_options(tmp_path: Path, cli, tiny_registered):
    SCALES_SEEN.clear()
    run = tmp_path / "run"
    code, out, err = _pretrain(cli, run, "method.name=tiny", "method.tiny.scale=0.25", "attack.steps=0",
                               "training.max_steps=2")  # fmt: skip
    assert code == 0, err
    assert SCALES_SEEN and set(SCALES_SEEN) == {0.25}
    assert yaml.safe_load((run / "recipe.yaml").read_text())["method"] == {"name": "tiny", "tiny": {"scale": 0.25}}
    # Its options are validated as any other section, and its own rule about the rest of the recipe holds.
    message = user_error(load_recipe, QUICK, ["method.name=tiny", "method.tiny.scale=0"])
    assert "invalid value for 'method.tiny.scale'" in message
    message = user_error(load_recipe, QUICK, ["method.name=tiny", "method.tiny.scael=2"])
    assert "unknown recipe key 'method.tiny.scael'" in message and "did you mean 'method.tiny.scale'?" in message
    message = user_error(load_recipe, QUICK, ["method.name=tiny"])
    assert "invalid recipe: method tiny trains without an attack: attack.steps must be 0, got 5" in message
    assert "method.tiny.scale = 1.0  # multiplier of the tiny loss [tiny]" in describe_keys().splitlines()


def test_an_unknown_method_is_refused_naming_every_registered_one(tiny_registered):
    message = user_error(load_recipe, QUICK, ["method.name=nope"])
    assert "invalid value for 'method.name'" in message
    for name in [*method_registry.METHODS, "tiny"]:
        assert f"'{name}'" in message, message


@pytest.mark.parametrize(
    "recipe, blocks",
    [
        ("acl", {"name", "temperature", "acl"}),
        ("simclr", {"name", "temperature", "simclr"}),
        ("advcl", {"name", "temperature", "advcl"}),
        ("deacl", {"name", "deacl"}),
        ("dynacl", {"name", "temperature", "acl", "dynacl"}),
        ("acl_air", {"name", "temperature", "acl", "air"}),
        ("dynacl_air", {"name", "temperature", "acl", "dynacl", "air"}),
        ("ainfonce", {"name", "temperature", "advcl", "ainfonce"}),
        ("rocl", {"name", "temperature", "rocl"}),
    ],
)
def test_a_resolved_recipe_holds_only_what_its_method_reads(recipe: str, blocks: set[str]):
    resolved = load_recipe(f"recipes/{recipe}.yaml")
    assert set(resolved.to_dict()["method"]) == blocks
    assert recipe_from_dict(yaml.safe_load(resolved.to_yaml())) == resolved


def test_another_methods_key_is_refused_naming_the_key_and_the_fix():
    message = user_error(load_recipe, QUICK, ["method.deacl.teacher=runs/elsewhere"])
    assert "invalid recipe: method.deacl is read by method deacl, not by method acl (method.name acl)" in message
    assert "remove method.deacl" in message
    message = user_error(load_recipe, "recipes/deacl.yaml", ["method.temperature=0.2"])
    assert "method.temperature is read by methods acl, simclr, advcl, dynacl, " in message
    assert "not by method deacl" in message


def _old_layout(recipe: Recipe) -> dict:
    """``recipe`` as a recipe.yaml written before each method owned its options: every built-in method's block (the
    others' with values their own recipes would not have), and a temperature whatever the method."""
    tree = recipe.to_dict()
    others = {"acl": {"variant": "a2s"}, "simclr": {"projector_dim": 7}, "advcl": {"ce_weight": 0.9},
              "deacl": {"teacher": "runs/elsewhere"}, "dynacl": {"momentum": None}}  # fmt: skip
    for name in BUILT_IN:
        tree["method"].setdefault(name, others[name])
    tree["method"].setdefault("temperature", 0.7)
    return tree


def test_old_run_directories_load_with_their_methods_block_only():
    deacl = load_recipe("recipes/deacl.yaml")
    assert recipe_from_dict(_old_layout(deacl)) == deacl
    dynacl = load_recipe("recipes/dynacl.yaml")
    assert recipe_from_dict(_old_layout(dynacl)) == dynacl


def test_resuming_an_acl_run_ignores_other_methods_options(tmp_path: Path, cli):
    run = tmp_path / "run"
    assert _pretrain(cli, run, "training.max_steps=1", "training.checkpoint_every=1")[0] == 0
    # Changing another method's option is not a change of this run: it is refused as a key ACL does not read.
    code, _, err = _pretrain(cli, run, "training.max_steps=2", "method.deacl.teacher=runs/elsewhere")
    assert code == 2 and err.count("\n") == 1, err
    assert "method.deacl is read by method deacl, not by method acl" in err, err
    # A run directory written before (all five blocks, the others far from their defaults) resumes.
    old = _old_layout(recipe_from_dict(yaml.safe_load((run / "recipe.yaml").read_text())))
    (run / "recipe.yaml").write_text(yaml.safe_dump(old, sort_keys=False))
    code, out, err = _pretrain(cli, run, "training.max_steps=2", "training.checkpoint_every=1")
    assert code == 0 and "resumed from" in out, err
    assert set(yaml.safe_load((run / "recipe.yaml").read_text())["method"]) == {"name", "temperature", "acl"}
    assert (run / "checkpoints" / "step-00000002").is_dir()


def test_robustcl_cluster_reads_advcls_defaults_from_another_methods_recipe(tmp_path: Path, cli, tiny_export: Path):
    # robustcl cluster is AdvCL's tool: a recipe of another method (no method.advcl) clusters with AdvCL's defaults.
    out = tmp_path / "labels.safetensors"
    code, stdout, err = cli(
        "cluster", QUICK, "--encoder", str(tiny_export), "-o", str(out), *with_sets("data.resolution=8")
    )
    assert code == 0, err
    assert "K=2: 2 clusters, K=10: 10 clusters, K=50: 50 clusters, K=100: 100 clusters, K=500: 500 clusters" in stdout
