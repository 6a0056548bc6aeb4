"""The pretraining loop on Accelerate: one loop for every method, precision, accumulation, checkpoints, resume."""

from __future__ import annotations

import json
import platform
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, closing, contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration
from pydantic import ValidationError
from tqdm.auto import tqdm

from .atomic_write import atomic_file
from .collectives import check_replicas_identical, convert_sync_batchnorm
from .data.batches import BatchPlan, EpochBatches, batch_random, plan_batches
from .data.crops import CropPlan
from .data.images import ImageRows
from .data.loading import OpenedSplit, open_pretraining_split, pretraining_images
from .data.placement import ImageFeed, image_feed
from .data.streamed import default_workers
from .deepspeed_support import configure_deepspeed, deepspeed_requested, uses_deepspeed, zero_stage
from .distributed import (
    check_world_size,
    node_main_first,
    on_main_process,
    processes_on_node,
    raise_on_every_process,
)
from .encoder_record import TRAIN_STATE_KEY
from .errors import NonFiniteLoss, UserError
from .eval_report import EvalReport
from .evaluation.preflight import check_after_pretrain
from .fingerprint import data_changes
from .json_files import to_json, write_json
from .locking import folder_lock
from .lpaft import run_lpaft
from .methods import build_method, method_class
from .methods.base import Method
from .methods.views import original_crop_plan
from .model_loading import check_model_size
from .optim import build_optimizer, build_scheduler
from .preemption import StopOnSignal, TrainingStopped
from .recipe import Recipe, TrainingConfig, recipe_differences
from .run_dir import (
    checkpoint_step,
    complete_checkpoints,
    latest_checkpoint,
    load_checkpoint,
    read_run_recipe,
    save_checkpoint,
)
from .run_handover import export_and_evaluate
from .run_layout import DATA_FINGERPRINT_FILE, ENCODER_DIR, LOGS_DIR, METRICS_FILE, RECIPE_FILE, SUMMARY_FILE
from .setup_context import ProcessesSetupContext
from .tracking import check_installed, start_trackers


@dataclass
class RunSummary:
    """What a finished run reports (``summary.json``): totals over every session of the run."""

    run_dir: Path
    encoder_dir: Path
    steps: int
    images_seen: int
    wall_time_s: float
    final_loss: float | None  # the last logged loss (None when no step was logged with one)
    evaluation: EvalReport | None  # the eval.json report when eval.after_pretrain
    already_finished: bool = False  # the run had finished before this command: nothing was changed

    def to_dict(self) -> dict[str, Any]:
        record = {**self.__dict__, "run_dir": str(self.run_dir), "encoder_dir": str(self.encoder_dir)}
        record.pop("already_finished")
        return record


class RunFinished(Exception):
    """Raised by :func:`open_session` when the run directory holds this run, finished: there is nothing to do."""

    def __init__(self, summary: RunSummary) -> None:
        super().__init__(f"{summary.run_dir} already finished")
        self.summary = summary


def _mixed_precision(precision: str, on_cpu: bool) -> str:
    if precision == "auto":
        return "no" if on_cpu else ("bf16" if torch.cuda.is_bf16_supported() else "fp16")
    return {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[precision]


def hardware_description(accelerator: Accelerator) -> str:
    """What the run trains on, e.g. '8 × NVIDIA H100 80GB HBM3' or '2 × CPU process (x86_64)'."""
    n = accelerator.num_processes
    if accelerator.device.type == "cuda":
        return f"{n} × {torch.cuda.get_device_name(accelerator.device)}"
    return f"{n} × {accelerator.device.type.upper()} process ({platform.machine()})"


def make_accelerator(recipe: Recipe, run_dir: Path) -> Accelerator:
    on_cpu = not torch.cuda.is_available()
    check_installed(recipe.logging.trackers)  # a tracker asked for and missing is refused before anything starts
    options: dict[str, Any] = {}
    # A dead or stuck process (a node lost, a full disk) then ends the others after this long instead of never.
    group = {"timeout": timedelta(minutes=recipe.training.dist_timeout_minutes)}
    if deepspeed_requested():
        # Accelerate's CPU switch turns DeepSpeed off; on CPU DeepSpeed needs the gloo backend named instead.
        if on_cpu:
            group["backend"] = "gloo"
    else:
        options["cpu"] = on_cpu
    options["kwargs_handlers"] = [InitProcessGroupKwargs(**group)]
    accelerator = Accelerator(
        mixed_precision=_mixed_precision(recipe.training.precision, on_cpu),
        log_with=recipe.logging.trackers or None,
        project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / LOGS_DIR)),
        **options,
    )
    check_world_size(accelerator)
    return accelerator


