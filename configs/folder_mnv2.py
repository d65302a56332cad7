"""Your own photos: an ImageNet MobileNetV2 fine-tuned on a folder of class folders.

    python main.py --config configs/folder_mnv2.py --workdir runs/photos \\
        --config.data.dir=<root>

``<root>`` holds one folder of images per class, or ``train/`` (and optionally
``validation/``, ``test/``) holding those; the class count comes from the data (README, "Your
own images"). 160x160 input with MobileNetV2's own scaling to [-1, 1], from images decoded
once at 184x184 into a disk cache. A 3-epoch head phase on the frozen base, then the blocks
from ``layers[100]`` (block 11) on train for 6 epochs with their BatchNorm on the moving
statistics (Adam, warmup and cosine decay, label smoothing). Neither phase augments, so the
frozen layers run once per image: the head phase caches the base's pooled features and the
input of block 11 for the next phase in the same pass.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.data.name = "photos"
  config.data.source = "folder"
  config.data.scale = "symmetric"
  config.data.validation_split = 0.1
  config.data.test_split = 0.1
  config.model.input_size = 160
  config.phases = (
      default.phase(name="head", epochs=3, learning_rate=1e-3, label_smoothing=0.1,
                    augment=False, rules=("train:predictions/.*", "freeze:.*")),
      default.phase(name="fine_tune", epochs=6, learning_rate=5e-4, schedule="cosine",
                    warmup_epochs=0.5, label_smoothing=0.1, augment=False,
                    rules=("freeze:layers[:100]", "train:.*")),
  )
  return config
