"""Kinetics-Sounds, ResNet18 audio + 3 frames, concat, ARL (paper: 74.28%).

  python -m experiments.main --config experiments/configs/kinetics_sounds.py \
      --workdir runs/ks --config.data.path=/path/to/kinetics_sounds
"""

from experiments.configs import default


def get_config():
  c = default.get_config()
  c.data.source = "kinetics_sounds"
  c.data.num_classes = 34
  c.data.num_frames = 3
  c.method.temperature = 4.0
  return c