def prepare_run_dir(run_dir: Path, recipe: Recipe, resume: bool) -> None:
    """Refuse to mix runs: an existing run dir must hold the same recipe (training length aside)."""
    previous = read_run_recipe(run_dir)
    has_checkpoint = bool(complete_checkpoints(run_dir))
    if previous is None:
        if run_dir.exists() and any(run_dir.iterdir()):
            raise UserError(
                "output directory is not empty and holds no robustcl run",
                str(run_dir),
                "choose another --output-dir",
            )
        return
    if has_checkpoint and not resume:
        raise UserError(
            "output directory already holds a run with checkpoints",
            str(run_dir),
            "resume it (--resume, the default) or choose another --output-dir",
        )
    diffs = recipe_differences(previous, recipe)
    if diffs:
        raise UserError(
            f"output directory holds a run with a different recipe (differs in: {', '.join(diffs)})",
            str(run_dir / RECIPE_FILE),
            "use the run's own recipe (only the training length, training.compile / channels_last / "
            "data_placement / nonfinite / max_skipped_steps / dist_timeout_minutes, data.loading / decoded_max_gb / "
            "workers / bad_images and the eval / export / logging sections may change) or a new --output-dir",
        )


@contextmanager
def _claimed_run_dir(run_dir: Path, recipe: Recipe, resume: bool) -> Iterator[None]:
    """The run directory's lock, held for the block, with the run directory checked under it (a run started
    elsewhere meanwhile cannot slip in between the check and the training)."""
    with folder_lock(run_dir, "pretrain", "wait until it ends, or choose another --output-dir"):
        prepare_run_dir(run_dir, recipe, resume)
        yield


def finished_run(run_dir: Path, recipe: Recipe) -> RunSummary | None:
    """The summary of ``run_dir`` when it is this recipe's run, finished: its summary names its newest checkpoint's
    step and the training length is unchanged (a longer one resumes the run)."""

    def length(r: Recipe) -> tuple[int, int | None]:
        return r.training.epochs, r.training.max_steps

    try:
        record = json.loads((run_dir / SUMMARY_FILE).read_text())
        stored = read_run_recipe(run_dir)
    except (OSError, ValueError, UserError):
        return None
    if not isinstance(record, dict) or stored is None or length(stored) != length(recipe):
        return None
    # Last: it hashes the checkpoint's files, which the session that resumes a longer run does again.
    checkpoint = latest_checkpoint(run_dir, warn=False)
    if checkpoint is None or record.get("steps") != checkpoint_step(checkpoint):
        return None
    try:
        report = record.get("evaluation")
        evaluation = None if report is None else EvalReport.model_validate(report)
        paths = {"run_dir": Path(record["run_dir"]), "encoder_dir": Path(record["encoder_dir"])}
        return RunSummary(**{**record, **paths, "evaluation": evaluation}, already_finished=True)
    except (KeyError, TypeError, ValidationError):
        return None  # a summary of an older layout: the run is finished again, writing a new one


@dataclass
class TrainingData:
    """What the steps train on: the batch plan (processes, micro-batches), the images' order over the epochs, the
    micro-batches' images on the device, and the run's length in optimizer steps."""

    plan: BatchPlan
    batches: EpochBatches
    feed: ImageFeed
    total_steps: int


@dataclass
class Optimisation:
    """What updates the weights: the optimizer (every parameter outside the method's frozen networks, as prepared by
    Accelerate) and the learning-rate schedule (stepped once per optimizer step, checkpointed by the trainer)."""

    optimizer: Any
    scheduler: Any


@dataclass
class Restored:
    """Where the session starts: the step and the run's totals so far, from the checkpoint restored (none: a fresh
    start at step 0)."""

    compute: dict[str, Any]  # images seen, wall time and hardware of the run so far (the model card reports them)
    step: int = 0
    skipped_steps: int = 0  # steps of the run whose update was dropped for a NaN/inf (training.nonfinite: skip)
    checkpoint: Path | None = None


@dataclass
class Session:
    """Everything one training session holds: the method (unwrapped, and as prepared by Accelerate: DDP-wrapped on
    several processes), the data, the optimisation state, where it starts and the run directory's lock."""

    recipe: Recipe
    run_dir: Path
    accelerator: Accelerator
    method: Method
    model: torch.nn.Module
    sync_batchnorm: bool  # BN statistics (and so the BN buffers) shared by all processes
    data: TrainingData
    optimisation: Optimisation
    start: Restored
    held: ExitStack  # the run directory's lock (main process) and the feed's thread, released by close()

    def close(self) -> None:
        """Stop the image feed's prefetching and release the run directory."""
        self.held.close()


