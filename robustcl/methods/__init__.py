"""The self-supervised methods, one file each (its ``Method``); their options are in robustcl/method_options/ and
robustcl/method_registry.py names both for recipes. What a method implements: see ``base.Method``. Here: the
registry's training side (the registry itself imports no training code)."""

from __future__ import annotations

from ..method_registry import METHODS, imported
from ..recipe import Recipe
from .base import Method


def method_class(name: str) -> type[Method]:
    """The class that trains the method registered as ``name``."""
    return imported(METHODS[name].method)


def build_method(recipe: Recipe) -> Method:
    return method_class(recipe.method.name)(recipe)
