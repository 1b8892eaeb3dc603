"""The normlab command line."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import normlab
from normlab.cli import main


def test_list_shows_every_norm(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in normlab.list_norms() + normlab.list_placements():
        assert f"\n{name} " in out
    assert "arXiv:2203.00555" in out  # DeepNorm's source line


def test_list_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in listed["norms"]] == normlab.list_norms()
    assert all(r["paper"] for r in listed["norms"])
    assert [r["name"] for r in listed["placements"]] == normlab.list_placements()
    assert {r["name"]: r["final_norm"] for r in listed["placements"]}["post"] == "no"


def test_smoke_checks_every_norm(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["smoke"]) == 0
    out = capsys.readouterr().out
    n = len(normlab.list_norms())
    assert f"{n} of {n} norms ran" in out


def test_smoke_measures_fp64_agreement() -> None:
    from normlab.cli.smoke import smoke_one

    result = smoke_one("layernorm")
    assert result.ok and 0 < result.max_err_vs_fp64 < 1e-5
    assert smoke_one("batchnorm").eval_equals_train is False


def test_unknown_norm_is_one_clear_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["smoke", "layrnorm"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("normlab: error: unknown norm 'layrnorm'") and "layernorm" in err


def test_console_entry_point_runs() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "normlab.cli", "--version"], capture_output=True, text=True, check=True
    )
    assert proc.stdout.strip() == f"normlab {normlab.__version__}"
