"""Defaults shared by every experiment (the paper's optimisation settings).

SGD lr 1e-3, momentum 0.9, weight decay 1e-4, batch 64, 100 epochs, lr x0.1
at epoch 70, gradient-norm clip 40, gamma 4, warm-up 5 epochs (ARL_SPEC.md).
"""

import ml_collections

from arl_jax import methods as methods_lib

METHODS = methods_lib.method_names()


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  # Seeds seed, seed + 1, ... trained together as one program (the step
  # vmapped over a seed axis); each seed's outputs go to workdir/seed<s>/.
  c.num_seeds = 1
  # How: "vmap" batches the seeds into every operation (dense layers: 1.9x
  # the samples/s of one seed at 5 seeds on a CPU); "map" runs them one
  # after the other inside the program. For convolutional encoders on a
  # CPU both are slower than separate runs (benchmarks/results/seeds_cpu.md).
  c.seed_program = "vmap"
  c.data = ml_collections.ConfigDict()
  # synthetic | imbalanced | uci | av_digits | crema_d | kinetics_sounds | ave
  c.data.source = "synthetic"
  c.data.path = ""                   # local copy of an audio-visual data set
  c.data.prepared_dir = ""           # where TFDS writes it (default: workdir/data)
  c.data.noise = {"audio": 1.0, "visual": 2.5}   # synthetic: sigma per modality
  c.data.setting = "memorise_vs_parity"   # imbalanced: data.IMBALANCE_SETTINGS
  # In-memory sources: train one modality alone (the others' inputs zeroed).
  c.data.only_modality = ""
  # In-memory sources: a slice of the training rows held out from gradients,
  # read by ARL's held-out estimators and the fusion weights (never test).
  c.data.heldout_fraction = 0.0
  # Where the data has groups (av_digits: speakers), hold out whole groups
  # (about heldout_fraction of the rows): held-out rows then come from groups
  # the model never trains on, as the test rows do.
  c.data.heldout_by_group = False
  # av_digits: share of the images' variance projected out (AV-MNIST: 0.75);
  # the FSDD copy (default: ../shared/data/fsdd or $ARL_JAX_FSDD).
  c.data.image_energy_removed = 0.0
  c.data.fsdd_path = ""
  # av_digits: the spectrogram's mean-pooling blocks (frequency, time);
  # (1, 1) keeps FSDD's full 129 x 63.
  c.data.audio_pool = (3, 2)
  c.data.nonlinear = False
  c.data.num_classes = 6
  c.data.dim = 8
  c.data.sizes = (2048, 512, 2048)
  c.data.views = ("profile", "morphological")     # uci
  c.data.split_seed = 0
  c.data.num_frames = 1
  c.data.image_size = 224
  # Audio-visual frames: "device" = the host decodes, the jitted step crops,
  # flips and resizes (FrameAugmentation; the fast path on GPU/TPU);
  # "host" = all of it in the input pipeline, as the reference does (faster
  # on a CPU-only machine); "auto" = device on GPU/TPU, host on CPU.
  c.data.augment = "auto"
  c.data.read_threads = 0            # grain prefetch threads (0: inline)
  c.data.num_workers = 0             # grain worker processes (0: none)
  c.data.actor_disjoint = False
  # Audio-visual preparation: skip clips that cannot be read (a damaged
  # video or WAV, an unknown label) and list them in prepare_report.json
  # (False: stop at the first one, naming it).
  c.data.skip_invalid = False
  c.model = ml_collections.ConfigDict()
  c.model.encoder_widths = (64,)
  # In-memory sources with 2-D inputs (av_digits): "mlp" or "cnn" (a small
  # ConvEncoder on the spectrogram and on the image).
  c.model.encoder = "mlp"
  c.model.fusion = "concat"
  c.model.dtype = "float32"
  # Method fields left at None take the method's own default (ARL: gamma 4,
  # warm-up gamma 1, T 4; concat: no unimodal loss; OGM-GE: alpha 0.1). A
  # field the chosen method does not have is ignored.
  c.method = ml_collections.ConfigDict()
  c.method.name = "arl"
  c.method.gamma = ml_collections.config_dict.placeholder(float)
  c.method.warmup_gamma = ml_collections.config_dict.placeholder(float)
  c.method.temperature = ml_collections.config_dict.placeholder(float)
  c.method.alpha = ml_collections.config_dict.placeholder(float)
  # ARL's variance estimator: train_entropy (Eq. 17, the paper) |
  # heldout_entropy | heldout_variance | heldout_error; ema: decay over steps (0: none);
  # dependency: train | heldout.
  c.method.estimator = ml_collections.config_dict.placeholder(str)
  c.method.ema = ml_collections.config_dict.placeholder(float)
  c.method.dependency = ml_collections.config_dict.placeholder(str)
  # ARL: the gradient residual g + a_m g (False: a_m g, arl_no_residual's),
  # the floor on the mean entropy, the reference modality (K > 2; default:
  # the last name in sorted order).
  c.method.residual = ml_collections.config_dict.placeholder(bool)
  c.method.entropy_floor = ml_collections.config_dict.placeholder(float)
  c.method.reference = ml_collections.config_dict.placeholder(str)
  # arl_released(_applied): scale encoders by the constant instead of a_m.
  c.method.apply_constant = ml_collections.config_dict.placeholder(bool)
  c.method.constant = ml_collections.config_dict.placeholder(float)
  # OGM-GE: Gaussian gradient noise (GE); its alpha is method.alpha.
  c.method.noise = ml_collections.config_dict.placeholder(bool)
  # MMPareto: Gamma, the rescale of the integrated gradient (official 1.5),
  # and each unimodal loss pulled back on its own (K + 1 backward passes).
  c.method.magnitude = ml_collections.config_dict.placeholder(float)
  c.method.separate_unimodal = ml_collections.config_dict.placeholder(bool)
  # MLA: head-gradient projection ("none" | "replace" | "add"), the head
  # kernel's /-path, the inference gating ("batch_entropy" |
  # "sample_entropy" | "fixed") and the fixed weights (sorted-name order;
  # empty: equal). Its batches_per_epoch is the runner's.
  c.method.projection = ml_collections.config_dict.placeholder(str)
  c.method.head_kernel = ml_collections.config_dict.placeholder(str)
  c.method.gating = ml_collections.config_dict.placeholder(str)
  c.method.fixed_weights = ml_collections.config_dict.placeholder(tuple)
  # MLA: rows sharing one batch-entropy gate at evaluation (official 64, its
  # test loader's batch; 0: the whole evaluation batch). eval_batch_size
  # must be a multiple of it per device.
  c.method.gate_batch = ml_collections.config_dict.placeholder(int)
  # AGM: upper clamp of r^ - r (official CREMA-D 10); its alpha is method.alpha.
  c.method.clamp = ml_collections.config_dict.placeholder(float)
  # OGM-GE, AGM, PMR: when they modulate. "window" (their official code):
  # in epochs modulation_starts..modulation_ends (0-based, inclusive;
  # defaults OGM-GE 0-50, AGM 0-20, PMR 0-100), the shared warm-up not
  # applied; "warmup": after warmup_epochs, as the other methods.
  c.method.schedule = ml_collections.config_dict.placeholder(str)
  c.method.modulation_starts = ml_collections.config_dict.placeholder(int)
  c.method.modulation_ends = ml_collections.config_dict.placeholder(int)
  # D&R: w = tanh(lam gap), re-initialise every `every` epochs, at most
  # `times` times (official 3, 20, 3, in a 90-epoch run).
  c.method.lam = ml_collections.config_dict.placeholder(float)
  c.method.every = ml_collections.config_dict.placeholder(int)
  c.method.times = ml_collections.config_dict.placeholder(int)
  # D&R: the run length `every` refers to (official 90; the schedule is
  # scaled to num_epochs); 0: `every` counts this run's epochs.
  c.method.run_epochs = ml_collections.config_dict.placeholder(int)
  # PMR: prototype momentum (official 0.2) and the share of training rows
  # the prototypes come from (0.1); its alpha is method.alpha.
  c.method.mu = ml_collections.config_dict.placeholder(float)
  c.method.fraction = ml_collections.config_dict.placeholder(float)
  # G-Blending: epochs between weight estimations and of each copy's
  # training (10), and the ratio's reading ("delta" | "multibench").
  c.method.super_epoch = ml_collections.config_dict.placeholder(int)
  c.method.ratio = ml_collections.config_dict.placeholder(str)
  c.optim = ml_collections.ConfigDict()
  c.optim.name = "sgd"               # sgd (the paper's) | adamw | lion
  # Where ARL's per-modality scales act (arl_jax.with_modality_scales):
  # auto = on the gradient for SGD (the paper), after AdamW/Lion (a
  # per-modality step size; before them the scales cancel).
  c.optim.scale_placement = "auto"   # auto | gradient | update
  # Refuse an optimiser in which the scales provably cancel (False: allow).
  c.optim.check_scales = True
  c.optim.learning_rate = 1e-3
  c.optim.momentum = 0.9
  c.optim.weight_decay = 1e-4
  c.optim.clip_norm = 40.0
  # Divide the loss by the sum of its weights (1 + gamma K), so the step size
  # does not triple when warm-up ends (arl_jax.make_train_step); False: Eq.
  # 22 as written (the paper's). Not for MLA (its own update loop).
  c.optim.normalize_loss_weights = False
  c.optim.decay_epochs = (70,)
  c.optim.decay_factor = 0.1
  c.batch_size = 64
  c.num_epochs = 100
  c.warmup_epochs = 5
  c.checkpoint_every_epochs = 1
  c.eval_batch_size = 256
  c.diagnostics = ml_collections.ConfigDict()
  # Per-epoch linear probes of each frozen encoder (in-memory sources).
  c.diagnostics.linear_probe = False
  c.parallel = ml_collections.ConfigDict()
  # Data parallelism over devices (experiments.distributed): jit with a
  # "data" mesh axis (default; across processes too) or pmap (one process).
  c.parallel.mode = "jit"
  c.parallel.devices = 0               # 0: every device; N: the first N
  # Stop cleanly after this epoch's checkpoint (0: never); running the same
  # command again resumes. For time-limited jobs; not part of the run's
  # identity.
  c.stop_after_epoch = 0
  c.plots = True
  # TensorBoard events in each run's folder (with tensorboardX installed);
  # metrics.jsonl holds every figure either way.
  c.tensorboard = True
  c.progress = "auto"                 # auto | bar | lines | none
  return c
