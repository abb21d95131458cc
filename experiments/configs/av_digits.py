"""Real audio-visual digits: FSDD speech paired with UCI handwriting.

``arl_jax.data.av_digits``: each 16 x 15 handwritten digit paired with a
spoken recording of the same digit (log-spectrogram 129 x 63 at 8 kHz);
test and validation speakers are never seen in training. A quarter of the
training pool is held out from gradients as one whole speaker
(``heldout_by_group``), read by ARL's held-out estimators and the fusion
weights: its rows resemble the unseen test voices. The runner's recipe: SGD
momentum 0.9, clip 40, weight decay 1e-4, lr 0.01 (x0.1 at epoch 15), 20
epochs, 3 warm-up epochs, MLP encoders (``--config.model.encoder=cnn``:
small CNNs), and the loss divided by the sum of its weights
(``optim.normalize_loss_weights``): without it the unimodal weight's jump at
the end of warm-up makes UR and ARL collapse at this learning rate.

  python -m experiments.main --config experiments/configs/av_digits.py \\
      --workdir runs/av_digits --config.method.name=unimodal_regularisation
"""

from experiments.configs import default


def get_config():
  c = default.get_config()
  c.data.source = "av_digits"
  c.data.num_classes = 10
  c.data.heldout_fraction = 0.25
  c.data.heldout_by_group = True
  c.model.encoder_widths = (128,)
  c.num_epochs = 20
  c.warmup_epochs = 3
  c.optim.learning_rate = 0.01
  c.optim.decay_epochs = (15,)
  c.optim.normalize_loss_weights = True
  c.eval_batch_size = 1024
  c.diagnostics.linear_probe = True
  return c
