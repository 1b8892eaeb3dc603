"""``normlab convert``: change the norms of a saved or described model, write the result and a report.

::

    normlab convert ckpt.pt --to dyt --where 'blocks.0-5' --out dyt.pt
    normlab convert config.json --to rmsnorm --out llama_rms.pt      # a Hugging Face config.json
    normlab convert hf:llama:num_hidden_layers=4 --lns --out lns.pt

The output is a ``torch.save`` file of plain data and tensors (``weights_only`` loadable):
``{"format": "normlab-converted/1", "source", "steps", "state_dict", "report"}``. ``source``
says how to rebuild the original model (a normlab GPT config, or a Hugging Face class and
config); ``steps`` lists the conversions applied in order. :func:`load_converted` rebuilds the
model, re-applies the steps and loads the weights; a converted checkpoint can be converted
again (the steps accumulate). The report goes to ``--report`` (default ``OUT.report.json``).
Both files are written atomically (temporary file, then rename). This module is an edge of the
package: it may import ``transformers`` (for Hugging Face sources).
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from normlab._atomic import atomic_torch_save, atomic_write_text
from normlab.convert import apply_layernorm_scaling, convert_norms
from normlab.models import GPT
from normlab.models.checkpoint import FORMAT as GPT_FORMAT
from normlab.models.checkpoint import config_from_dict, config_to_dict
from normlab.modelspec import hf_from_spec, model_from_spec, parse_overrides

FORMAT = "normlab-converted/1"

__all__ = ["FORMAT", "add_parser", "apply_steps", "cmd_convert", "load_converted"]


# --------------------------------------------------------------------------------------------
# Sources: how to rebuild the unconverted model


def _describe_source(model: nn.Module) -> dict[str, Any]:
    if isinstance(model, GPT):
        return {"kind": "gpt", "config": config_to_dict(model.config)}
    config = getattr(model, "config", None)
    to_dict: Callable[[], dict[str, Any]] | None = getattr(config, "to_dict", None)
    if to_dict is not None and hasattr(config, "model_type"):
        return {"kind": "hf", "class": type(model).__name__, "config": to_dict()}
    raise ValueError(f"normlab convert: cannot describe a {type(model).__name__} for re-loading")


def _build_source(source: dict[str, Any], map_location: str | torch.device) -> nn.Module:
    if source.get("kind") == "gpt":
        return GPT(config_from_dict(source["config"]), device=map_location)
    if source.get("kind") == "hf":
        try:
            import transformers
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ValueError("this checkpoint holds a Hugging Face model: pip install 'normlab[hf]'") from e
        data = dict(source["config"])
        model_type = data.pop("model_type")
        config = transformers.AutoConfig.for_model(model_type, **data)
        cls = getattr(transformers, source["class"], None)
        if cls is None:
            raise ValueError(f"transformers has no class {source['class']!r}")
        model: nn.Module = cls(config)
        return model.to(map_location)
    raise ValueError(f"unknown source kind {source.get('kind')!r}")


def apply_steps(model: nn.Module, steps: list[dict[str, Any]]) -> list[Any]:
    """Re-apply recorded conversion steps to a freshly built model; returns their reports."""
    reports: list[Any] = []
    for step in steps:
        op = step.get("op")
        if op == "convert_norms":
            reports.append(
                convert_norms(
                    model,
                    step["to"],
                    where=step["where"],
                    copy_affine=step["copy_affine"],
                    strict=step.get("strict", True),
                    **step["norm_kwargs"],
                )
            )
        elif op == "apply_layernorm_scaling":
            reports.append(apply_layernorm_scaling(model))
        else:
            raise ValueError(f"unknown conversion step {op!r}")
    return reports


def load_converted(
    path: str | os.PathLike[str], *, map_location: str | torch.device = "cpu"
) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model of a checkpoint written by ``normlab convert``; returns ``(model, payload)``."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"load_converted: no file at {str(path)!r}")
    payload = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise ValueError(f"load_converted: {str(path)!r} is not a converted checkpoint (format {found!r})")
    model = _build_source(payload["source"], map_location)
    apply_steps(model, payload["steps"])
    model.load_state_dict(payload["state_dict"])
    return model, payload


def _load_input(spec: str) -> tuple[nn.Module, dict[str, Any], list[dict[str, Any]]]:
    """The model named on the command line, its source description and the steps already applied."""
    path = Path(spec)
    if path.is_file() and path.suffix == ".json":
        model = hf_from_spec(config_json=path)
        return model, _describe_source(model), []
    if path.is_file():
        payload = torch.load(path, map_location="cpu", weights_only=True)
        fmt = payload.get("format") if isinstance(payload, dict) else None
        if fmt == FORMAT:
            model, payload = load_converted(path)
            return model, payload["source"], list(payload["steps"])
        if fmt != GPT_FORMAT:
            raise ValueError(f"{spec!r} is neither a normlab checkpoint nor a converted one (format {fmt!r})")
    model = model_from_spec(spec)
    return model, _describe_source(model), []


# --------------------------------------------------------------------------------------------
# Writing


def cmd_convert(args: argparse.Namespace) -> int:
    if args.to is None and not args.lns:
        raise ValueError("normlab convert: give --to NORM, --lns, or both")
    if args.out is None and not args.dry_run:
        raise ValueError("normlab convert: --out PATH is required (or --dry-run)")
    model, source, steps = _load_input(args.model)
    reports: dict[str, Any] = {}
    new_steps: list[dict[str, Any]] = []
    if args.to is not None:
        options = parse_overrides(args.set, where="--set")
        where = args.where if args.where else None
        report = convert_norms(
            model,
            args.to,
            where=where,
            copy_affine=not args.no_copy_affine,
            strict=not args.non_strict,
            dry_run=args.dry_run,
            **options,
        )
        print(report)
        if report.recipe is None:  # pragma: no cover - command-line arguments are always plain data
            raise ValueError("normlab convert: the conversion cannot be recorded")
        new_steps.append({"op": "convert_norms", "strict": not args.non_strict, **report.recipe})
        reports["convert_norms"] = report.to_dict()
    if args.lns and not args.dry_run:
        scaled = apply_layernorm_scaling(model)
        print(f"LayerNorm Scaling on {len(scaled)} pre-norms (final norm left alone)")
        new_steps.append({"op": "apply_layernorm_scaling"})
        reports["apply_layernorm_scaling"] = scaled
    if args.dry_run:
        if args.report:
            text = json.dumps(reports, indent=2)
            atomic_write_text(args.report, text)
        return 0
    out = Path(args.out)
    payload = {
        "format": FORMAT,
        "source": source,
        "steps": steps + new_steps,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "report": reports,
    }
    atomic_torch_save(payload, out)
    report_path = Path(args.report) if args.report else out.with_name(out.name + ".report.json")
    text = json.dumps(reports, indent=2)
    atomic_write_text(report_path, text)
    print(f"wrote {out} and {report_path}")
    return 0


def add_parser(subparsers: Any) -> None:
    """Register ``normlab convert`` on the ``normlab`` command's subparsers."""
    p = subparsers.add_parser(
        "convert",
        help="change the norms of a model and write the converted checkpoint and a report",
        description=(
            "Convert the norms of MODEL: a normlab checkpoint, a converted checkpoint, a Hugging Face "
            "config.json, or a spec (gpt:key=value,... or hf:MODEL_TYPE[:key=value,...])."
        ),
    )
    p.add_argument("model", help="checkpoint path, config.json path, or model spec")
    p.add_argument("--to", help="target norm (normlab list), e.g. dyt, rmsnorm, groupnorm")
    p.add_argument(
        "--where",
        action="append",
        help="which norms: a name pattern ('layers.0-5', 'h.*.ln_1') or a block range ('0-5'); repeatable",
    )
    p.add_argument("--set", default="", help="options of the new norms, e.g. alpha_init=0.8,bias=False")
    p.add_argument("--no-copy-affine", action="store_true", help="do not carry weight and bias over")
    p.add_argument("--non-strict", action="store_true", help="skip norms that cannot be converted")
    p.add_argument("--lns", action="store_true", help="then apply LayerNorm Scaling (Pre-LN models)")
    p.add_argument("--dry-run", action="store_true", help="print the report, write no checkpoint")
    p.add_argument("--out", "-o", help="path of the converted checkpoint")
    p.add_argument("--report", help="path of the JSON report (default: OUT.report.json)")
    p.set_defaults(func=cmd_convert)
