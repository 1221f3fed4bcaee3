"""Command line: ``adlib fit|predict|evaluate|pretrain ...`` (or ``python -m adlib ...``).

- ``fit --method NAME (--images FOLDER_OR_FILES... | --data ROOT --category CAT) --out MODEL``: fits
  on normal images (a plain folder, or an MVTec-layout category's ``train/good``), calibrates a
  decision threshold on held-out normal images (mean + 3 std of their scores) and writes one model file.
- ``predict --model MODEL IMAGES_OR_FOLDERS... [--csv FILE] [--heatmaps DIR]``: scores images of any
  size and bit depth, read as the training images were; writes a CSV (path, score, decision at the
  model's threshold) and heat-map PNG overlays, streamed batch by batch (each file read once).
- ``evaluate --method NAME --data ROOT --category CAT [--backbone NAME_OR_FILE]``: fits on
  ``train/good``, evaluates on ``test/``, prints the metrics table and writes it as JSON.
- ``export --model MODEL --format onnx --out MODEL.onnx``: the fitted scoring path (preprocessing,
  backbone, k-NN or Mahalanobis, map smoothing) as one ONNX graph with the threshold and file
  reading in its metadata; ``python -m adlib.deploy --model MODEL.onnx IMAGES...`` runs it without PyTorch.
- ``pretrain centering --data ROOT --category CAT --out FILE``: fine-tunes a backbone on the
  category's normal images and writes it as one backbone file that ``--backbone`` accepts; under
  ``torchrun --nproc-per-node K`` it trains data-parallel.
- ``compare --methods M... --data D... --out DIR``: every method on every data set (MVTec AD
  categories, ELPV's ``elpv_mono``/``elpv_poly``), several seeds where fitting is random; writes
  ``compare_runs.csv``, ``compare.csv`` and ``compare.md`` (mean ± std over seeds).
- ``pretrain semi_formula --data ROOT --category CAT --images N --out FILE``: pre-trains a backbone
  on N Gaussian-mixture anomalies streamed from the category's normal images (also under torchrun).
  Each recipe's options are the fields of its recipe dataclass (:data:`adlib.pretrain.RECIPES`).

Bad input ends with one line on stderr and exit code 2 (``--debug`` shows the traceback); output
paths are checked before any work starts. Progress bars go to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import inspect
import json
import os
import sys
import time
import traceback
import types
import typing
import warnings
from pathlib import Path

import torch
from tqdm import tqdm

from . import settings
from .data import (ImageFiles, MVTecDataset, Preprocessing, find_data_root, holdout_split, list_image_files,
                   load_split, train_batches)
from .detectors import DETECTORS, get_detector, load_detector
from .evaluate import evaluate, format_table
from .pretrain import RECIPES, FieldDoc, PretrainRecipe
from .backbones import BACKBONES
from .train import STATE_FILE, is_main_process


def _parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _checked_number(parse, accept, expected: str):
    """An argparse ``type``: ``parse`` the text, refuse it unless ``accept(value)``, naming ``expected``."""

    def convert(text: str):
        try:
            value = parse(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not accept(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {value}")
        return value

    return convert


_positive_int = _checked_number(int, lambda v: v >= 1, "a positive whole number")
_fraction = _checked_number(float, lambda v: 0.0 <= v < 1.0, "a number in [0, 1)")


def _common() -> argparse.ArgumentParser:
    """Options every command has."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="on an error, show the full traceback")
    return common


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="adlib", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _add_fit(sub)
    _add_predict(sub)
    _add_export(sub)
    ev = sub.add_parser("evaluate", parents=[_common()],
                        help="fit on train/good, evaluate on test/, print and save the metrics")
    _add_method_options(ev)
    ev.add_argument("--data", default=None, help="data root in the MVTec AD layout (default: ADLIB_DATA, ...)")
    ev.add_argument("--category", default="bottle")
    _add_reading_options(ev)
    ev.add_argument("--limit", type=_positive_int, default=None, help="use only the first N images of each folder")
    ev.add_argument("--missing-masks", choices=["error", "skip"], default="error",
                    help="defective test images without a mask: stop (default) or leave them out")
    ev.add_argument("--json", type=Path, default=None, help="write the metrics here as JSON")
    ev.add_argument("--save", type=Path, default=None, help="save the fitted detector (safetensors)")
    _add_pretrain(sub)
    _add_compare(sub)
    return parser


