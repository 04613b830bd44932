"""The ``elastic-fx`` command. Thin: parses arguments, calls the public API, prints.

    elastic-fx inspect MODEL            heads, FFN neurons, params and GFLOPs per block
    elastic-fx score MODEL --images DIR --out FILE          local (diagonal-Hessian) scores
    elastic-fx prune MODEL --images DIR --out scores.efx     local scores + xNES search
    elastic-fx export MODEL --scores FILE --sparsity ... --out-dir DIR   one ONNX per budget
    elastic-fx eval MODEL --scores FILE --sparsity ... --train DIR --test DIR
    elastic-fx report SCORES_FILE                            Markdown report with plots
    elastic-fx import-scores FILE --model MODEL --out scores.efx
    elastic-fx demo                                          the whole pipeline on a small ViT
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import List, Optional

from .errors import ElasticFxError
from .models import SPEC_HELP, load_model
from .version import __version__


def _add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help=f"the model: {SPEC_HELP}")
    p.add_argument("--pretrained", action="store_true", help="download pretrained weights (needs network)")
    p.add_argument("--checkpoint", help="load a local state dict (.pt/.pth/.safetensors) into the model")
    p.add_argument("--input-size", type=int, nargs=2, metavar=("H", "W"), help="override the model's input size")


def _model_and_graph(args):
    import torch

    from .tracing import default_example_inputs, trace

    model = load_model(args.model, pretrained=args.pretrained, checkpoint=args.checkpoint)
    if args.input_size:
        example = (torch.randn(2, 3, *args.input_size),)
    else:
        example = default_example_inputs(model)
    return model, trace(model, example)


def cmd_inspect(args) -> int:
    from .passes.discover import discover

    _, gm = _model_and_graph(args)
    smap = discover(gm)
    print(f"{args.model}  (traced with torch.{gm.meta.get('elastic_fx.tracer', 'fx')})")
    print(smap.summary())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="elastic-fx",
        description="Turn a pretrained Vision Transformer into an elastic one: label-free structured pruning "
        "to any compute budget, exported to ONNX.",
    )
    parser.add_argument("--version", action="version", version=f"elastic_fx {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("inspect", help="print the discovered heads / FFN neurons / GFLOPs per block")
    _add_model(p)
    p.set_defaults(func=cmd_inspect)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=[logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)],
        format="%(levelname)s %(name)s: %(message)s",
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except ElasticFxError as e:
        print(f"elastic-fx {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"elastic-fx {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # python -m elastic_fx.cli
    sys.exit(main())
