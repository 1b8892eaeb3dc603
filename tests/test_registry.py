"""The norm registry: names, aliases, spelling, errors, and the one-file-one-line rule."""

from __future__ import annotations

import functools
import importlib
import pkgutil

import pytest
import torch
from torch import nn

import normlab
from normlab.norms import NORMS, NormSpec
from normlab.registry import Registry

ISSUE_2_NAMES = {
    "layernorm",
    "rmsnorm",
    "batchnorm",
    "groupnorm",
    "instancenorm",
    "identity",
    "dyt",
    "derf",
    "lns",
}


def test_every_issue_layer_is_registered() -> None:
    assert set(normlab.list_norms()) >= ISSUE_2_NAMES


def test_every_norm_file_registers_a_name() -> None:
    """A class added to norms/ but never registered (timm's split-commit failure) is caught here."""
    package = importlib.import_module("normlab.norms")
    files = [m.name for m in pkgutil.iter_modules(package.__path__) if not m.name.startswith("_")]
    registered_in = {NORMS.get(n).__module__.rsplit(".", 1)[-1] for n in normlab.list_norms()}
    assert set(files) == registered_in


@pytest.mark.parametrize("spelling", ["layernorm", "LayerNorm", "layer_norm", "LAYER-NORM", "ln"])
def test_names_ignore_case_and_separators(spelling: str) -> None:
    assert normlab.get_norm_layer(spelling) is normlab.LayerNorm


def test_aliases_resolve_to_their_class() -> None:
    for name in normlab.list_norms():
        for alias in NORMS.aliases(name):
            assert normlab.get_norm_layer(alias) is normlab.get_norm_layer(name)


def test_unknown_name_lists_close_matches() -> None:
    with pytest.raises(ValueError, match=r"unknown norm 'rmsnrom'.*'rmsnorm'"):
        normlab.create_norm("rmsnrom", 8)


def test_create_from_class_partial_and_none() -> None:
    assert isinstance(normlab.create_norm(normlab.RMSNorm, 8), normlab.RMSNorm)
    gn = normlab.create_norm(functools.partial(normlab.GroupNorm, num_groups=4), 8)
    assert isinstance(gn, normlab.GroupNorm) and gn.num_groups == 4
    assert isinstance(normlab.create_norm(None, 8), normlab.Identity)
    assert isinstance(normlab.create_norm(nn.LayerNorm, 8), nn.LayerNorm)  # any nn.Module class


def test_create_rejects_other_types() -> None:
    with pytest.raises(ValueError, match="must be a name"):
        normlab.get_norm_layer(42)  # type: ignore[arg-type]


def test_options_are_keyword_only() -> None:
    with pytest.raises(TypeError):
        normlab.GroupNorm(8, 4)  # type: ignore[misc]


def test_duplicate_names_and_aliases_are_refused() -> None:
    reg: Registry[object] = Registry("thing")
    reg.register("alpha", aliases=("a",))(object())
    with pytest.raises(ValueError, match="already registered"):
        reg.register("Alpha")(object())
    with pytest.raises(ValueError, match="already registered"):
        reg.register("beta", aliases=("A",))(object())
    assert "beta" not in reg  # a refused registration leaves nothing behind


def test_registering_needs_a_spec() -> None:
    class NoSpec(nn.Module):
        pass

    with pytest.raises(TypeError, match="NormSpec"):
        normlab.register_norm("no_spec_norm")(NoSpec)
    assert "no_spec_norm" not in NORMS


def test_specs_are_consistent() -> None:
    for name in normlab.list_norms():
        spec = NORMS.get(name).spec  # type: ignore[attr-defined]
        assert isinstance(spec, NormSpec)
        assert spec.paper
        assert not (spec.running_stats and not spec.batch_stats), name
        assert not (spec.elementwise and spec.batch_stats), name
        module = normlab.create_norm(name, 6, **spec.example_kwargs)
        assert isinstance(module, torch.nn.Module)