def open_session(recipe: Recipe, run_dir: Path, resume: bool = True, allow_data_change: bool = False) -> Session:
    """Set up a run: start Accelerate, lock and check the run directory, load the data onto the device, build the
    method (teacher, pseudo-labels, SyncBN), optimizer and schedule, and restore the newest complete checkpoint.

    Nothing is written into the run directory before every start-up check has passed; a run directory this call
    created is removed again when one fails. Raises :class:`RunFinished` when the run is finished already."""
    run_dir = Path(run_dir)
    if recipe.training.nonfinite == "skip" and deepspeed_requested():
        raise UserError(
            "training.nonfinite: skip is not available under DeepSpeed (its engine applies the update inside the "
            "backward pass, before the loss can be checked)",
            "training.nonfinite",
            "use training.nonfinite: stop with DeepSpeed",
        )
    accelerator = make_accelerator(recipe, run_dir)
    plan = plan_batches(recipe.training, accelerator.num_processes)
    held = ExitStack()
    held.enter_context(on_main_process(accelerator, lambda: _claimed_run_dir(run_dir, recipe, resume)))
    fresh = accelerator.is_main_process and not run_dir.exists()  # decided under the lock
    try:
        finished = finished_run(run_dir, recipe) if resume else None
        if finished is not None:
            raise RunFinished(finished)
        return _start_session(recipe, run_dir, resume, allow_data_change, accelerator, plan, held)
    except BaseException:
        if fresh:
            shutil.rmtree(run_dir, ignore_errors=True)  # a refused start leaves nothing to refuse the next one
        held.close()
        raise


def _check_data(run_dir: Path, fingerprint: dict[str, Any], allow_change: bool, main: bool) -> UserError | None:
    """Why the run cannot go on with this data (it differs from the data the run started with), else None."""
    path = run_dir / DATA_FINGERPRINT_FILE
    if not main or allow_change or not path.is_file():
        return None
    changes = data_changes(json.loads(path.read_text()), fingerprint)
    if not changes:
        return None
    return UserError(
        f"the training data changed since this run started ({'; '.join(changes)})",
        f"data.path, {path}",
        "resume with the data the run started with, or add --allow-data-change to go on training on the new data",
    )


def _open_data(
    recipe: Recipe, run_dir: Path, allow_data_change: bool, accelerator: Accelerator, originals: bool
) -> tuple[OpenedSplit, ImageRows]:
    """The pretraining split, opened (each node's main process first: it prepares the datasets cache), checked
    against the data the run started with, then decoded or left encoded for streaming (data.loading; always streamed
    when ``originals``: the views are cropped from the original images)."""
    progress = accelerator.is_local_main_process and recipe.logging.progress_bar
    opened = node_main_first(accelerator, lambda: open_pretraining_split(recipe.data, progress))
    # Before any decoding: a resume on other data is refused in seconds.
    error = _check_data(run_dir, opened.fingerprint, allow_data_change, accelerator.is_main_process)
    raise_on_every_process(accelerator, error)
    images = pretraining_images(opened, recipe.data, processes_on_node(accelerator), progress, originals)
    if opened.replaced_rows:
        accelerator.print(f"robustcl: {_replaced(opened.replaced_rows)} (data.bad_images: skip)")
    return opened, images


def _start_session(
    recipe: Recipe,
    run_dir: Path,
    resume: bool,
    allow_data_change: bool,
    accelerator: Accelerator,
    plan: BatchPlan,
    held: ExitStack,
) -> Session:
    """Data, method, optimizer, restored checkpoint, in that order; then the run directory becomes this run's."""
    # Refused before any data is opened when the method cannot take crops of the original images.
    crops = original_crop_plan(recipe, method_class(recipe.method.name).original_crops)
    check_after_pretrain(recipe, accelerator)  # the evaluation the run ends with: refused now, not after training
    opened, images = _open_data(recipe, run_dir, allow_data_change, accelerator, crops is not None)
    data = _training_data(recipe, accelerator, plan, images, crops, held)
    method, sync_bn, speed = _build_method(recipe, run_dir, accelerator, data, images)
    model, optimisation = _prepare_optimisation(recipe, accelerator, method, data)
    start = _restore(accelerator, run_dir, resume, optimisation)
    if accelerator.is_main_process:
        _adopt_run_dir(recipe, run_dir, opened.fingerprint, allow_data_change, start.step)
    accelerator.wait_for_everyone()
    session = Session(recipe, run_dir, accelerator, method, model, sync_bn, data, optimisation, start, held)
    _announce(session, speed)
    start.compute["hardware"] = list(dict.fromkeys([*start.compute["hardware"], hardware_description(accelerator)]))
    start.compute["dataset_images"] = len(images)
    return session


