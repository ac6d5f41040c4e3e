"""Pydantic models of every rndpo configuration: the single place where defaults live.

Every model forbids unknown keys (a typo such as ``lerning_rate`` fails with the key named), is
frozen (so a config can be hashed for the stage cache) and documents each field. Stages take the
part of the configuration they need; :func:`config_hash` gives the content hash that names their
cached output.
"""

from __future__ import annotations

import hashlib
import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = [
    "StrictModel",
    "SyntheticConfig",
    "DataConfig",
    "SplitConfig",
    "ModelConfig",
    "BaseTrainConfig",
    "ProposalConfig",
    "JudgeConfig",
    "MiningConfig",
    "FinetuneConfig",
    "OBJECTIVES",
    "BASELINES",
    "METHODS",
    "config_hash",
    "format_validation_error",
]

#: Objective name → (loss_type, normalize) of :func:`rndpo.objectives.preference_loss`.
OBJECTIVES: dict[str, tuple[str, str]] = {
    "dpo": ("sigmoid", "none"),
    "rn-dpo": ("sigmoid", "region"),
    "ipo": ("ipo", "none"),
    "rn-ipo": ("ipo", "region"),
    "rdpo": ("robust", "none"),
    "rn-rdpo": ("robust", "region"),
    "hinge": ("hinge", "none"),
    "rn-hinge": ("hinge", "region"),
}
#: Baselines run through the same runner (``oracle`` uses pool ground truth: an upper bound).
BASELINES: tuple[str, ...] = ("base", "pseudo-label", "entropy-min", "mean-teacher", "oracle")
METHODS: tuple[str, ...] = tuple(OBJECTIVES) + BASELINES

PositiveInt = Annotated[int, Field(gt=0)]
Fraction = Annotated[float, Field(ge=0.0, lt=1.0)]


class StrictModel(BaseModel):
    """Base of every config: unknown keys are errors, instances are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class SyntheticConfig(StrictModel):
    """The embedded synthetic data set: lesion-like shapes on textured, noisy backgrounds."""

    n_images: PositiveInt = 500
    """Number of images (or volumes) to generate."""
    size: Annotated[int, Field(ge=16)] = 96
    """Side length in pixels (voxels in 3D)."""
    spatial_dims: Literal[2, 3] = 2
    """2 for images, 3 for (small) volumes."""
    seed: int = 0
    """Generator seed: the same seed gives the same data set, bit for bit."""


class DataConfig(StrictModel):
    """Where the images come from and how they are brought to the training size."""

    path: str = "synthetic"
    """``synthetic`` for the embedded generator, or a folder: ``images/`` + ``masks/`` (the layout of
    ../shared/data) or an nnU-Net v2 raw dataset (``dataset.json``, ``imagesTr/``, ``labelsTr/``)."""
    format: Literal["auto", "folder", "nnunet", "synthetic"] = "auto"
    """Reader to use; ``auto`` detects it from the folder's content."""
    size: Annotated[int, Field(ge=16)] = 128
    """Training size: every image is brought to ``size`` per spatial side."""
    resize_mode: Literal["resize", "pad"] = "resize"
    """``resize``: bilinear (images) / nearest (masks) resampling to ``size`` (aspect not kept);
    ``pad``: scale the longest side to ``size`` keeping aspect, then zero-pad to a square."""
    max_cases: PositiveInt | None = None
    """Use only the first ``max_cases`` cases (sorted by case id), for quick runs."""
    synthetic: SyntheticConfig = SyntheticConfig()
    """Parameters of the synthetic generator (used when ``path == 'synthetic'``)."""


