"""The typed recipe: YAML file + ``--set key=value`` overrides → a validated :class:`Recipe`.

Every key has a default and a one-line description (``robustcl recipe show`` prints them). Errors name the key
path and the file and suggest the closest valid key.
"""

from __future__ import annotations

import difflib
from fractions import Fraction
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, get_args, get_origin

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ModelWrapValidatorHandler,
    SerializeAsAny,
    SerializerFunctionWrapHandler,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_serializer,
    model_validator,
)

from .errors import UserError, one_line, shown
from .method_registry import METHODS, OLD_LAYOUT_BLOCKS, OLD_LAYOUT_KEYS, default_method, method_options
from .models.configuration_robustcl import (
    MAX_BLOCKS_PER_STAGE,
    MAX_PARAMETERS,
    MAX_STAGES,
    MAX_WIDTH,
    estimate_parameters,
)
from .models.resnet import STEM_KERNEL, STEM_PADDING
from .tracker_names import unknown_tracker


def _parse_fraction(value: Any) -> Any:
    # Papers write ε as "8/255"; accept that spelling in YAML and --set.
    if isinstance(value, str) and "/" in value:
        try:
            return float(Fraction(value.replace(" ", "")))
        except ZeroDivisionError:
            raise ValueError("division by zero") from None
        except OverflowError:
            raise ValueError("the fraction is too large for a float") from None
        except ValueError:
            return value  # not a fraction: the float validator reports it as not a number
    return value


