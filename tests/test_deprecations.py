"""Import paths that users were told about keep working for one release, each with a DeprecationWarning."""

from __future__ import annotations

import contextlib
import importlib
import sys
import warnings
from collections.abc import Iterator

import pytest
import torch

import normlab


@pytest.mark.parametrize(
    ("old", "attribute", "new"),
    [
        ("normlab.init", "deepnorm_alpha_beta", "normlab.blocks.init"),
        ("normlab.nn", "WNConv2d", "normlab.norms"),
        ("normlab.cli_convert", "load_converted", "normlab.convert"),
        ("normlab.report", "write_report", "normlab.summary"),
    ],
)
def test_old_module_paths_warn_and_give_the_same_objects(old: str, attribute: str, new: str) -> None:
    with pytest.warns(DeprecationWarning, match=old.replace(".", r"\.")):
        module = importlib.reload(sys.modules[old]) if old in sys.modules else importlib.import_module(old)
    expected = "write_summary" if attribute == "write_report" else attribute
    assert getattr(module, attribute) is getattr(importlib.import_module(new), expected)


def test_attribute_access_from_the_package_root() -> None:
    sys.modules.pop("normlab.init", None)
    vars(normlab).pop("init", None)  # a former import set the attribute; __getattr__ is the path asked about
    with pytest.warns(DeprecationWarning, match="normlab.blocks.init"):
        assert normlab.init.deepnorm_alpha_beta(12) == normlab.blocks.deepnorm_alpha_beta(12)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = normlab.nope  # type: ignore[attr-defined]


def test_diagnostics_report_class_is_now_diagnosis() -> None:
    with pytest.warns(DeprecationWarning, match="Diagnosis"):
        old = normlab.diagnostics.DiagnosticsReport  # type: ignore[attr-defined]
    assert old is normlab.diagnostics.Diagnosis


def test_importing_normlab_warns_about_nothing() -> None:
    import subprocess

    code = (
        "import warnings; warnings.simplefilter('error')\n"
        "import normlab, normlab.cli\n"
        "normlab.cli.build_parser()\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


@contextlib.contextmanager
def warnings_as_errors() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


def test_placement_option_fields_still_build_the_same_blocks() -> None:
    from normlab.models import GPT, GPTConfig
    from normlab.models.checkpoint import config_from_dict, config_to_dict

    kw = {"vocab_size": 11, "block_size": 6, "n_layer": 4, "n_head": 2, "n_embd": 8}
    cases = [
        ("mixln", {"mixln_alpha": 0.5}, {"alpha": 0.5}),
        ("b2t", {"b2t_rescale": True}, {"rescale": True}),
    ]
    for placement, old, new in cases:
        with pytest.warns(DeprecationWarning, match=next(iter(old))):
            legacy = GPTConfig(**kw, placement=placement, **old)  # type: ignore[arg-type]
        current = GPTConfig(**kw, placement=placement, placement_kwargs=new)  # type: ignore[arg-type]
        torch.manual_seed(0)
        a = GPT(legacy)
        torch.manual_seed(0)
        b = GPT(current)
        pairs = zip(a.state_dict().values(), b.state_dict().values(), strict=True)
        assert all(torch.equal(x, y) for x, y in pairs)
        assert [blk.options for blk in a.blocks] == [blk.options for blk in b.blocks]
    mix = GPT(GPTConfig(**kw, placement="mixln", placement_kwargs={"alpha": 0.5}))  # type: ignore[arg-type]
    assert [blk.post_ln for blk in mix.blocks] == [True, True, False, False]
    # a checkpoint's config written before placement_kwargs existed holds the old fields' defaults
    legacy_defaults = {"b2t_rescale": False, "mixln_alpha": 0.25, "layernorm_scaling": False}
    old_dict = {**config_to_dict(mix.config), **legacy_defaults, "placement": "mixln"}
    del old_dict["placement_kwargs"]
    with warnings_as_errors():
        restored = config_from_dict(old_dict)
    assert restored.placement_kwargs == {} and GPT(restored).blocks[0].options == {"alpha": 0.25}
    assert "mixln_alpha" not in config_to_dict(restored)


@pytest.mark.parametrize(
    ("old", "new"), [("ConversionReport", "ConversionSummary"), ("FoldReport", "FoldSummary")]
)
def test_conversion_report_classes_are_now_summaries(old: str, new: str) -> None:
    with pytest.warns(DeprecationWarning, match=new):
        cls = getattr(normlab.convert, old)
    assert cls is getattr(normlab.convert, new)
