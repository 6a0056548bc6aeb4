"""``python -m robustcl``, and ``accelerate launch robustcl ...`` from the repository root.

The latter runs this *folder* as a script: ``__package__`` is empty and ``sys.path[0]`` is the package folder
itself, where a module such as ``robustcl/datasets.py`` would shadow the real library. Put the repository root
in its place before importing anything else.
"""

import os
import sys

if not __package__:
    _pkg_dir = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _pkg_dir]
    sys.path.insert(0, os.path.dirname(_pkg_dir))

from robustcl.cli import main  # noqa: E402

if __name__ == "__main__":
    main()
