"""Command line: ``python -m adlib evaluate|pretrain ...``.

- ``evaluate --method NAME --data ROOT --category CAT [--backbone NAME_OR_FILE]``: fits on
  ``train/good``, evaluates on ``test/``, prints the metrics table and writes it as JSON.
- ``pretrain centering --data ROOT --category CAT --out FILE``: fine-tunes a backbone on the
  category's normal images and writes it as one backbone file that ``--backbone`` accepts; under
  ``torchrun --nproc-per-node K`` it trains data-parallel.
- ``pretrain semi_formula --data ROOT --category CAT --images N --out FILE``: pre-trains a backbone
  on N Gaussian-mixture anomalies streamed from the category's normal images (also under torchrun).

Works on any folder in the MVTec AD layout. Bad input ends with one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from . import settings
from .data import MVTecDataset, find_data_root, load_split
from .detectors import DETECTORS, get_detector
from .evaluate import evaluate, format_table
from .pretrain import CenteringRecipe, SemiFormulaRecipe, pretrain_centering, pretrain_semi_formula
from .pretrain.semi_formula import INITS, LOSSES
from .backbones import BACKBONES
from .train import STATE_FILE, is_main_process


def _parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m adlib", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    ev = sub.add_parser("evaluate", help="fit on train/good, evaluate on test/, print and save the metrics")
    ev.add_argument("--method", required=True, choices=sorted(DETECTORS))
    ev.add_argument("--data", default=None, help="data root in the MVTec AD layout (default: ADLIB_DATA, ...)")
    ev.add_argument("--category", default="bottle")
    ev.add_argument("--backbone", default=None, metavar="NAME_OR_FILE",
                    help="backbone name or fine-tuned backbone file (.safetensors), for methods that use one")
    ev.add_argument("--device", default=None, help="cuda or cpu (default: ADLIB_DEVICE, else automatic)")
    ev.add_argument("--image-size", type=int, default=256)
    ev.add_argument("--crop-size", type=int, default=None)
    ev.add_argument("--limit", type=int, default=None, help="use only the first N images of each folder")
    ev.add_argument("--batch-size", type=int, default=16)
    ev.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a hyper-parameter, e.g. --set coreset_ratio=0.01 (repeatable)")
    ev.add_argument("--json", type=Path, default=None, help="write the metrics here as JSON")
    ev.add_argument("--save", type=Path, default=None, help="save the fitted detector (safetensors)")
    _add_pretrain(sub)
    return parser


def _add_pretrain(sub: argparse._SubParsersAction) -> None:
    pre = sub.add_parser("pretrain", help="fine-tune a backbone for anomaly detection, write a backbone file")
    recipes = pre.add_subparsers(dest="recipe", required=True)
    c = recipes.add_parser("centering", help="L_class + lambda * L_center on the category's normal images")
    defaults = CenteringRecipe()
    c.add_argument("--backbone", default=defaults.backbone, help="architecture to start from (ImageNet weights)")
    c.add_argument("--epochs", type=int, default=defaults.epochs)
    c.add_argument("--lambda-center", type=float, default=defaults.lambda_center)
    c.add_argument("--form", choices=["per_position", "pooled"], default=defaults.form,
                   help="L_center on PaDiM's per-position patches or on the pooled vector")
    c.add_argument("--batch-size", type=int, default=defaults.batch_size, help="per process")
    c.add_argument("--lr", type=float, default=defaults.lr)
    c.add_argument("--seed", type=int, default=defaults.seed)
    c.add_argument("--labelled", default=None, metavar="FOLDER",
                   help="ImageFolder of ImageNet classes for L_class (default: distillation from the original)")
    _add_run_options(c, checkpoint_every=20)
    _add_semi_formula(recipes)


def _add_run_options(p: argparse.ArgumentParser, checkpoint_every: int) -> None:
    """Data, device and checkpoint options every recipe shares."""
    p.add_argument("--data", default=None, help="data root in the MVTec AD layout (default: ADLIB_DATA, ...)")
    p.add_argument("--category", default="bottle")
    p.add_argument("--out", type=Path, required=True, help="the backbone file to write (.safetensors)")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--limit", type=int, default=None, help="use only the first N training images")
    p.add_argument("--device", default=None, help="cuda or cpu (default: ADLIB_DEVICE, else automatic)")
    p.add_argument("--checkpoint-dir", type=Path, default=None, help="default: OUT with the suffix .ckpt")
    p.add_argument("--checkpoint-every", type=int, default=checkpoint_every, help="steps between checkpoints")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint")


def _add_semi_formula(recipes: argparse._SubParsersAction) -> None:
    s = recipes.add_parser("semi_formula", help="separation + ranking losses on streamed Gaussian-mixture anomalies")
    defaults = SemiFormulaRecipe()
    s.add_argument("--images", type=int, default=defaults.images,
                   help="anomalous images to stream, all processes together (default: %(default)s)")
    s.add_argument("--backbone", default=defaults.backbone, help="architecture to pre-train")
    s.add_argument("--init", choices=INITS, default=defaults.init, help="start from ImageNet weights or from scratch")
    s.add_argument("--losses", choices=LOSSES, default=defaults.losses,
                   help="separation (a), ranking (b) or both")
    s.add_argument("--margin", type=float, default=defaults.margin)
    s.add_argument("--tau", type=float, default=defaults.tau)
    s.add_argument("--batch-size", type=int, default=defaults.batch_size, help="pairs per step and process")
    s.add_argument("--lr", type=float, default=defaults.lr)
    s.add_argument("--seed", type=int, default=defaults.seed)
    s.add_argument("--workers", type=int, default=0, help="DataLoader processes making the blobs (CPU only)")
    _add_run_options(s, checkpoint_every=200)


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


def run_pretrain(args: argparse.Namespace) -> dict:
    """``pretrain RECIPE``: train, then (rank 0) write the backbone file; returns a summary."""
    if args.recipe == "semi_formula":
        return run_semi_formula(args)
    if args.epochs < 1:
        raise ValueError(f"--epochs must be at least 1, got {args.epochs}")
    _check_pretrain_args(args)
    device = _device(args.device)
    recipe = CenteringRecipe(backbone=args.backbone, lambda_center=args.lambda_center, form=args.form,
                             epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                             labelled=args.labelled)
    folder = _checkpoint_folder(args)
    images = _normal_images(args)
    run = pretrain_centering(images, recipe, device=device, checkpoint_dir=folder,
                             checkpoint_every=args.checkpoint_every, resume=args.resume,
                             data_name=f"{args.category} (limit {args.limit})")
    summary = {"recipe": "centering", "category": args.category, "train_images": len(images),
               "steps": run.history.steps, "seconds": round(run.seconds, 1), "world_size": run.world_size,
               **{k: round(v[-1], 5) for k, v in run.history.epoch.items()}}
    if is_main_process():
        summary["sha256"] = run.save(args.out, category=args.category, image_size=args.image_size)
        summary["out"] = str(args.out)
        print(json.dumps(summary, indent=2))
    return summary


def run_semi_formula(args: argparse.Namespace) -> dict:
    """``pretrain semi_formula``: stream, train, then (rank 0) write the backbone file."""
    _check_pretrain_args(args)
    device = _device(args.device)
    recipe = SemiFormulaRecipe(backbone=args.backbone, init=args.init, losses=args.losses, margin=args.margin,
                               tau=args.tau, images=args.images, batch_size=args.batch_size, lr=args.lr,
                               seed=args.seed)
    folder = _checkpoint_folder(args)
    images = _normal_images(args)
    run = pretrain_semi_formula(images, recipe, device=device, checkpoint_dir=folder,
                                checkpoint_every=args.checkpoint_every, resume=args.resume, workers=args.workers,
                                data_name=f"{args.category} (limit {args.limit})")
    summary = {"recipe": "semi_formula", "category": args.category, "normal_images": len(images),
               "streamed_images": run.history.steps * recipe.batch_size * run.world_size,
               "steps": run.history.steps, "seconds": round(run.seconds, 1), "world_size": run.world_size,
               "stream_images_per_s": round(run.stream_images_per_s or 0.0, 1),
               "train_images_per_s": round(run.train_images_per_s, 2),
               **{k: round(v[-1], 5) for k, v in run.history.epoch.items()}}
    if is_main_process():
        summary["sha256"] = run.save(args.out, category=args.category, image_size=args.image_size)
        summary["out"] = str(args.out)
        print(json.dumps(summary, indent=2))
    return summary


def run_evaluate(args: argparse.Namespace) -> dict:
    cls = DETECTORS[args.method]
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    hyper = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set expects KEY=VALUE, got {item!r}")
        hyper[key] = _parse_value(value)
    if args.backbone is not None:
        if "backbone" not in fields:
            raise SystemExit(f"method {args.method} uses no backbone; drop --backbone")
        hyper["backbone"] = args.backbone
    device = _device(args.device)
    if "device" in fields:
        hyper["device"] = args.device
    detector = get_detector(args.method, **hyper)
    root = find_data_root(args.data)
    kwargs = dict(root=root, category=args.category, image_size=args.image_size, crop_size=args.crop_size,
                  limit=args.limit)
    train = MVTecDataset(split="train", **kwargs)
    test = MVTecDataset(split="test", **kwargs)
    result = evaluate(detector, test, train, batch_size=args.batch_size)
    row = {"method": args.method, "backbone": getattr(detector, "backbone", None) or "none",
           "device": str(device), "category": args.category, **result.metrics}
    print(format_table(row))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(row, indent=2) + "\n")
    if args.save is not None:
        detector.save(args.save)
    return row


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "evaluate":
            run_evaluate(args)
        elif args.command == "pretrain":
            run_pretrain(args)
    except (ValueError, OSError, ImportError) as err:   # bad input: one line, not a traceback
        print(f"adlib {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
