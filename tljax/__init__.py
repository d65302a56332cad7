"""tljax: transfer learning with an ImageNet MobileNetV2 in JAX/Flax."""
