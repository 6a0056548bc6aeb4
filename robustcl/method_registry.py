"""The method registry: ``method.name`` in a recipe → its options class and the class that trains it.

Import paths ("module:Class"), not classes: a recipe's ``method`` section is validated by the options class of the
method it names, imported then; the ``Method`` (torch, the training code) is imported only to train. Options live
in robustcl/method_options/ (pydantic only), so evaluation and export read any run's recipe without importing
robustcl/methods/. Adding a method: its ``Method`` under robustcl/methods/, its options (a
:class:`~robustcl.recipe.MethodOptions` subclass with ``name: Literal["<name>"]`` and the keys it reads) under
robustcl/method_options/, one line here, its recipe, its tests.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    from pydantic import BaseModel


class Registered(NamedTuple):
    options: str  # its MethodOptions subclass: the recipe's `method` section
    method: str  # its Method subclass


# The first is the method of a recipe that names none.
METHODS: dict[str, Registered] = {
    "acl": Registered("robustcl.method_options.acl:ACLOptions", "robustcl.methods.acl:ACL"),
    "simclr": Registered("robustcl.method_options.simclr:SimCLROptions", "robustcl.methods.simclr:SimCLR"),
    "advcl": Registered("robustcl.method_options.advcl:AdvCLOptions", "robustcl.methods.advcl:AdvCL"),
    "deacl": Registered("robustcl.method_options.deacl:DeACLOptions", "robustcl.methods.deacl:DeACL"),
    "dynacl": Registered("robustcl.method_options.dynacl:DynACLOptions", "robustcl.methods.dynacl:DynACL"),
    "ainfonce": Registered("robustcl.method_options.ainfonce:AInfoNCEOptions", "robustcl.methods.ainfonce:AInfoNCE"),
    "acl_air": Registered("robustcl.method_options.air:ACLAIROptions", "robustcl.methods.air:ACLAIR"),
    "dynacl_air": Registered("robustcl.method_options.air:DynACLAIROptions", "robustcl.methods.air:DynACLAIR"),
    "rocl": Registered("robustcl.method_options.rocl:RoCLOptions", "robustcl.methods.rocl:RoCL"),
}

# The method section of every recipe.yaml written before each method owned its options: all five blocks, and the
# temperature whatever the method. Such a section is read with the chosen method's keys only (recipe._own_keys).
OLD_LAYOUT_BLOCKS = frozenset({"acl", "simclr", "advcl", "deacl", "dynacl"})
OLD_LAYOUT_KEYS = OLD_LAYOUT_BLOCKS | {"temperature"}


def default_method() -> str:
    return next(iter(METHODS))


def imported(path: str) -> Any:
    module, _, attribute = path.partition(":")
    return getattr(importlib.import_module(module), attribute)


def method_options(name: str) -> type[BaseModel]:
    """The options class of the method registered as ``name``. Raises KeyError for a name not registered."""
    return imported(METHODS[name].options)