PixelFloat = Annotated[float, BeforeValidator(_parse_fraction)]
NonNegativeFloat = Annotated[float, Field(ge=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
PositiveInt = Annotated[int, Field(ge=1)]
NonNegativeInt = Annotated[int, Field(ge=0)]
Hue = Annotated[float, Field(ge=0, le=0.5)]  # ColorJitter's hue shift is a fraction of the colour circle, at most half
# Seeds feed torch generators, also as seed + 1 and seed × 1,000,003 + index (evaluation): 32 bits keep every one
# of them in range.
Seed = Annotated[int, Field(ge=0, le=2**32 - 1)]
# Side of the square images data is decoded to. A 4096² RGB image is 48 MB decoded; beyond that a ResNet encoder is
# not what anyone trains, and a typo (100000) would ask for 30 GB per image.
MAX_RESOLUTION = 4096


def _low_at_most_high(pair: tuple[float, float]) -> tuple[float, float]:
    if pair[0] > pair[1]:
        raise ValueError(f"must be [low, high] with low ≤ high, got {list(pair)}")
    return pair


# What the augmentation settings may be: the recipe's augment section and the augmentations' own parameters
# (data/augment.py) are both checked by these types.
Probability = Annotated[float, Field(ge=0, le=1)]
Interpolation = Literal["bicubic", "bilinear"]
AreaFraction = Annotated[float, Field(gt=0, le=1)]
CropScale = Annotated[tuple[AreaFraction, AreaFraction], AfterValidator(_low_at_most_high)]
CropRatio = Annotated[tuple[PositiveFloat, PositiveFloat], AfterValidator(_low_at_most_high)]
Jitter = tuple[NonNegativeFloat, NonNegativeFloat, NonNegativeFloat, Hue]  # brightness, contrast, saturation, hue
BlurSide = Annotated[float, Field(ge=0, le=MAX_RESOLUTION)]  # a σ beyond the largest image side only flattens it
BlurSigma = Annotated[tuple[BlurSide, BlurSide], AfterValidator(_low_at_most_high)]


def _type_args(annotation: Any) -> set[Any]:
    """The plain types and Literal values a field's annotation is made of (unions, Annotated and lists opened)."""
    if get_origin(annotation) is Literal:
        return set(get_args(annotation))
    args = get_args(annotation)
    return set().union(*(_type_args(a) for a in args)) if args else {annotation}


def _numbers_only(annotation: Any) -> bool:
    """Whether a field holds numbers (or lists of them) and no booleans: there, true/false is a mistake."""
    kinds = _type_args(annotation)
    return bool(kinds & {int, float}) and bool not in kinds and not any(isinstance(k, bool) for k in kinds)


class Section(BaseModel):
    # allow_inf_nan: a NaN or infinite ε, learning rate or probability is never meant, and only shows up as a
    # NaN loss steps later.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_booleans_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        # Python counts True as 1: pydantic would read `max_steps: true` as one step.
        items = value if isinstance(value, (list, tuple)) else [value]
        if any(isinstance(item, bool) for item in items) and _numbers_only(
            cls.model_fields[info.field_name].annotation
        ):
            raise ValueError("expected a number, got a boolean (true/false)")
        return value


class AugmentConfig(Section):
    """SimCLR view augmentation, run on the device per sample."""

    crop_scale: CropScale = Field(
        (0.08, 1.0), description="RandomResizedCrop area range: fractions of the image, 0 < low ≤ high ≤ 1"
    )
    crop_ratio: CropRatio = Field(
        (3 / 4, 4 / 3), description="RandomResizedCrop aspect-ratio (width / height) range, 0 < low ≤ high"
    )
    interpolation: Interpolation = Field("bicubic", description="crop resampling")
    flip_p: Probability = Field(0.5, description="horizontal flip probability")
    jitter: Jitter = Field(
        (0.4, 0.4, 0.4, 0.1), description="colour jitter strength: brightness, contrast, saturation (≥ 0), hue (0–0.5)"
    )
    jitter_p: Probability = Field(0.8, description="probability of applying colour jitter")
    grayscale_p: Probability = Field(0.2, description="probability of converting to grayscale")
    blur_p: tuple[Probability, Probability] = Field(
        (0.0, 0.0),
        description="probability of blurring the first and the second SimCLR view with PIL's GaussianBlur(radius=σ) "
        "(after grayscale), as solo-learn's per-view pipelines (solo/utils/contrastive_dataloader.py); one number: "
        "both views; read by method simclr",
    )
    blur_sigma: BlurSigma = Field(
        (0.1, 2.0), description="the blur's σ, uniform in [low, high] per image (solo-learn GaussianBlur: [0.1, 2.0])"
    )
    solarize_p: tuple[Probability, Probability] = Field(
        (0.0, 0.0),
        description="probability of solarising (PIL ImageOps.solarize: grey levels ≥ 128 inverted) the first and "
        "the second SimCLR view (after the blur), as solo-learn's per-view pipelines (asymmetric: [0.0, 0.2]); "
        "one number: both views; read by method simclr",
    )
    weak_padding: NonNegativeInt = Field(
        4, description="weak view (AdvCL, DeACL): RandomCrop with this zero padding + flip"
    )
    crop_on: Literal["decoded", "original"] = Field(
        "decoded",
        description="decoded: RandomResizedCrop of the image decoded at data.resolution (the CIFAR recipes); original: "
        "sampled on each image's own width × height and taken by the data workers (ImageNet; streams the data)",
    )

    @field_validator("blur_p", "solarize_p", mode="before")
    @classmethod
    def _one_per_view(cls, value: Any) -> Any:
        # One number is both views' probability, as solo-learn replicates a single value to every pipeline.
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return [value, value]
        if isinstance(value, (list, tuple)) and len(value) == 1:
            return [value[0], value[0]]
        if isinstance(value, (list, tuple)) and len(value) != 2:
            raise ValueError(f"must be [first view, second view] or one number for both, got {list(value)}")
        return value


class DataConfig(Section):
    """Where the pretraining images come from (any Hugging Face image dataset)."""

    path: str = Field(
        "uoft-cs/cifar10",
        description="Hub id, local dataset folder, save_to_disk folder, image folder, or builtin:digits",
    )
    name: str | None = Field(None, description="dataset configuration name (load_dataset's `name`)")
    split: str = Field("train", description="split used for pretraining")
    image_column: str | None = Field(None, description="image column; auto-detected when unambiguous")
    label_column: str | None = Field(None, description="class-label column (evaluation only); auto-detected")
    resolution: int = Field(
        32, gt=0, le=MAX_RESOLUTION, description="images are resized to resolution×resolution (at most 4096)"
    )
    max_samples: int | None = Field(
        None, gt=0, description="use a seeded random subset of N images of the split (the same N rows every run)"
    )
    loading: Literal["auto", "decoded", "streamed"] = Field(
        "auto",
        description="decoded: every image decoded once into memory; streamed: kept encoded, decoded per batch by "
        "worker processes (memory flat in the dataset size); auto: decoded when it fits data.decoded_max_gb and memory",
    )
    decoded_max_gb: float = Field(
        8.0, gt=0, description="auto decodes the split up front only when its decoded pixels take at most this (GB)"
    )
    workers: int | None = Field(
        None, ge=0, le=256, description="decoding processes per training process when streamed (null: its CPU share)"
    )
    bad_images: Literal["stop", "skip"] = Field(
        "stop",
        description="an unreadable image: stop naming its row, or skip it (the next readable row stands in; counted)",
    )


class ModelConfig(Section):
    """The ResNet encoder (CIFAR or ImageNet stem; basic, bottleneck or wide pre-activation blocks); normalisation
    lives inside the model."""

    # Bounded like the model's own config (limits and why: models/configuration_robustcl.py), so that a recipe
    # is refused by `recipe validate` and before `pretrain` writes anything, naming the key.
    block: Literal["basic", "bottleneck", "wide_preact"] = Field(
        "basic",
        description="basic: two 3×3 convs (ResNet-18: block_layers [2,2,2,2]); bottleneck: 1×1-3×3-1×1, 4× output "
        "channels, stride on the 3×3 (ResNet-50: block_layers [3,4,6,3], widths [64,128,256,512], stem imagenet → "
        "2048 features; ResNet-101: [3,4,23,3]); wide_preact: pre-activation wide basic block as TRADES/AWP "
        "(WRN-34-10: block_layers [5,5,5], widths [160,320,640], stem cifar; WRN-28-10: [4,4,4])",
    )
    block_layers: list[Annotated[int, Field(ge=1, le=MAX_BLOCKS_PER_STAGE)]] = Field(
        [2, 2, 2, 2], min_length=1, max_length=MAX_STAGES, description="blocks per stage (ResNet-18: 2,2,2,2)"
    )
    widths: list[Annotated[int, Field(ge=1, le=MAX_WIDTH)]] = Field(
        [64, 128, 256, 512],
        min_length=1,
        max_length=MAX_STAGES,
        description="channels per stage (a bottleneck stage outputs 4× its width)",
    )
    stem_width: int | None = Field(
        None, ge=1, le=MAX_WIDTH, description="stem conv channels (default widths[0]; 16 for wide_preact)"
    )
    stem: Literal["cifar", "imagenet"] = Field("cifar", description="cifar: 3×3 s1 conv; imagenet: 7×7 s2 + pool")
    stem_padding: int | None = Field(None, ge=0, description="stem conv padding (default 1 cifar, 3 imagenet)")
    image_mean: list[float] = Field(
        [0.485, 0.456, 0.406], min_length=3, max_length=3, description="normalisation mean inside the model (RGB)"
    )
    image_std: list[PositiveFloat] = Field(
        [0.229, 0.224, 0.225], min_length=3, max_length=3, description="normalisation std inside the model (RGB)"
    )

    @model_validator(mode="after")
    def _same_lengths(self) -> ModelConfig:
        if len(self.block_layers) != len(self.widths):
            raise ValueError("model.block_layers and model.widths must have the same length")
        return self

    @model_validator(mode="after")
    def _not_too_large(self) -> ModelConfig:
        size = self.estimated_parameters()
        if size > MAX_PARAMETERS:
            raise ValueError(
                f"model.block_layers {self.block_layers} and model.widths {self.widths} make about {size:,} "
                f"parameters, more than the {MAX_PARAMETERS:,} robustcl builds: lower model.block_layers or "
                "model.widths"
            )
        return self

    def estimated_parameters(self, bn_branches: int = 1) -> int:
        """Values in the encoder's state dict (with ``bn_branches`` copies of every BatchNorm), without building it."""
        return estimate_parameters(
            self.block_layers,
            self.widths,
            self.stem,
            len(self.image_mean),
            bn_branches,
            block=self.block,
            stem_width=self.stem_width,
        )


class MethodOptions(Section):
    """Which self-supervised method trains the encoder, and that method's own keys. Each method defines a subclass
    (robustcl/method_options/: ``name: Literal[...]`` and the keys it reads, e.g. ``temperature`` and its
    sub-section); a recipe's section is validated as the subclass its ``method.name`` names in the registry
    (robustcl/method_registry.py, which a test may extend at run time), so a recipe holds, and a resume compares,
    only what its method reads."""

    name: str = Field(description="method to run (registry in robustcl/method_registry.py)")
    # Whether the method builds solo-learn's per-view pipelines (augment.blur_p, augment.solarize_p).
    per_view_extras: ClassVar[bool] = False

    @model_validator(mode="wrap")
    @classmethod
    def _as_the_named_method(cls, data: Any, handler: ModelWrapValidatorHandler[MethodOptions]) -> MethodOptions:
        if cls is not MethodOptions or not isinstance(data, dict):
            return handler(data)  # a method's own class, or something the base refuses as not a section
        options = named_options(data)
        if options is None:
            names = [repr(name) for name in METHODS]
            expected = f"{', '.join(names[:-1])} or {names[-1]}" if len(names) > 1 else names[0]
            raise ValidationError.from_exception_data(
                cls.__name__,
                [{"type": "literal_error", "loc": ("name",), "input": data["name"], "ctx": {"expected": expected}}],
            )
        return options.model_validate(_own_keys(data, options))

    def check_recipe(self, recipe: Recipe) -> None:
        """Raise ValueError (naming the keys) for settings outside ``method.*`` this method cannot train with;
        called on the whole recipe once every section is valid. A method extends it, calling ``super()``."""
        if self.per_view_extras:
            return
        # Any other method would silently train without them.
        a = recipe.augment
        for key, value in (("blur_p", a.blur_p), ("solarize_p", a.solarize_p)):
            if any(value):
                readers = [n for n in METHODS if method_options(n).per_view_extras]
                raise ValueError(
                    f"augment.{key} is read by {_methods(readers)} only, got {list(value)} with method.name "
                    f"{self.name}; set it to 0"
                )


def named_options(section: dict[Any, Any]) -> type[MethodOptions] | None:
    """The options class of the method ``section`` names (the default method when it names none); None when the
    name is not registered."""
    name = section.get("name", default_method())
    return method_options(name) if isinstance(name, str) and name in METHODS else None


def _own_keys(section: dict[Any, Any], options: type[MethodOptions]) -> dict[Any, Any]:
    """``section`` for ``options`` to validate: an old-layout section with the chosen method's keys only; another
    method's key refused naming it (an unknown key is left to the options class, which suggests the closest)."""
    fields = options.model_fields
    if OLD_LAYOUT_BLOCKS <= section.keys():
        # Written before each method owned its options (run directories, exports): every block, the others unread.
        return {k: v for k, v in section.items() if k in fields or k not in OLD_LAYOUT_KEYS}
    for key in section:
        readers = [] if key in fields else [n for n in METHODS if key in method_options(n).model_fields]
        if readers:
            name = section.get("name", default_method())
            raise ValueError(
                f"method.{key} is read by {_methods(readers)}, not by method {name} (method.name {name}): remove "
                f"method.{key}, or set method.name to {' or '.join(readers)}"
            )
    return section


def _methods(names: list[str]) -> str:
    return f"method {names[0]}" if len(names) == 1 else f"methods {', '.join(names)}"


def _default_method_options() -> MethodOptions:
    return method_options(default_method())()


class AttackConfig(Section):
    """The L∞ PGD attack used inside pretraining (pixel space, images in [0, 1])."""

    epsilon: PixelFloat = Field(8 / 255, ge=0, description="L∞ radius (accepts '8/255')")
    step_size: PixelFloat = Field(2 / 255, ge=0, description="PGD step (accepts '2/255')")
    steps: int = Field(5, ge=0, description="PGD iterations")
    random_start: bool = Field(True, description="uniform random start inside the ε-ball")
    clamp_start: bool = Field(
        False,
        description="clamp x + δ₀ into [0, 1] before the first gradient; false (the authors' code: ACL's "
        "PGD_contrastive, AdvCL, DynACL): the first gradient is at the unclamped start, each step is clamped",
    )
    bn_mode: Literal["eval", "train"] = Field("eval", description="BN mode of the model while attacking")
    negatives: Literal["global", "local"] = Field(
        "global",
        description="the negatives of the attacked contrastive loss (acl, advcl, dynacl; deacl's attack has none, "
        "simclr no attack) on several processes. global: every process's images, gathered in each PGD step, so "
        "the attack is the one process would run on the whole batch, as the authors' attacks see the whole batch "
        "(ACL train_simCLR.py and DynACL train_DynACL.py PGD_contrastive on one GPU, AdvCL pretraining_advCL.py "
        "AttackPGD over nn.DataParallel); one all-gather of the embeddings per PGD step. local: this process's "
        "images only (batch_size / processes negatives, no communication, faster)",
    )
    # fp32 until a GPU measurement shows the bf16 attack costs ≤ 0.5 points of RA: under autocast the first
    # convolution sees the perturbed image in bf16, which quantises a 2/255 step (issue 20).
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "fp32",
        description="auto: as training.precision; fp32: full precision even under mixed-precision training (the "
        "authors train in fp32); "
        "bf16: the attack's passes under bf16 autocast (the perturbation stays fp32)",
    )


class OptimizerConfig(Section):
    name: Literal["lars", "sgd"] = Field("lars", description="lars (You et al.) or sgd")
    lr: float = Field(5.0, gt=0, description="peak learning rate (of reference_batch_size with lr_scaling)")
    weight_decay: float = Field(1e-6, ge=0, description="L2 weight decay (all parameters)")
    momentum: float = Field(0.9, ge=0, lt=1, description="momentum")
    trust_coefficient: float = Field(
        1e-3, gt=0, description="LARS trust coefficient η (ACL: 1e-3; solo-learn CIFAR SimCLR: 0.02)"
    )
    trust_eps: float = Field(
        0.0,
        ge=0,
        description="LARS: added to the trust ratio's denominator ‖g‖ + wd‖w‖ (solo-learn solo/utils/lars.py: "
        "1e-8; ACL optimizer/lars.py: none)",
    )
    exclude_bias_and_norm: bool = Field(
        False,
        description="LARS: 1-D tensors (biases, BatchNorm weights and biases) step by lr·g, with neither trust "
        "ratio nor weight decay (solo-learn exclude_bias_n_norm); false: every tensor is adapted and decayed (ACL)",
    )
    clip_lr: bool = Field(
        False,
        description="LARS: the trust ratio is clipped to min(ratio / lr, 1), so no tensor steps faster than lr "
        "(solo-learn clip_lr / grad_clip_lars); false: unclipped (ACL)",
    )
    lr_outside_momentum: bool = Field(
        False,
        description="LARS: the momentum buffer sums trust·(g + wd·w) and each step moves w by lr·buffer (torch SGD, "
        "as solo-learn's LARS); false: the buffer sums lr·trust·(g + wd·w) (ACL). Equal while lr is constant",
    )
    nesterov: bool = Field(False, description="Nesterov momentum (sgd only)")
    lr_scaling: Literal["none", "linear", "sqrt"] = Field(
        "none",
        description="peak lr = lr × f(training.batch_size / reference_batch_size); none: lr is used as written",
    )
    reference_batch_size: int = Field(256, gt=0, description="global batch size that optimizer.lr is given for")

    @model_validator(mode="after")
    def _nesterov_needs_momentum(self) -> OptimizerConfig:
        # torch.optim.SGD refuses it only when the optimizer is built, after the data is loaded.
        if self.name == "sgd" and self.nesterov and self.momentum == 0:
            raise ValueError("optimizer.nesterov needs optimizer.momentum > 0 (sgd)")
        return self

    def peak_lr(self, batch_size: int) -> float:
        """The learning rate a run with global batch ``batch_size`` trains with (independent of processes)."""
        ratio = batch_size / self.reference_batch_size
        return self.lr * {"none": 1.0, "linear": ratio, "sqrt": ratio**0.5}[self.lr_scaling]


class ScheduleConfig(Section):
    name: Literal["cosine", "constant"] = Field("cosine", description="learning-rate schedule after the warm-up")
    warmup_epochs: float = Field(10, ge=0, description="linear warm-up length in epochs")
    min_lr: float = Field(1e-6, ge=0, description="final learning rate of the cosine")
    unit: Literal["step", "epoch"] = Field(
        "step",
        description="how often the lr changes: step (every optimizer step, as ACL's train_simCLR.py) or epoch "
        "(held for a whole epoch and set at its start from the epoch index, as DynACL's train_DynACL.py and "
        "DeACL's Lightning scheduler step it); either way a function of the step, so resuming is exact",
    )
    warmup_start_lr: float | None = Field(
        None,
        ge=0,
        description="lr of the first warm-up step (or epoch), rising linearly to the peak at the warm-up's last one "
        "(pl_bolts LinearWarmupCosineAnnealingLR, DeACL: 0.003); null: peak / warm-up length (ACL, DynACL)",
    )

    @model_validator(mode="after")
    def _whole_warmup_epochs(self) -> ScheduleConfig:
        if self.unit == "epoch" and self.warmup_epochs != int(self.warmup_epochs):
            raise ValueError(
                f"schedule.warmup_epochs must be a whole number of epochs with schedule.unit epoch, got "
                f"{self.warmup_epochs:g}"
            )
        return self


class TrainingConfig(Section):
    epochs: int = Field(1000, gt=0, description="training length in epochs (ignored when max_steps is set)")
    max_steps: int | None = Field(None, gt=0, description="training length in optimizer steps")
    batch_size: int = Field(
        512, gt=0, description="global batch size in images per optimizer step (all processes together)"
    )
    micro_batch_size: int | None = Field(
        None,
        gt=0,
        description="images per process per forward pass (to fit memory); null: batch_size / processes. "
        "Gradient accumulation steps = batch_size / (processes × micro_batch_size)",
    )
    sync_batchnorm: bool | None = Field(
        None,
        description="BatchNorm statistics over the global batch across processes; null: on for contrastive "
        "methods (acl, simclr, advcl, dynacl), off for deacl",
    )
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field("auto", description="auto: bf16 on GPU, fp32 on CPU")
    compile: bool | None = Field(None, description="torch.compile the encoder; null: on for GPU, off for CPU")
    channels_last: bool | None = Field(
        None, description="channels-last memory format for the convolutions; null: on for GPU, off for CPU"
    )
    data_placement: Literal["auto", "device", "host"] = Field(
        "auto",
        description="where decoded data (data.loading) lives. device: the uint8 dataset is on the training device; "
        "host: it stays in host memory and each batch is gathered and copied ahead in a background thread; auto: "
        "device when it takes at most a quarter of the free device memory",
    )
    dist_timeout_minutes: float = Field(
        30, gt=0, le=1440, description="how long a process waits for the others in a collective before failing"
    )
    checkpoint_every: int = Field(1000, ge=0, description="checkpoint every N steps (0: only at the end)")
    keep_checkpoints: int = Field(2, gt=0, description="complete checkpoints kept in the run directory")
    nonfinite: Literal["stop", "skip"] = Field(
        "stop",
        description="a step whose loss or gradients are NaN/inf — stop: end the run, naming the step and the last "
        "good checkpoint; skip: drop the step's update (and its BatchNorm statistics), log it, go on",
    )
    max_skipped_steps: int = Field(
        10, ge=0, description="with nonfinite: skip, stop once more steps than this were skipped in the run"
    )
    seed: Seed = Field(0, description="seed for initialisation, data order, augmentation and attack starts (0 … 2³²−1)")

    @field_validator("batch_size", "micro_batch_size")
    @classmethod
    def _two_images_at_least(cls, value: int | None) -> int | None:
        # A batch of one fails inside the step (BatchNorm in train mode needs two values per channel, and a 1×1
        # feature map of one image has one); a contrastive batch of one has no negatives to learn from either.
        if value == 1:
            raise ValueError("a batch needs at least 2 images (BatchNorm statistics, contrastive negatives)")
        return value


class LoggingConfig(Section):
    every_steps: int = Field(10, gt=0, description="log metrics every N steps")
    trackers: list[str] = Field(
        [],
        description="experiment trackers besides metrics.jsonl, any Accelerate supports (tensorboard, wandb, mlflow, "
        '…), each installed with its extra: pip install "robustcl[wandb]"',
    )
    project: str = Field(
        "robustcl", min_length=1, description="the trackers' project (W&B project, MLflow experiment, logs/<project>)"
    )
    progress_bar: bool = Field(True, description="progress bar on the main process")

    @field_validator("trackers")
    @classmethod
    def _accelerate_trackers(cls, names: list[str]) -> list[str]:
        for name in names:
            problem = unknown_tracker(name)
            if problem:
                raise ValueError(problem)
        return names


class EvalDataConfig(Section):
    """The downstream dataset: any labelled image dataset, opened like data.path."""

    path: str | None = Field(None, description="dataset (as data.path); default: the pretraining dataset")
    name: str | None = Field(None, description="dataset configuration name")
    train_split: str = Field("train", description="split the head (or network) is finetuned on")
    test_split: str = Field("test", description="split SA / RA / AA are measured on")
    image_column: str | None = Field(None, description="image column; auto-detected when unambiguous")
    label_column: str | None = Field(None, description="class-label column; auto-detected when unambiguous")
    resolution: int | None = Field(
        None, gt=0, le=MAX_RESOLUTION, description="image size (default: data.resolution; at most 4096)"
    )
    max_train: int | None = Field(None, gt=0, description="use a seeded random subset of N training images")
    max_test: int | None = Field(None, gt=0, description="use a seeded random subset of N test images")
    val_fraction: float = Field(0.1, gt=0, lt=1, description="share of the training split held out for model selection")
    center_crop: float = Field(
        1.0,
        gt=0,
        le=1,
        description="images are resized to resolution / center_crop on the shorter side, then the centre cut "
        "(ImageNet evaluation: 0.875, i.e. 256 → 224; 1: the whole shorter side)",
    )


class FinetuneConfig(Section):
    """One finetuning protocol: optimiser, schedule, training attack and model selection. Every key not set is filled
    by eval.preset (robustcl/evaluation/presets.py names the script each preset follows)."""

    epochs: int = Field(25, gt=0, description="finetuning epochs")
    batch_size: int = Field(512, gt=0, description="finetuning batch size")
    lr: float = Field(0.1, gt=0, description="SGD learning rate")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum")
    weight_decay: float = Field(2e-4, ge=0, description="SGD weight decay")
    milestones: list[int] = Field([15, 20], description="epochs after which the lr is multiplied by gamma")
    gamma: float = Field(0.1, gt=0, description="lr decay factor at each milestone")
    train_encoder: bool = Field(False, description="train the encoder too (AFF); else it stays frozen")
    augment: bool = Field(False, description="random crop (pad 4) + horizontal flip of the training images")
    bn_mode: Literal["auto", "eval", "train"] = Field(
        "auto",
        description="the encoder's BatchNorm in the training passes. eval: running statistics, never changed; train: "
        "batch statistics, the running ones follow the finetuning data, also of a frozen encoder (DeACL "
        "adv_finetune.py); auto: train when the encoder trains, else eval",
    )
    head_init: Literal["default", "zeros"] = Field(
        "default",
        description="the linear head's start. zeros: weight and bias 0 (the scripts of RobustSSL_Benchmark, DynACL "
        "and ACL load a zeroed fc); default: nn.Linear's seeded random initialisation",
    )
    train_attack: Literal["none", "pgd", "trades"] = Field(
        "none", description="none: clean CE; pgd: CE on PGD examples; trades: CE + beta·KL on KL-PGD examples"
    )
    trades_beta: float = Field(6.0, ge=0, description="TRADES robustness weight")
    attack_steps: int = Field(10, ge=0, description="steps of the training attack")
    epsilon: PixelFloat = Field(8 / 255, ge=0, description="L∞ radius of the training attack")
    step_size: PixelFloat = Field(2 / 255, ge=0, description="step of the training attack")
    clamp_start: bool = Field(
        True,
        description="the training attack's start x + δ₀ is clamped into [0, 1] before the first gradient; false (the "
        "reference finetuning scripts): the first gradient is at the unclamped start, each step is clamped",
    )
    trades_random_start: bool = Field(
        True,
        description="TRADES' KL attack starts at x + 0.001·N(0, 1) (TRADES, ACL, DeACL, RobustSSL_Benchmark); false: "
        "at x itself (DynACL utils.py trades_loss_dual)",
    )
    trades_target: Literal["shared", "separate"] = Field(
        "shared",
        description="TRADES' KL target softmax(f(x)): shared: from the CE's own forward pass; separate: from one more "
        "clean pass, as DeACL trades/trades.py computes it (the same values; in BN train mode the running statistics "
        "move once more)",
    )
    dual_bn: bool = Field(
        False,
        description="TRADES with two BatchNorm branches: clean images through 'normal', adversarial ones through "
        "'pgd' (RobustSSL_Benchmark / DynACL trades_loss_dual); the classifier keeps 'pgd'. 'normal' starts from a "
        "run directory's 'normal' branch when it has one, else as a copy of the evaluated branch",
    )
    select_by: Literal["clean", "robust", "final"] = Field(
        "clean",
        description="which epoch's weights are kept. clean / robust: best accuracy on the validation split (carved "
        "from the training split: eval.data.val_fraction) clean or under PGD; final: the last epoch, no validation "
        "split (the whole training split trains, as the reference scripts do)",
    )
    select_attack_steps: int | None = Field(
        None, ge=0, description="PGD steps of robust selection (null: attack_steps; ACL and AdvCL validate with 20)"
    )
    drop_last: bool = Field(
        False,
        description="each epoch leaves out the last, partial batch (a DataLoader's drop_last, as DynACL LPAFT.py "
        "trains); false: it trains as a smaller batch",
    )

    def encoder_bn_train(self) -> bool:
        """Whether the encoder's BatchNorm runs in train mode (batch statistics) in the training passes."""
        return self.train_encoder if self.bn_mode == "auto" else self.bn_mode == "train"


class EvalAttackConfig(Section):
    """The measurement attacks on the test split (RA: PGD with CE; AA: AutoAttack)."""

    epsilon: PixelFloat = Field(8 / 255, ge=0, description="L∞ radius of RA and AA")
    step_size: PixelFloat = Field(2 / 255, ge=0, description="PGD step of RA")
    steps: int = Field(20, ge=0, description="PGD steps of RA")
    random_start: bool = Field(True, description="uniform random start inside the ε-ball")
    curve_epsilons: list[Annotated[PixelFloat, Field(ge=0)]] = Field(
        [0, 2 / 255, 4 / 255, 8 / 255, 16 / 255],
        description="radii of the accuracy-vs-ε curve (PGD, step scaled with ε); [] skips the curve",
    )
    autoattack_version: Literal["standard", "plus", "rand"] = Field("standard", description="AutoAttack version")
    batch_size: int = Field(256, gt=0, description="test images attacked per batch (per process)")


class CorruptionsConfig(Section):
    """Common-corruption accuracy (CIFAR-10-C style): the finetuned classifier's clean accuracy on a corrupted copy of
    the test images, per corruption × severity 1..5, as GodXuxilie/RobustSSL_Benchmark reports it
    (Finetuning_Methods/Vanilla_Finetuning/utils.py, eval_test_OOD). Layout read: one split with a row per image ×
    corruption × severity, as CIFAR-10-C is on the Hub (randall-lab/cifar10-c: image, label, corruption_name,
    corruption_level)."""

    path: str | None = Field(
        None,
        description="corrupted test set (Hub id or local, as data.path), e.g. randall-lab/cifar10-c; null: not "
        "measured",
    )
    name: str | None = Field(None, description="dataset configuration name")
    split: str = Field("test", description="split holding the corrupted images")
    image_column: str | None = Field(None, description="image column; auto-detected when unambiguous")
    label_column: str | None = Field(
        None, description="class-label column; auto-detected when it is the only ClassLabel (randall-lab: label)"
    )
    corruption_column: str = Field("corruption_name", description="column naming each row's corruption")
    severity_column: str = Field("corruption_level", description="column holding each row's severity, 1..5")
    corruptions: Annotated[list[str], Field(min_length=1)] | None = Field(
        None,
        description="corruptions measured (null: every one in the data); the benchmark's 15 (no speckle_noise, "
        "gaussian_blur, spatter, saturate): [shot_noise, gaussian_noise, impulse_noise, contrast, zoom_blur, "
        "motion_blur, glass_blur, defocus_blur, snow, pixelate, brightness, fog, jpeg_compression, "
        "elastic_transform, frost]",
    )
    max_samples: int | None = Field(
        None, gt=0, description="use a seeded random subset of N rows of the split (quick checks)"
    )


class EvalConfig(Section):
    """Downstream evaluation (robustcl evaluate): finetuning protocol, then SA / RA / AA on the test split."""

    data: EvalDataConfig = Field(default_factory=EvalDataConfig)
    protocol: Literal["slf", "alf", "aff"] = Field("slf", description="slf | alf | aff (--protocol overrides)")
    # Frozen: the preset fills the sections when the recipe is built (read, --set, --preset), not on assignment.
    preset: Literal["robustssl", "acl", "advcl", "deacl", "dynacl", "robustcl"] = Field(
        "robustssl",
        frozen=True,
        description="fills every eval.slf / alf / aff key not set (--preset overrides): robustssl: the RobustSSL "
        "leaderboard's vanilla_finetuning.py (last epoch kept); acl, advcl, deacl, dynacl: the method's own "
        "finetuning scripts; robustcl: the honest one, the epoch picked on a validation split, never on the test "
        "split (sources: robustcl/evaluation/presets.py)",
    )
    slf: FinetuneConfig = Field(
        default_factory=lambda: _preset_default("slf"),
        description="standard linear finetuning: frozen encoder, linear head on clean images",
    )
    alf: FinetuneConfig = Field(
        default_factory=lambda: _preset_default("alf"),
        description="adversarial linear finetuning: frozen encoder, head trained on adversarial examples",
    )
    aff: FinetuneConfig = Field(
        default_factory=lambda: _preset_default("aff"),
        description="adversarial full finetuning: whole network, TRADES",
    )
    attack: EvalAttackConfig = Field(default_factory=EvalAttackConfig)
    attacks: list[Literal["pgd20", "autoattack"]] = Field(["pgd20"], description="measurements besides SA")
    attack_subset: int | None = Field(None, gt=0, description="attack only the first N test images")
    corruptions: CorruptionsConfig = Field(default_factory=CorruptionsConfig)
    after_pretrain: bool = Field(False, description="run this evaluation at the end of robustcl pretrain")
    save_classifier: bool = Field(
        True, description="save the finetuned classifier beside eval.json (for robustcl export --classifier)"
    )
    seed: Seed = Field(
        0, description="seed of the validation split, head initialisation, shuffling, attacks (0 … 2³²−1)"
    )

    @model_validator(mode="before")
    @classmethod
    def _fill_from_preset(cls, data: Any, info: ValidationInfo) -> Any:
        """Every eval.slf / alf / aff key not given takes the preset's value; the given ones stay."""
        from .evaluation.presets import DEFAULT_PRESET, PRESETS, PROTOCOL_KEYS, is_legacy, legacy_changes, preset_values

        # An assignment (validate_assignment: one of this model's own fields named, no parent data) validates the
        # assigned value as it is: a section assigned in Python is taken whole, as before presets.
        assignment = info.field_name in cls.model_fields and info.data is None
        if not isinstance(data, dict) or assignment:
            return data
        name = data.get("preset", DEFAULT_PRESET)
        if not isinstance(name, str) or name not in PRESETS:
            return data  # the field's own check names the choices
        filled = dict(data)
        for protocol in PROTOCOL_KEYS:
            given = filled.get(protocol)
            if isinstance(given, FinetuneConfig):
                given = given.model_dump(include=given.model_fields_set)
            given = {} if given is None else given
            if not isinstance(given, dict):
                continue  # not a section: its validation says so
            if "preset" not in data and is_legacy(given):
                # Written whole by robustcl before presets existed (a run directory's or an export's recipe): only
                # what differs from that version's protocol was chosen by its user.
                given = legacy_changes(protocol, given)
            filled[protocol] = {**preset_values(name, protocol), **given}
        return filled

    @model_validator(mode="after")
    def _dual_bn_needs_trades(self) -> EvalConfig:
        # Two BN branches need both kinds of image in each step: TRADES passes clean and adversarial ones.
        for protocol in ("slf", "alf", "aff"):
            cfg = getattr(self, protocol)
            if cfg.dual_bn and cfg.train_attack != "trades":
                raise ValueError(
                    f"eval.{protocol}.dual_bn needs eval.{protocol}.train_attack: trades (clean and adversarial "
                    f"images in each step), got {cfg.train_attack}"
                )
        return self

    @model_serializer(mode="wrap")
    def _changes_from_preset(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """eval.slf / alf / aff written as what differs from the preset: read back, the recipe is the same, and
        another eval.preset (--preset, --set) still fills every key the user did not choose."""
        from .evaluation.presets import PROTOCOL_KEYS, preset_values

        data = handler(self)
        for protocol in PROTOCOL_KEYS:
            preset = preset_values(self.preset, protocol)
            data[protocol] = {k: v for k, v in data[protocol].items() if k not in preset or v != preset[k]}
        return data


def _preset_default(protocol: str) -> FinetuneConfig:
    from .evaluation.presets import DEFAULT_PRESET, preset_values

    return FinetuneConfig(**preset_values(DEFAULT_PRESET, protocol))


class ExportConfig(Section):
    bn_branch: str | None = Field(None, description="BN branch exported (default: 'pgd' when present)")
    license: str = Field("apache-2.0", description="license identifier written into the model card metadata")
    repo_id: str | None = Field(
        None, description="Hub repo id the model card's loading example names (default: the export folder's name)"
    )

    # Both go into the model card's YAML metadata and text: anything but an identifier could rewrite them.
    @field_validator("license")
    @classmethod
    def _license_identifier(cls, value: str) -> str:
        allowed = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-+_")
        if not (0 < len(value) <= 64 and value[0].isalnum() and set(value) <= allowed):
            raise ValueError(
                "must be a license identifier as the Hub lists them (letters, digits, '.', '-', '+', '_'), "
                "e.g. apache-2.0, mit, cc-by-4.0 or other"
            )
        return value

    @field_validator("repo_id")
    @classmethod
    def _hub_repo_id(cls, value: str | None) -> str | None:
        from .hub import REPO_ID_RULE, invalid_repo_id

        if value is not None and invalid_repo_id(value):
            raise ValueError(f"must be a Hub repo id: {REPO_ID_RULE}")
        return value


# DynACL++'s two finetunings as PKU-ML/DYNACL LPAFT.py runs them (argument defaults and the optimisers, schedulers and
# loaders main() builds). Shared: batch 512 (--batch_size), shuffled with drop_last=True, RandomCrop(32, padding=4) +
# RandomHorizontalFlip (tfs_val), SGD momentum 0.9 and weight decay 1e-4, the pseudo-labels as targets, no validation
# (every pretraining image trains; the last epoch is kept).
_LPAFT_SHARED: dict[str, Any] = {
    "batch_size": 512,
    "momentum": 0.9,
    "weight_decay": 1e-4,
    "gamma": 0.1,
    "augment": True,
    "drop_last": True,
    "select_by": "final",
    "dual_bn": False,
}
LPAFT_DEFAULTS: dict[str, dict[str, Any]] = {
    # train_head(): --epochs_head 10, optimizer_head = SGD(model.fc, --lr_head 0.01), MultiStepLR(milestones=[]);
    # the whole model in eval mode, clean CE; the head starts at zero (cvt_state_dict zeroes fc).
    "lp": {
        **_LPAFT_SHARED,
        "epochs": 10,
        "lr": 0.01,
        "milestones": [],
        "train_encoder": False,
        "bn_mode": "eval",
        "head_init": "zeros",
        "train_attack": "none",
    },
    # train(): --epochs 25, SGD(model.parameters(), --lr 0.1), MultiStepLR([10, 20], 0.1); utils.py trades_loss with
    # perturb_steps 10 and its defaults (beta 6.0, epsilon 8/255, step_size 2/255): the KL attack starts at x itself
    # (no Gaussian), in eval mode; the loss in train mode, CE and KL from one clean pass.
    "aft": {
        **_LPAFT_SHARED,
        "epochs": 25,
        "lr": 0.1,
        "milestones": [10, 20],
        "train_encoder": True,
        "bn_mode": "train",
        "train_attack": "trades",
        "trades_beta": 6.0,
        "attack_steps": 10,
        "epsilon": 8 / 255,
        "step_size": 2 / 255,
        "trades_random_start": False,
        "trades_target": "shared",
    },
}


class LpaftConfig(Section):
    """DynACL++ (Luo et al., ICLR 2023; PKU-ML/DYNACL assign_label.py, LPAFT.py), run after pretraining: k-means
    pseudo-labels of the pretraining images from the pretrained encoder's features, then a linear probe on the frozen
    encoder and TRADES finetuning of encoder and head on them (linear-probing-then-adversarial-finetuning), no true
    labels. Every lp / aft key not written takes the authors' value (LPAFT_DEFAULTS)."""

    clusters: int = Field(10, ge=2, description="k-means clusters, the pseudo-classes (assign_label.py: [10])")
    cluster_bn_branch: str = Field(
        "normal",
        description="BN branch of a multi-BN encoder whose pooled features are clustered, unnormalised "
        "(assign_label.py: model.eval()(x, 'normal', return_features=True)); a plain-BN encoder uses its own",
    )
    bn_branch: str | None = Field(
        None,
        description="BN branch finetuned and handed over as a plain-BN encoder (null: the run's exported one, "
        "'pgd'; LPAFT.py --bnNameCnt 1: cvt_state_dict loads the adversarial route)",
    )
    lp: FinetuneConfig = Field(
        default_factory=lambda: FinetuneConfig(**LPAFT_DEFAULTS["lp"]),
        description="the linear probe: a head on the frozen encoder (LPAFT.py train_head)",
    )
    aft: FinetuneConfig = Field(
        default_factory=lambda: FinetuneConfig(**LPAFT_DEFAULTS["aft"]),
        description="the adversarial finetuning of encoder and probed head (LPAFT.py train)",
    )

    @model_validator(mode="before")
    @classmethod
    def _authors_defaults(cls, data: Any) -> Any:
        """Every lp / aft key not written takes the authors' value; the written ones stay."""
        if not isinstance(data, dict):
            return data
        filled = dict(data)
        for stage, defaults in LPAFT_DEFAULTS.items():
            given = filled.get(stage)
            if isinstance(given, FinetuneConfig):
                given = given.model_dump(include=given.model_fields_set)
            if given is None:
                given = {}
            if isinstance(given, dict):
                filled[stage] = {**defaults, **given}
        return filled

    @model_validator(mode="after")
    def _one_plain_encoder(self) -> LpaftConfig:
        # The stage trains the pseudo-labels' classifier to the end and hands over one plain-BN encoder.
        if self.lp.train_encoder:
            raise ValueError("lpaft.lp.train_encoder must be false: the linear probe trains the head alone")
        for stage in ("lp", "aft"):
            cfg = getattr(self, stage)
            if cfg.select_by != "final":
                raise ValueError(f"lpaft.{stage}.select_by must be final: the stage has no validation split")
            if cfg.dual_bn:
                raise ValueError(f"lpaft.{stage}.dual_bn must be false: the stage finetunes one BN branch")
        return self


class Recipe(Section):
    data: DataConfig = Field(default_factory=DataConfig)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    # SerializeAsAny: written as the method's own class, with its keys (the field's type names only `name`).
    method: SerializeAsAny[MethodOptions] = Field(default_factory=_default_method_options)
    attack: AttackConfig = Field(default_factory=AttackConfig)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    lpaft: LpaftConfig | None = Field(
        None,
        description="DynACL++'s post-pretraining stage (pseudo-labels, linear probe, TRADES finetuning) after "
        "pretraining; null: none (robustcl lpaft RUN runs it on a finished run)",
    )

    @model_validator(mode="after")
    def _stem_fits_the_images(self) -> Recipe:
        # Otherwise the first convolution fails inside the first training (or evaluation) step.
        m = self.model
        kernel, pad = STEM_KERNEL[m.stem], m.stem_padding if m.stem_padding is not None else STEM_PADDING[m.stem]
        for key, resolution in [
            ("data.resolution", self.data.resolution),
            ("eval.data.resolution", self.eval.data.resolution),
        ]:
            if resolution is not None and resolution + 2 * pad < kernel:
                raise ValueError(
                    f"the {m.stem} stem's {kernel}×{kernel} convolution needs {key} + 2 × model.stem_padding ≥ "
                    f"{kernel}, got {key} {resolution} and padding {pad}"
                )
        return self

    @model_validator(mode="after")
    def _method_fits_the_recipe(self) -> Recipe:
        self.method.check_recipe(self)
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.dump(self.to_dict(), Dumper=_RecipeDumper, sort_keys=False)


class _RecipeDumper(yaml.SafeDumper):
    """Writes short lists of numbers inline ([0.1, 1.0]) so a resolved recipe reads like a hand-written one."""


def _represent_list(dumper: yaml.SafeDumper, data: list[Any]) -> yaml.Node:
    flow = all(isinstance(v, (int, float, str, bool)) or v is None for v in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_RecipeDumper.add_representer(list, _represent_list)


# Keys that may change between a run and its resumption: the training length, settings that change speed but not
# what a step computes (a run may move to another machine; decoded and streamed data give the same pixels), what to
# do about a non-finite step or an unreadable image (a run stopped by one resumes with `skip`), and the evaluation,
# export and logging settings (a tracker may be added to a running run, or one that failed left out).
RESUMABLE_CHANGES = {
    ("data", "loading"),
    ("data", "decoded_max_gb"),
    ("data", "workers"),
    ("data", "bad_images"),
    ("training", "dist_timeout_minutes"),
    ("training", "epochs"),
    ("training", "max_steps"),
    ("training", "compile"),
    ("training", "channels_last"),
    ("training", "data_placement"),
    ("training", "nonfinite"),
    ("training", "max_skipped_steps"),
}
RESUMABLE_SECTIONS = {"eval", "export", "logging"}


class DuplicateKey(yaml.YAMLError):
    def __init__(self, key: Any, mark: yaml.Mark) -> None:
        super().__init__(f"key {key!r} is written twice")
        self.key, self.mark = key, mark


class _RecipeLoader(yaml.SafeLoader):
    """``yaml.safe_load`` that refuses a key written twice in one mapping, where PyYAML keeps the last silently
    (``<<`` merge keys may still be overridden)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:  # an unhashable key: the constructor below reports it
                continue
            if duplicate:
                raise DuplicateKey(key, key_node.start_mark)
        return super().construct_mapping(node, deep)


def read_yaml(text: str) -> Any:
    """Parse recipe YAML safely (plain data only), refusing duplicate keys."""
    return yaml.load(text, Loader=_RecipeLoader)  # noqa: S506 - a SafeLoader subclass


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b=c`` → (["a", "b"], value); the value is parsed as YAML, so 8 is an int and [1,2] a list."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise UserError(
            f"malformed override '{one_line(text)}'", "--set", "write it as KEY=VALUE, e.g. training.max_steps=100"
        )
    try:
        value = read_yaml(raw) if raw.strip() else ""
    except DuplicateKey as exc:
        raise UserError(
            f"key {shown(exc.key)} is written twice in '{one_line(text)}'", "--set", "keep one of them"
        ) from None
    except (yaml.YAMLError, ValueError, RecursionError):
        # Not YAML (or a number or date PyYAML cannot convert): the text itself, which validation then judges.
        value = raw
    return key.strip().split("."), value


def apply_override(tree: dict[str, Any], path: list[str], value: Any) -> None:
    node = tree
    for i, part in enumerate(path[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise UserError(
                f"cannot set '{one_line('.'.join(path))}': '{one_line('.'.join(path[: i + 1]))}' is a value, "
                "not a section",
                "--set",
                f"set '{one_line('.'.join(path[: i + 1]))}' itself, or check the key's spelling",
            )
        node = child
    node[path[-1]] = value


def _section_at(loc: tuple[Any, ...], tree: Any) -> type[BaseModel] | None:
    """The section class at key path ``loc`` of the recipe ``tree`` was validated from (the method section: the
    class of the method the tree names)."""
    model: type[BaseModel] | None = Recipe
    for part in loc:
        if model is None:
            return None
        field = model.model_fields.get(str(part))
        if field is None:
            return None
        tree = tree.get(part) if isinstance(tree, dict) else None
        ann = field.annotation
        model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
        if model is MethodOptions:
            model = named_options(tree if isinstance(tree, dict) else {}) or MethodOptions
    return model


def _format_validation_error(err: ValidationError, source: str, tree: Any) -> UserError:
    first = err.errors()[0]
    loc = tuple(first["loc"])
    key = one_line(".".join(str(p) for p in loc))
    source = one_line(source)
    if first["type"] == "extra_forbidden" and loc:
        parent = _section_at(tuple(p for p in loc[:-1] if not isinstance(p, int)), tree)
        valid = sorted(parent.model_fields) if parent else []
        close = difflib.get_close_matches(str(loc[-1]), valid, n=1)
        fix = f"did you mean '{'.'.join([*map(str, loc[:-1]), close[0]])}'?" if close else ""
        fix = (fix + " " if fix else "") + f"valid keys here: {', '.join(valid)}"
        return UserError(f"unknown recipe key '{key}'", source, one_line(fix))
    msg = one_line(first["msg"]).removeprefix("Value error, ")
    if first["type"] == "value_error" and _section_at(loc, tree) is not None:
        # A section's own check of keys that must agree: its message names them.
        return UserError(f"invalid recipe: {msg}", source, "change the keys named, in the recipe or with --set")
    return UserError(
        f"invalid value for '{key}': {msg} (got {shown(first.get('input'))})",
        source,
        "fix the value in the recipe or --set",
    )


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read a recipe YAML, apply ``--set`` overrides, validate. Raises :class:`UserError`."""
    path = Path(path)
    if not path.is_file():
        raise UserError("recipe file not found", str(path), "give the path to a YAML recipe, e.g. recipes/acl.yaml")
    try:
        tree = read_yaml(path.read_text()) or {}
    except DuplicateKey as exc:
        raise UserError(
            f"recipe key {shown(exc.key)} is written twice in one section",
            f"{path}:{exc.mark.line + 1}",
            "keep one of them (YAML would silently use the last)",
        ) from None
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f"{path}:{where.line + 1}" if where else str(path)
        raise UserError("recipe is not valid YAML", line, "check indentation and quoting") from None
    except (ValueError, RecursionError) as exc:
        # Valid YAML that PyYAML cannot turn into values: an int over Python's 4300 digits, a date like
        # 2024-13-01, lists nested past the recursion limit.
        reason = str(exc).split(";")[0] if isinstance(exc, ValueError) else "nested too deeply"
        raise UserError(f"recipe cannot be read: {one_line(reason)}", str(path), "check the values") from None
    if not isinstance(tree, dict):
        raise UserError("recipe must be a mapping of sections", str(path), "start with e.g. 'data:' / 'training:'")
    return _with_overrides(tree, overrides, str(path))


def override_recipe(recipe: Recipe, overrides: list[str] | None, source: str) -> Recipe:
    """``recipe`` with ``--set`` overrides applied and validated again."""
    return _with_overrides(recipe.to_dict(), overrides, source)


def _with_overrides(tree: dict[str, Any], overrides: list[str] | None, source: str) -> Recipe:
    if overrides:
        for text in overrides:
            keys, value = parse_override(text)
            apply_override(tree, keys, value)
        source += " with --set " + " ".join(overrides)
    return recipe_from_dict(tree, source)


def recipe_from_dict(tree: dict[str, Any], source: str = "<recipe>") -> Recipe:
    try:
        return Recipe.model_validate(tree)
    except ValidationError as err:
        raise _format_validation_error(err, source, tree) from None


def recipe_differences(old: Recipe, new: Recipe) -> list[str]:
    """Key paths whose values differ between two recipes, except the training length and evaluation settings."""

    def flatten(tree: Any, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
        if isinstance(tree, dict):
            out: dict[tuple[str, ...], Any] = {}
            for k, v in tree.items():
                out.update(flatten(v, (*prefix, k)))
            return out
        return {prefix: tree}

    a, b = flatten(old.to_dict()), flatten(new.to_dict())
    return [
        ".".join(k)
        for k in sorted(set(a) | set(b))
        if a.get(k) != b.get(k) and k not in RESUMABLE_CHANGES and k[0] not in RESUMABLE_SECTIONS
    ]


def describe_keys() -> str:
    """One line per key: path, default, description (for ``robustcl recipe show --describe``). The method section
    lists the keys of every registered method, each followed by the methods that read it in brackets."""
    lines: dict[str, str] = {}
    readers: dict[str, list[str]] = {}

    def walk(model: type[BaseModel], prefix: str, method: str | None, defaults: BaseModel | None = None) -> None:
        """``defaults``: the section a default factory builds (lpaft.lp: the authors' values, not the class's)."""
        for name, field in model.model_fields.items():
            ann, path = field.annotation, prefix + name
            default = getattr(defaults, name) if defaults is not None else field.get_default(call_default_factory=True)
            if ann is MethodOptions:
                for registered in METHODS:
                    walk(method_options(registered), f"{path}.", registered)
                continue
            sections = [a for a in get_args(ann) if isinstance(a, type) and issubclass(a, BaseModel)]
            if len(sections) == 1 and type(None) in get_args(ann):  # an optional section (lpaft): its keys
                ann = sections[0]
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                walk(ann, f"{path}.", method, default if isinstance(default, BaseModel) else None)
                continue
            if method is not None:
                readers.setdefault(path, []).append(method)
            if path not in lines:  # a key several methods read: the first one's default
                # A method's `name` repeats the base field without its description.
                base = MethodOptions.model_fields.get(name) if issubclass(model, MethodOptions) else None
                about = field.description or (base.description if base else None) or ""
                lines[path] = f"{path} = {default!r}  # {about}"

    walk(Recipe, "", None)
    out = [f"{line} [{', '.join(readers[key])}]" if key in readers else line for key, line in lines.items()]
    return "\n".join(out)
