"""Command line: ``python -m adlib evaluate --method NAME --data ROOT --category CAT ...``.

Fits on ``train/good``, evaluates on ``test/``, prints the metrics table and writes it as JSON.
Works on any folder in the MVTec AD layout.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from . import settings
from .data import MVTecDataset, find_data_root
from .detectors import DETECTORS, get_detector
from .evaluate import evaluate, format_table


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
    ev.add_argument("--backbone", default=None, help="backbone name, for methods that use one")
    ev.add_argument("--device", default=None, help="cuda or cpu (default: ADLIB_DEVICE, else automatic)")
    ev.add_argument("--image-size", type=int, default=256)
    ev.add_argument("--crop-size", type=int, default=None)
    ev.add_argument("--limit", type=int, default=None, help="use only the first N images of each folder")
    ev.add_argument("--batch-size", type=int, default=16)
    ev.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a hyper-parameter, e.g. --set coreset_ratio=0.01 (repeatable)")
    ev.add_argument("--json", type=Path, default=None, help="write the metrics here as JSON")
    ev.add_argument("--save", type=Path, default=None, help="save the fitted detector (safetensors)")
    return parser


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
    if "device" in fields:
        hyper["device"] = args.device
    device = settings.default_device(args.device)
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
    if args.command == "evaluate":
        run_evaluate(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