def _training_data(
    recipe: Recipe,
    accelerator: Accelerator,
    plan: BatchPlan,
    images: ImageRows,
    crops: CropPlan | None,
    held: ExitStack,
) -> TrainingData:
    """The epochs' batch order and the feed that puts each micro-batch's images on the device."""
    t = recipe.training
    batches = EpochBatches(
        len(images), t.batch_size, t.seed, plan.processes, accelerator.process_index, plan.accumulation
    )
    total_steps = t.max_steps or t.epochs * batches.steps_per_epoch
    workers = recipe.data.workers
    workers = default_workers(processes_on_node(accelerator)) if workers is None else workers
    feed = image_feed(images, batches, accelerator.device, t.data_placement, workers, total_steps, crops)
    held.callback(feed.close)  # its prefetch thread or decoding workers, also when a later start-up check fails
    return TrainingData(plan, batches, feed, total_steps)


def _build_method(
    recipe: Recipe, run_dir: Path, accelerator: Accelerator, data: TrainingData, images: ImageRows
) -> tuple[Method, bool, str]:
    """The method, set up, with BN synchronised across processes when it should be and the speed settings on;
    returns it, whether BN is synchronised, and the speed settings switched on."""
    t = recipe.training
    # Built on the host before it moves to the device.
    check_model_size(recipe.model, "model.widths, model.block_layers", "lower them, or use a machine with more memory")
    torch.manual_seed(t.seed)
    method = build_method(recipe)
    # Before the checkpoint is restored and before DDP wraps the method: a teacher or pseudo-labels come from
    # outside the weights (a DeACL student starts as its teacher; a restored checkpoint then overrides that).
    context = ProcessesSetupContext(
        run_dir, images, data.batches.steps_per_epoch, data.total_steps, accelerator.device,
        progress=accelerator.is_main_process, accelerator=accelerator,
    )  # fmt: skip
    method.setup(context)
    sync_bn = data.plan.processes > 1 and (
        t.sync_batchnorm if t.sync_batchnorm is not None else type(method).contrastive
    )
    if sync_bn:
        convert_sync_batchnorm(method)  # same parameters and buffers: checkpoints and exports are unchanged
    return method, sync_bn, apply_speed_settings(method, t, accelerator.device)


def _prepare_optimisation(
    recipe: Recipe, accelerator: Accelerator, method: Method, data: TrainingData
) -> tuple[torch.nn.Module, Optimisation]:
    """The optimizer and schedule of the method, and the method and optimizer prepared by Accelerate."""
    t, plan = recipe.training, data.plan
    lr = recipe.optimizer.peak_lr(t.batch_size)
    # The method's frozen networks are updated by the method itself (or never), not by the optimizer.
    optimizer = build_optimizer([p for p in method.parameters() if p.requires_grad], recipe.optimizer, lr)
    scheduler = build_scheduler(optimizer, recipe.schedule, data.total_steps, data.batches.steps_per_epoch, lr)
    accelerator.gradient_accumulation_steps = plan.accumulation
    configure_deepspeed(accelerator, recipe, plan.micro_batch, plan.accumulation, frozen_in_weights(method))
    model, optimizer = accelerator.prepare(method, optimizer)
    # The scheduler is not passed to prepare(): we step it once per optimizer step (Accelerate's wrapper would
    # step it once per process) and checkpoint its state ourselves.
    return model, Optimisation(optimizer, scheduler)


def frozen_in_weights(method: Method) -> list[str]:
    """The names of the method's frozen networks that are part of its weights (what ZeRO stage 3 would partition).
    Every parameter that requires no gradient must belong to a declared frozen network, so that messages can name
    it."""
    declared = {name: net for name, net in method.frozen_networks().items() if any(net is m for m in method.modules())}
    covered = {id(p) for net in declared.values() for p in net.parameters()}
    stray = [name for name, p in method.named_parameters() if not p.requires_grad and id(p) not in covered]
    if stray:
        raise RuntimeError(
            f"{type(method).__name__} has parameters that require no gradient outside the networks its "
            f"frozen_networks() declares: {', '.join(stray[:3])}"
        )
    return list(declared)


