"""Shared fixtures: the real data and weights in ../shared, and the Keras reference backend."""

import os
import pathlib

import pytest

# Keras is the numerical reference; it must run on the JAX backend, set before its import.
os.environ.setdefault("KERAS_BACKEND", "jax")

SHARED_DIR = pathlib.Path(__file__).resolve().parents[1].parent / "shared"


def _shared_path(relative: str) -> pathlib.Path:
  path = SHARED_DIR / relative
  if not path.exists():
    if os.environ.get("CI"):
      pytest.fail(f"{path} is missing; CI must provide ../shared beside the checkout.")
    pytest.skip(f"{path} is absent: real data and weights live in ../shared beside the "
                "checkout, which a fresh clone does not have.")
  return path


@pytest.fixture(scope="session")
def shared_dir() -> pathlib.Path:
  """``../shared`` beside the checkout (real MNIST, Fashion-MNIST, ImageNet weights)."""
  return _shared_path("")


@pytest.fixture(scope="session")
def mnist_dir() -> pathlib.Path:
  return _shared_path("data/mnist")


@pytest.fixture(scope="session")
def fashion_mnist_dir() -> pathlib.Path:
  return _shared_path("data/fashion-mnist")


@pytest.fixture(scope="session")
def imagenet_weights_path() -> pathlib.Path:
  return _shared_path("weights/mobilenet_v2_1.0_imagenet_no_top.h5")
