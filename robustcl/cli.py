"""The ``robustcl`` command line. It only parses arguments and calls the library; each command imports what it
needs in its body (``import robustcl`` itself loads neither torch nor transformers), so ``--help`` answers at once
(tests/test_startup.py)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from .errors import UserError

app = typer.Typer(
    help="Self-supervised adversarial pre-training of robust image encoders (ACL, AdvCL, DeACL, DynACL and "
    "DynACL++, AIR, A-InfoNCE, RoCL; SimCLR).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
recipe_app = typer.Typer(help="Inspect and check recipes without training.", no_args_is_help=True)
app.add_typer(recipe_app, name="recipe")

RecipeArg = Annotated[
    Path,
    typer.Argument(help="Recipe YAML file, e.g. recipes/acl.yaml.", show_default=False, metavar="RECIPE"),
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        metavar="KEY=VALUE",
        help="Override one recipe key, KEY=VALUE with a dotted key (repeatable), e.g. --set training.max_steps=100. "
        "Values are parsed as YAML; fractions like 8/255 are accepted for pixel values.",
        show_default=False,
    ),
]


def _default_run_dir(recipe: Path) -> Path:
    return Path("runs") / recipe.stem


@app.command()
def pretrain(
    recipe: RecipeArg,
    set_: SetOpt = None,
    output_dir: Annotated[
        Path | None,
        typer.Option("--output-dir", "-o", help="Run directory (default: runs/<recipe name>).", show_default=False),
    ] = None,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume/--no-resume",
            help="Resume from the newest complete checkpoint in the run directory; --no-resume refuses to "
            "touch a run directory that already holds checkpoints.",
        ),
    ] = True,
    allow_data_change: Annotated[
        bool,
        typer.Option(
            "--allow-data-change",
            help="Resume even though the training data differs from the data the run started with (rows, "
            "columns, classes, sampled images or labels); the run then records the new data.",
        ),
    ] = False,
) -> None:
    """Pretrain an encoder with the recipe's method; checkpoints, metrics and the exported encoder go to the
    run directory. Works under `accelerate launch` (one or many processes). A finished run started again is left
    as it is; a longer training length (training.max_steps / epochs) resumes it."""
    from .recipe import load_recipe
    from .train import pretrain as run_pretrain

    loaded = load_recipe(recipe, set_)
    run_dir = output_dir or _default_run_dir(recipe)
    summary = run_pretrain(loaded, run_dir, resume=resume, allow_data_change=allow_data_change)
    if not _is_main_process():
        return
    loss = "none logged" if summary.final_loss is None else f"{summary.final_loss:.4f}"
    if summary.already_finished:
        typer.echo(
            f"robustcl: {run_dir} already finished ({summary.steps} steps in {summary.wall_time_s:.1f}s, final "
            f"loss {loss}); nothing changed — raise training.max_steps or training.epochs to train on"
        )
        typer.echo(f"robustcl: its encoder is {summary.encoder_dir}")
    else:
        typer.echo(f"\nrobustcl: trained {summary.steps} steps in {summary.wall_time_s:.1f}s (final loss {loss})")
        typer.echo(f"robustcl: encoder exported to {summary.encoder_dir}")
    if summary.evaluation and not summary.already_finished:
        from .evaluation import format_table

        typer.echo("\n" + format_table(summary.evaluation))


@app.command()
def evaluate(
    model: Annotated[
        str,
        typer.Argument(
            help="A run directory (robustcl pretrain), an export directory (robustcl export / save_pretrained) "
            "or a Hub repo id; loaded with AutoModel.from_pretrained unless it is a run directory.",
            show_default=False,
        ),
    ],
    protocol: Annotated[
        str | None,
        typer.Option(
            help="slf: frozen encoder, linear head on clean data; alf: frozen encoder, head trained on PGD-10 "
            "examples; aff: whole network, TRADES; all: the three in turn, each into its own folder (--output: a "
            "folder), and their mean (the RobustSSL leaderboard's ensemble) in ensemble.json beside them. Default: "
            "the recipe's eval.protocol (slf).",
            show_default=False,
        ),
    ] = None,
    attack: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated measurements besides clean accuracy: pgd20 (RA) and/or autoattack (AA, needs "
            'pip install "robustcl[autoattack]"). Default: the recipe\'s eval.attacks (pgd20).',
            show_default=False,
        ),
    ] = None,
    set_: SetOpt = None,
    recipe: Annotated[
        Path | None,
        typer.Option(
            help="Recipe whose eval section to use (default: the one stored with the model, else the defaults).",
            show_default=False,
        ),
    ] = None,
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            "-o",
            help="eval.json to write, or a folder for it (a name without .json); the robustness curve PNG and the "
            "finetuned classifier/ go beside it. Refused inside model folders, among a run's own files and over "
            "files that are not evaluation reports (default: RUN_DIR/eval/PROTOCOL/eval.json, else "
            "eval/MODEL/PROTOCOL/eval.json).",
            show_default=False,
        ),
    ] = None,
    attack_subset: Annotated[
        int | None,
        typer.Option(
            min=1, help="Attack only the first N test images (quick checks); SA still uses all.", show_default=False
        ),
    ] = None,
    bn_branch: Annotated[
        str | None,
        typer.Option(
            help="BN branch of a multi-branch run directory (default: the exported one, 'pgd').", show_default=False
        ),
    ] = None,
    trust_remote_code: Annotated[
        bool,
        typer.Option(help="Allow a Hub model's own Python code to run (robustcl models never need it)."),
    ] = False,
    preset: Annotated[
        str | None,
        typer.Option(
            help="Finetuning settings of a reference script: robustssl (the RobustSSL leaderboard: last epoch "
            "kept), acl, advcl, deacl, dynacl (the methods' own scripts) or robustcl (epoch picked on a validation "
            "split, never on the test split). Keys set with --set or in the recipe still win. Default: the "
            "recipe's eval.preset (robustssl).",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Finetune a classifier on the encoder with a protocol (SLF / ALF / AFF, set up as --preset's reference script
    does) and measure clean (SA), PGD-20 (RA) and AutoAttack (AA) accuracy on the test split. Writes eval.json and an
    accuracy-vs-epsilon PNG. Works under `accelerate launch` (the test set is sharded over processes)."""
    attacks = [a.strip() for a in attack.split(",") if a.strip()] if attack is not None else None
    _evaluate_protocols(
        model,
        protocol,
        output,
        recipe,
        attacks=attacks,
        overrides=set_,
        attack_subset=attack_subset,
        bn_branch=bn_branch,
        trust_remote_code=trust_remote_code,
        preset=preset,
    )


