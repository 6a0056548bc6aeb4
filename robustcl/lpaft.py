"""DynACL++ (Luo et al., ICLR 2023; PKU-ML/DYNACL ``assign_label.py``, ``LPAFT.py``): the post-pretraining stage.

On a run's newest checkpoint, without labels:

1. **pseudo-labels** (``assign_label.py``): the pooled features of the pretraining images (dataset order, no
   augmentation) from the encoder's ``lpaft.cluster_bn_branch`` ('normal') BN branch in eval mode, not normalised,
   clustered by k-means into ``lpaft.clusters`` (10) groups. Written to ``RUN_DIR/lpaft/pseudo_labels.safetensors``
   with the images' fingerprint (robustcl's pseudo-label format), and reused while they fit.
2. **LP** (``LPAFT.py`` ``train_head``): the ``lpaft.bn_branch`` ('pgd') branch as a plain-BN encoder, frozen in eval
   mode, and a zero-initialised linear head trained on the pseudo-labels: one :func:`finetune` with ``lpaft.lp``.
3. **AFT** (``LPAFT.py`` ``train`` with ``utils.py`` ``trades_loss``): encoder and the probed head trained together
   with TRADES on the pseudo-labels: one :func:`finetune` with ``lpaft.aft``, starting from LP's head.

The finetuned encoder goes to ``RUN_DIR/lpaft/encoder/`` (:mod:`.lpaft_output`) in one rename, from where the run's
export, evaluation and push-to-hub hand it over; nothing of the pretraining is changed, so an interrupted stage
loses nothing and runs again whole. Under several processes the feature pass is split by blocks of images and
k-means combines the blocks (:mod:`.kmeans`), and both finetunings share every batch as evaluation does
(:mod:`.evaluation.sharding`).

Where robustcl differs from the authors' code: k-means starts from k-means++ seeding with the run's
``training.seed`` and runs until no label changes (their ``kmeans_pytorch``: unseeded random initial points, stops
when the summed centre shift² < 1e-4, an emptied cluster becomes NaN); everything else follows their scripts
(``recipe.LPAFT_DEFAULTS`` names each value's source).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator

from .data.images import ImageRows
from .data.loading import open_pretraining_split, pretraining_images
from .data.streamed import default_workers
from .distributed import check_world_size, node_main_first, on_main_process, processes_on_node
from .encoder_loading import FeatureEncoder, RunEncoder, load_run
from .encoder_record import EncoderRecord, MethodCard
from .errors import UserError
from .eval_report import EvalReport
from .evaluation.finetune import FinetuneResult, LabelledImages, finetune
from .fingerprint import weights_sha256
from .json_files import write_json
from .kmeans import OneProcess, ProcessGroup
from .locking import folder_lock
from .lpaft_output import LpaftRecord, read_lpaft_record, write_lpaft
from .method_options.dynacl import DYNACL_PAPER
from .models import RobustCLResNetModel
from .pseudo_labels import PseudoLabels, cluster_labels, load_pseudo_labels, save_pseudo_labels
from .recipe import FinetuneConfig, LpaftConfig, Recipe, override_recipe, parse_override
from .run_dir import checkpoint_step, read_run_recipe
from .run_handover import export_and_evaluate
from .run_layout import LPAFT_DIR, PSEUDO_LABELS_FILE, SUMMARY_FILE
from .setup_context import encode_block

# k-means runs until no label changes (tol 0: the centres' movement is not a criterion); the cap only guards
# against a cycle, which Lloyd iterations on float64 sums do not reach in practice.
KMEANS_MAX_ITER = 1000


@dataclass
class LpaftResult:
    run_dir: Path
    ran: bool  # False: the run directory held this stage's output for its newest checkpoint already
    record: LpaftRecord


def plain_branch(encoder: RobustCLResNetModel, branch: str | None, key: str) -> RobustCLResNetModel:
    """A plain-BN copy of ``encoder`` keeping ``branch`` (a plain-BN encoder is copied as it is), in eval mode."""
    branches = list(encoder.config.bn_branches)
    if branches and branch not in branches:
        raise UserError(
            f"BN branch '{branch}' does not exist in the run's encoder", key, f"choose one of {', '.join(branches)}"
        )
    return encoder.to_single_branch(branch if branches else None).eval()


def cluster_pseudo_labels(
    encoder: RobustCLResNetModel,
    images: ImageRows,
    clusters: int,
    seed: int,
    device: torch.device,
    collectives: OneProcess,
    progress: bool = True,
) -> torch.Tensor:
    """k-means labels (int64 [N], dataset order, on every process) of ``encoder``'s pooled features of ``images``,
    unnormalised (assign_label.py); each process encodes a block of the images and k-means combines the blocks."""
    features = collectives.agree(
        lambda: encode_block(FeatureEncoder(encoder), images, device, collectives, progress=progress),
        "encoding the pretraining images",
    )
    found = cluster_labels(
        features, [clusters], seed=seed, normalize=False, progress=False, max_iter=KMEANS_MAX_ITER, tol=0.0
    )
    return found[clusters]


def _labels_source(checkpoint: Path, branch: str | None, encoder: RobustCLResNetModel) -> str:
    """What the pseudo-label file records as its encoder: the checkpoint, the branch and the exact weights."""
    return f"{checkpoint.name} BN branch {branch or 'plain'} weights sha256 {weights_sha256(encoder)}"


def _stored_labels(path: Path, source: str, seed: int, clusters: int, images: ImageRows) -> torch.Tensor | None:
    """The labels in ``path`` when they were computed from ``source`` with ``seed`` on these images, else None."""
    from safetensors import safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception:  # noqa: BLE001 — a damaged file is computed again
        return None
    if (meta.get("encoder"), meta.get("seed"), meta.get("normalized")) != (source, str(seed), "false"):
        return None
    try:
        return load_pseudo_labels(path, [clusters], images)[0]
    except UserError:  # other images, or another K: computed again
        return None


def stage_pseudo_labels(
    run_dir: Path, run: RunEncoder, section: LpaftConfig, images: ImageRows, accelerator: Accelerator, progress: bool
) -> torch.Tensor:
    """The stage's pseudo-labels: read back while they fit this checkpoint, branch, seed and these images, else
    computed (by every process) and written by the main process."""
    seed = run.recipe.training.seed
    encoder = plain_branch(run.encoder, section.cluster_bn_branch, "lpaft.cluster_bn_branch")
    branch = section.cluster_bn_branch if run.encoder.config.bn_branches else None
    source = _labels_source(run.checkpoint, branch, encoder)
    path = Path(run_dir) / LPAFT_DIR / PSEUDO_LABELS_FILE
    stored = _stored_labels(path, source, seed, section.clusters, images)
    if stored is not None:
        return stored
    collectives = ProcessGroup() if accelerator.num_processes > 1 else OneProcess()
    labels = cluster_pseudo_labels(encoder, images, section.clusters, seed, accelerator.device, collectives, progress)
    if accelerator.is_main_process:
        save_pseudo_labels(path, PseudoLabels({section.clusters: labels}, images.identity(), source, seed, False))
    accelerator.wait_for_everyone()
    return labels


def probe_and_finetune(
    encoder: RobustCLResNetModel,
    data: LabelledImages,
    section: LpaftConfig,
    seed: int,
    device: torch.device,
    progress: bool = True,
    workers: int = 0,
) -> tuple[RobustCLResNetModel, FinetuneResult, FinetuneResult]:
    """LP (a head on the frozen ``encoder``), then AFT (encoder and that head) on the pseudo-labelled ``data``; the
    finetuned encoder (a new plain-BN model on the CPU, eval mode) and both finetunings' results."""
    none = data.take(torch.arange(0))  # select_by final: nothing is held out
    classes = section.clusters

    def run(cfg: FinetuneConfig, features: FeatureEncoder, stage: str, head=None, offset: int = 0) -> FinetuneResult:
        desc = {"lp": "DynACL++ linear probe", "aft": "DynACL++ adversarial finetuning"}[stage]
        return finetune(
            features, data, none, classes, cfg, device=device, seed=seed + offset, desc=desc, progress=progress,
            workers=workers, key=f"lpaft.{stage}", head=head,
        )  # fmt: skip

    lp = run(section.lp, FeatureEncoder(encoder), "lp")
    aft = run(section.aft, lp.classifier.encoder, "aft", head=lp.classifier.head, offset=1)
    trained = aft.classifier.encoder.backbone  # its BatchNorms may be SyncBatchNorm (several processes)
    plain = RobustCLResNetModel(trained.config)
    plain.load_state_dict({k: v.detach().cpu() for k, v in trained.state_dict().items()}, strict=True)
    return plain.eval(), lp, aft