def _add_compare(sub: argparse._SubParsersAction) -> None:
    from .compare import METHODS

    c = sub.add_parser("compare", parents=[_common()],
                       help="every method on every data set, with seeds: CSV and Markdown tables")
    c.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS, metavar="METHOD",
                   help=f"default: all of {', '.join(METHODS)}")
    c.add_argument("--data", nargs="+", default=["bottle", "elpv_mono"], metavar="DATA",
                   help="MVTec AD categories (under --root) and/or elpv_mono, elpv_poly (default: bottle elpv_mono)")
    c.add_argument("--root", default=None, help="MVTec AD data root (default: ADLIB_DATA, ...)")
    c.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds of the methods that draw random numbers")
    c.add_argument("--image-size", type=_positive_int, default=256)
    c.add_argument("--train-limit", type=_positive_int, default=None, help="fit on the first N training images")
    c.add_argument("--test-limit", type=_positive_int, default=None, help="the first N images of each test folder")
    c.add_argument("--device", default=None, help="cuda or cpu (default: ADLIB_DEVICE, else automatic)")
    c.add_argument("--set", action="append", default=[], metavar="METHOD.KEY=VALUE",
                   help="a method's option, e.g. autoencoder.epochs=30 or semi_formula.images=800 (repeatable)")
    c.add_argument("--missing-masks", choices=["error", "skip", "none"], default="error",
                   help="defective test images without a mask: stop (default), leave them out, or keep them "
                        "for image metrics only (ELPV always: none)")
    c.add_argument("--out", type=Path, required=True, help="folder for compare_runs.csv, compare.csv, compare.md")


def _compare_options(items: list[str]) -> dict[str, dict]:
    """``--set METHOD.KEY=VALUE`` items -> per-method options, names and types checked."""
    from .compare import method_options

    options: dict[str, dict] = {}
    for item in items:
        target, sep, text = item.partition("=")
        method, dot, key = target.partition(".")
        if not sep or not dot or not key:
            raise ValueError(f"--set expects METHOD.KEY=VALUE, got {item!r}")
        defaults = method_options(method)
        if key not in defaults or key == "seed":
            raise ValueError(f"--set {target}: {method} has no such option; it has "
                             f"{sorted(k for k in defaults if k != 'seed')} (seeds come from --seeds)")
        options.setdefault(method, {})[key] = _typed(target, text, defaults[key])
    return options


def run_compare(args: argparse.Namespace) -> list[dict]:
    from .compare import CompareConfig, compare, write_results

    _check_writable_folder(args.out, "--out")
    _device(args.device)
    config = CompareConfig(image_size=args.image_size, train_limit=args.train_limit, test_limit=args.test_limit,
                           seeds=tuple(dict.fromkeys(args.seeds)), device=args.device,
                           missing_masks=args.missing_masks, options=_compare_options(args.set))
    done: list[dict] = []

    def finished(row: dict) -> None:   # each run is saved at once: a long comparison can be read as it goes
        done.append(row)
        write_results(done, args.out)
        tqdm.write(f"{row['data']} {row['method']} seed {row['seed']}: image AUROC {row['image_auroc']:.3f}, "
                   f"fit {row['fit_s']:.1f} s, {row['ms_per_image']:.1f} ms/image", file=sys.stderr)

    rows = compare(args.methods, args.data, config, root=args.root, on_row=finished)
    paths = write_results(rows, args.out)
    print(paths["markdown"].read_text(), end="")
    print(f"adlib compare: {len(rows)} runs -> {', '.join(str(p) for p in paths.values())}", file=sys.stderr)
    return rows


def _add_method_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--method", required=True, choices=sorted(DETECTORS))
    p.add_argument("--backbone", default=None, metavar="NAME_OR_FILE",
                   help="backbone name or fine-tuned backbone file (.safetensors), for methods that use one")
    p.add_argument("--device", default=None, help="cuda or cpu (default: ADLIB_DEVICE, else automatic)")
    p.add_argument("--batch-size", type=_positive_int, default=16)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a hyper-parameter, e.g. --set coreset_ratio=0.01 (repeatable)")
    p.add_argument("--memory-mb", type=float, default=None, metavar="MB",
                   help="memory budget of PatchCore's bank and coreset while fitting (default: ADLIB_MEMORY_MB, "
                        "else 2048); coreset=exact fails clearly when the bank would not fit it")


