"""``normlab bench``: the report's structure, the CLI's files and errors, and that the implementations
compared side by side compute the same function (never assert a timing)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

import normlab
from normlab import bench
from normlab.cli import main

TINY: dict[str, Any] = {"tokens": 64, "width": 32, "repeats": 2, "dtypes": ("fp32",), "threads": (1,)}
TINY_E2E = {"n_layer": 1, "n_embd": 32, "block_size": 8, "batch": 2}


@pytest.fixture(scope="module")
def report() -> dict[str, Any]:
    return bench.run_bench(**TINY, e2e_steps=1, e2e_kwargs=TINY_E2E)


def test_report_has_every_case_and_the_derived_figures(report: dict[str, Any]) -> None:
    cases = {(c.norm, c.layout) for c in bench.default_cases(64, 32)}
    assert {(r["norm"], r["layout"]) for r in report["results"]} == cases
    for r in report["results"]:
        assert r["copy_gbps"] > 0 and r["bytes_fwdbwd"] > r["bytes_fwd"] > 0
        assert set(r["derived"]) >= {"normlab", "plain", "torch"}
        d = r["derived"]["normlab"]
        for key in ("fwd_ms", "fwdbwd_ms", "fwd_gbps", "fwdbwd_gbps", "fwdbwd_copy_frac", "fwdbwd_vs_torch"):
            assert math.isfinite(d[key]) and d[key] > 0, (r["norm"], key)
        # %copy is the achieved bandwidth over the same-run copy bandwidth
        assert d["fwdbwd_copy_frac"] == pytest.approx(d["fwdbwd_gbps"] / r["copy_gbps"])
        if "paper" in r["derived"]:
            assert d["fwdbwd_vs_paper"] > 0
        assert len(r["timings"]["normlab"]["fwdbwd"]) == 4  # median, min, spread, n
    residual = next(r for r in report["results"] if r["norm"] == "add+layernorm")
    plain = next(r for r in report["results"] if r["norm"] == "layernorm" and r["layout"] == "tokens")
    assert residual["bytes_fwd"] == 2 * plain["bytes_fwd"]  # reads x and r, writes y and h
    assert {e["norm"] for e in report["e2e"]} == {n for n, _ in bench.E2E_NORMS}
    assert all(e["steps_per_s"] > 0 and e["steps_per_s_kernels_off"] > 0 for e in report["e2e"])
    meta = report["machine"]
    assert meta["torch"] == torch.__version__ and "kernels" in meta and "glibc_tunables" in meta
    assert "load_before" in report and "load_after" in report
    table = bench.format_table([])  # an empty run still formats
    assert table.startswith("norm")


def test_cli_writes_table_json_and_png(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["bench", "--tokens", "64", "--width", "32", "--repeats", "2", "--dtypes", "fp32"]
    args += ["--norms", "dyt,rmsnorm", "--threads", "1", "--no-e2e", "--quiet", "--out", str(tmp_path)]
    pytest.importorskip("matplotlib", reason="the PNG needs matplotlib")
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "dyt" in out and "rmsnorm" in out and "%copy" in out
    data = json.loads((tmp_path / "bench.json").read_text())
    assert [r["norm"] for r in data["results"]] == ["rmsnorm", "dyt", "dyt"]  # tokens, then conv
    assert (tmp_path / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--dtypes", "fp64"], "unknown dtype 'fp64'"),
        (["--norms", "nonorm"], r"unknown norm\(s\) \['nonorm'\]"),
        (["--threads", "two"], "comma-separated integers"),
        (["--width", "33"], "width divisible by 32"),
        (["--repeats", "0"], "repeats must be >= 1"),
    ],
)
def test_cli_rejects_bad_options(
    args: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["bench", "--no-e2e", "--out", str(tmp_path), *args]) == 2
    err = capsys.readouterr().err
    assert "normlab: error: normlab bench:" in err
    assert __import__("re").search(message, err)


def _same(a: torch.nn.Module, b: torch.nn.Module, x: torch.Tensor) -> None:
    torch.testing.assert_close(a(x), b(x), rtol=1e-5, atol=1e-5)


def test_the_compared_implementations_compute_the_same_function() -> None:
    """The paper's code and torch's layer are the same function as the normlab layer they are timed
    against (at init), so the ratios compare equal work."""
    x = torch.randn(4, 6, 32) * 2 + 0.5
    _same(normlab.DyT(32), bench.PaperDyT(32), x)
    _same(normlab.Derf(32), bench.PaperDerf(32), x)
    _same(normlab.RMSNorm(32, eps_mode="outside", eps=1e-8), bench.PaperRMSNorm(32), x)
    _same(normlab.LayerNormScaling(32, layer_idx=3), bench.PaperLNS(32, 3), x)
    img = torch.randn(2, 32, 5, 4)
    _same(normlab.LayerNorm(32, channels_first=True), bench.TorchLayerNorm2d(32), img)
    _same(normlab.DyT(32, channels_first=True), bench.PaperDyT(32, channels_last=False), img)
    gn = bench.Transposed(normlab.GroupNorm(32, num_groups=4))
    ref = bench.Transposed(torch.nn.GroupNorm(4, 32))
    _same(gn, ref, x)
    r = torch.randn_like(x)
    for kind in ("layernorm", "rmsnorm"):
        fused = bench.AddNorm(32, kind, fused=True)
        torch.testing.assert_close(
            fused(x, r), bench.AddNorm(32, kind, fused=False)(x, r), rtol=1e-5, atol=1e-5
        )


def test_timing_summary() -> None:
    t = bench.Timing([1.0, 2.0, 3.0, 4.0, 100.0])
    assert t.median == 3.0 and t.summary()["min_ms"] == 1.0
    assert 0 < t.spread < 20  # the outlier moves the quartiles, not the median
    assert math.isnan(bench.Timing([1.0]).spread)


@pytest.mark.inductor
def test_compile_role_times_torch_compile_of_the_papers_code() -> None:
    report = bench.run_bench(**{**TINY, "repeats": 1}, norms=["dyt"], compile=True, e2e_steps=0)
    assert report["settings"]["compile"] is True and report["settings"]["device"] == "cpu"
    for r in report["results"]:
        assert "compile" in r["derived"] and r["derived"]["normlab"]["fwdbwd_vs_compile"] > 0
    assert "t/compile" in report["_table"]


def test_device_is_checked() -> None:
    with pytest.raises(ValueError, match=r"device must be one of \('cpu', 'cuda'\), got 'tpu'"):
        bench.run_bench(**TINY, device="tpu", e2e_steps=0)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"torch\.cuda\.is_available"):
            bench.run_bench(**TINY, device="cuda", e2e_steps=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_bench_runs_the_triton_kernels() -> None:
    report = bench.run_bench(
        **{**TINY, "tokens": 4096, "width": 256}, device="cuda", e2e_steps=1, e2e_kwargs=TINY_E2E
    )
    assert report["machine"]["gpu_kernels"]["loaded"], report["machine"]["gpu_kernels"]
    for r in report["results"]:
        assert {"normlab", "plain", "torch", "compile"} <= set(r["derived"])
        assert r["derived"]["normlab"]["fwd_copy_frac"] > 0
    assert all(e["device"] == "cuda" for e in report["e2e"])
