"""Method registry: ``method.name`` in a recipe → the class that trains it."""

from __future__ import annotations

from ..recipe import Recipe
from .acl import ACL
from .base import Method

METHODS: dict[str, type[Method]] = {"acl": ACL}


def build_method(recipe: Recipe) -> Method:
    return METHODS[recipe.method.name](recipe)