def _restore(accelerator: Accelerator, run_dir: Path, resume: bool, optimisation: Optimisation) -> Restored:
    """The newest complete checkpoint loaded into the prepared model, optimizer and schedule (when resuming)."""
    start = Restored(compute={"images_seen": 0, "wall_time_s": 0.0, "hardware": []})
    checkpoint = latest_checkpoint(run_dir, warn=accelerator.is_main_process) if resume else None
    if checkpoint is None:
        return start
    train_state = load_checkpoint(accelerator, checkpoint)
    optimisation.scheduler.load_state_dict(train_state["scheduler"])
    return Restored(
        compute=train_state.get("compute", start.compute),
        step=int(train_state["step"]),
        skipped_steps=int(train_state.get("skipped_steps", 0)),
        checkpoint=checkpoint,
    )


def _adopt_run_dir(recipe: Recipe, run_dir: Path, fingerprint: dict[str, Any], allow_change: bool, step: int) -> None:
    """Only now, with every start-up check passed: the recipe (and the data it trains on) become the run's, and the
    log forgets the steps after the one the run resumes from."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / RECIPE_FILE).write_text(recipe.to_yaml())
    if allow_change or not (run_dir / DATA_FINGERPRINT_FILE).is_file():
        write_json(run_dir / DATA_FINGERPRINT_FILE, fingerprint)
    drop_metrics_after(run_dir / METRICS_FILE, step)


def _announce(session: Session, speed: str) -> None:
    recipe, data, start, accelerator = session.recipe, session.data, session.start, session.accelerator
    lr = recipe.optimizer.peak_lr(recipe.training.batch_size)
    accelerator.print(
        f"robustcl: {data.plan.describe()}; peak lr {lr:g} (optimizer.lr_scaling {recipe.optimizer.lr_scaling}); "
        f"SyncBN {'on' if session.sync_batchnorm else 'off'}; data {_feed_description(data.feed)}"
        f"{'; ' + speed if speed else ''}"
    )
    if start.checkpoint is not None:
        accelerator.print(f"robustcl: resumed from {start.checkpoint} (step {start.step})")


def _feed_description(feed: ImageFeed) -> str:
    if feed.placement == "streamed":
        return f"streamed (decoded per batch by {feed.workers or 'no'} worker process(es))"
    return "decoded, on the device" if feed.placement == "device" else "decoded, in host memory"


def _replaced(rows: list[int]) -> str:
    shown = ", ".join(map(str, rows[:5])) + (", …" if len(rows) > 5 else "")
    return f"{len(rows):,} unreadable image(s) replaced by the next readable row (rows {shown})"


def drop_metrics_after(path: Path, step: int) -> None:
    """Forget the logged records of steps after ``step``: a run killed since its last checkpoint repeats those
    steps, and the log should hold each step once (replaced atomically: a kill here loses nothing)."""
    if not path.exists():
        return
    lines = path.read_text().splitlines(keepends=True)
    # A kill mid-write can leave a last line without its end.
    kept = [line for line in lines if line.endswith("\n") and json.loads(line)["step"] <= step]
    if kept != lines:
        with atomic_file(path) as tmp:
            tmp.write_text("".join(kept))


def apply_speed_settings(method: Method, t: TrainingConfig, device: torch.device) -> str:
    """channels_last and torch.compile of the encoder (null: on for GPUs); returns what was switched on. Both keep the
    parameter names, so checkpoints and exports do not depend on them."""
    on_gpu = device.type == "cuda"
    done = []
    if on_gpu:
        # TF32 for fp32 matmuls and convolutions (fp32 attacks, evaluation): tensor cores with fp32 range.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    if t.channels_last if t.channels_last is not None else on_gpu:
        method.to(memory_format=torch.channels_last)
        done.append("channels_last")
    if t.compile if t.compile is not None else on_gpu:
        # In place: the state dict keeps its names. BN branch and train/eval mode are guarded (a few graphs).
        method.encoder.compile()
        done.append("torch.compile(encoder)")
    return " + ".join(done)


def accumulate_gradients(session: Session, step: int) -> dict[str, torch.Tensor]:
    """Forward and backward of every micro-batch of optimizer step ``step``: afterwards each parameter's
    ``.grad`` holds the step's gradient, averaged over processes (one all-reduce, at the last micro-batch), and
    ``optimizer.step()`` applies it. (Under DeepSpeed the engine keeps the gradients and takes the step itself
    in the last backward.) Returns this process's metrics (detached, averaged over its micro-batches)."""
    s, t = session, session.recipe.training
    accelerator, plan = s.accelerator, s.data.plan
    totals: dict[str, torch.Tensor] = {}
    for micro in range(plan.accumulation):
        batch, indices = s.data.feed.batch(step, micro)
        random = batch_random(
            t.seed, step, micro, accelerator.device, plan.micro_batch, accelerator.process_index, plan.processes
        )
        # Accelerate skips the gradient all-reduce until the last micro-batch and divides the loss by the
        # accumulation steps (DeepSpeed's engine does both itself).
        with accelerator.accumulate(s.model):
            loss, metrics = s.model(batch, random, indices, step)
            accelerator.backward(loss)
        for name, value in {"loss": loss.detach(), **metrics}.items():
            totals[name] = totals.get(name, 0) + value.float() / plan.accumulation
    return totals