class SplitConfig(StrictModel):
    """Labeled / unlabeled pool / validation / test split, deterministic by seed and grouped by patient."""

    labeled: float | int = 0.1
    """Label budget: a fraction of the non-test, non-val cases if < 1, else a count of cases."""
    val: Fraction = 0.1
    """Fraction of cases (by group) in the labeled validation split (judge audits, β selection)."""
    test: Fraction = 0.2
    """Fraction of cases (by group) in the test split, touched only by evaluation."""
    group_column: str | None = None
    """``metadata.csv`` column that groups cases (patients, exams); ``None`` picks ``patient_case`` or
    ``exam_id`` when present, else every case is its own group."""
    seed: int = 0
    """Seed of the split."""

    @field_validator("labeled")
    @classmethod
    def _labeled_positive(cls, value: float | int) -> float | int:
        if value <= 0:
            raise ValueError(f"labeled must be a fraction in (0, 1) or a count >= 1, got {value}")
        if not float(value).is_integer() and value > 1:
            raise ValueError(f"labeled must be a fraction in (0, 1) or a whole count, got {value}")
        return value

    @model_validator(mode="after")
    def _fractions_leave_room(self) -> "SplitConfig":
        if self.val + self.test >= 0.9:
            raise ValueError(f"val + test = {self.val + self.test:.2f} leaves no room for the labeled split and pool")
        return self


class ModelConfig(StrictModel):
    """The segmentation network (a MONAI network; 2D or 3D follows the data)."""

    arch: Literal["unet", "basicunet", "dynunet", "segresnet"] = "unet"
    """MONAI network: ``unet`` (monai.networks.nets.UNet), ``basicunet``, ``dynunet``, ``segresnet``."""
    channels: tuple[PositiveInt, ...] = (16, 32, 64, 128)
    """Feature channels per resolution level."""
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.1
    """Dropout rate (also what MC-dropout proposals sample with)."""


class BaseTrainConfig(StrictModel):
    """Supervised training of the base segmenter on the labeled split."""

    epochs: PositiveInt = 30
    """Passes over the labeled split (ignored when ``steps`` is set). 30 epochs of a 10 % label budget
    at 128 px (BUS-BRA: 131 images, 510 steps) take a few minutes on 2 CPU cores."""
    steps: PositiveInt | None = None
    """Optimizer steps in total; overrides ``epochs`` when set."""
    batch_size: PositiveInt = 8
    """Images per optimizer step."""
    lr: Annotated[float, Field(gt=0)] = 5e-3
    """AdamW peak learning rate: linear warm-up over the first 5 % of steps (at most 100), then cosine
    to zero. On short budgets the instance-norm UNet reached clearly higher Dice at 5e-3..1e-2 than at 2e-3..3e-3."""
    weight_decay: Annotated[float, Field(ge=0)] = 1e-4
    """AdamW weight decay (not applied to biases and norm weights)."""
    augment: bool = True
    """MONAI augmentation: left-right flips (every axis in 3D), small rotations / scaling, intensity
    shift and scale (see :func:`rndpo.training.base.build_augmentation`)."""
    snapshots: Annotated[int, Field(ge=0)] = 0
    """Number of evenly spaced snapshots kept for the ``checkpoints`` proposal generator."""
    checkpoint_every: PositiveInt = 50
    """Steps between full-state (resumable) checkpoints."""
    seed: int = 0


class ProposalConfig(StrictModel):
    """K proposals per unlabeled image, from a mix of generators (identical proposals removed)."""

    mc_dropout: Annotated[int, Field(ge=0)] = 3
    """Stochastic forward passes with dropout on (0: generator off)."""
    tta: tuple[Literal["hflip", "vflip", "rot90", "rot180", "rot270"], ...] = ("hflip", "vflip")
    """Test-time augmentations, each inverted back onto the image."""
    thresholds: tuple[Annotated[float, Field(gt=0.0, lt=1.0)], ...] = (0.3, 0.7)
    """Probability cut-offs of the base prediction (the base mask itself is the 0.5 cut)."""
    checkpoints: bool = False
    """Add the prediction of every snapshot kept during base training."""
    morphology: tuple[str, ...] = ("erode:2", "dilate:2")
    """Morphological variants of the base prediction: ``erode|dilate|open|close:radius``."""
    include_base: bool = True
    """Include the base model's own prediction (argmax / 0.5 cut)."""
    batch_size: PositiveInt = 32
    seed: int = 0

    @field_validator("morphology")
    @classmethod
    def _morphology_specs(cls, specs: tuple[str, ...]) -> tuple[str, ...]:
        for spec in specs:
            op, _, radius = spec.partition(":")
            if op not in {"erode", "dilate", "open", "close"} or not radius.isdigit() or int(radius) < 1:
                raise ValueError(f"morphology entry {spec!r} must look like 'erode:2' (erode|dilate|open|close:radius>=1)")
        return specs


