"""robustcl: self-supervised adversarial pre-training of image encoders.

Importing robustcl registers its model type with transformers, so ``AutoModel.from_pretrained(export)`` and
``AutoModelForImageClassification.from_pretrained(export)`` load robustcl exports without ``trust_remote_code``.
It imports neither transformers nor torch itself (``robustcl --help`` answers at once): the registration happens when
the process loads transformers' Auto classes, before any ``from_pretrained`` can run (see ``auto_registration``).
"""

import importlib
from types import ModuleType

from . import auto_registration

__version__ = "0.1.0"

auto_registration.register_when_transformers_loads()


def __getattr__(name: str) -> ModuleType:
    # `import robustcl; robustcl.models.X` keeps working now that the package no longer imports models eagerly.
    if name == "models":
        return importlib.import_module(".models", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