def _step_is_finite(session: Session, loss: torch.Tensor) -> bool:
    """Whether this step's loss (on every process) and gradients are finite: one host sync per step. Under fp16
    Accelerate's gradient scaler already skips overflowing steps, and DeepSpeed keeps the gradients in its engine:
    there only the loss is checked."""
    bad = (~torch.isfinite(loss)).float()
    if session.accelerator.scaler is None and not uses_deepspeed(session.accelerator):
        grads = [p.grad for p in session.method.parameters() if p.grad is not None]
        if grads:  # after the all-reduce: the same on every process
            norm = torch.nn.utils.get_total_norm(grads, error_if_nonfinite=False)
            bad = bad + (~torch.isfinite(norm)).float()
    if session.accelerator.num_processes > 1:
        bad = session.accelerator.reduce(bad, "sum")
    return bad.item() == 0


def train_step(session: Session, step: int) -> dict[str, torch.Tensor] | None:
    """Optimizer step ``step`` (0-based): the method's ``before_step``, every micro-batch's forward and backward,
    the update, the schedule, then the method's ``after_step``.

    Returns the step's metrics, or None when its loss or a gradient was NaN/inf: then no update was made, the
    method's ``after_step`` is not called and, with ``training.nonfinite: skip``, the BatchNorm statistics are as
    before the step (a NaN forward would poison them): a skipped step changes nothing but the schedule, which still
    advances, so the learning rate stays a function of the step."""
    method, optimisation = session.method, session.optimisation
    # Only a run that goes on after a NaN step needs the statistics from before it.
    keep = session.recipe.training.nonfinite == "skip"
    buffers = list(method.buffers()) if keep else []
    before = [b.clone() for b in buffers]
    method.before_step(step)
    metrics = accumulate_gradients(session, step)
    finite = _step_is_finite(session, metrics["loss"])
    if finite:
        optimisation.optimizer.step()
    elif buffers:
        torch._foreach_copy_(buffers, before)
    optimisation.scheduler.step()
    optimisation.optimizer.zero_grad(set_to_none=True)
    if not finite:
        return None
    method.after_step(step)  # under DeepSpeed the engine applied the update in the last backward
    return metrics


def _non_finite_stop(session: Session, step: int, skipped: int, last_checkpoint: Path | None) -> NonFiniteLoss:
    t = session.recipe.training
    kept = f"the last good checkpoint is {last_checkpoint}" if last_checkpoint else "no checkpoint was written yet"
    if t.nonfinite == "skip":
        return NonFiniteLoss(
            f"{skipped} steps had a NaN/inf loss or gradient, more than training.max_skipped_steps "
            f"{t.max_skipped_steps} (the last: step {step}); {kept}",
            str(session.run_dir),
            "the run diverges: train again with a lower optimizer.lr in a new --output-dir",
        )
    update = "DeepSpeed had applied its update" if uses_deepspeed(session.accelerator) else "no update was made"
    return NonFiniteLoss(
        f"the loss or a gradient is NaN/inf at step {step} ({update}, nothing saved after it); {kept}",
        str(session.run_dir),
        "to skip such steps, run the same command with --set training.nonfinite=skip (it resumes from the last "
        "good checkpoint); to train more gently, use a lower optimizer.lr in a new --output-dir",
    )


def _stop_agreed(stop: StopOnSignal, accelerator: Accelerator, step: int, every: int) -> bool:
    """Whether to stop after ``step``. One process decides at every step; several agree at the logging steps (an
    all-reduce there, where the step already synchronises), so all of them checkpoint the same step."""
    if accelerator.num_processes == 1:
        return stop.received is not None
    if step % every:
        return False
    flag = torch.tensor([1.0 if stop.received else 0.0], device=accelerator.device)
    return accelerator.reduce(flag, "sum").item() > 0


