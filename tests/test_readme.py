"""The README's example is executed, so it cannot rot."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_readme_python_blocks_run(capsys):
  text = (ROOT / "README.md").read_text()
  blocks = re.findall(r"<!-- executed by tests/test_readme.py -->\n```python\n"
                      r"(.*?)```", text, flags=re.S)
  assert blocks, "README has no python example"
  for block in blocks:
    exec(compile(block, "README.md", "exec"), {})
  out = capsys.readouterr().out
  assert "True" in out


def test_readme_test_command_is_what_ci_runs():
  ci = (ROOT / ".ci" / "run").read_text()
  assert "make test" in ci and "make test" in (ROOT / "README.md").read_text()