def _add_reading_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--image-size", type=_positive_int, default=256)
    p.add_argument("--crop-size", type=_positive_int, default=None)
    p.add_argument("--value-range", type=float, nargs=2, default=None, metavar=("LOW", "HIGH"),
                   help="pixel range of 16-bit, 32-bit and float images (default: by their type)")


def _add_fit(sub: argparse._SubParsersAction) -> None:
    f = sub.add_parser("fit", parents=[_common()], help="fit a detector on normal images, write a model file")
    _add_method_options(f)
    source = f.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", nargs="+", metavar="FOLDER_OR_FILE",
                        help="normal images: folders (their image files) and/or files")
    source.add_argument("--category", help="an MVTec-layout category under --data: uses its train/good")
    f.add_argument("--data", default=None, help="data root for --category (default: ADLIB_DATA, ...)")
    _add_reading_options(f)
    f.add_argument("--limit", type=_positive_int, default=None, help="use only the first N images")
    f.add_argument("--holdout", type=_fraction, default=0.1,
                   help="fraction of the normal images kept out of fit to set the threshold (0: no threshold "
                        "unless the method sets its own; default %(default)s)")
    f.add_argument("--seed", type=int, default=0, help="seed of the hold-out split")
    f.add_argument("--out", type=Path, required=True, help="the model file to write (.safetensors)")


