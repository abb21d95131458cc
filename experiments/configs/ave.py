"""AVE, ResNet18 audio + 3 frames, concat, ARL (paper: 72.89%).

  python -m experiments.main --config experiments/configs/ave.py \
      --workdir runs/ave --config.data.path=/path/to/AVE
"""

from experiments.configs import default


def get_config():
  c = default.get_config()
  c.data.source = "ave"
  c.data.num_classes = 28
  c.data.num_frames = 3
  c.method.temperature = 4.0
  return c
