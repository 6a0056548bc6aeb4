"""What DynACL++'s post-pretraining stage (:mod:`robustcl.lpaft`) leaves in a run directory, and how it is read back:
``RUN_DIR/lpaft/encoder/`` holds the finetuned plain-BN encoder (``model.safetensors``) and its record
(``lpaft.json``: the checkpoint it was made from, the stage's settings and seed, the encoder's record for export and
cards). The folder is written whole (renamed into place), so it is there complete or not at all.

``encoder_loading.load_run`` hands this encoder over, in place of the checkpoint's, while it was made from the run's
newest checkpoint: export, evaluation and push-to-hub of the run then take it. Imports nothing of training.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from .atomic_write import atomic_folder
from .encoder_record import EncoderRecord
from .errors import UserError
from .export_layout import WEIGHTS_FILE
from .model_loading import check_state_dict, first_line, read_safetensors
from .models import RobustCLResNetConfig, RobustCLResNetModel
from .recipe import LpaftConfig, Recipe
from .run_layout import LPAFT_DIR, LPAFT_ENCODER_DIR, LPAFT_RECORD_FILE


class LpaftRecord(BaseModel):
    """The stage's record of the encoder it wrote."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    source_step: int  # the checkpoint (its optimizer step) whose encoder was finetuned
    seed: int  # k-means and finetuning seed (the run's training.seed)
    settings: dict[str, Any]  # the lpaft section it ran with, as the recipe writes it
    encoder: EncoderRecord  # plain BN: weights_prefix "", export_branch None; the card's method is DynACL++
    cluster_sizes: list[int]  # images per pseudo-label
    history: dict[str, list[dict[str, Any]]]  # "lp" / "aft": finetune's per-epoch records

    def section(self) -> LpaftConfig:
        return LpaftConfig.model_validate(self.settings)


@dataclass
class LpaftEncoder:
    encoder: RobustCLResNetModel  # eval mode, on the CPU
    record: LpaftRecord

    def recipe(self, run_recipe: Recipe) -> Recipe:
        """The run's recipe with the lpaft section this encoder was made with (what an export ships)."""
        return run_recipe.model_copy(update={"lpaft": self.record.section()})


def lpaft_folder(run_dir: Path) -> Path:
    return Path(run_dir) / LPAFT_DIR / LPAFT_ENCODER_DIR


_FIX = "delete the folder and run robustcl lpaft RUN_DIR again"


def read_lpaft_record(run_dir: Path) -> LpaftRecord | None:
    """The stage's record, or None when the stage has not finished in this run directory."""
    path = lpaft_folder(run_dir) / LPAFT_RECORD_FILE
    if not path.is_file():
        return None
    try:
        return LpaftRecord.model_validate(json.loads(path.read_text()))
    except (OSError, ValueError, ValidationError) as err:
        raise UserError(f"the DynACL++ record is damaged: {first_line(err)}", str(path), _FIX) from None


def read_lpaft(run_dir: Path, step: int) -> LpaftEncoder | None:
    """The stage's encoder when it was made from the checkpoint of ``step`` (None: no stage output, or one made from
    an older checkpoint, which a longer run leaves behind)."""
    record = read_lpaft_record(run_dir)
    if record is None or record.source_step != step:
        return None
    path = lpaft_folder(run_dir) / WEIGHTS_FILE
    encoder = RobustCLResNetModel(RobustCLResNetConfig.from_dict(record.encoder.config))
    state = read_safetensors(path, _FIX)
    check_state_dict(encoder, state, str(path), _FIX)
    encoder.load_state_dict(state, strict=True)
    return LpaftEncoder(encoder.eval(), record)


def write_lpaft(run_dir: Path, encoder: RobustCLResNetModel, record: LpaftRecord) -> Path:
    """Write the stage's folder at once (a temporary folder renamed into place, replacing an earlier one)."""
    from safetensors.torch import save_file

    folder = lpaft_folder(run_dir)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with atomic_folder(folder) as tmp:
        state = {k: v.detach().cpu().contiguous() for k, v in encoder.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS_FILE))
        (tmp / LPAFT_RECORD_FILE).write_text(record.model_dump_json(indent=2) + "\n")
    return folder