def _add_predict(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", parents=[_common()], help="score images with a model file: CSV and heat maps")
    p.add_argument("images", nargs="+", metavar="IMAGE_OR_FOLDER", help="image files and/or folders of them")
    p.add_argument("--model", type=Path, required=True, help="a model file written by fit (or evaluate --save)")
    p.add_argument("--csv", type=Path, default=None, help="write the scores here (default: standard output)")
    p.add_argument("--heatmaps", type=Path, default=None, metavar="DIR", help="write heat-map overlays here (PNG)")
    p.add_argument("--threshold", type=float, default=None, help="decide at this score instead of the model's")
    p.add_argument("--device", default=None, help="cuda or cpu (default: ADLIB_DEVICE, else automatic)")
    p.add_argument("--batch-size", type=_positive_int, default=16)


def _add_export(sub: argparse._SubParsersAction) -> None:
    e = sub.add_parser("export", parents=[_common()],
                       help="write a model file as one ONNX graph: pixels in, score and anomaly map out")
    e.add_argument("--model", type=Path, required=True, help="a model file written by fit (or evaluate --save)")
    e.add_argument("--format", choices=["onnx"], default="onnx", help="the file format (default %(default)s)")
    e.add_argument("--out", type=Path, required=True, help="the file to write (.onnx)")


def _add_pretrain(sub: argparse._SubParsersAction) -> None:
    pre = sub.add_parser("pretrain", help="fine-tune a backbone for anomaly detection, write a backbone file")
    recipes = pre.add_subparsers(dest="recipe", required=True)
    for entry in RECIPES.values():
        p = recipes.add_parser(entry.name, parents=[_common()], help=entry.description)
        hints = typing.get_type_hints(entry.recipe)
        for f in entry.fields():
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            _add_typed_option(p, f.name, hints[f.name], default, entry.docs.get(f.name))
        hints = typing.get_type_hints(entry.pretrain)
        parameters = inspect.signature(entry.pretrain).parameters
        for name in entry.run_options:
            _add_typed_option(p, name, hints[name], parameters[name].default, entry.docs.get(name))
        _add_run_options(p, checkpoint_every=entry.checkpoint_every)


def _add_typed_option(p: argparse.ArgumentParser, name: str, annotation, default, doc: FieldDoc | None) -> None:
    """``--NAME`` (underscores as dashes) for a recipe field of type ``annotation``: int, float, str, bool,
    a fixed or open tuple of one of them (``nargs``), or any of these ``| None`` (the word ``none``
    gives None)."""
    doc = doc or FieldDoc()
    optional = False
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        kinds = [a for a in typing.get_args(annotation) if a is not type(None)]
        optional = len(kinds) < len(typing.get_args(annotation))
        if len(kinds) != 1:
            raise TypeError(f"option --{name}: the command line cannot read a {annotation}")
        annotation = kinds[0]
    kwargs: dict = {"default": default}
    if typing.get_origin(annotation) is tuple:
        items = typing.get_args(annotation)
        open_ended = len(items) == 2 and items[1] is Ellipsis
        if open_ended:
            items = items[:1]
        if len(set(items)) != 1:
            raise TypeError(f"option --{name}: the command line cannot read a {annotation}")
        kwargs["nargs"] = "+" if open_ended else len(items)
        annotation = items[0]
    if annotation is bool and "nargs" not in kwargs:
        kwargs["action"] = argparse.BooleanOptionalAction
    elif annotation in (int, float, str):
        kwargs["type"] = _none_or(annotation) if optional else annotation
    else:
        raise TypeError(f"option --{name}: the command line cannot read a {annotation}")
    if doc.choices is not None:
        kwargs["choices"] = doc.choices
    if doc.metavar is not None:
        kwargs["metavar"] = doc.metavar
    shown = " ".join(map(str, default)) if isinstance(default, tuple) else default
    help_text = doc.help.replace("%", "%%")
    if shown is not None and "default" not in help_text:
        help_text = f"{help_text} (default: {str(shown).replace('%', '%%')})".lstrip()
    p.add_argument(f"--{name.replace('_', '-')}", dest=name, help=help_text or None, **kwargs)


def _none_or(parse):
    """An argparse ``type`` for an optional field: the word ``none`` is None, anything else ``parse(text)``."""

    def convert(text: str):
        return None if text.lower() == "none" else parse(text)

    convert.__name__ = parse.__name__
    return convert


def _add_run_options(p: argparse.ArgumentParser, checkpoint_every: int) -> None:
    """Data, device and checkpoint options every recipe shares."""
    p.add_argument("--data", default=None, help="data root in the MVTec AD layout (default: ADLIB_DATA, ...)")
    p.add_argument("--category", default="bottle")
    p.add_argument("--out", type=Path, required=True, help="the backbone file to write (.safetensors)")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--limit", type=_positive_int, default=None, help="use only the first N training images")
    p.add_argument("--device", default=None, help="cuda or cpu (default: ADLIB_DEVICE, else automatic)")
    p.add_argument("--checkpoint-dir", type=Path, default=None, help="default: OUT with the suffix .ckpt")
    p.add_argument("--checkpoint-every", type=int, default=checkpoint_every, help="steps between checkpoints")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint")


def _device(name: str | None):
    """The run's device, with a bad name or a missing GPU as a ValueError (one line on the CLI)."""
    try:
        return settings.default_device(name)
    except RuntimeError as err:
        raise ValueError(f"--device {name}: {err}") from err


def _check_pretrain_args(args: argparse.Namespace) -> None:
    if args.out.suffix != ".safetensors":
        raise ValueError(f"--out must end in .safetensors, got {args.out}")
    if args.backbone not in BACKBONES:
        raise ValueError(f"--backbone must be an architecture to start from, one of {list(BACKBONES)}; "
                         f"got {args.backbone!r}")


def _checkpoint_folder(args: argparse.Namespace) -> Path:
    folder = args.checkpoint_dir or args.out.with_suffix(".ckpt")
    if args.resume and not (folder / STATE_FILE).is_file():
        raise ValueError(f"--resume: no checkpoint in {folder} to resume from")
    return folder


def _normal_images(args: argparse.Namespace):
    root = find_data_root(args.data)
    train = MVTecDataset(root, args.category, "train", image_size=args.image_size, limit=args.limit)
    return load_split(train)[0]


def _recipe_from_args(entry: PretrainRecipe, args: argparse.Namespace):
    """The recipe of ``entry`` with every field as parsed (``nargs`` lists as tuples)."""
    values = {f.name: getattr(args, f.name) for f in entry.fields()}
    return entry.make(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def run_pretrain(args: argparse.Namespace) -> dict:
    """``pretrain RECIPE``: train, then (rank 0) write the backbone file; returns a summary."""
    entry = RECIPES[args.recipe]
    _check_pretrain_args(args)
    device = _device(args.device)
    recipe = _recipe_from_args(entry, args)
    folder = _checkpoint_folder(args)
    images = _normal_images(args)
    run = entry.pretrain(images, recipe, device=device, checkpoint_dir=folder, checkpoint_every=args.checkpoint_every,
                         resume=args.resume, data_name=f"{args.category} (limit {args.limit})",
                         **{name: getattr(args, name) for name in entry.run_options})
    summary = {"recipe": entry.name, "category": args.category, **entry.summary(run)}
    if is_main_process():
        summary["sha256"] = run.save(args.out, category=args.category, image_size=args.image_size)
        summary["out"] = str(args.out)
        print(json.dumps(summary, indent=2))
    return summary


def _hyper(args: argparse.Namespace) -> dict:
    """``--set``/``--backbone``/``--device`` -> hyper-parameters, each name and type checked."""
    cls = DETECTORS[args.method]
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hyper = {}
    for item in args.set:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        if key not in fields or key == "device":
            raise ValueError(f"--set {key}: {args.method} has no such hyper-parameter; it has "
                             f"{sorted(k for k in fields if k != 'device')}")
        hyper[key] = _typed(key, text, fields[key].default)
    if args.backbone is not None:
        if "backbone" not in fields:
            raise ValueError(f"method {args.method} uses no backbone; drop --backbone")
        hyper["backbone"] = args.backbone
    if args.memory_mb is not None:
        if "memory_mb" not in fields:
            raise ValueError(f"method {args.method} has no memory budget; drop --memory-mb")
        if not args.memory_mb > 0:
            raise ValueError(f"--memory-mb must be a positive number of MB, got {args.memory_mb}")
        hyper["memory_mb"] = args.memory_mb
    _device(args.device)
    if "device" in fields:
        hyper["device"] = args.device
    elif args.device not in (None, "cpu"):
        raise ValueError(f"method {args.method} runs on the CPU only; drop --device")
    return hyper


def _typed(key: str, text: str, default):
    """A ``--set`` value parsed as JSON, refused when its type cannot be the default's."""
    value = _parse_value(text)
    kind = type(default)
    if default is None or default is dataclasses.MISSING:
        return value
    ok = (isinstance(value, bool) if kind is bool else
          isinstance(value, (int, float)) and not isinstance(value, bool) if kind is float else
          isinstance(value, int) and not isinstance(value, bool) if kind is int else
          isinstance(value, list) if kind is tuple else isinstance(value, kind))
    if not ok:
        raise ValueError(f"--set {key}={text}: expected a value of type {kind.__name__}, like the default {default!r}")
    return tuple(value) if kind is tuple else value


def _check_output(path: Path | None, flag: str, suffix: str | None = None) -> None:
    """Refuse an output path that cannot be written, before any work starts."""
    if path is None:
        return
    if suffix and path.suffix != suffix:
        raise ValueError(f"{flag} must end in {suffix}, got {path}")
    if path.is_dir():
        raise ValueError(f"{flag} {path} is a folder; give a file name")
    _check_writable_folder(path.parent, flag)


def _check_writable_folder(folder: Path, flag: str) -> None:
    existing = folder.resolve()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"{flag}: {existing} is a file, so {folder} cannot be made")
    if not os.access(existing, os.W_OK):
        raise ValueError(f"{flag}: cannot write in {existing} (permission denied)")


def _preprocessing(args: argparse.Namespace) -> Preprocessing:
    return Preprocessing(args.image_size, args.crop_size, True, tuple(args.value_range) if args.value_range else None)


def run_evaluate(args: argparse.Namespace) -> dict:
    hyper = _hyper(args)
    _check_output(args.json, "--json")
    _check_output(args.save, "--save", ".safetensors")
    detector = get_detector(args.method, **hyper)
    device = getattr(detector, "device_", "cpu")
    root = find_data_root(args.data)
    prep = _preprocessing(args)
    kwargs = dict(root=root, category=args.category, image_size=prep.image_size, crop_size=prep.crop_size,
                  value_range=prep.value_range, limit=args.limit)
    train = MVTecDataset(split="train", **kwargs)
    test = MVTecDataset(split="test", missing_masks=args.missing_masks, **kwargs)
    result = evaluate(detector, test, train, batch_size=args.batch_size)
    row = {"method": args.method, "backbone": getattr(detector, "backbone", None) or "none",
           "device": str(device), "category": args.category, **result.metrics}
    print(format_table(row))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(row, indent=2) + "\n")
    if args.save is not None:
        args.save.parent.mkdir(parents=True, exist_ok=True)
        detector.save(args.save)
    return row


