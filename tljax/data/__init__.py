"""Examples, from where they are stored to the model's input.

* ``dataset``: what a loaded dataset is (splits of uint8 images and int32 labels);
* ``idx``, ``tfds``, ``folder`` (with ``images``): one module per source;
* ``load``: which source a config names, and the splits it cuts;
* ``sources``: where a phase's batches come from (device memory or a streamed cache), and
  in which order;
* ``transforms``: on-device preprocessing (the evaluation view, augmentation).
"""
