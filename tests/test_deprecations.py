"""Import paths that users were told about keep working for one release, each with a DeprecationWarning."""

from __future__ import annotations

import importlib
import sys

import pytest

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
