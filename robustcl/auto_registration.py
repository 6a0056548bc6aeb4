"""Registration of robustcl's model type with transformers' Auto classes, deferred until a process loads them.

``import robustcl`` must not import transformers (seconds of torch and model-stack imports before ``robustcl --help``
could answer), yet any process that imported robustcl must load robustcl exports with ``AutoConfig`` /
``AutoModel.from_pretrained`` without remote code. So registration (importing :mod:`robustcl.models`) happens at once
when transformers' Auto classes are already loaded, and otherwise right after the import that first loads them.

"Right after" means when the outermost transformers import of that thread finishes, not when the Auto module itself
finishes: transformers loads its Auto config module from inside ``modeling_utils`` (through its quantizers), and the
model classes imported at that point would meet a half-initialised ``modeling_utils``. An import finishes before any
``from_pretrained`` call can follow it, so registration always comes first.
"""

from __future__ import annotations

import importlib
import sys
import threading
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # importlib.abc alone costs more than the rest of `import robustcl`
    from collections.abc import Sequence
    from importlib.abc import Loader
    from importlib.machinery import ModuleSpec
    from types import ModuleType

# Every Auto class reads the model types from this module (the Auto model modules import it), so a process can call
# from_pretrained only once it is loaded.
AUTO_CONFIG_MODULE = "transformers.models.auto.configuration_auto"


def register_when_transformers_loads() -> None:
    """Register robustcl's model type with the Auto classes now if transformers has loaded them, else as soon as it
    does. Idempotent."""
    if AUTO_CONFIG_MODULE in sys.modules:
        importlib.import_module("robustcl.models")
    elif not any(isinstance(finder, _RegisterAfterTransformers) for finder in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterTransformers())


def _is_transformers(name: str) -> bool:
    return name == "transformers" or name.startswith("transformers.")


class _RegisterAfterTransformers:
    """Finds nothing itself: it wraps the loader of every transformers module the other finders find, to count
    the transformers modules executing in each thread, and registers when an outermost one finishes with the Auto
    classes loaded. It then leaves ``sys.meta_path``: later imports run untouched."""

    def __init__(self) -> None:
        self.executing = threading.local()
        self.registering = threading.Lock()

    def find_spec(self, name: str, path: Sequence[str] | None, target: ModuleType | None = None) -> ModuleSpec | None:
        if not _is_transformers(name):
            return None
        for finder in list(sys.meta_path):
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _CountingLoader(spec.loader, self)
                return spec
        return None

    def started(self) -> None:
        self.executing.depth = getattr(self.executing, "depth", 0) + 1

    def finished(self, succeeded: bool) -> None:
        self.executing.depth -= 1
        if not (succeeded and self.executing.depth == 0 and AUTO_CONFIG_MODULE in sys.modules):
            return
        # While one thread registers, another that finishes its transformers import goes on without waiting: the
        # registering thread may need a module whose import lock this one still holds (a deadlock importlib reports
        # by failing the import). transformers' own first imports are not safe from several threads either.
        if not self.registering.acquire(blocking=False):
            return
        try:
            if self in sys.meta_path:
                sys.meta_path.remove(self)
            # Inside robustcl.models' own first import (its transformers imports end here) this returns the package
            # half-initialised, and the package registers when it finishes.
            importlib.import_module("robustcl.models")
        finally:
            self.registering.release()


class _CountingLoader:
    """A transformers module's own loader, reporting when the module starts and finishes executing. The module keeps
    its own loader (``__loader__``, ``__spec__.loader``): only this one execution goes through the wrapper."""

    def __init__(self, loader: Loader, finder: _RegisterAfterTransformers) -> None:
        self.loader = loader
        self.finder = finder

    def create_module(self, spec: ModuleSpec) -> ModuleType | None:
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        module.__loader__ = self.loader
        if module.__spec__ is not None:
            module.__spec__.loader = self.loader
        self.finder.started()
        succeeded = False
        try:
            self.loader.exec_module(module)
            succeeded = True
        finally:
            self.finder.finished(succeeded)

    def __getattr__(self, name: str) -> Any:  # get_source, is_package, resource readers: the module's own loader
        if name == "loader":  # not set yet (a copy being built): no endless recursion
            raise AttributeError(name)
        return getattr(self.loader, name)
