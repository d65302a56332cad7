"""Backbones: Keras applications as Flax layer stacks (the contract: ``layer_stack``).

``BACKBONES`` maps ``config.model.name`` to the module class; a new backbone is a file here
whose class subclasses ``layer_stack.LayerStack``, and one entry below.
"""

from tljax.models.mobilenet_v2 import MobileNetV2

BACKBONES = {"mobilenet_v2": MobileNetV2}


def backbone(name: str) -> type:
  """The backbone class called ``name``; a ValueError lists the known names."""
  if name not in BACKBONES:
    raise ValueError(f"model.name={name!r} is not one of {sorted(BACKBONES)}.")
  return BACKBONES[name]