def _last_logged_loss(path: Path) -> float | None:
    """The loss of the newest ``metrics.jsonl`` record that has one (a resumed run continues from it)."""
    if not path.is_file():
        return None
    for line in reversed(path.read_text().splitlines()):
        loss = json.loads(line).get("loss")
        if loss is not None:
            return float(loss)
    return None


def pretrain(recipe: Recipe, run_dir: Path, resume: bool = True, allow_data_change: bool = False) -> RunSummary:
    """Train ``recipe`` into ``run_dir`` (resuming from its newest complete checkpoint), run the ``lpaft`` stage when
    the recipe has one (DynACL++; skipped when its output for the newest checkpoint is there), export the encoder,
    evaluate the export when ``eval.after_pretrain`` (its model card then states the figures) and write
    ``summary.json``. A run that finished already is left as it is (its summary is returned)."""
    try:
        session = open_session(recipe, run_dir, resume, allow_data_change)
    except RunFinished as finished:
        return finished.summary
    try:
        summary = train(session)
        bars = recipe.logging.progress_bar
        if recipe.lpaft is not None:  # DynACL++: its encoder is the one exported and evaluated below
            run_lpaft(session.run_dir, recipe.lpaft, accelerator=session.accelerator, progress=bars)
        summary.evaluation = export_and_evaluate(session.run_dir, recipe, session.accelerator, bars)
        write_summary(session, summary)
        return summary
    finally:
        session.close()


def train(session: Session) -> RunSummary:
    """Train from the session's step to the last; the run's summary so far (no evaluation yet)."""
    compute, last_loss = train_loop(session)
    return RunSummary(
        run_dir=session.run_dir,
        encoder_dir=session.run_dir / ENCODER_DIR,
        steps=max(session.start.step, session.data.total_steps),  # a shortened run ends at the step it had reached
        images_seen=int(compute["images_seen"]),
        wall_time_s=float(compute["wall_time_s"]),
        final_loss=last_loss,
        evaluation=None,
    )


@dataclass
class MetricsWindow:
    """The steps since the last logged record: the sums of their metrics (finite steps only), how many steps it
    holds and how many of them were finite, and when it began."""

    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    steps: int = 0
    finite: int = 0
    started: float = field(default_factory=time.perf_counter)

    def add(self, metrics: dict[str, torch.Tensor] | None) -> None:
        """A step's metrics (None: a skipped step, which counts for the speed but has none)."""
        self.steps += 1
        if metrics is None:
            return
        for name, value in metrics.items():
            self.sums[name] = self.sums.get(name, 0) + value
        self.finite += 1

    def means(self, accelerator: Accelerator) -> dict[str, float]:
        """Every metric's mean over the window's finite steps and all processes (none: only skipped steps)."""
        return {name: accelerator.reduce(v, "mean").item() / self.finite for name, v in self.sums.items()}

    def images_per_s(self, batch_size: int) -> float:
        return self.steps * batch_size / max(time.perf_counter() - self.started, 1e-9)


@dataclass
class LoopState:
    """What the loop carries from step to step besides the weights."""

    step: int
    skipped: int  # steps of the run skipped for a NaN/inf
    checkpoint: Path | None  # the newest good checkpoint
    compute: dict[str, Any]  # the newest checkpoint's record of the whole run (the start's until one is written)
    last_loss: float | None  # the last logged loss


def train_loop(session: Session) -> tuple[dict[str, Any], float | None]:
    """Train from the session's step to its last, logging and checkpointing; returns the compute record of the
    newest checkpoint (totals over every session of the run) and the last logged loss."""
    recipe, accelerator, start = session.recipe, session.accelerator, session.start
    total_steps, every = session.data.total_steps, recipe.logging.every_steps
    start_trackers(accelerator, recipe, session.run_dir, start.step)
    bar = _progress_bar(session)
    started, window = time.perf_counter(), MetricsWindow()
    last_loss = _last_logged_loss(session.run_dir / METRICS_FILE)
    state = LoopState(start.step, start.skipped_steps, start.checkpoint, start.compute, last_loss)
    encoder_record = session.method.encoder_record().model_dump(mode="json")
    session.model.train()
    with StopOnSignal() as stop, closing(bar):
        while state.step < total_steps:
            metrics = train_step(session, state.step)
            state.step += 1
            window.add(metrics)
            if metrics is None:
                _skipped(session, state)
            if state.step % every == 0 or state.step == total_steps:
                log_window(session, window, state, bar)
                window = MetricsWindow()
            bar.update(1)
            stopping = _stop_agreed(stop, accelerator, state.step, every)
            checkpoint_every = recipe.training.checkpoint_every
            if (checkpoint_every and state.step % checkpoint_every == 0) or state.step == total_steps or stopping:
                save_progress(session, state, started, encoder_record)
            if stopping:
                raise TrainingStopped(
                    f"stopped by {stop.received or 'a signal to another process'} after step {state.step} of "
                    f"{total_steps}; checkpoint {state.checkpoint} written — run the same command again to resume"
                )
    return state.compute, state.last_loss


