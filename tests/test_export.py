"""tljax.export: the exported model of a finished run (conftest's tiny_idx_run) loads in a
process with only jax and numpy and computes what tljax.predict and the run's own test
predictions compute."""

import json
import subprocess
import sys
import textwrap

import jax
import numpy as np

from tljax import export, predict
from tljax.data import idx


# Imports only jax and numpy: what another program has to load an exported model.
_LOAD_EXPORTED = textwrap.dedent("""
    import json, pathlib, sys
    import jax, numpy as np
    export_dir, images_path, out_path = map(pathlib.Path, sys.argv[1:])
    meta = json.loads((export_dir / "model.json").read_text())
    exported = jax.export.deserialize(bytearray((export_dir / "model.jax_exported").read_bytes()))
    images = np.load(images_path)
    assert images.shape[1:] == tuple(meta["input"]["shape"][1:]), images.shape
    np.save(out_path, np.asarray(exported.call(images.astype(meta["input"]["dtype"]))))
    print(json.dumps(sorted(m for m in ("tljax", "flax", "optax") if m in sys.modules)))
""")


def test_export_round_trips_in_a_process_without_tljax(tiny_idx_run, tiny_idx_dir, tmp_path):
  workdir, _ = tiny_idx_run
  meta = json.loads((workdir / "export" / "model.json").read_text())
  assert meta["class_names"] == [str(i) for i in range(10)]
  assert meta["input"] == {"shape": [None, 28, 28], "dtype": "uint8"}
  images = idx.load_idx_folder(tiny_idx_dir, "mnist").test.images[:7]  # Not the eval batch.
  np.save(tmp_path / "images.npy", images)
  loaded = subprocess.run(
      [sys.executable, "-c", _LOAD_EXPORTED, str(workdir / "export"),
       str(tmp_path / "images.npy"), str(tmp_path / "out.npy")],
      capture_output=True, text=True, check=True)
  assert json.loads(loaded.stdout) == []
  exported = np.load(tmp_path / "out.npy")
  assert exported.shape == (7, 10) and exported.dtype == np.float32
  # tljax.predict on the same images, every class listed: its full probability vectors.
  run = predict.load_run(workdir)
  rows = predict.predict(run, ((f"image{i}", image) for i, image in enumerate(images)),
                         batch_size=4, top_k=10, progress=False)
  assert [len(r["top_k"]) for r in rows] == [10] * 7
  predicted = np.zeros((7, 10))
  for i, row in enumerate(rows):
    for label, probability in row["top_k"]:
      predicted[i, run.class_names.index(label)] = probability
  np.testing.assert_allclose(exported, predicted, rtol=0, atol=1e-5)
  expected = np.load(workdir / "test_predictions.npz")["probabilities"][:7]
  np.testing.assert_allclose(exported, expected, rtol=0, atol=1e-5)


def test_metadata_describes_the_input_the_output_and_the_preprocessing(tiny_idx_run):
  meta = json.loads((tiny_idx_run[0] / "export" / export.METADATA).read_text())
  assert meta["output"] == {"shape": [None, 10], "dtype": "float32", "meaning":
                            "class probabilities (softmax), in class_names order"}
  assert meta["preprocessing"] == {"size": 32, "scale": "unit", "centre_crop": 1.0}
  assert meta["platforms"] == list(export.platforms()) and meta["platforms"][0] == "cpu"
  assert meta["jax_version"] == jax.__version__
  assert sorted(p.name for p in (tiny_idx_run[0] / "export").iterdir()) == [export.ARTIFACT,
                                                                            export.METADATA]
