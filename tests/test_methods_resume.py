"""Each balancing method's state survives a SIGKILL and a resume bit for bit
(the runner's test of ``test_runner.py``, one module of its own so that the
test workers share the load)."""

import pytest
from test_runner import check_sigkill_and_resume


@pytest.mark.parametrize("extra", [
    # AGM's running scores and step count (its method state).
    {"method.name": "agm"},
    # D&R's initial encoders and count, and its re-initialisation after
    # epoch 3 (0-based 2), after the resume from checkpoint 2.
    {"method.name": "dr", "method.every": 2, "method.run_epochs": 0},
    # PMR's prototypes (set by its epoch hook, used by every step).
    {"method.name": "pmr"},
    # G-Blending's weights (estimated at epochs 0 and 2 on model copies).
    {"method.name": "g_blending", "method.super_epoch": 2},
    # MLA's projection matrix and sub-step count, with the shared head.
    {"method.name": "mla", "method.projection": "replace",
     "model.fusion": "shared"},
], ids=["agm", "dr", "pmr", "g_blending", "mla"])
def test_method_state_survives_sigkill_and_resume(tmp_path, extra):
  check_sigkill_and_resume(tmp_path, extra)