def _evaluate_protocols(
    model: str, protocol: str | None, output: Path | None, recipe: Path | None, **options: Any
) -> None:
    """Evaluate ``model`` with ``protocol`` (``all``: slf, alf and aff in turn, then their ensemble), printing each
    report as it is written; ``options`` are :func:`robustcl.evaluation.evaluate`'s."""
    from .evaluation import evaluate as run_evaluate
    from .evaluation import format_table
    from .evaluation.ensemble import ALL, format_ensemble, planned_outputs, write_ensemble
    from .recipe import load_recipe

    reports = []
    for protocol_run, output_run in planned_outputs(protocol, output):  # --protocol all: slf, alf, aff in turn
        loaded = load_recipe(recipe) if recipe is not None else None
        report = run_evaluate(model, protocol=protocol_run, recipe=loaded, output=output_run, **options)
        reports.append(report)
        if _is_main_process():
            typer.echo("\n" + format_table(report))
            curve = f" and {report.curve_png}" if report.curve_png else ""
            typer.echo(f"robustcl: wrote {report.output}{curve}")
    if protocol == ALL and _is_main_process():
        figures, path = write_ensemble(reports)
        typer.echo("\n" + format_ensemble(figures))
        typer.echo(f"robustcl: wrote {path}")


@app.command()
def export(
    run_dir: Annotated[Path, typer.Argument(help="A run directory written by `robustcl pretrain`.")],
    out_dir: Annotated[
        Path,
        typer.Argument(
            help="Folder to write: new, empty, or an earlier export (a clone of its Hub repo, say), where only the "
            "export's own files are replaced and everything else is kept."
        ),
    ],
    bn_branch: Annotated[
        str | None,
        typer.Option(help="BN branch to export (default: the recipe's export.bn_branch, else 'pgd' when present)."),
    ] = None,
    classifier: Annotated[
        str | None,
        typer.Option(
            help="Export the classifier that `robustcl evaluate RUN_DIR --protocol P` finetuned (slf, alf or aff) "
            "instead of the bare encoder; it loads with AutoModelForImageClassification.",
            show_default=False,
        ),
    ] = None,
    repo_id: Annotated[
        str | None,
        typer.Option(
            help="Hub repo id the model card's loading example names (default: the recipe's export.repo_id, else "
            "OUT_DIR's name).",
            show_default=False,
        ),
    ] = None,
    card_template: Annotated[
        Path | None,
        typer.Option(help="Jinja model card template (default: hub_cards/robustcl_model_card.md).", show_default=False),
    ] = None,
    export_format: Annotated[
        str,
        typer.Option(
            "--format",
            help="remote-code: robustcl's model with its code (any architecture; trust_remote_code=True). native: "
            "transformers' own ResNet (no remote code; normalisation in the image processor), for an ImageNet-stem "
            "encoder with basic or bottleneck blocks.",
        ),
    ] = "remote-code",
) -> None:
    """Export the newest checkpoint as a transformers model folder: model.safetensors, config.json with remote code
    (AutoModel.from_pretrained(OUT_DIR, trust_remote_code=True) works without robustcl), preprocessor_config.json,
    README.md model card, recipe.yaml, and the run's evaluations of exactly these weights (eval/<protocol>/). With
    --format native, config.json is transformers' ResNet: AutoModel.from_pretrained(OUT_DIR) needs no remote code."""
    _export(run_dir, out_dir, bn_branch, classifier, repo_id, card_template, export_format)