def stage_method_card(base: MethodCard, section: LpaftConfig, branch: str | None) -> MethodCard:
    """The card of the stage's encoder: DynACL++ after the run's method (DynACL → DynACL++, DynACL-AIR →
    DynACL-AIR++), citing the DynACL paper and saying what the pretraining was."""
    cited = f" ({base.paper.authors}, {base.paper.venue})" if base.paper is not None else ""
    objective = (
        f"{base.display_name} pretraining{cited}: {base.objective}; then DynACL++ post-processing (linear probing "
        f"then adversarial finetuning on k-means pseudo-labels, no labels): {section.clusters} clusters of the "
        f"'{section.cluster_bn_branch}' BN branch's features, a linear probe for {section.lp.epochs} epochs and "
        f"TRADES (β {section.aft.trades_beta:g}) finetuning of encoder and head for {section.aft.epochs} epochs"
        + (f" on the '{branch}' branch" if branch else "")
    )
    display = f"{base.display_name}++"
    return MethodCard(name=base.name, display_name=display, paper=DYNACL_PAPER, objective=objective, adversarial=True)


def stage_done(run_dir: Path, step: int, section: LpaftConfig, seed: int) -> LpaftRecord | None:
    """The stage's record when it ran on the checkpoint of ``step`` with these settings and seed, else None."""
    record = read_lpaft_record(run_dir)
    if record is None or record.source_step != step or record.seed != seed:
        return None
    return record if record.section() == section else None


