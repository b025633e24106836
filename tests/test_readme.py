"""Every ```python block of README.md runs as written (each in a fresh namespace, in a scratch
directory), so the README's examples cannot fall behind the code. Other blocks (bash) are not run."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).parents[1] / "README.md"
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```\s*$", re.MULTILINE | re.DOTALL)


def code_blocks(language: str) -> list[tuple[int, str]]:
    """(line number, code) of each fenced block of `language` in README.md."""
    text = README.read_text(encoding="utf-8")
    return [(text.count("\n", 0, m.start()) + 1, m.group(2)) for m in FENCE.finditer(text)
            if m.group(1) == language]


PYTHON_BLOCKS = code_blocks("python")


def test_the_readme_has_python_examples_and_every_block_is_fenced() -> None:
    assert len(PYTHON_BLOCKS) >= 4
    text = README.read_text(encoding="utf-8")
    assert text.count("```") % 2 == 0  # every fence closed
    assert len(FENCE.findall(text)) * 2 == text.count("```")


@pytest.mark.parametrize("line, code", PYTHON_BLOCKS, ids=[f"line{line}" for line, _ in PYTHON_BLOCKS])
def test_readme_python_block_runs(line: int, code: str, tmp_path: Path,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # examples that write files write them here
    exec(compile(code, f"README.md, block at line {line}", "exec"), {"__name__": "__readme__"})