class JudgeConfig(StrictModel):
    """A judge and its noise model. Also parsed from a string: ``"oracle"``, ``"oracle+gaussian:0.1"``,
    ``"agreement"``, ``"ensemble(agreement,entropy)"``."""

    name: Literal["oracle", "agreement", "entropy", "learned-qc", "ensemble"] = "oracle"
    noise: str | None = None
    """Noise model of the oracle: ``gaussian:σ`` (score noise), ``flip:p`` (pair orientation flipped
    with probability p at mining), ``size-bias:b`` (adds b × foreground fraction)."""
    members: tuple["JudgeConfig", ...] = ()
    """Members of an ``ensemble`` (mean rank)."""
    agreement_mode: Literal["mean-dice", "majority"] = "mean-dice"
    """``agreement``: mean Dice with the other proposals, or Dice with their majority vote."""
    qc_epochs: PositiveInt = 30
    """``learned-qc``: training epochs of the quality regressor (early stopping on labeled val)."""
    qc_patience: PositiveInt = 6
    """``learned-qc``: epochs without improvement of the validation loss before training stops."""
    qc_size: Annotated[int, Field(ge=16)] = 64
    """``learned-qc``: side length the (image, mask) input is resampled to before the regressor."""
    qc_corruptions: Annotated[int, Field(ge=0)] = 8
    """``learned-qc``: synthetic corruptions (erode, dilate, shift, holes, false blobs) per labeled image."""
    qc_model: str | None = None
    """``learned-qc``: a trained regressor (``.safetensors``) to use instead of training one."""
    entropy_passes: Annotated[int, Field(ge=2)] = 8
    """``entropy``: stochastic (MC-dropout) passes of the base model behind the predictive entropy."""
    entropy_region: Literal["foreground", "boundary"] = "foreground"
    """``entropy``: where the entropy is averaged: the proposal's foreground, or a band around its contour."""
    boundary_width: PositiveInt = 2
    """``entropy`` with ``boundary``: half-width of the contour band in pixels."""
    seed: int = 0

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value: Any) -> Any:
        if isinstance(value, str):
            return parse_judge_spec(value)
        return value

    @model_validator(mode="after")
    def _check(self) -> "JudgeConfig":
        if self.noise is not None:
            if self.name != "oracle":
                raise ValueError(f"noise {self.noise!r} only applies to the oracle judge, not {self.name!r}")
            kind, _, level = self.noise.partition(":")
            try:
                level_value = float(level)
            except ValueError:
                level_value = float("nan")
            if kind not in {"gaussian", "flip", "size-bias"} or level_value != level_value:
                raise ValueError(f"noise {self.noise!r} must be gaussian:σ, flip:p or size-bias:b")
            if kind == "flip" and not 0.0 <= level_value <= 1.0:
                raise ValueError(f"flip probability must be in [0, 1], got {level_value}")
            if kind == "gaussian" and level_value < 0:
                raise ValueError(f"gaussian σ must be >= 0, got {level_value}")
        if self.name == "ensemble" and len(self.members) < 2:
            raise ValueError("an ensemble judge needs at least two members")
        return self

    @property
    def label(self) -> str:
        """Short name used in tables: ``oracle+gaussian:0.1``, ``ensemble(agreement,entropy)``."""
        if self.name == "ensemble":
            return "ensemble(" + ",".join(m.label for m in self.members) + ")"
        return self.name + (f"+{self.noise}" if self.noise else "")


