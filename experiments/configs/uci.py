"""UCI Multiple Features: a strong view (profile correlations) and a weak one
(morphological), MLP encoders, offline.

  python -m experiments.main --config experiments/configs/uci.py --workdir runs/uci
"""

from experiments.configs import default


def get_config():
  c = default.get_config()
  c.data.source = "uci"
  c.data.views = ("profile", "morphological")
  c.data.num_classes = 10
  c.batch_size = 64
  c.num_epochs = 30
  c.warmup_epochs = 2
  c.optim.learning_rate = 0.01
  c.optim.decay_epochs = (20,)
  return c
