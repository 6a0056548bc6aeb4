"""An evaluation's settings checked without decoding a pixel: what ``robustcl pretrain`` runs before its first step
when the run ends with an evaluation (``eval.after_pretrain``), so that a setting the evaluation would refuse stops
the run before it trains, not after hours of training. ``robustcl evaluate`` opens the same splits and corrupted
set (the functions used here) before it finetunes, and keeps them for the evaluation.
"""

from __future__ import annotations

from accelerate import Accelerator

from ..distributed import node_main_first
from ..errors import UserError
from ..recipe import Recipe
from .corruptions import open_corruptions
from .measure import require_autoattack
from .splits import open_eval_splits


def check_eval_settings(recipe: Recipe, progress: bool = False) -> None:
    """Open every split the evaluation reads (metadata and labels, no pixel decoded) and raise the one-line
    :class:`UserError` the evaluation would: a missing split, a test split without labels (and no labelled
    ``validation`` split to stand in, see ``splits._open_test``), fewer than 2 classes, test labels the training split
    lacks, an ``eval.corruptions`` set that cannot be measured (columns, severities, labels), AutoAttack asked for
    but not installed.

    A dataset without a test split stops here, with the fix (name a labelled split in ``eval.data.test_split``, point
    ``eval.data.path`` at a dataset that has one, or turn the evaluation off). No held-out split is carved from the
    training split instead: those images are the pretraining images, so the figures would not be test figures, and
    an evaluation that silently measured something else than asked would be worse than one that asks.
    """
    if "autoattack" in recipe.eval.attacks:
        require_autoattack()
    opened = open_eval_splits(recipe, progress)
    open_corruptions(recipe, opened.source, progress)


def check_after_pretrain(recipe: Recipe, accelerator: Accelerator) -> None:
    """:func:`check_eval_settings` when the run ends with an evaluation (each node's main process first: it prepares
    the datasets cache), its refusal naming ``eval.after_pretrain``."""
    if not recipe.eval.after_pretrain:
        return
    try:
        node_main_first(accelerator, lambda: check_eval_settings(recipe))
    except UserError as err:
        off = "turn it off with --set eval.after_pretrain=false"
        raise type(err)(
            f"the evaluation at the end of pretraining (eval.after_pretrain) cannot run: {err.what}",
            err.where,
            f"{err.fix}; or {off}" if err.fix else off,
        ) from None