def parse_judge_spec(spec: str) -> dict[str, Any]:
    """Parse ``"oracle+gaussian:0.1"`` / ``"ensemble(agreement,entropy)"`` into JudgeConfig fields."""
    spec = spec.strip()
    if spec.startswith("ensemble(") and spec.endswith(")"):
        members = [m.strip() for m in spec[len("ensemble(") : -1].split(",") if m.strip()]
        return {"name": "ensemble", "members": members}
    name, _, noise = spec.partition("+")
    return {"name": name, "noise": noise or None}


class MiningConfig(StrictModel):
    """How preference pairs are mined from the judge's ranking of each image's proposals."""

    strategy: Literal["top-vs-rest", "top-vs-bottom", "random-pairs", "all-pairs"] = "top-vs-rest"
    pairs_per_image: PositiveInt = 4
    """``random-pairs``: pairs drawn per image (each oriented by the judge)."""
    min_margin: Annotated[float, Field(ge=0)] = 0.0
    """Drop pairs whose judge-score gap is below this (ties, gap 0, are always dropped)."""
    min_region: Annotated[int, Field(ge=1)] = 1
    """Drop pairs whose disagreement region |D| has fewer pixels than this."""
    seed: int = 0


class FinetuneConfig(StrictModel):
    """Preference fine-tuning (or a baseline) from the base weights."""

    method: Literal[
        "dpo", "rn-dpo", "ipo", "rn-ipo", "rdpo", "rn-rdpo", "hinge", "rn-hinge",
        "base", "pseudo-label", "entropy-min", "mean-teacher", "oracle",
    ] = "rn-dpo"
    beta: Annotated[float, Field(gt=0)] = 0.1
    """DPO temperature. Not transferable between ``dpo`` and ``rn-dpo`` (scales differ by ~|D|)."""
    lr: Annotated[float, Field(gt=0)] = 1e-4
    """AdamW learning rate (constant after a short warm-up)."""
    steps: PositiveInt = 200
    """Optimizer steps."""
    images_per_step: PositiveInt = 8
    """Images per step; all pairs of an image are scored from one forward pass."""
    sft_weight: Annotated[float, Field(ge=0)] = 0.0
    """Weight of a supervised DiceCE anchor on the chosen mask (0: off)."""
    label_smoothing: Annotated[float, Field(ge=0, lt=0.5)] = 0.1
    """Assumed label-flip rate ε of the robust objectives (``rdpo``, ``rn-rdpo``)."""
    grad_clip: Annotated[float, Field(gt=0)] | None = 1.0
    """Max gradient norm (None: no clipping)."""
    dropout: bool = False
    """Keep dropout active while fine-tuning (off: deterministic logits, the default)."""
    eval_every: PositiveInt = 20
    """Steps between evaluations on val and test."""
    checkpoint_every: PositiveInt = 50
    """Steps between full-state (resumable) checkpoints."""
    ema_decay: Annotated[float, Field(gt=0, lt=1)] = 0.99
    """``mean-teacher``: EMA decay of the teacher."""
    seed: int = 0

    @property
    def is_preference(self) -> bool:
        return self.method in OBJECTIVES


def config_hash(*parts: BaseModel | dict | str | int | float | None, length: int = 12) -> str:
    """Content hash of one or more config parts (order matters): the name of a cached stage output."""
    payload = [p.model_dump(mode="json") if isinstance(p, BaseModel) else p for p in parts]
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def format_validation_error(error: Exception) -> str:
    """One readable line per problem of a pydantic ``ValidationError``: ``key.path: message``."""
    errors = getattr(error, "errors", None)
    if not callable(errors):
        return str(error)
    lines = []
    for item in errors():
        where = ".".join(str(p) for p in item.get("loc", ())) or "config"
        message = item.get("msg", "invalid value")
        if item.get("type") == "extra_forbidden":
            message = "unknown key"
        lines.append(f"{where}: {message}")
    return "; ".join(lines)


