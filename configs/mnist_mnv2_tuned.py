"""The tuned MNIST recipe: same ImageNet MobileNetV2 backbone, more accurate and fast.

Changes from the tutorial (``mnist_mnv2.py``):
48x48 input (at 32x32 the last blocks see 1x1 feature maps; 48x48 keeps 2x2) with
MobileNetV2's own scaling to [-1, 1]; one epoch for the new head on the cached frozen base;
then everything above block 3 trains for 4 epochs (the ``large_similar`` preset:
``layers[:36]`` frozen and computed once, so each step runs blocks 4-16 only), with
BatchNorm on batch statistics (momentum 0.99, so the moving averages follow the new data
within a few hundred steps), batch 128, Adam with warmup and cosine decay, and label
smoothing. 10% of the training set is held out for validation.

Measured alternatives on the same 2-core CPU (README, Results): 32x32 input with 5 fine-tune
epochs 99.16%; 32x32 with random 2-pixel shifts and 6 epochs 99.11%; 48x48 with 3-pixel
shifts was behind this recipe at every epoch; 64x64 with ``layers[:54]`` frozen and no head
phase 99.44%, but in 16.5 minutes.

    python main.py --config configs/mnist_mnv2_tuned.py --workdir runs/mnist_mnv2_tuned

Measured on a 2-core CPU (README, Results): 99.40% MNIST test accuracy in 13 min 9 s.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.batch_size = 128
  config.data.scale = "symmetric"
  config.data.validation_split = 0.1
  config.model.input_size = 48
  config.model.bn_momentum = 0.99
  config.phases = (
      default.phase(name="head", epochs=1, learning_rate=1e-3,
                    rules=("preset:small_similar",)),
      default.phase(name="fine_tune", epochs=4, learning_rate=2e-3, schedule="cosine",
                    warmup_epochs=0.3, label_smoothing=0.1, batchnorm="batch_stats",
                    rules=("preset:large_similar",)),
  )
  return config
