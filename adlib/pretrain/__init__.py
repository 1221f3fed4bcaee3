"""Backbone recipes: fine-tune a pretrained CNN for anomaly detection, on :mod:`adlib.train`'s loop.

Each recipe writes one fine-tuned backbone file (:func:`adlib.backbones.save_backbone`) that every
feature method (PaDiM, PatchCore, DFR) accepts in place of a backbone name.

- :mod:`~adlib.pretrain.centering`: ``L_class + lambda * L_center`` on the target's normal images.
- :mod:`~adlib.pretrain.semi_formula`: separation and ranking losses on a stream of Gaussian-mixture
  anomalies added to the target's normal images.

:data:`RECIPES` registers them as :data:`adlib.detectors.DETECTORS` registers the detectors: a name
-> :class:`PretrainRecipe` (the recipe dataclass, whose fields are the options; the function that runs
it; what that returns; one line of help per option). The CLI builds ``adlib pretrain NAME``'s options
from it; :func:`get_recipe` makes a recipe by name.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from ..kernels import BLOB_COLOURS, BLOB_SIGNS
from .centering import FORMS, CenteringNet, CenteringRecipe, CenteringRun, center_loss, pretrain_centering
from .record import run_summary
from .semi_formula import (INITS, LOSSES, SemiFormulaNet, SemiFormulaRecipe, SemiFormulaRun, SemiFormulaStream,
                           pretrain_semi_formula)

__all__ = ["CenteringNet", "CenteringRecipe", "CenteringRun", "center_loss", "pretrain_centering",
           "SemiFormulaNet", "SemiFormulaRecipe", "SemiFormulaRun", "SemiFormulaStream", "pretrain_semi_formula",
           "FieldDoc", "PretrainRecipe", "RECIPES", "register_recipe", "get_recipe"]


@dataclass(frozen=True)
class FieldDoc:
    """How one option reads on the command line; its name, type and default come from the recipe field
    (or, for a ``run_options`` entry, from the pretrain function's keyword)."""

    help: str = ""
    choices: tuple[str, ...] | None = None
    metavar: str | tuple[str, ...] | None = None


@dataclass(frozen=True)
class PretrainRecipe:
    """One registered recipe.

    ``recipe``: the dataclass of its hyper-parameters (every ``init`` field is an option);
    ``pretrain``: ``pretrain(images, recipe, *, device, checkpoint_dir, checkpoint_every, resume,
    data_name, **run_options) -> run``; ``run``: the type it returns (``history``, ``seconds``,
    ``train_images``, ``world_size``, ``save(path, **extra) -> sha256``); ``summary``: ``run ->`` the
    recipe's own entries of the run summary; ``docs``: per field (or run option) help text;
    ``run_options``: keywords of ``pretrain`` besides the recipe that the CLI offers too;
    ``checkpoint_every``: the CLI's default steps between checkpoints.
    """

    name: str
    recipe: type
    pretrain: Callable[..., Any]
    run: type
    description: str
    summary: Callable[[Any], dict[str, Any]]
    docs: Mapping[str, FieldDoc] = field(default_factory=dict)
    run_options: tuple[str, ...] = ()
    checkpoint_every: int = 0

    def fields(self) -> list[dataclasses.Field]:
        """The recipe's options, in declaration order."""
        return [f for f in dataclasses.fields(self.recipe) if f.init]

    def make(self, **options: Any) -> Any:
        """A recipe with ``options`` overriding the defaults; unknown names are a TypeError."""
        names = {f.name for f in self.fields()}
        unknown = set(options) - names
        if unknown:
            raise TypeError(f"{self.name} has no option(s) {sorted(unknown)}; it has {sorted(names)}")
        return self.recipe(**options)


RECIPES: dict[str, PretrainRecipe] = {}


def register_recipe(entry: PretrainRecipe) -> PretrainRecipe:
    """Make a recipe available under ``entry.name`` to the CLI (``adlib pretrain NAME``)."""
    if entry.name in RECIPES and RECIPES[entry.name] != entry:
        raise ValueError(f"a recipe is already registered as {entry.name!r}")
    RECIPES[entry.name] = entry
    return entry


def get_recipe(name: str, **options: Any) -> Any:
    """A new recipe of the kind ``name`` with ``options`` overriding the defaults."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; registered: {sorted(RECIPES)}")
    return RECIPES[name].make(**options)


_RANGE = ("MIN", "MAX")   # metavar of a (min, max) option


def _centering_summary(run: CenteringRun) -> dict[str, Any]:
    return {"train_images": run.train_images, **run_summary(run)}


def _semi_formula_summary(run: SemiFormulaRun) -> dict[str, Any]:
    return {"normal_images": run.train_images,
            "streamed_images": run.history.steps * run.recipe.batch_size * run.world_size,
            **run_summary(run),
            "stream_images_per_s": round(run.stream_images_per_s or 0.0, 1),
            "train_images_per_s": round(run.train_images_per_s, 2)}


register_recipe(PretrainRecipe(
    name="centering", recipe=CenteringRecipe, pretrain=pretrain_centering, run=CenteringRun,
    description="L_class + lambda * L_center on the category's normal images",
    summary=_centering_summary, checkpoint_every=20,
    docs={
        "backbone": FieldDoc("architecture to start from (ImageNet weights)"),
        "lambda_center": FieldDoc("weight of L_center"),
        "class_weight": FieldDoc("weight of L_class; 0 lets L_center act alone (the collapse)"),
        "form": FieldDoc("L_center on PaDiM's per-position patches or on the pooled vector", choices=FORMS),
        "strides": FieldDoc("feature strides L_center acts on", metavar="STRIDE"),
        "epochs": FieldDoc("passes over the normal images (at least 1)"),
        "batch_size": FieldDoc("per process"),
        "lr": FieldDoc("learning rate"),
        "seed": FieldDoc("seed of the run"),
        "labelled": FieldDoc("ImageFolder of ImageNet classes for L_class (default: distillation from the original)",
                             metavar="FOLDER"),
    }))

register_recipe(PretrainRecipe(
    name="semi_formula", recipe=SemiFormulaRecipe, pretrain=pretrain_semi_formula, run=SemiFormulaRun,
    description="separation + ranking losses on streamed Gaussian-mixture anomalies",
    summary=_semi_formula_summary, run_options=("workers",), checkpoint_every=200,
    docs={
        "backbone": FieldDoc("architecture to pre-train"),
        "init": FieldDoc("start from ImageNet weights or from scratch", choices=INITS),
        "losses": FieldDoc("separation (a), ranking (b) or both", choices=LOSSES),
        "margin": FieldDoc("separation: relative change wanted inside a blob"),
        "tau": FieldDoc("ranking: temperature of the pairwise logistic loss"),
        "strides": FieldDoc("feature strides the losses act on", metavar="STRIDE"),
        "images": FieldDoc("anomalous images to stream, all processes together"),
        "batch_size": FieldDoc("pairs per step and process"),
        "lr": FieldDoc("learning rate"),
        "seed": FieldDoc("seed of the run and of the stream"),
        "components": FieldDoc("range of Gaussians per anomalous image (inclusive)", metavar=_RANGE),
        "centre": FieldDoc("range of the blob centres (y and x alike) as fractions of the side", metavar=_RANGE),
        "sigma": FieldDoc("range of the blob standard deviations (y and x) as fractions of the side", metavar=_RANGE),
        "rotation": FieldDoc("range of the blob rotations in radians", metavar=_RANGE),
        "amplitude": FieldDoc("range of the peak intensity change on a [0, 1] image", metavar=_RANGE),
        "signs": FieldDoc("sign of the intensity change", choices=BLOB_SIGNS),
        "colour": FieldDoc("per-channel weights in [0.5, 1] (random) or all 1 (gray)", choices=BLOB_COLOURS),
        "mask_level": FieldDoc("blobs are cut at this many sigma"),
        "workers": FieldDoc("DataLoader processes making the blobs (CPU only)"),
    }))