def _export(
    run_dir: Path,
    out_dir: Path,
    bn_branch: str | None,
    classifier: str | None,
    repo_id: str | None,
    card_template: Path | None,
    export_format: str,
) -> None:
    """Export the run and say what was exported, with its evaluations (and a warning for each one left out)."""
    from .export import export_run
    from .model_card import given_repo_id

    if repo_id is not None:
        repo_id = given_repo_id(repo_id)  # a name typed here is refused; a default from a folder name is cleaned
    result = export_run(
        run_dir,
        out_dir,
        bn_branch,
        classifier=classifier,
        repo_id=repo_id,
        card_template=card_template,
        export_format=export_format,
    )
    for reason in result.skipped:
        typer.echo(f"robustcl: warning: evaluation not exported — {reason}", err=True)
    what = f"{classifier.upper()} classifier" if classifier else "encoder"
    evals = ", ".join(result.evaluations) or "none (run robustcl evaluate RUN_DIR to add measured accuracy)"
    typer.echo(f"robustcl: {what} exported to {result.out_dir} (evaluations: {evals})")


@app.command()
def cluster(
    recipe: RecipeArg,
    encoder: Annotated[
        str,
        typer.Option(
            help="Encoder whose features are clustered: a run directory, an export directory or a Hub repo id.",
            show_default=False,
        ),
    ],
    set_: SetOpt = None,
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            "-o",
            help="Labels file to write (default: the recipe's method.advcl.pseudo_labels, else "
            "pseudo_labels.safetensors).",
            show_default=False,
        ),
    ] = None,
    seed: Annotated[int | None, typer.Option(help="k-means seed (default: the recipe's training.seed).")] = None,
    normalize: Annotated[bool, typer.Option(help="L2-normalise the features before k-means.")] = True,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per feature-extraction batch.")] = 512,
    revision: Annotated[str | None, typer.Option(help="Hub revision of the encoder.", show_default=False)] = None,
    trust_remote_code: Annotated[
        bool, typer.Option(help="Allow a Hub model's own Python code to run (robustcl models never need it).")
    ] = False,
) -> None:
    """Pseudo-labels for AdvCL: features of the recipe's pretraining images (data section, dataset order) from any
    encoder, then k-means (k-means++ seeding, fixed seed) on the GPU when there is one, for every K in
    method.advcl.clusters. Writes one safetensors file that records which images it labels; point the recipe at it
    with method.advcl.pseudo_labels."""
    from .data.loading import open_pretraining_split, pretraining_images
    from .method_options.advcl import AdvCLSection
    from .pseudo_labels import check_labels_output, compute_pseudo_labels, save_pseudo_labels
    from .recipe import load_recipe
    from .run_layout import PSEUDO_LABELS_FILE

    loaded = load_recipe(recipe, set_)
    advcl = getattr(loaded.method, "advcl", None) or AdvCLSection()  # another method's recipe: AdvCL's defaults
    target = output or Path(advcl.pseudo_labels or PSEUDO_LABELS_FILE)
    check_labels_output(target, "--output" if output else "method.advcl.pseudo_labels")
    images = pretraining_images(open_pretraining_split(loaded.data), loaded.data)
    from .encoder_loading import load_encoder

    model = load_encoder(encoder, revision=revision, trust_remote_code=trust_remote_code).encoder
    labels = compute_pseudo_labels(
        model,
        encoder,
        images,
        advcl.clusters,
        seed=loaded.training.seed if seed is None else seed,
        normalize=normalize,
        batch_size=batch_size,
    )
    path = save_pseudo_labels(target, labels)
    sizes = ", ".join(f"K={k}: {int(v.bincount().count_nonzero())} clusters" for k, v in labels.labels.items())
    typer.echo(f"robustcl: pseudo-labels of {len(images)} images ({sizes}) written to {path}")


