"""ImageNet's per-channel RGB mean and standard deviation (of pixels in
[0, 1]): the frames' normalisation, on the host
(:mod:`arl_jax.data.av_pipeline`, ``normalize=True``) or on the device
(:class:`arl_jax.models.FrameEncoder`, uint8 frames)."""

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
