"""The README's example is executed, so it cannot rot."""

import ast
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_readme_python_blocks_run(capsys):
  text = (ROOT / "README.md").read_text()
  blocks = re.findall(r"<!-- executed by tests/test_readme.py -->\n```python\n"
                      r"(.*?)```", text, flags=re.S)
  assert blocks, "README has no python example"
  assert len(blocks) == 2        # the linen-style loop and the NNX one
  for block in blocks:
    exec(compile(block, "README.md", "exec"), {})
  out = capsys.readouterr().out.strip().splitlines()
  assert len(out) == 2 and out[1].startswith("nnx ")
  for line in out:
    # ARL's coefficients after three steps: a proper softmax over the two
    # modalities, not the neutral 1/2 of an untrained or failed computation,
    # and a finite loss.
    coefficients, loss = ast.literal_eval(
        "(" + line.removeprefix("nnx ").replace("} ", "}, ") + ")")
    assert set(coefficients) == {"audio", "visual"}
    assert sum(coefficients.values()) == pytest.approx(1.0, abs=2e-3)
    assert all(0.0 < v < 1.0 and v != 0.5 for v in coefficients.values())
    assert 0.0 < loss < 50.0


def test_readme_test_command_is_what_ci_runs():
  ci = (ROOT / ".ci" / "run").read_text()
  assert "make test" in ci and "make test" in (ROOT / "README.md").read_text()