@app.command()
def lpaft(
    run_dir: Annotated[
        Path, typer.Argument(help="A finished run directory of robustcl pretrain (DynACL, DynACL-AIR or any method).")
    ],
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            metavar="KEY=VALUE",
            help="Override one lpaft key (repeatable), e.g. --set lpaft.aft.epochs=10. Default settings: the run "
            "recipe's lpaft section, else the authors' (robustcl recipe show --describe lists the keys).",
            show_default=False,
        ),
    ] = None,
) -> None:
    """DynACL++ (Luo et al., ICLR 2023) on a finished run: k-means pseudo-labels (10 clusters) of the pretraining
    images from the encoder's 'normal' BN branch, then linear probing (10 epochs, encoder frozen) and TRADES
    finetuning of encoder and head (25 epochs) on them, without labels, as the authors' assign_label.py and LPAFT.py
    do. The result, a plain-BN encoder of the 'pgd' branch, goes to RUN_DIR/lpaft/ and is what the run's export,
    evaluate and push-to-hub hand over from then on; RUN_DIR/encoder is exported again (and evaluated when the
    recipe's eval.after_pretrain). The pretraining is not changed. A recipe with an lpaft section runs the same stage
    at the end of robustcl pretrain. Works under `accelerate launch`."""
    from .lpaft import lpaft_command

    result = lpaft_command(run_dir, set_)
    if not _is_main_process():
        return
    record = result.record
    done = "ran" if result.ran else "had run already"
    sizes = ", ".join(str(n) for n in record.cluster_sizes)
    typer.echo(f"robustcl: DynACL++ {done} on step {record.source_step} of {run_dir} (cluster sizes {sizes})")
    typer.echo(f"robustcl: encoder ({record.encoder.method.display_name}) exported to {run_dir / 'encoder'}")


@app.command("push-to-hub")
def push_to_hub(
    export_dir: Annotated[Path, typer.Argument(help="A folder written by `robustcl export`.", show_default=False)],
    repo_id: Annotated[str, typer.Argument(help="NAMESPACE/NAME on the Hub, e.g. my-org/acl-r18.", show_default=False)],
    private: Annotated[
        bool, typer.Option(help="Create the repo as private (an existing repo keeps its setting).")
    ] = False,
    revision: Annotated[
        str | None,
        typer.Option(help="Branch to commit to (created from main when missing; default: main).", show_default=False),
    ] = None,
    create_pr: Annotated[bool, typer.Option(help="Open a pull request with the commit instead of committing.")] = False,
    commit_message: Annotated[
        str | None, typer.Option(help="Commit message (default: 'Upload NAME (robustcl VERSION export)').")
    ] = None,
    timeout: Annotated[
        float,
        typer.Option(
            min=1,
            metavar="SECONDS",
            help="Seconds the Hub may stay silent (connecting, between bytes sent or received, waiting for a free "
            "connection) before the push stops and names the request that got no answer. A bound on silence, not on "
            "the whole push: a large model uploads at any steady speed. 60 s leaves the Hub time to check a large "
            "commit before it answers; requests huggingface_hub retries (listing files, pre-upload checks; up to 5 "
            "times) get it per try. Xet storage transfers use hf_xet's own timeouts.",
        ),
    ] = 60.0,
) -> None:
    """Publish an export folder as a single commit (the repo is created if needed). Uses HF_TOKEN or the login cache
    (`hf auth login`) and HF_ENDPOINT; refuses folders that are not a complete export or hold other files."""
    from .hub import push_to_hub as run_push

    result = run_push(
        export_dir,
        repo_id,
        private=private,
        revision=revision,
        create_pr=create_pr,
        commit_message=commit_message,
        timeout=timeout,
    )
    typer.echo(f"robustcl: pushed {len(result.files)} files to {result.repo_url}")
    typer.echo(f"robustcl: commit {result.commit_url}")
    if result.pr_url:
        typer.echo(f"robustcl: pull request {result.pr_url}")
    if result.card_names_other_repo:
        typer.echo(
            f"robustcl: note: the model card's loading example does not name {repo_id}; "
            f"re-export with --repo-id {repo_id} to fix it",
            err=True,
        )


