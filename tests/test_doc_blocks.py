"""Every Python block of README.md and docs/*.md runs as written.

A block runs in a fresh namespace, in a fresh working directory, unless the
line before it is ``<!-- continues the previous block -->``: it then runs in
the namespace the previous block left. A block that reads a data set the
repository does not ship says so on the line before it,
``<!-- data: crema_d -->``: the test writes a tiny data set of that layout
(benchmarks/fake_data.py) and puts its path where the block names the data
set's (``/data/CREMA-D``; ``/data/prepared`` becomes a fresh folder). The
FSDD recordings are real and local (../shared/data/fsdd, as in CI).
"""

from __future__ import annotations

import os
import pathlib
import re
import sys
import types

import pytest

from arl_jax._src import method_protocol

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCUMENTS = ("README.md", *sorted(
    str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md")))
CONTINUES = "<!-- continues the previous block -->"
DATA = re.compile(r"<!-- data: (\w+) -->")


def _blocks(text: str) -> list[tuple[int, str, str]]:
  """``(line, marker line, code)`` of each fenced Python block."""
  out, lines = [], text.splitlines()
  i = 0
  while i < len(lines):
    if lines[i].strip() == "```python":
      j = i + 1
      while lines[j].strip() != "```":
        j += 1
      before = next((lines[k] for k in range(i - 1, -1, -1)
                     if lines[k].strip()), "")
      out.append((i + 1, before.strip(), "\n".join(lines[i + 1:j]) + "\n"))
      i = j
    i += 1
  return out


def _chains(document: str) -> list[list[tuple[int, str, str]]]:
  """The document's blocks, each continuation attached to its chain."""
  chains: list[list] = []
  for block in _blocks((ROOT / document).read_text()):
    if block[1] == CONTINUES:
      assert chains, f"{document}:{block[0]} continues nothing"
      chains[-1].append(block)
    else:
      chains.append([block])
  return chains


CHAINS = [(doc, chain) for doc in DOCUMENTS for chain in _chains(doc)]


def test_every_document_block_is_collected():
  # README: the two loops, parallel, your own data, CREMA-D by hand and its
  # device path, FSDD; docs: own_loop.md and methods.md.
  assert len([b for _, c in CHAINS for b in c]) >= 9
  for doc, chain in CHAINS:
    for line, before, _ in chain[1:]:
      assert before == CONTINUES, (doc, line)


def _fake_crema_d(tmp: pathlib.Path) -> dict[str, str]:
  from benchmarks import fake_data
  root = fake_data.write_fake_crema_d(tmp / "CREMA-D", actors=(1001, 1002),
                                      sentences=("DFA",))
  return {"/data/CREMA-D": str(root), "/data/prepared": str(tmp / "prepared")}


@pytest.mark.parametrize(
    "document,chain", CHAINS,
    ids=[f"{doc}:{chain[0][0]}" for doc, chain in CHAINS])
def test_block_runs_as_written(document, chain, tmp_path, monkeypatch,
                               capsys):
  monkeypatch.chdir(tmp_path)
  # Methods a block registers leave the registry with the test.
  monkeypatch.setattr(method_protocol, "_REGISTRY",
                      dict(method_protocol._REGISTRY))
  # A module of its own (dataclasses defined in a block look theirs up).
  module = types.ModuleType("doc_block")
  monkeypatch.setitem(sys.modules, "doc_block", module)
  namespace = module.__dict__
  for line, before, code in chain:
    data = DATA.search(before)
    if data:
      assert data.group(1) == "crema_d", f"no fake data set {data.group(1)}"
      for path, local in _fake_crema_d(tmp_path).items():
        code = code.replace(path, local)
    exec(compile(code, f"{document}:{line}", "exec"), namespace)
  capsys.readouterr()
  assert os.getcwd() == str(tmp_path)