def _training_files(args: argparse.Namespace) -> list[Path]:
    if args.images:
        files = list_image_files(args.images)
    else:
        dataset = MVTecDataset(find_data_root(args.data), args.category, "train", image_size=args.image_size)
        files = [entry.image for entry in dataset.entries]
    return files[: args.limit]


def _split_holdout(files: list[Path], fraction: float, seed: int) -> tuple[list[Path], list[Path]]:
    """Seeded split into (fit, held-out) files (:func:`adlib.data.holdout_split`)."""
    kept, held = holdout_split(len(files), fraction, seed)
    return [files[i] for i in kept], [files[i] for i in held]


def run_fit(args: argparse.Namespace) -> dict:
    """``fit``: normal images -> model file with its preprocessing and a calibrated threshold."""
    hyper = _hyper(args)
    _check_output(args.out, "--out", ".safetensors")
    if args.data is not None and args.images:
        raise ValueError("--data goes with --category; with --images give the folders or files only")
    prep = _preprocessing(args)
    detector = get_detector(args.method, **hyper)
    files = _training_files(args)
    own_rule = detector.calibrates_itself
    fit_files, held_files = (files, []) if own_rule else _split_holdout(files, args.holdout, args.seed)
    start = time.perf_counter()
    detector.fit(train_batches(ImageFiles(fit_files, prep), args.batch_size), preprocessing=prep)
    summary = {"method": args.method, "fit_images": len(fit_files), "holdout_images": len(held_files),
               "image_size": prep.side, "fit_seconds": round(time.perf_counter() - start, 1)}
    if own_rule:
        summary["threshold_rule"] = f"{args.method}'s own (fit sets it; --holdout is not used)"
    elif held_files:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            detector.calibrate(train_batches(ImageFiles(held_files, prep), args.batch_size))
        for note in caught:
            print(f"adlib fit: note: {note.message} (more normal images or a larger --holdout)", file=sys.stderr)
        summary["threshold_rule"] = f"mean + 3 std of {len(held_files)} held-out normal images"
    summary["threshold"] = detector.threshold
    args.out.parent.mkdir(parents=True, exist_ok=True)
    detector.save(args.out)
    summary["out"] = str(args.out)
    print(json.dumps(summary, indent=2))
    return summary


