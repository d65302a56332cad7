"""The tuned recipe (``mnist_mnv2_tuned.py``) on Fashion-MNIST.

    python main.py --config configs/fashion_mnist_mnv2_tuned.py \
        --workdir runs/fashion_mnist_mnv2_tuned

Reaches 94.4% Fashion-MNIST test accuracy in about 8 minutes on 2 CPU cores
(benchmarks/README.md).
"""

from configs import mnist_mnv2_tuned


def get_config():
  config = mnist_mnv2_tuned.get_config()
  config.data.name = "fashion_mnist"
  return config
