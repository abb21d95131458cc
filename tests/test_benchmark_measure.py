"""The timing loop of benchmarks/step.py: groups, blocks, rotation."""

from benchmarks import step as step_bench


def test_groups_blocks_and_rotating_order():
  calls = []
  impls = {n: (lambda n=n: calls.append(n)) for n in ("a", "b", "torch")}
  res = step_bench.measure(impls, rounds=2, warmup=1, block=3,
                           groups=[["a", "b"], ["torch"]])
  # Warm-ups and timed blocks of a group first, then the next group; the
  # order within a group rotates each round; each block's first step is not
  # counted.
  assert calls == (["a", "b"] + ["a"] * 3 + ["b"] * 3 + ["b"] * 3 + ["a"] * 3
                   + ["torch"] + ["torch"] * 6)
  assert list(res) == ["a", "b", "torch"]
  assert all(len(r["times_s"]) == 4 for r in res.values())
  assert all(r["median_s"] >= 0 for r in res.values())


def test_block_of_one_counts_every_step():
  impls = {"a": lambda: None, "b": lambda: None}
  res = step_bench.measure(impls, rounds=5, warmup=0)
  assert [len(r["times_s"]) for r in res.values()] == [5, 5]