def run_predict(args: argparse.Namespace) -> dict:
    """``predict``: model file + images -> CSV rows (and heat-map PNGs), streamed: each batch of files is
    read once, scored, written (rows and heat maps) and dropped, so memory holds one batch whatever the
    number of images."""
    if not args.model.is_file():
        raise ValueError(f"--model {args.model}: no such file")
    _check_output(args.csv, "--csv")
    if args.heatmaps is not None:
        if args.heatmaps.exists() and not args.heatmaps.is_dir():
            raise ValueError(f"--heatmaps {args.heatmaps} is a file; give a folder")
        _check_writable_folder(args.heatmaps, "--heatmaps")
    files = list_image_files(args.images)
    if not files:
        raise ValueError("no image files given")
    _device(args.device)
    try:
        detector = load_detector(args.model, args.device)
    except Exception as err:   # a file that is not a model: say so in one line
        if isinstance(err, (ValueError, OSError)) or "safetensors" in type(err).__module__:
            raise ValueError(f"--model {args.model}: not a readable adlib model file ({err})") from err
        raise
    if detector.preprocessing is None:
        raise ValueError(f"--model {args.model} was fitted on tensors, without a record of how files were read; "
                         f"refit it with `adlib fit` (or on adlib.data.train_batches)")
    threshold = args.threshold if args.threshold is not None else detector.threshold
    heatmaps = _Heatmaps(args.heatmaps, threshold) if args.heatmaps is not None else None
    with _csv_rows(args.csv) as write_rows:
        for start in tqdm(range(0, len(files), args.batch_size), desc="predict", unit="batch", file=sys.stderr):
            chunk = files[start:start + args.batch_size]
            images = detector.preprocessing.load_many(chunk)     # the only read of these files
            scores, maps = detector.predict(images)
            write_rows([_csv_row(path, score, threshold) for path, score in zip(chunk, scores.tolist())])
            if heatmaps is not None:
                heatmaps.write(chunk, images, maps.cpu())
            del images, scores, maps    # this batch is written: drop it before the next one is read
    if args.csv is not None:
        print(f"adlib predict: {len(files)} images scored -> {args.csv}", file=sys.stderr)
    if heatmaps is not None:
        print(f"adlib predict: {heatmaps.written} heat maps -> {args.heatmaps}", file=sys.stderr)
    return {"images": len(files), "csv": None if args.csv is None else str(args.csv),
            "heatmaps": None if args.heatmaps is None else str(args.heatmaps)}