@recipe_app.command("show")
def recipe_show(
    recipe: RecipeArg,
    set_: SetOpt = None,
    describe: Annotated[bool, typer.Option(help="List every key with its default and description.")] = False,
) -> None:
    """Print the fully resolved recipe (defaults filled in, overrides applied) as YAML."""
    from .recipe import describe_keys, load_recipe

    loaded = load_recipe(recipe, set_)
    typer.echo(describe_keys() if describe else loaded.to_yaml(), nl=not describe)


@recipe_app.command("validate")
def recipe_validate(
    recipe: RecipeArg,
    set_: SetOpt = None,
    check_data: Annotated[
        bool,
        typer.Option("--check-data/--no-check-data", help="Also open the dataset and check its columns."),
    ] = True,
) -> None:
    """Check a recipe: keys, types, ranges and (by default) that the dataset opens and has an image column.
    Exits 0 when valid, 2 with a one-line error otherwise."""
    from .methods import method_class
    from .methods.views import original_crop_plan
    from .recipe import load_recipe

    loaded = load_recipe(recipe, set_)
    original_crop_plan(loaded, method_class(loaded.method.name).original_crops)  # settings that only fit together
    if check_data:
        from .data.loading import check_dataset

        d = loaded.data
        image_col, label_col = check_dataset(
            d.path, d.split, name=d.name, image_column=d.image_column, label_column=d.label_column
        )
        typer.echo(
            f"robustcl: {recipe} is valid (data: {d.path} [{d.split}], image column '{image_col}', "
            f"label column {label_col!r})"
        )
    else:
        typer.echo(f"robustcl: {recipe} is valid")


@app.command(context_settings={"allow_interspersed_args": False})
def launch(
    command: Annotated[
        list[str] | None,
        typer.Argument(
            help="The robustcl command every process runs, after --, e.g. -- pretrain recipes/acl.yaml --set ...",
            metavar="-- COMMAND ARGS",
            show_default=False,
        ),
    ] = None,
    gpus: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Processes per node: one per GPU (default: every visible GPU); with --cpu, CPU processes per node "
            "(default 1). The total is --gpus × --nodes.",
            show_default=False,
        ),
    ] = None,
    nodes: Annotated[
        int, typer.Option(min=1, help="Machines taking part; start the same command on each with its --node-rank.")
    ] = 1,
    node_rank: Annotated[
        int | None,
        typer.Option(
            min=0, help="This machine's rank, 0 … NODES-1 (0 runs the main process; $SLURM_NODEID).", show_default=False
        ),
    ] = None,
    main_address: Annotated[
        str | None,
        typer.Option(
            metavar="HOST:PORT",
            help="Address of the node with --node-rank 0 and a free port there, the same on every node "
            "(needed with --nodes > 1).",
            show_default=False,
        ),
    ] = None,
    deepspeed: Annotated[
        Path | None,
        typer.Option(
            metavar="FILE",
            help="Train with DeepSpeed using this DeepSpeed JSON config, e.g. launch/zero2.json (ZeRO-2).",
            show_default=False,
        ),
    ] = None,
    cpu: Annotated[
        bool, typer.Option("--cpu", help="Run on the CPU: the processes form one gloo process group (no GPU needed).")
    ] = False,
    mixed_precision: Annotated[
        str,
        typer.Option(
            metavar="no|bf16|fp16",
            help="Accelerate's default precision for the processes; robustcl pretrain follows the recipe's "
            "training.precision whatever this says.",
        ),
    ] = "no",
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print the equivalent accelerate launch command and exit.")
    ] = False,
) -> None:
    """Run a robustcl command on several GPUs, CPU processes or machines through Accelerate's launcher, with every
    setting explicit (a machine-local `accelerate config` file is not used). Prints the equivalent `accelerate
    launch` command first; exits with the job's exit code.

    \b
    Examples:
      robustcl launch --gpus 8 -- pretrain recipes/acl.yaml
      robustcl launch --cpu --gpus 2 -- pretrain recipes/quickstart.yaml
      robustcl launch --gpus 8 --deepspeed launch/zero2.json -- pretrain recipes/acl.yaml
      robustcl launch --gpus 8 --nodes 2 --node-rank 0 --main-address 10.0.0.1:29500 -- pretrain recipes/acl.yaml
      (and the same with --node-rank 1 on the second machine; launch/slurm.sbatch does this under SLURM)
    """
    _launch(
        command or [],
        gpus,
        dry_run,
        nodes=nodes,
        node_rank=node_rank,
        main_address=main_address,
        deepspeed=deepspeed,
        cpu=cpu,
        mixed_precision=mixed_precision,
    )


