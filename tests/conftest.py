import os
import sys

# Eight faked CPU devices for the data-parallel tests; must be set before JAX
# initialises its backends (conftest is imported before any test module).
# The tests compile far more than they run: LLVM's optimisation level 0 cuts
# XLA's CPU compile time by about a third. Every comparison in the suite is
# between computations compiled the same way, or to a tolerance.
TEST_XLA_FLAGS = ("--xla_force_host_platform_device_count=8",
                  "--xla_backend_optimization_level=0")
for _flag in TEST_XLA_FLAGS:
  if _flag.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " "
                               + _flag).strip()

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))
