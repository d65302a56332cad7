"""The configuration schema: every key tljax reads, with its meaning.

Other configs start from ``get_config()`` here and override what differs. Any key can be
overridden on the command line, e.g. ``--config.batch_size=64`` or
``--config.phases[1].epochs=2``; the config is locked, so a mistyped key is an error.
"""

import ml_collections


def phase(**overrides) -> ml_collections.ConfigDict:
  """One training phase; keyword arguments override the defaults below."""
  p = ml_collections.ConfigDict()
  p.name = "phase"               # Shown in logs, metrics.jsonl and plots.
  p.epochs = 1                   # Passes over the training split.
  # Ordered freeze rules "<train|freeze>:<regex over 'layer/param' | layers[a:b]>"; the first
  # match decides. Or one named preset "preset:<name>" (the backbone's PRESETS, e.g.
  # tljax.models.mobilenet_v2.MobileNetV2.PRESETS).
  p.rules = ("train:.*",)
  p.optimizer = "adam"           # adam | adamw | sgd (momentum 0.9).
  p.learning_rate = 1e-3         # Peak learning rate.
  p.schedule = "constant"        # constant | cosine (decays to 0 over the phase).
  p.warmup_epochs = 0.0          # Linear warmup from 0, in epochs (fractions allowed).
  p.weight_decay = 0.0           # Decoupled weight decay (adamw only); trainable params only.
  p.grad_clip_norm = 0.0         # Clip trainable gradients to this global norm; 0 = off.
  p.label_smoothing = 0.0        # Cross-entropy label smoothing.
  # Exponential moving average of the trainable weights, updated every step and used for
  # validation, test, the saved variables and the next phase; 0 = off (e.g. 0.999).
  p.ema_decay = 0.0
  # The weights the phase hands on: "last" (its final epoch's) or "best" (the epoch with the
  # best select_metric; the epoch's weights are saved in <workdir>/best_checkpoints).
  p.select = "last"
  # val_accuracy | val_balanced_accuracy | val_macro_f1 (higher is better) | val_loss (lower).
  p.select_metric = "val_accuracy"
  p.early_stopping_patience = 0  # End the phase after N epochs without a better select_metric.
  # BatchNorm of trainable layers: "inference" uses and keeps the moving statistics (the
  # Keras fine-tuning guide; the tutorial's training=False); "batch_stats" normalises with
  # batch statistics and updates the moving averages (what Keras 3's fit does after
  # base.trainable = True). Frozen layers' BatchNorm is always in inference mode.
  p.batchnorm = "inference"
  # Compute the frozen prefix of the network once per phase and train on its cached
  # output. "auto": on when exact (no augmentation) and the cache fits cache_max_gb.
  p.cache_prefix = "auto"        # auto | off
  # Apply the data augmentation settings (augment_shift, random_crop, flip) in this phase.
  # False trains on the evaluation view, which lets the frozen prefix be cached.
  p.use_augmentation = True
  p.update(overrides)
  return p


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0                    # Seeds initialisation, data order and augmentation.
  config.batch_size = 32             # Global training batch; must divide by the device count.
  config.eval_batch_size = 500       # Global batch for validation, test and prefix caching.
  config.steps_per_dispatch = 100    # Train steps dispatched between two host syncs.
  config.checkpoint_every_steps = 1000  # Periodic checkpoints; 0 = only at phase ends.
  config.max_to_keep = 2             # Checkpoints kept in <workdir>/checkpoints.
  config.cache_max_gb = 4.0          # Largest prefix cache held in device memory.
  config.max_bad_steps = 10          # Consecutive non-finite steps before the run stops.
  config.tensorboard = True          # TensorBoard event files in the workdir (process 0).
  # Weights of each example's training loss by its class: none | balanced (inverse to the
  # class's frequency in the training split, mean weight over the examples 1). docs/trust.md.
  config.class_weighting = "none"
  # After training, fit one temperature on the validation split (its log-likelihood) and
  # fold it into the head, so predictions, exports and predict give calibrated probabilities.
  config.calibrate = True

  config.data = ml_collections.ConfigDict()
  # auto: a folder of class folders, else a folder of IDX files, else tensorflow-datasets |
  # folder | idx | tfds. See docs/data.md.
  config.data.source = "auto"
  # mnist | fashion_mnist (IDX files, downloaded by tljax) | another tensorflow-datasets name.
  config.data.name = "mnist"
  # An image folder, a folder of IDX *-ubyte.gz files, or a tfds data_dir; "" = download into
  # the cache ($TLJAX_CACHE or ~/.cache/tljax; mnist and fashion_mnist) or tfds's default.
  config.data.dir = ""
  config.data.train_examples = 0     # Use the first N training examples; 0 = all. (A
  # folder's are in a seeded random order, so they are a sample of every class.)
  # Held out for validation: IDX/tfds the last fraction, as Keras's validation_split; a
  # folder without validation/ this fraction of each class (seeded).
  config.data.validation_split = 0.2
  config.data.test_split = 0.1       # Of each class, for a folder without test/ (seeded).
  config.data.scale = "unit"         # unit: x/255 | symmetric: x/127.5 - 1 (MobileNetV2's).
  config.data.augment_shift = 0      # Random translation of up to N pixels; 0 = none.
  config.data.random_crop = False    # Random resized crop (photos); needs stored room.
  config.data.crop_scale = (0.35, 1.0)   # Random crop: range of its area fraction.
  config.data.crop_ratio = (0.75, 1.333)  # Random crop: range of its width / height.
  config.data.flip = False           # Random horizontal flip (photos; not digits or text).
  # Evaluation (and unaugmented training) view: the centre crop of this fraction of each
  # side, resized to model.input_size; 1.0 = the whole image.
  config.data.eval_crop = 1.0
  # Folder datasets: side of the square images decoded into the cache; 0 = model.input_size
  # * 8/7 rounded up to a multiple of 8 (room for crops).
  config.data.image_size = 0
  config.data.cache_dir = ""         # Decoded cache; "" = $TLJAX_CACHE or ~/.cache/tljax
                                     # + /decoded.
  config.data.skip_bad_images = False  # Skip unreadable images (warned, in summary.json).
  config.data.max_memory_gb = 8.0    # Largest decoded folder dataset held in memory.
  # Folder datasets: auto (stream batches from the disk cache when larger than
  # max_memory_gb) | on (always) | off (refuse a dataset larger than max_memory_gb).
  config.data.stream = "auto"

  config.model = ml_collections.ConfigDict()
  config.model.name = "mobilenet_v2"  # The backbone (tljax.models.BACKBONES).
  config.model.alpha = 1.0           # Width multiplier: 0.35, 0.5, 0.75, 1.0, 1.3 or 1.4.
  config.model.input_size = 32       # Images are resized (bilinear) to this square size.
  config.model.weights = "imagenet"  # imagenet (download, cached) | a .h5 path | none.
  config.model.cache_dir = ""        # Download cache; "" = $TLJAX_CACHE or ~/.cache/tljax.
  config.model.depthwise = "auto"    # auto (shifted on CPU, XLA elsewhere) | shifted | xla.
  config.model.dtype = "float32"     # Compute dtype: float32 | bfloat16 (params stay f32).
  # Moving-average momentum of BatchNorm layers in batch-statistics mode (Keras: 0.999).
  config.model.bn_momentum = 0.999

  # Multi-process runs (one process per host). See docs/multihost.md.
  config.distributed = ml_collections.ConfigDict()
  # auto: start jax.distributed when a coordinator address is given (here or in
  # JAX_COORDINATOR_ADDRESS) or on a Cloud TPU VM | yes: always (JAX detects the cluster:
  # Cloud TPU, SLURM, Open MPI, Kubernetes) | no: single process.
  config.distributed.initialize = "auto"
  config.distributed.coordinator_address = ""  # host:port of process 0; "" = detected.
  config.distributed.num_processes = 0         # 0 = detected.
  config.distributed.process_id = -1           # -1 = detected.
  config.distributed.timeout_s = 300           # How long processes wait for each other.

  # What a run writes to <workdir>/export (docs/deploying.md).
  config.export = ml_collections.ConfigDict()
  config.export.formats = ("jax", "onnx", "tflite")  # Any of jax | onnx | tflite.
  config.export.int8 = True          # Also int8 ONNX and LiteRT files (static, calibrated).
  # An int8 file more than this many test-accuracy points below its float32 file is kept
  # as *.FAILED_GATE.* and reported, not handed over.
  config.export.max_int8_drop = 1.0

  # The data audit before training: <workdir>/audit.json and audit_gallery.png (docs/audit.md).
  config.audit = ml_collections.ConfigDict()
  config.audit.enabled = True        # False: no audit (and no audit.json).
  # Near duplicates and label errors need the pretrained base's features of every image:
  # computed up to this many images in all splits (and not with model.weights=none); above
  # it, exact duplicates and class counts only.
  config.audit.feature_max_examples = 20000
  # Cosine similarity of pooled features (less their mean) above which two images are near
  # duplicates (measured on clothing-small: docs/audit.md).
  config.audit.near_duplicate_threshold = 0.86
  config.audit.folds = 5             # Folds of the linear head whose probabilities rank labels.
  config.audit.max_listed = 500      # Findings of each kind written to audit.json.
  # Remove from train the copies (exact or near) of test images before training. Off: a run
  # trains on the data it is given, the warning in the log and summary.json says how many
  # test images leak, and audit.json lists them to fix the folder itself.
  config.audit.remove_test_copies = False

  config.phases = (
      phase(name="frozen_base", epochs=10, rules=("train:predictions/.*", "freeze:.*")),
      phase(name="fine_tune", epochs=5, learning_rate=1e-5,
            rules=("freeze:layers[:100]", "train:.*")),
  )
  return config
