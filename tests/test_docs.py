"""Every Python block of the README runs (x-transformers' test_readme, for all blocks)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_python_blocks() -> None:
    assert len(BLOCKS) >= 3


def test_readme_starts_with_the_two_commands() -> None:
    first_code = re.search(r"```bash\n(.*?)```", README.read_text(), flags=re.S)
    assert first_code is not None
    lines = [line.split("#")[0].strip() for line in first_code.group(1).splitlines()]
    assert lines[:2] == ["make demo", "make test"]


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_block_runs(index: int) -> None:
    exec(compile(BLOCKS[index], f"README.md block {index}", "exec"), {"__name__": "__readme__"})
