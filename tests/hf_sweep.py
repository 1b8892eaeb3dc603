"""Every Hugging Face architecture the installed transformers builds from a tiny config, put through
normlab's conversion, LayerNorm Scaling and diagnostics; one :class:`Row` per architecture.

The architectures are enumerated from transformers' own auto mappings (causal LM, masked LM /
encoder, encoder-decoder, speech encoder-decoder, image classification), not from a hand list.
``python tests/hf_sweep.py [--only a,b] [--json out.json]`` prints the table.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from normlab.convert import (
    apply_layernorm_scaling,
    convert_norms,
    read_norm,
    remove_layernorm_scaling,
    revert,
)
from normlab.convert.convert import record_inputs
from normlab.convert.detect import UnsupportedNormError
from normlab.diagnostics import diagnose
from normlab.models.hf import hf_tiny_config

# mapping name -> task; an architecture is taken once, under the first task that has it
TASKS = (
    ("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "causal-lm"),
    ("MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES", "encoder-decoder"),
    ("MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES", "speech-encoder-decoder"),
    ("MODEL_FOR_MASKED_LM_MAPPING_NAMES", "encoder"),
    ("MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES", "vision"),
)
# the same family: what each kind of source norm is converted to for the exactness check
SAME_FAMILY = {
    "layernorm": "layernorm",
    "rmsnorm": "rmsnorm",
    "batchnorm": "batchnorm",
    "groupnorm": "groupnorm",
}
EXACT_TOL = 1e-5
MAX_PARAMS = 20_000_000


def architectures() -> list[tuple[str, str, str]]:
    """``(model_type, task, class name)`` for every architecture of the installed transformers."""
    from transformers.models.auto import modeling_auto

    seen: dict[str, tuple[str, str, str]] = {}
    for mapping, task in TASKS:
        for model_type, cls in getattr(modeling_auto, mapping).items():
            if model_type not in seen and isinstance(cls, str):
                seen[model_type] = (model_type, task, cls)
    return sorted(seen.values())


@dataclass
class Row:
    model_type: str
    task: str
    cls: str = ""
    built: bool = False
    why_not_built: str = ""
    norms: int = 0
    stack: str = ""
    blocks: int = 0
    same_exact: int = 0
    same_other: list[str] = field(default_factory=list)
    same_max_diff: float = 0.0
    refused: list[str] = field(default_factory=list)
    dyt_replaced: int = 0
    dyt_revert_exact: bool = False
    lns: str = ""
    diagnose: str = ""
    failures: list[str] = field(default_factory=list)
    seconds: float = 0.0


def build(model_type: str, cls_name: str, *, keep_depth: bool = False) -> nn.Module:
    import transformers

    config = hf_tiny_config(model_type, keep_depth=keep_depth)
    cls = getattr(transformers, cls_name)
    with torch.device("meta"):  # its size first: a default depth can be large
        size = sum(p.numel() for p in cls(config).parameters())
    if size > MAX_PARAMS:
        raise ValueError(f"{size / 1e6:.0f}M parameters at this size, more than the sweep builds")
    torch.manual_seed(0)
    model: nn.Module = cls(config)
    return model.eval()


def inputs(model: nn.Module) -> dict[str, Tensor]:
    config: Any = model.config  # type: ignore[assignment]
    gen = torch.Generator().manual_seed(1)
    main = getattr(model, "main_input_name", "input_ids")
    if main == "input_ids":
        vocab = int(
            getattr(config, "vocab_size", None) or getattr(config.get_text_config(), "vocab_size", 128)
        )
        ids = torch.randint(3, max(4, min(vocab, 128)), (2, 8), generator=gen)
        batch = {"input_ids": ids}
        if getattr(config, "is_encoder_decoder", False):
            batch["decoder_input_ids"] = ids[:, :5]
        return batch
    if main == "pixel_values":
        size = getattr(config, "image_size", 32)
        size = size[0] if isinstance(size, (list, tuple)) else size
        channels = getattr(config, "num_channels", 3)
        return {"pixel_values": torch.randn(2, channels, size, size, generator=gen)}
    if main == "input_features":
        bins = getattr(config, "num_mel_bins", 80)
        length = 2 * int(getattr(config, "max_source_positions", 1500))
        batch = {"input_features": torch.randn(2, bins, length, generator=gen)}
        batch["decoder_input_ids"] = torch.randint(3, 50, (2, 4), generator=gen)
        return batch
    raise ValueError(f"main input {main!r} not handled by the sweep")


def output(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    with torch.no_grad():
        out = model(**batch)
    t = getattr(out, "logits", None)
    if t is None:
        t = out[0] if isinstance(out, tuple) else out.last_hidden_state
    return t.detach().double()


def _perturb_norm_params(model: nn.Module) -> None:
    """Norm weights away from their init, so a dropped or misread weight shows in the output."""
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for m in model.modules():
            if "Norm" not in type(m).__name__:
                continue
            for p in m.parameters(recurse=False):
                p.add_(0.2 * torch.randn(p.shape, generator=gen).to(p.dtype))


def _state(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same_state(a: dict[str, Tensor], b: dict[str, Tensor]) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def _rel(a: Tensor, b: Tensor) -> float:
    if a.shape != b.shape:
        return math.inf
    return float((a - b).abs().max() / (1.0 + b.abs().max()))


def _norm_like(m: nn.Module) -> bool:
    name = type(m).__name__
    return (
        not m._modules
        and re.search(r"Norm(?!al)", name) is not None
        and "WeightNorm" not in name
        and "SpectralNorm" not in name
    )


def _kinds(model: nn.Module, batch: dict[str, Tensor]) -> dict[str, str]:
    calls = record_inputs(model, batch)
    kinds = {}
    for name, m in model.named_modules():
        call = calls.get(id(m))
        try:
            info = read_norm(m, input_shape=None if call is None else tuple(call.shape))
        except UnsupportedNormError:
            continue
        if info is not None:
            kinds[name] = info.kind
    return kinds


def check(model_type: str, task: str, cls_name: str) -> Row:
    row = Row(model_type, task, cls_name)
    start = time.perf_counter()
    built = None
    for keep_depth in (False, True):  # per-layer patterns (hybrid stacks) may need every layer
        try:
            model = build(model_type, cls_name, keep_depth=keep_depth)
            _perturb_norm_params(model)
            batch = inputs(model)
            ref = output(model, batch)
            if not torch.isfinite(ref).all():
                raise ValueError("non-finite output of the unconverted model")
            built = (model, batch, ref)
            break
        except Exception as e:  # an architecture that does not build tiny is not in the sweep
            row.why_not_built = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
    if built is None:
        row.seconds = time.perf_counter() - start
        return row
    model, batch, ref = built
    row.why_not_built = ""
    row.built = True
    try:
        _sweep(row, model, batch, ref)
    except Exception as e:
        row.failures.append(f"crash: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
    row.seconds = time.perf_counter() - start
    return row


def _sweep(row: Row, model: nn.Module, batch: dict[str, Tensor], ref: Tensor) -> None:
    before = _state(model)
    # 1. the same family: exact where reported exact
    kinds = _kinds(model, batch)
    row.norms = len(kinds)
    reports = []
    for kind, target in SAME_FAMILY.items():
        if kind not in kinds.values():
            continue
        want = {n for n, k in kinds.items() if k == kind}
        rep = convert_norms(
            model, target, where=lambda n, m, want=want: n in want, strict=False, example=batch
        )
        reports.append(rep)
        row.refused += [f"{', '.join(s.names)}: {s.reason}" for s in rep.skipped if "already" not in s.reason]
        for r in rep.replaced:
            if r.relation == "exact":
                row.same_exact += 1
            else:
                row.same_other.append(f"{r.name}: {r.relation}")
    if reports:
        row.stack = "" if reports[0].blocks is None else reports[0].blocks.name
        row.blocks = 0 if reports[0].blocks is None else reports[0].blocks.size
    try:
        out = output(model, batch)
        row.same_max_diff = _rel(out, ref)
        if not row.same_other and row.same_max_diff > EXACT_TOL:
            row.failures.append(f"same-family conversion reported exact, differs by {row.same_max_diff:.3g}")
    except Exception as e:
        row.failures.append(f"converted (same family) model fails: {type(e).__name__}: {e}")
    for rep in reversed(reports):
        revert(model, rep)
    if not _same_state(_state(model), before):
        row.failures.append("revert of the same-family conversion changed the state_dict")
    # 2. DyT and back
    norm_like = {n for n, m in model.named_modules() if _norm_like(m)}
    rep = convert_norms(model, "dyt", strict=False, example=batch)
    row.dyt_replaced = len(rep.replaced)
    row.refused += [
        f"{', '.join(s.names)}: {s.reason}" for s in rep.skipped if s.reason.startswith("unsupported")
    ]
    accounted = {n for r in rep.replaced for n in r.names} | {n for s in rep.skipped for n in s.names}
    silent = sorted(n for n in norm_like if not any(n == a or n.startswith(a + ".") for a in accounted))
    if silent:
        row.failures.append(f"norms neither converted nor skipped with a reason: {silent[:3]}")
    try:
        out = output(model, batch)
        if not torch.isfinite(out).all():
            row.failures.append("DyT model output is not finite")
    except Exception as e:
        row.failures.append(f"DyT model fails: {type(e).__name__}: {e}")
    revert(model, rep)
    row.dyt_revert_exact = _same_state(_state(model), before) and torch.equal(output(model, batch), ref)
    if not row.dyt_revert_exact:
        row.failures.append("DyT revert is not bit-exact")
    # 3. LNS applied or clearly refused
    try:
        scaled = apply_layernorm_scaling(model)
    except ValueError as e:
        row.lns = f"refused: {e}"
    else:
        row.lns = f"applied to {len(scaled)} norms"
        try:
            output(model, batch)
        except Exception as e:
            row.failures.append(f"LNS model fails: {type(e).__name__}: {e}")
        remove_layernorm_scaling(model)
        if not torch.equal(output(model, batch), ref):
            row.failures.append("removing LNS does not restore the output")
    # 4. diagnose runs
    d = diagnose(model, batch)
    row.diagnose = f"{d.model.num_blocks} blocks"
    if not _same_state(_state(model), before):
        row.failures.append("diagnose changed the state_dict")


def table(rows: list[Row]) -> str:
    built = [r for r in rows if r.built]
    lines = [
        f"architectures enumerated: {len(rows)}, built from a tiny config: {len(built)}, "
        f"failed: {sum(bool(r.failures) for r in built)}",
        "",
        "| model_type | task | norms | stack (blocks) | same family exact | refused | DyT + revert | LNS "
        "| failures |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in built:
        lns = "applied" if r.lns.startswith("applied") else "refused"
        lines.append(
            f"| {r.model_type} | {r.task} | {r.norms} | {r.stack or '-'} ({r.blocks}) | {r.same_exact}"
            f"{' + ' + str(len(r.same_other)) + ' other' if r.same_other else ''} | {len(r.refused)} | "
            f"{r.dyt_replaced}, {'bit-exact' if r.dyt_revert_exact else 'NO'} | {lns} | "
            f"{'; '.join(r.failures) or '-'} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", default="")
    parser.add_argument("--json", default="")
    args = parser.parse_args(argv)
    import transformers

    transformers.logging.set_verbosity_error()
    warnings.simplefilter("ignore")
    only = set(filter(None, args.only.split(",")))
    rows = []
    for model_type, task, cls in architectures():
        if only and model_type not in only:
            continue
        row = check(model_type, task, cls)
        rows.append(row)
        status = "skip" if not row.built else ("FAIL" if row.failures else "ok")
        print(
            f"{status:4} {model_type:28} {row.seconds:6.1f}s {'; '.join(row.failures) or row.why_not_built}",
            flush=True,
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in rows], f, indent=1)
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
