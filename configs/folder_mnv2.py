"""Your own photos: an ImageNet MobileNetV2 fine-tuned on a folder of class folders.

    python main.py --config configs/folder_mnv2.py --workdir runs/photos \\
        --config.data.dir=<root>

``<root>`` holds one folder of images per class, or ``train/`` (and optionally
``validation/``, ``test/``) holding those; the class count comes from the data (docs/data.md). 160x160 input with MobileNetV2's own scaling to [-1, 1], from images decoded
once at 184x184 into a disk cache. A 5-epoch head phase on the frozen base, then the blocks
from ``layers[100]`` (block 11) on train for 3 epochs with their BatchNorm on the moving
statistics (Adam, warmup and cosine decay, label smoothing 0.1). Neither phase augments, so
the frozen layers run once per image: the head phase caches the base's pooled features and,
in the same pass, the input of block 11 for the fine-tune phase. (Training the head on the
cached features of augmented views instead was no more accurate: benchmarks/README.md.)

The other situations, from the command line: a large dataset, or photos unlike ImageNet's,
``--config.phases[1].use_augmentation=true`` (random resized crops and flips, set up below;
uncached, so several times slower a step) and more layers trained, e.g.
``--config.phases[1].rules='("freeze:layers[:54]", "train:.*")'``; a small dataset like
ImageNet, ``--config.phases[1].epochs=1`` or the head phase alone.

Reaches 91.1% test accuracy on clothing-small in about 1.5 minutes on 2 CPU cores
(benchmarks/README.md).
"""

from configs import default


def get_config():
  config = default.get_config()
  config.data.name = "photos"
  config.data.source = "folder"
  config.data.scale = "symmetric"
  config.data.validation_split = 0.1
  config.data.test_split = 0.1
  config.data.random_crop = True  # Used by phases with use_augmentation=True.
  config.data.flip = True
  config.model.input_size = 160
  config.phases = (
      default.phase(name="head", epochs=5, learning_rate=1e-3, label_smoothing=0.1,
                    use_augmentation=False,
                    rules=("train:predictions/.*", "freeze:.*")),
      default.phase(name="fine_tune", epochs=3, learning_rate=5e-4, schedule="cosine",
                    warmup_epochs=0.5, label_smoothing=0.1, use_augmentation=False,
                    rules=("freeze:layers[:100]", "train:.*")),
  )
  return config
