"""Downstream evaluation: SLF / ALF / AFF finetuning, then SA, RA (PGD-20) and AA (AutoAttack) on the test split."""

from .run import ATTACKS, PROTOCOLS, evaluate, format_table, run_dir_output
from .splits import load_eval_data

__all__ = ["ATTACKS", "PROTOCOLS", "evaluate", "format_table", "load_eval_data", "run_dir_output"]
