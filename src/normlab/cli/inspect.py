"""``normlab inspect``: where a model's norms sit, what each computes, and what normlab can do with them.

::

    normlab inspect hf:glm4
    normlab inspect hf --config-json GLM-4-9B/config.json
    normlab inspect gpt:n_layer=6,placement=peri
    normlab inspect runs/ckpt.pt --json

MODEL is a normlab GPT spec, a normlab checkpoint, or a Hugging Face model type / config.json
(random weights, nothing downloaded; see :mod:`normlab.models.spec`). The report lists the
stack of blocks and the placement of each (Pre-LN, Post-LN, Peri-LN / sandwich, parallel, q/k
norms, final norm), every norm with its formula, and the relation of each normlab conversion
and of LayerNorm Scaling. Roles come from one forward on a small input. A Hugging Face model
of more than ``--max-params`` parameters is first built on the meta device (no memory) for its
size and stack, then inspected on a miniature of the same config (2 layers, width 64): the
placement of a block does not depend on its width.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import torch
from torch import nn

from normlab.convert.inspection import inspect
from normlab.structure import find_blocks

__all__ = ["add_parser", "cmd_inspect"]


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``normlab inspect`` on the CLI's subparsers."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "inspect",
        help="norm sites, block placements and applicable conversions of a model",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    p.add_argument("model", help="gpt:key=value,..., a normlab checkpoint, or hf:MODEL_TYPE[:key=value,...]")
    p.add_argument("--config-json", default=None, help="a Hugging Face config.json (random weights)")
    p.add_argument(
        "--max-params",
        type=float,
        default=5e7,
        help="above this many parameters a Hugging Face model is inspected in miniature (default 5e7)",
    )
    p.add_argument("--json", action="store_true", help="print the JSON report")
    p.set_defaults(func=cmd_inspect)
    return p


def _build(spec: str, config_json: str | None, max_params: float) -> tuple[nn.Module, str]:
    from normlab.models.spec import model_from_spec

    hf = config_json is not None or spec.startswith("hf:") or spec == "hf"
    if not hf:
        return model_from_spec(spec), ""
    with torch.device("meta"):
        full = model_from_spec(spec, config_json=config_json)
    size = sum(p.numel() for p in full.parameters())
    if size <= max_params:
        return model_from_spec(spec, config_json=config_json), ""
    from normlab.models.hf import hf_model, shrink_config

    stack = find_blocks(full, required=False)
    where = "no stack of blocks" if stack is None else f"{stack.size} blocks in {stack.name}"
    mini = hf_model(shrink_config(full.config))
    note = (
        f"the full model: {size / 1e6:,.0f}M parameters, {where} (built on the meta device); "
        "inspected below in miniature (2 layers, width 64), whose placement is the same"
    )
    return mini, note


def cmd_inspect(args: argparse.Namespace) -> int:
    try:
        model, note = _build(args.model, args.config_json, args.max_params)
    except (ValueError, OSError) as e:
        raise SystemExit(f"normlab inspect: {e}") from None
    report = inspect(model.eval())
    if args.json:
        print(json.dumps({**report.to_dict(), "note": note}, indent=1))
        return 0
    if note:
        print(note)
    print(report)
    return 0