def _progress_bar(session: Session) -> tqdm:
    return tqdm(
        total=session.data.total_steps,
        initial=session.start.step,
        desc="pretrain",
        unit="step",
        dynamic_ncols=True,
        disable=not (session.accelerator.is_main_process and session.recipe.logging.progress_bar),
    )


def _skipped(session: Session, state: LoopState) -> None:
    """Count a step skipped for a NaN/inf; stop the run when it may not go on."""
    t = session.recipe.training
    state.skipped += 1
    if t.nonfinite == "stop" or state.skipped > t.max_skipped_steps:
        raise _non_finite_stop(session, state.step, state.skipped, state.checkpoint)
    if session.accelerator.is_main_process:
        print(f"robustcl: warning: NaN/inf loss or gradient at step {state.step}: skipped", file=sys.stderr)


def log_window(session: Session, window: MetricsWindow, state: LoopState, bar: tqdm) -> None:
    """The window's record: appended to ``metrics.jsonl``, shown on the progress bar and sent to the trackers."""
    recipe, accelerator, feed = session.recipe, session.accelerator, session.data.feed
    # A window of skipped steps alone has no metrics to average: its record carries no loss.
    means = window.means(accelerator)
    record = {
        "step": state.step,
        "epoch": session.data.batches.epoch_of(state.step - 1),
        **means,
        "lr": session.optimisation.scheduler.get_last_lr()[0],
        "images_per_s": window.images_per_s(recipe.training.batch_size),
        "skipped_steps": state.skipped,
    }
    if recipe.data.bad_images == "skip" and feed.placement == "streamed":
        replaced = torch.tensor(float(len(feed.replaced_rows)), device=accelerator.device)
        record["replaced_images"] = int(accelerator.reduce(replaced, "sum").item())
    state.last_loss = means.get("loss", state.last_loss)
    if accelerator.is_main_process:
        with (session.run_dir / METRICS_FILE).open("a") as f:
            f.write(to_json(record) + "\n")
        loss = "-" if state.last_loss is None else f"{state.last_loss:.4f}"
        bar.set_postfix(loss=loss, lr=f"{record['lr']:.3g}", img_s=f"{record['images_per_s']:.0f}")
    accelerator.log(record, step=state.step)


def save_progress(session: Session, state: LoopState, started: float, encoder_record: dict[str, Any]) -> None:
    """A checkpoint of ``state.step`` with the run's totals so far; it becomes the newest good one."""
    t, start, accelerator = session.recipe.training, session.start, session.accelerator
    # Totals over every session of the run: the model card reports the compute behind the weights.
    so_far = {
        **start.compute,
        "images_seen": start.compute["images_seen"] + (state.step - start.step) * t.batch_size,
        "wall_time_s": start.compute["wall_time_s"] + time.perf_counter() - started,
    }
    # Without SyncBN each process keeps its own BN running statistics (DDP broadcasts process 0's); ZeRO-3 keeps
    # only a partition of each parameter per process.
    if zero_stage(accelerator) < 3:
        check_replicas_identical(session.method, buffers=session.sync_batchnorm)
    train_state = {
        "step": state.step,
        "scheduler": session.optimisation.scheduler.state_dict(),
        "compute": so_far,
        "skipped_steps": state.skipped,
        # The encoder as a standalone artifact: export and evaluation read it without the method.
        TRAIN_STATE_KEY: encoder_record,
    }
    run_dir, step = session.run_dir, state.step
    state.checkpoint = save_checkpoint(accelerator, session.model, run_dir, step, t.keep_checkpoints, train_state)
    state.compute = so_far


def write_summary(session: Session, summary: RunSummary) -> None:
    """``summary.json``, then the end of the session's collectives."""
    accelerator = session.accelerator
    if accelerator.is_main_process:
        write_json(session.run_dir / SUMMARY_FILE, summary.to_dict())
    accelerator.wait_for_everyone()
    accelerator.end_training()  # also tears down the process group: nothing collective after this