class MethodSpec(StrictModel):
    """One method of an experiment and its grid (β and learning rate); other fine-tuning fields may be
    overridden per method (e.g. ``sft_weight``)."""

    method: Literal[
        "dpo", "rn-dpo", "ipo", "rn-ipo", "rdpo", "rn-rdpo", "hinge", "rn-hinge",
        "base", "pseudo-label", "entropy-min", "mean-teacher", "oracle",
    ]
    betas: tuple[Annotated[float, Field(gt=0)], ...] = (0.1,)
    """β grid (objectives only; chosen on the labeled val split, never on test)."""
    lrs: tuple[Annotated[float, Field(gt=0)], ...] | None = None
    """Learning-rate grid; ``None`` uses ``finetune.lr``."""
    overrides: dict[str, Any] = {}
    """Other :class:`FinetuneConfig` fields for this method, e.g. ``{sft_weight: 0.1}``."""
    mining: tuple[Literal["top-vs-rest", "top-vs-bottom", "random-pairs", "all-pairs"], ...] | None = None
    """Run this objective only with these mining strategies (``None``: every mining of the experiment)."""

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value: Any) -> Any:
        return {"method": value} if isinstance(value, str) else value

    @model_validator(mode="after")
    def _check_overrides(self) -> "MethodSpec":
        reserved = {"method", "beta", "lr"} & set(self.overrides)
        if reserved:
            raise ValueError(f"overrides may not set {sorted(reserved)}: use method / betas / lrs")
        unknown = set(self.overrides) - set(FinetuneConfig.model_fields)
        if unknown:
            raise ValueError(f"unknown fine-tuning field(s) in overrides: {sorted(unknown)}")
        return self


class EvalConfig(StrictModel):
    """What each periodic evaluation computes."""

    hd95: bool = False
    """HD95 at every evaluation (the slowest metric; the final summary of the run always has it)."""
    gallery: Annotated[int, Field(ge=0)] = 6
    """Pairs kept for the report's gallery per (judge, mining)."""


class ExperimentConfig(StrictModel):
    """A whole study: data → base → proposals → judges → mining → methods, over seeds.

    Stages are cached by a content hash of the config part that produced them (so every method of a
    seed shares one base model, one bank, one set of scores and pairs); cells are (seed, judge, mining,
    method, β, lr); baselines that ignore the judge (and mining) run once per seed and are reported in
    every regime.
    """

    name: str = "experiment"
    data: DataConfig = DataConfig()
    split: SplitConfig = SplitConfig()
    model: ModelConfig = ModelConfig()
    base: BaseTrainConfig = BaseTrainConfig()
    proposals: ProposalConfig = ProposalConfig()
    judges: tuple[JudgeConfig, ...] = (JudgeConfig(),)
    mining: tuple[MiningConfig, ...] = (MiningConfig(),)
    methods: tuple[MethodSpec, ...] = (MethodSpec(method="base"), MethodSpec(method="dpo"), MethodSpec(method="rn-dpo"))
    finetune: FinetuneConfig = FinetuneConfig()
    """Defaults of every cell's fine-tuning (method, β and lr come from ``methods``)."""
    eval: EvalConfig = EvalConfig()
    seeds: tuple[int, ...] = (0,)
    """Each seed re-draws the split, the base model, proposals, judge noise, mining and fine-tuning."""

    @field_validator("judges", "mining", "methods", "seeds")
    @classmethod
    def _non_empty(cls, value: tuple) -> tuple:
        if not value:
            raise ValueError("must list at least one entry")
        return value

    @model_validator(mode="after")
    def _unique(self) -> "ExperimentConfig":
        labels = [j.label for j in self.judges]
        if len(set(labels)) != len(labels):
            raise ValueError(f"judges are listed twice: {labels}")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds are listed twice: {list(self.seeds)}")
        strategies = {m.strategy for m in self.mining}
        for spec in self.methods:
            if spec.mining is not None and not set(spec.mining) & strategies:
                raise ValueError(f"method {spec.method}: mining {list(spec.mining)} is not among the experiment's "
                                 f"minings {sorted(strategies)}")
        return self