def _launch(
    command: list[str], gpus: int | None, dry_run: bool, *, cpu: bool, deepspeed: Path | None, **options: Any
) -> None:
    """Plan the launch (``options`` are :func:`robustcl.launcher.plan_launch`'s) and print it; unless ``dry_run``,
    check this machine and the recipe's batch, start the processes and exit with the job's code."""
    from . import launcher

    commands = typer.main.get_command(app).commands
    names = tuple(name for name in commands if name != "launch")
    if gpus is None:
        gpus = 1 if cpu else launcher.visible_gpus()
        if gpus == 0:
            raise UserError("no GPU is visible", "--gpus", "add --cpu to run on the CPU, or --gpus N on a GPU machine")
    plan = launcher.plan_launch(command, gpus=gpus, deepspeed=deepspeed, cpu=cpu, known_commands=names, **options)
    if dry_run:
        typer.echo(f"robustcl: launching: {plan.shell()}")
        return
    launcher.check_hardware(gpus, cpu, deepspeed)
    launcher.check_pretrain_batch(command, plan.processes, commands["pretrain"])
    config = launcher.default_accelerate_config()
    if config is not None:
        typer.echo(f"robustcl: note: not using {config} (robustcl launch passes every setting itself)", err=True)
    typer.echo(f"robustcl: launching: {plan.shell()}", err=True)
    code = launcher.run_launch(plan)
    if code:
        raise typer.Exit(code)


def _is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"


def _click_errors() -> tuple[type[Exception], type[Exception]]:
    """click's UsageError and ClickException, from whichever click Typer runs on (recent Typers carry their own)."""
    classes = {cls.__name__: cls for cls in typer.BadParameter.__mro__}
    return classes["UsageError"], classes["ClickException"]


def main() -> None:
    """Console entry point: user errors, command-line mistakes included, become one line on stderr and exit code 2;
    bugs keep their traceback."""
    from .preemption import TrainingStopped

    usage_error, click_exception = _click_errors()
    try:
        code = app(standalone_mode=False)
    except usage_error as err:
        if type(err).__name__ == "NoArgsIsHelpError":  # a bare `robustcl` or `robustcl recipe`: the help
            err.show()
            sys.exit(err.exit_code)
        if _is_main_process():
            command = err.ctx.command_path if err.ctx is not None else "robustcl"
            message = " ".join(err.format_message().split()).removesuffix(".")
            print(f"robustcl: error: {message} ({command}) — see {command} --help", file=sys.stderr)
        sys.exit(err.exit_code)
    except click_exception as err:
        err.show()
        sys.exit(err.exit_code)
    except typer.Abort:
        print("Aborted!", file=sys.stderr)
        sys.exit(1)
    except UserError as err:
        if _is_main_process():
            print(f"robustcl: error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
    except TrainingStopped as stopped:
        if _is_main_process():
            print(f"robustcl: {stopped}", file=sys.stderr)
        sys.exit(stopped.exit_code)
    # Without torch.distributed loaded there is no process group, and importing it (accelerate, torch) would cost
    # --help its start-up time.
    if not code and "torch.distributed" in sys.modules:
        from .distributed import end_process_group

        end_process_group()
    sys.exit(code if isinstance(code, int) else 0)
