"""Method registry: ``method.name`` in a recipe → the class that trains it."""

from __future__ import annotations

from ..recipe import Recipe
from .acl import ACL
from .advcl import AdvCL
from .base import Method, TrainingRun
from .deacl import DeACL
from .dynacl import DynACL
from .simclr import SimCLR

METHODS: dict[str, type[Method]] = {"acl": ACL, "simclr": SimCLR, "advcl": AdvCL, "deacl": DeACL, "dynacl": DynACL}

__all__ = ["METHODS", "Method", "TrainingRun", "build_method"]


def build_method(recipe: Recipe) -> Method:
    return METHODS[recipe.method.name](recipe)