def run_lpaft(
    run_dir: Path, section: LpaftConfig, *, accelerator: Accelerator | None = None, progress: bool = True
) -> LpaftResult:
    """The stage on ``run_dir``'s newest checkpoint (every process calls it), unless its output for that
    checkpoint, these settings and the run's seed is there already. Writes the pseudo-labels and the encoder folder
    (main process); the run's recipe and checkpoints stay as they are."""
    run_dir = Path(run_dir)
    if accelerator is None:
        accelerator = Accelerator(cpu=not torch.cuda.is_available())
        check_world_size(accelerator)
    run = load_run(run_dir, post_pretraining=False)
    seed, step = run.recipe.training.seed, checkpoint_step(run.checkpoint)
    done = stage_done(run_dir, step, section, seed)
    if done is not None:
        return LpaftResult(run_dir, False, done)
    bars = progress and accelerator.is_main_process
    data = run.recipe.data
    opened = node_main_first(accelerator, lambda: open_pretraining_split(data, bars))
    images = pretraining_images(opened, data, processes_on_node(accelerator), bars)
    labels = stage_pseudo_labels(run_dir, run, section, images, accelerator, bars)
    branch = section.bn_branch or run.record.export_branch
    encoder = plain_branch(run.encoder, branch, "lpaft.bn_branch")
    workers = data.workers if data.workers is not None else default_workers(processes_on_node(accelerator))
    trained, lp, aft = probe_and_finetune(
        encoder, LabelledImages(images, labels), section, seed, accelerator.device, bars, workers
    )
    card = stage_method_card(run.record.method, section, branch if run.encoder.config.bn_branches else None)
    record = LpaftRecord(
        source_step=step,
        seed=seed,
        settings=section.model_dump(mode="json"),
        encoder=EncoderRecord(config=trained.config.to_diff_dict(), weights_prefix="", export_branch=None, method=card),
        cluster_sizes=torch.bincount(labels, minlength=section.clusters).tolist(),
        history={"lp": lp.history, "aft": aft.history},
    )
    if accelerator.is_main_process:
        write_lpaft(run_dir, trained, record)
    accelerator.wait_for_everyone()
    return LpaftResult(run_dir, True, record)


def command_section(recipe: Recipe, overrides: list[str] | None, where: Path) -> LpaftConfig:
    """The stage's settings for ``robustcl lpaft``: the run's lpaft section (the authors' defaults when it has
    none) with ``--set lpaft.KEY=VALUE`` overrides."""
    for text in overrides or []:
        if parse_override(text)[0][0] != "lpaft":
            raise UserError(
                f"robustcl lpaft sets lpaft.* keys only, got '{text.partition('=')[0]}'",
                "--set",
                "change other settings in the run's recipe (robustcl pretrain), or pass only lpaft.* keys",
            )
    base = recipe if recipe.lpaft is not None else recipe.model_copy(update={"lpaft": LpaftConfig()})
    return override_recipe(base, overrides, f"lpaft settings of {where}").lpaft  # type: ignore[return-value]


def lpaft_command(run_dir: Path, overrides: list[str] | None = None, progress: bool = True) -> LpaftResult:
    """``robustcl lpaft RUN_DIR``: the stage on a finished run, under the run directory's lock, then the run's export
    (and its evaluation when the recipe's eval.after_pretrain) made again from the stage's encoder."""
    run_dir = Path(run_dir)
    recipe = read_run_recipe(run_dir)
    if recipe is None:
        raise UserError(
            "not a robustcl run directory (no recipe.yaml)", str(run_dir), "give the --output-dir of robustcl pretrain"
        )
    section = command_section(recipe, overrides, run_dir)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    check_world_size(accelerator)
    fix = "wait until it ends: robustcl lpaft needs the run directory to itself"
    with on_main_process(accelerator, lambda: folder_lock(run_dir, "lpaft", fix)):
        result = run_lpaft(run_dir, section, accelerator=accelerator, progress=progress)
        report = export_and_evaluate(run_dir, recipe, accelerator, progress)
        if report is not None and accelerator.is_main_process:
            _add_to_summary(run_dir, report)
    accelerator.wait_for_everyone()
    return result


def _add_to_summary(run_dir: Path, report: EvalReport) -> None:
    """The stage's encoder's figures in ``summary.json``, which stated the pretrained encoder's (if any)."""
    summary = run_dir / SUMMARY_FILE
    if summary.is_file():
        write_json(summary, {**json.loads(summary.read_text()), "evaluation": report.model_dump(mode="json")})
