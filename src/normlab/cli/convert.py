"""``normlab convert``: change the norms of a saved or described model, write the result and a report.

::

    normlab convert ckpt.pt --to dyt --where 'blocks.0-5' --out dyt.pt
    normlab convert config.json --to rmsnorm --out llama_rms.pt      # a Hugging Face config.json
    normlab convert hf:llama:num_hidden_layers=4 --lns --out lns.pt

The output is a converted checkpoint (:mod:`normlab.convert.checkpoint`, loaded with
:func:`normlab.convert.load_converted`); the conversion's summary goes to ``--report`` (default
``OUT.report.json``). Both files are written atomically (temporary file, then rename).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

__all__ = ["add_parser", "cmd_convert"]


def _load_input(spec: str) -> tuple[nn.Module, dict[str, Any], list[dict[str, Any]]]:
    """The model named on the command line, its source description and the steps already applied."""
    import torch

    from normlab.convert.checkpoint import FORMAT, describe_source, load_converted
    from normlab.models.checkpoint import FORMAT as GPT_FORMAT
    from normlab.models.spec import model_from_spec

    path = Path(spec)
    if path.is_file() and path.suffix == ".json":
        model = model_from_spec(spec, config_json=path)
        return model, describe_source(model), []
    if path.is_file():
        payload = torch.load(path, map_location="cpu", weights_only=True)
        fmt = payload.get("format") if isinstance(payload, dict) else None
        if fmt == FORMAT:
            model, payload = load_converted(path)
            return model, payload["source"], list(payload["steps"])
        if fmt != GPT_FORMAT:
            raise ValueError(f"{spec!r} is neither a normlab checkpoint nor a converted one (format {fmt!r})")
    model = model_from_spec(spec)
    return model, describe_source(model), []


# --------------------------------------------------------------------------------------------
# Writing


def cmd_convert(args: argparse.Namespace) -> int:
    from normlab._atomic import atomic_torch_save, atomic_write_text
    from normlab.convert import apply_layernorm_scaling, convert_norms
    from normlab.convert.checkpoint import FORMAT
    from normlab.models.spec import parse_overrides

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