_CSV_FIELDS = ["path", "score", "decision", "threshold"]


def _csv_row(path: Path, score: float, threshold: float | None) -> dict:
    decision = "" if threshold is None else ("anomalous" if score > threshold else "normal")
    return {"path": str(path), "score": f"{score:.6g}", "decision": decision,
            "threshold": "" if threshold is None else f"{threshold:.6g}"}


@contextlib.contextmanager
def _csv_rows(path: Path | None):
    """Yields ``write(rows)``. Standard output gets the rows as they come; a file is written beside
    ``path`` and renamed onto it when all rows are in, so a run that fails leaves no half CSV there."""
    if path is None:
        writer = csv.DictWriter(sys.stdout, fieldnames=_CSV_FIELDS, lineterminator="\n")
        writer.writeheader()
        yield writer.writerows
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    try:
        with open(partial, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=_CSV_FIELDS)
            writer.writeheader()
            yield writer.writerows
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


class _Heatmaps:
    """One PNG per image, written batch by batch, all on one colour scale fixed at the first batch: from
    its lowest map value to the larger of its highest and twice the threshold (a later map beyond it
    saturates), so that colour means the same in every file of the run."""

    def __init__(self, folder: Path, threshold: float | None) -> None:
        self.folder, self.threshold = folder, threshold
        self.scale: tuple[float, float] | None = None
        self.used: set[str] = set()
        self.written = 0

    def write(self, paths: list[Path], images: torch.Tensor, maps: torch.Tensor) -> None:
        from PIL import Image

        from .viz import heatmap_rgb

        if self.scale is None:
            self.folder.mkdir(parents=True, exist_ok=True)
            twice_threshold = 2 * self.threshold if self.threshold is not None else float("-inf")
            self.scale = (float(maps.min()), max(float(maps.max()), twice_threshold))
        for path, image, amap in zip(paths, images, maps):
            name = f"{path.stem}_heatmap.png"
            k = 1
            while name in self.used:   # two inputs with one name (from two folders): number them
                k += 1
                name = f"{path.stem}_{k}_heatmap.png"
            self.used.add(name)
            Image.fromarray(heatmap_rgb(image, amap.float(), *self.scale)).save(self.folder / name)
            self.written += 1


def run_export(args: argparse.Namespace) -> dict:
    """``export``: a model file -> an ONNX file that :mod:`adlib.deploy` (or any onnxruntime) runs."""
    from .export import export_onnx

    _check_output(args.out, "--out", ".onnx")
    if not args.model.is_file():
        raise ValueError(f"--model {args.model}: no such file")
    start = time.perf_counter()
    export_onnx(args.model, args.out)
    summary = {"model": str(args.model), "out": str(args.out), "format": args.format,
               "megabytes": round(args.out.stat().st_size / 2**20, 1), "seconds": round(time.perf_counter() - start, 1)}
    print(json.dumps(summary))
    return summary


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    commands = {"fit": run_fit, "predict": run_predict, "evaluate": run_evaluate, "pretrain": run_pretrain,
                "compare": run_compare, "export": run_export}
    try:
        commands[args.command](args)
    except (ValueError, OSError, ImportError) as err:   # bad input or environment; anything else is a bug: traceback
        if getattr(args, "debug", False):
            traceback.print_exc()
        print(f"adlib {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
