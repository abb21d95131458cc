"""A problem where modality imbalance happens: memorisable code vs parity code.

``arl_jax.data.make_imbalanced``: modality ``a`` a noisy Gaussian code in 1024
dimensions that a small MLP memorises (unimodal Bayes ~74%), modality ``b``
a rotated parity (XOR) code that needs hidden units and is more informative
(~90%); joint Bayes ~95%. Plain concatenation fits ``a`` first and starves
``b``. 10% of the training rows are held out from gradients for ARL's
held-out estimators and the fusion weights; every method trains on the same
remaining rows. The paper's optimiser (SGD momentum 0.9, clip 40, weight
decay 1e-4), lr 0.01, 5 warm-up epochs.

  python -m experiments.main --config experiments/configs/imbalance.py \\
      --workdir runs/imbalance --config.method.name=arl \\
      --config.method.estimator=heldout_variance
"""

from experiments.configs import default


def get_config():
  c = default.get_config()
  c.data.source = "imbalanced"
  c.data.setting = "memorise_vs_parity"
  c.data.num_classes = 4
  c.data.sizes = (2048, 1024, 4096)
  c.data.heldout_fraction = 0.1
  c.model.encoder_widths = (128,)
  c.num_epochs = 30
  c.warmup_epochs = 5
  c.optim.learning_rate = 0.01
  c.optim.decay_epochs = (22,)
  c.eval_batch_size = 1024
  c.diagnostics.linear_probe = True
  return c
