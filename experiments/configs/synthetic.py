"""Two-modality linear-Gaussian problem with a known Bayes-optimal accuracy.

  python -m experiments.main --config experiments/configs/synthetic.py \
      --workdir runs/syn
"""

from experiments.configs import default


def get_config():
  c = default.get_config()
  c.data.source = "synthetic"
  c.data.noise = {"audio": 1.0, "visual": 2.5}
  c.data.num_classes = 6
  c.num_epochs = 20
  c.warmup_epochs = 2
  c.optim.learning_rate = 0.01
  c.optim.decay_epochs = (14,)
  return c
