"""The fused kernels' build: ISA choice, the announced build, one build across processes, the cache,
``normlab kernels status|build|clear`` and ``make install``'s build-ahead step.

Everything here runs on a temporary cache with the compiler replaced by a stub that writes a
library file, so no test compiles C++ (``test_kernels.py`` builds and loads the real library).
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from normlab.cli import main
from normlab.kernels import _build
from normlab.kernels._build import ISA_ENV, choose_isa

ALL = frozenset({"sse4_2", "avx", "avx2", "fma", "f16c"})


# ------------------------------------------------------------------------------------------------
# ISA


@pytest.mark.parametrize(
    ("machine", "capability", "features", "requested", "expected", "why"),
    [
        ("x86_64", "AVX2", ALL, "auto", "avx2", "the CPU has avx2, fma, f16c"),
        ("x86_64", "AVX512", ALL, "auto", "avx2", "AVX512"),
        ("AMD64", "AVX2", None, "auto", "avx2", "CPU features unread"),
        ("x86_64", "AVX2", ALL - {"f16c"}, "auto", "default", "lacks f16c"),
        ("x86_64", "DEFAULT", ALL - {"avx2", "fma"}, "auto", "default", "lacks avx2, fma"),
        ("x86_64", "DEFAULT", ALL, "auto", "default", "torch runs its DEFAULT kernels"),
        ("x86_64", "AVX2", ALL, "default", "default", f"{ISA_ENV}=default"),
        ("x86_64", "DEFAULT", ALL, "avx2", "avx2", f"{ISA_ENV}=avx2"),
        ("aarch64", "NEON", None, "auto", "default", "aarch64"),
        ("arm64", "SVE256", frozenset({"sve"}), "auto", "default", "arm64"),
    ],
)
def test_isa_is_chosen_from_what_the_cpu_has(
    machine: str, capability: str, features: frozenset[str] | None, requested: str, expected: str, why: str
) -> None:
    chosen = choose_isa(machine, capability, features, requested)
    assert chosen.name == expected and why in chosen.why
    assert ("-mavx2" in chosen.flags) == (expected == "avx2")


@pytest.mark.parametrize(
    ("machine", "features", "requested", "match"),
    [
        ("aarch64", None, "avx2", "needs an x86-64 CPU; this machine is aarch64"),
        ("x86_64", ALL - {"fma"}, "avx2", "this CPU lacks fma"),
        ("x86_64", ALL, "avx512", "must be one of auto, avx2, default, got 'avx512'"),
    ],
)
def test_an_impossible_isa_request_is_refused(
    machine: str, features: frozenset[str] | None, requested: str, match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        choose_isa(machine, "AVX2", features, requested)


def test_each_isa_builds_into_its_own_folder(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("NORMLAB_KERNELS_CACHE", str(tmp_path))
    avx2 = choose_isa("x86_64", "AVX2", ALL)
    portable = choose_isa("x86_64", "AVX2", ALL, "default")
    assert _build.build_dir(avx2) != _build.build_dir(portable)
    assert _build.build_dir(avx2).parent == tmp_path
    monkeypatch.setenv(ISA_ENV, "default")
    assert _build.build_dir() == _build.build_dir(portable)
    assert "-mavx2" not in _build.status()["flags"]


@pytest.mark.skipif(not Path("/proc/cpuinfo").is_file(), reason="reads /proc/cpuinfo (Linux)")
def test_cpu_features_are_read_from_the_os() -> None:
    features = _build._cpu_features()
    assert features is not None and len(features) > 3


# ------------------------------------------------------------------------------------------------
# the build: announced, once across processes, never a half-written library


class StubCompiler:
    """Stands in for cpp_extension: records the stderr seen when it starts, writes a library file."""

    def __init__(self, capsys: pytest.CaptureFixture[str] | None = None, seconds: float = 0.0) -> None:
        self.capsys, self.seconds = capsys, seconds
        self.calls = 0
        self.stderr_at_start = ""
        self.started = threading.Event()
        self.lock_files_seen: list[bool] = []

    def __call__(self, directory: Path, verbose: bool) -> None:
        self.calls += 1
        self.started.set()
        self.lock_files_seen.append((directory / "lock").exists())
        if self.capsys is not None:
            self.stderr_at_start = self.capsys.readouterr().err
        time.sleep(self.seconds)
        (directory / f"{_build.LIB_NAME}{_build.LIB_EXT}").write_bytes(b"\x7fELF stub")


@pytest.fixture
def stub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> StubCompiler:
    """A fresh build state on an empty cache, with the stub compiler and a loader that records."""
    monkeypatch.setenv("NORMLAB_KERNELS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(_build, "STATE", _build.BuildState())
    monkeypatch.setattr(_build, "_missing_tool", lambda: None)
    compiler = StubCompiler(capsys)
    monkeypatch.setattr(_build, "_compile", compiler)
    monkeypatch.setattr(_build, "_load", lambda directory: None)
    return compiler


def test_a_build_is_announced_before_it_starts_and_timed_when_it_ends(
    stub: StubCompiler, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _build.ensure_built()
    assert stub.calls == 1
    directory = _build.build_dir()
    assert "normlab.kernels: building the fused CPU kernels" in stub.stderr_at_start
    assert str(directory) in stub.stderr_at_start and "about a minute on 2 cores" in stub.stderr_at_start
    assert "built the fused CPU kernels in" in capsys.readouterr().err
    record = json.loads((directory / _build.MARKER).read_text())
    assert record["isa"] == _build.isa().name and record["torch"]
    assert _build.STATE.source == "build" and _build.status()["cached"]


def test_a_new_process_loads_the_finished_build_silently(
    stub: StubCompiler, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _build.ensure_built()
    capsys.readouterr()
    monkeypatch.setattr(_build, "STATE", _build.BuildState())  # a new process
    assert _build.ensure_built()
    assert stub.calls == 1 and _build.STATE.source == "cache"
    assert _build.status()["reason"] == "loaded"
    assert capsys.readouterr().err == ""


def test_the_expected_time_is_the_last_real_build_of_this_cache(stub: StubCompiler, tmp_path: Path) -> None:
    older = tmp_path / "cache" / "cpu-0123456789abcdef"
    older.mkdir(parents=True)
    (older / _build.MARKER).write_text(json.dumps({"seconds": 73.4}))
    assert _build.ensure_built()
    assert "about 73 s, as the last build here" in stub.stderr_at_start


def test_a_half_written_build_is_rebuilt_not_loaded(stub: StubCompiler) -> None:
    directory = _build.build_dir()
    directory.mkdir(parents=True)
    (directory / f"{_build.LIB_NAME}{_build.LIB_EXT}").write_bytes(b"truncated")  # no built.json
    (directory / "lock").write_text("")  # cpp_extension's lock of the killed build
    assert _build.ensure_built()
    assert stub.calls == 1 and stub.lock_files_seen == [False]


def test_a_cached_library_that_no_longer_loads_is_rebuilt(
    stub: StubCompiler, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert _build.ensure_built()
    loads: list[Path] = []

    def load_fails_once(directory: Path) -> None:
        loads.append(directory)
        if len(loads) == 1:
            raise OSError("undefined symbol: _ZN3c104impl")

    monkeypatch.setattr(_build, "_load", load_fails_once)
    monkeypatch.setattr(_build, "STATE", _build.BuildState())
    assert _build.ensure_built()
    assert stub.calls == 2 and _build.STATE.source == "build"


def test_processes_starting_together_build_once_and_the_others_say_they_wait(
    stub: StubCompiler, capsys: pytest.CaptureFixture[str]
) -> None:
    stub.capsys, stub.seconds = None, 0.5
    results: list[str | None] = []

    def one_process() -> None:  # _load_or_build is what each process runs under its own STATE
        _build._load_or_build(verbose=False)
        results.append(_build.STATE.source)

    first = threading.Thread(target=one_process)
    first.start()
    assert stub.started.wait(10)
    second = threading.Thread(target=one_process)
    second.start()
    first.join(10)
    second.join(10)
    err = capsys.readouterr().err
    assert stub.calls == 1
    assert sorted(r or "" for r in results) == ["build", "cache"]
    assert err.count("kernels: building the fused CPU kernels") == 1
    assert "waiting for another process that is building the fused CPU kernels in" in err


def test_a_failed_build_warns_with_the_reason(stub: StubCompiler, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_build, "_missing_tool", lambda: "ninja not found (pip install ninja)")
    with pytest.warns(RuntimeWarning, match=r"build failed: ninja not found"):
        assert not _build.ensure_built()
    assert stub.calls == 0


def test_a_bad_isa_request_fails_the_build_with_its_reason(
    stub: StubCompiler, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(ISA_ENV, "sse2")
    with pytest.warns(RuntimeWarning, match=rf"{ISA_ENV} must be one of auto, avx2, default, got 'sse2'"):
        assert not _build.ensure_built()
    assert _build.status()["isa"] is None and "sse2" in _build.status()["isa_reason"]


def test_a_handler_the_user_gave_normlab_replaces_the_default(
    stub: StubCompiler, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import logging

    logger = logging.getLogger("normlab")
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    monkeypatch.setattr(logger, "handlers", [Keep()])
    stub.capsys = None
    assert _build.ensure_built()
    assert [r.name for r in records] == ["normlab.kernels", "normlab.kernels"]
    assert "building" in records[0].getMessage() and capsys.readouterr().err == ""


# ------------------------------------------------------------------------------------------------
# normlab kernels status|build|clear


def test_cli_build_then_status_then_clear(stub: StubCompiler, capsys: pytest.CaptureFixture[str]) -> None:
    stub.capsys = None
    assert main(["kernels", "status", "--json"]) == 0
    before = json.loads(capsys.readouterr().out)
    assert not before["loaded"] and not before["cached"] and before["cache_env"] == "NORMLAB_KERNELS_CACHE"
    assert before["isa"] in ("avx2", "default") and before["key"] and "-O3" in before["flags"]

    assert main(["kernels", "build"]) == 0
    out = capsys.readouterr().out
    assert "normlab kernels: built in" in out and str(_build.build_dir()) in out

    assert main(["kernels", "status"]) == 0
    text = capsys.readouterr().out
    assert "fused CPU kernels  " in text and f"cpu-{_build.status()['key']}: built" in text
    assert "ISA " in text and "compiler " in text and "ninja " in text

    stray = Path(_build.cache_root()) / "notes.txt"
    stray.write_text("not a build")
    assert main(["kernels", "clear"]) == 0
    assert "removed 1 build(s)" in capsys.readouterr().out
    assert not _build.build_dir().exists() and stray.exists()


def test_cli_status_of_an_empty_cache_says_how_to_build(
    stub: StubCompiler, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["kernels", "status"]) == 0
    assert "not built for this machine: `normlab kernels build` builds them" in capsys.readouterr().out
    assert stub.calls == 0  # status never compiles


def test_cli_build_force_rebuilds(stub: StubCompiler, monkeypatch: pytest.MonkeyPatch) -> None:
    stub.capsys = None
    assert main(["kernels", "build"]) == 0
    monkeypatch.setattr(_build, "STATE", _build.BuildState())
    assert main(["kernels", "build", "--force"]) == 0
    assert stub.calls == 2


def test_cli_build_without_a_compiler_exits_1(
    stub: StubCompiler, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(_build, "_missing_tool", lambda: "no C++ compiler ('c++' not found)")
    with pytest.warns(RuntimeWarning):
        assert main(["kernels", "build"]) == 1
    assert "not built (build failed: no C++ compiler" in capsys.readouterr().err


def test_make_install_builds_the_kernels_ahead() -> None:
    """``make install`` ends with ``normlab kernels build`` (a dry run: ``make -n``)."""
    root = Path(__file__).resolve().parents[1]
    if not (root / "Makefile").is_file():
        pytest.skip("no Makefile (installed package)")
    out = subprocess.run(
        ["make", "-n", "--no-print-directory", "-C", str(root), "-o", ".venv/.normlab-installed", "install"],
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode != 0 and "No such file" in out.stderr:
        pytest.skip(f"make is not available: {out.stderr.strip()}")
    recipe = [line for line in out.stdout.splitlines() if line.strip()]
    assert recipe and "normlab kernels build" in recipe[-1], out.stdout + out.stderr


def test_kernels_is_a_subcommand() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "normlab.cli", "kernels", "--help"], capture_output=True, text=True, check=True
    )
    assert "status" in out.stdout and "NORMLAB_KERNELS_CACHE" in out.stdout
