"""The README's Python example runs verbatim, and its first two lines are the two commands."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_the_python_example_runs_verbatim() -> None:
    text = README.read_text(encoding="utf-8")
    block = re.search(r"<!-- example: python[^\n]*-->\n```python\n(.*?)```", text, re.S)
    assert block is not None, "the README lost its Python example"
    code = block.group(1)
    assert 15 <= len(code.splitlines()) <= 25  # "about 20 lines"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, str(README), "exec"), {})  # our own README, as written
    printed = out.getvalue()
    assert printed.count("tensor(") == 2  # the two rankings it prints


def test_the_first_lines_are_the_two_commands() -> None:
    lines = README.read_text(encoding="utf-8").splitlines()
    assert lines[0] == "# diffkg-fast" and lines[2] == "```bash"
    assert lines[3].startswith("python3 -m venv .venv") and "diffkg-fast train" in lines[3]
    assert lines[4].startswith("python3 -m venv .venv") and lines[4].endswith("pytest -q")
