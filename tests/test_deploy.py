"""tljax.export's deployable files: on real photos, model.onnx and model.tflite compute what the
JAX model computes, the int8 files stay within the accuracy gate, export/predict.py runs
without jax or tljax and decodes as tljax does, a broken format is recorded without losing
the others, and the graph folds what it should.

One module fixture makes a finished run without training (ImageNet MobileNetV2 and a head
fitted in closed form on its pooled features of real clothing-small photos: the exporters do
not care whether a model was trained) and exports it with ``python -m tljax.export``.
"""

import csv
import importlib.util
import json
import logging
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import onnx
import pytest
from ai_edge_litert import interpreter as litert
from PIL import Image

from tljax import calibration, predict
from tljax.data import images as tljax_images
from tljax.data import transforms
from tljax.export import __main__ as export_cli
from tljax.export import deploy, gate, graph, onnx_format, runtimes
from tljax.models import layer_stack, weights
from tljax.models.mobilenet_v2 import MobileNetV2

CLASSES = ("dress", "hat", "pants", "shoes")
TRAIN_PER_CLASS, TEST_PER_CLASS = 40, 50
INPUT_SIZE, STORED_SIZE = 96, 112  # A centre crop of 0.875 (98 px), resized down to 96.
# float32 files on real photos: no probability further from the JAX model's (the export's gate
# allows more, for fine-tuned models: tljax/export/gate.py).
FLOAT32_AGREEMENT = 1e-4
BLOCKED = ("jax", "jaxlib", "flax", "optax", "orbax", "tljax", "tensorflow", "ml_collections")


def _link_photos(shared_dir: pathlib.Path, root: pathlib.Path) -> None:
  """``root/{train,test}/<class>/``: links to real photos (test: clothing-small's test, then
  validation photos)."""
  source = shared_dir / "data" / "clothing-small"
  for name in CLASSES:
    picked = {"train": sorted((source / "train" / name).iterdir())[:TRAIN_PER_CLASS],
              "test": [*sorted((source / "test" / name).iterdir()),
                       *sorted((source / "validation" / name).iterdir())][:TEST_PER_CLASS]}
    for split, paths in picked.items():
      (root / split / name).mkdir(parents=True)
      for path in paths:
        (root / split / name / path.name).symlink_to(path)


def _config(root: pathlib.Path):
  from configs import default
  config = default.get_config()
  config.data.source, config.data.dir = "folder", str(root)
  config.data.cache_dir = str(root.parent / "cache")
  config.data.image_size, config.data.eval_crop, config.data.scale = STORED_SIZE, 0.875, "symmetric"
  config.data.validation_split = 0.1
  config.model.input_size = INPUT_SIZE
  return config


def _fit_head(model, variables, view, photos, labels, scratch):
  """The dense head: softmax regression (L2, gradient descent) on the pooled features; and
  its probabilities for ``photos``."""
  import onnx
  # The features through onnxruntime (no compilation): the ONNX file's pooling output.
  proto = onnx_format.to_onnx(graph.build(model, variables, view, photos.shape[1:]))
  proto.graph.output.append(onnx.helper.make_tensor_value_info(
      model.layers[-2].name, onnx.TensorProto.FLOAT, None))
  path = scratch / "features.onnx"
  path.write_bytes(proto.SerializeToString())
  import onnxruntime
  session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
  features = runtimes.in_batches(lambda x: session.run(None, {"images": x})[1], photos)
  features = features.astype(np.float64)
  targets = np.eye(len(CLASSES))[labels]
  kernel, bias = np.zeros((features.shape[1], len(CLASSES))), np.zeros(len(CLASSES))
  for _ in range(300):
    logits = features @ kernel + bias
    p = np.exp(logits - logits.max(1, keepdims=True))
    error = p / p.sum(1, keepdims=True) - targets
    kernel -= 0.5 * (features.T @ error / len(labels) + 1e-2 * kernel)
    bias -= 0.5 * error.mean(0)
  variables["params"]["predictions"] = {"kernel": jnp.asarray(kernel, jnp.float32),
                                        "bias": jnp.asarray(bias, jnp.float32)}
  logits = features @ kernel + bias
  p = np.exp(logits - logits.max(1, keepdims=True))
  return variables, p / p.sum(1, keepdims=True)


@pytest.fixture(scope="module")
def exported(shared_dir, imagenet_weights_path, tmp_path_factory):
  """``(workdir, run, test images, test labels, JAX probabilities)`` of a finished run on
  real photos, exported by the command line."""
  base = tmp_path_factory.mktemp("deploy")
  root, workdir = base / "photos", base / "run"
  _link_photos(shared_dir, root)
  workdir.mkdir()
  config = _config(root)
  model = MobileNetV2.from_config(config.model, len(CLASSES))
  variables = weights.load_keras_h5(imagenet_weights_path, model, dont_load=("predictions",),
                                    rng=jax.random.key(0))
  variables = jax.tree.map(np.asarray, variables)
  view = transforms.EvalView.from_config(config)
  train = [(p, i) for i, c in enumerate(CLASSES) for p in sorted((root / "train" / c).iterdir())]
  photos = np.stack([tljax_images.load_stored(p, STORED_SIZE) for p, _ in train])
  train_labels = np.array([i for _, i in train])
  variables, probabilities = _fit_head(model, variables, view, photos, train_labels, base)
  (workdir / "trained_variables.msgpack").write_bytes(
      flax.serialization.msgpack_serialize(jax.tree.map(np.asarray, variables)))
  # A temperature, as a run records it beside its trained variables (fitted on the training
  # photos here: the exporters only apply it).
  temperature = calibration.fit_temperature(probabilities, train_labels)
  (workdir / "summary.json").write_text(json.dumps({
      "config": json.loads(config.to_json_best_effort()), "class_names": list(CLASSES),
      "image_shape": [STORED_SIZE, STORED_SIZE, 3],
      "calibration": {"temperature": temperature}}))
  assert export_cli.main(["--workdir", str(workdir)]) == 0
  run = predict.load_run(workdir)
  test = [(p, i) for i, c in enumerate(CLASSES) for p in sorted((root / "test" / c).iterdir())]
  test_images = np.stack([tljax_images.load_stored(p, STORED_SIZE) for p, _ in test])
  reference = deploy.reference_probabilities(run.model, run.variables, run.view, test_images)
  return workdir, run, test_images, np.array([i for _, i in test]), reference


def test_export_holds_every_file_and_model_json_the_input_contract(exported):
  workdir, *_ = exported
  directory = workdir / "export"
  assert sorted(p.name for p in directory.iterdir()) == sorted([
      "model.jax_exported", "model.json", "model.onnx", "model.int8.onnx", "model.tflite",
      "model.int8.tflite", "predict.py"])
  meta = json.loads((directory / "model.json").read_text())
  assert meta["class_names"] == list(CLASSES)
  assert meta["input"] == {"shape": [None, STORED_SIZE, STORED_SIZE, 3], "dtype": "uint8"}
  contract = meta["input_contract"]
  assert (contract["layout"], contract["channel_order"]) == ("NHWC", "RGB")
  assert contract["before_the_model"]["size"] == [STORED_SIZE, STORED_SIZE]
  assert "BILINEAR" in contract["before_the_model"]["resize"]
  assert contract["inside_the_model"][0] == "centre crop of 0.875 of each side"
  files = meta["files"]
  assert all(files[name]["gate"] == "passed" for name in deploy.FILES.values()), files
  for name in ("model.onnx", "model.tflite"):
    assert files[name]["max_abs_difference"] <= FLOAT32_AGREEMENT
  for fmt in ("onnx", "tflite"):  # int8 weights, zero points shared: under 30% of float32.
    assert files[f"model.int8.{fmt}"]["bytes"] < 0.30 * files[f"model.{fmt}"]["bytes"]
  summary = json.loads((workdir / "summary.json").read_text())
  assert summary["export"]["files"] == files and summary["export"]["failed"] == []
  assert meta["calibration"]["temperature"] == summary["calibration"]["temperature"]


def test_the_temperature_is_in_every_float32_file(exported):
  """The JAX model that the float32 files agree with (the test below) is the calibrated one,
  far from the uncalibrated model."""
  workdir, run, _, _, reference = exported
  recorded = json.loads((workdir / "summary.json").read_text())["calibration"]["temperature"]
  assert run.temperature == recorded and abs(recorded - 1.0) > 0.05
  uncalibrated = calibration.with_temperature(reference, 1.0 / recorded)
  assert np.abs(uncalibrated - reference).max() > 100 * FLOAT32_AGREEMENT


@pytest.mark.parametrize("name", ["model.onnx", "model.tflite"])
def test_float32_files_agree_with_the_jax_model_on_real_photos(exported, name):
  workdir, _, test_images, _, reference = exported
  probabilities = runtimes.in_batches(runtimes.runner(workdir / "export" / name), test_images,
                                      batch_size=48)  # Batches unlike the gate's.
  assert probabilities.shape == reference.shape and probabilities.dtype == np.float32
  np.testing.assert_allclose(probabilities, reference, rtol=0, atol=FLOAT32_AGREEMENT)


@pytest.mark.parametrize("name", ["model.int8.onnx", "model.int8.tflite"])
def test_int8_files_stay_within_the_gate_on_real_photos(exported, name):
  workdir, _, test_images, labels, reference = exported
  probabilities = runtimes.in_batches(runtimes.runner(workdir / "export" / name), test_images)
  float_accuracy = np.mean(reference.argmax(1) == labels)
  assert float_accuracy > 0.9  # A real classifier, so the gate measures something.
  drop = 100 * (float_accuracy - np.mean(probabilities.argmax(1) == labels))
  assert drop <= gate.MAX_INT8_DROP
  assert np.mean(probabilities.argmax(1) == reference.argmax(1)) > 0.95


def test_the_view_inside_onnx_is_jaxs(exported):
  """The crop, bilinear resize (half-pixel, no antialiasing) and scaling, alone."""
  import onnx
  workdir, run, test_images, *_ = exported
  model = onnx.load(workdir / "export" / "model.onnx")
  model.graph.output.append(onnx.helper.make_tensor_value_info("view_scale",
                                                               onnx.TensorProto.FLOAT, None))
  path = workdir.parent / "view.onnx"
  path.write_bytes(model.SerializeToString())
  import onnxruntime
  session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
  _, view_NCHW = session.run(None, {"images": test_images[:8]})
  expected = np.asarray(run.view(test_images[:8])).transpose(0, 3, 1, 2)
  np.testing.assert_allclose(view_NCHW, expected, rtol=0, atol=1e-5)


def _load_predictor(path: pathlib.Path):
  spec = importlib.util.spec_from_file_location("exported_predict", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _odd_photos(directory: pathlib.Path, photo: pathlib.Path) -> list[pathlib.Path]:
  """A real photo turned by its EXIF orientation, with transparency, grey, 16-bit, palette."""
  directory.mkdir()
  image = Image.open(photo).convert("RGB")
  exif = Image.Exif()
  exif[0x0112] = 6  # Rotate 90 degrees clockwise to display.
  image.save(directory / "rotated.jpg", exif=exif)
  rgba = image.convert("RGBA")
  rgba.putalpha(Image.linear_gradient("L").resize(image.size))
  rgba.save(directory / "alpha.png")
  image.convert("L").save(directory / "grey.png")
  Image.fromarray((np.asarray(image.convert("L")).astype(np.uint16) * 257)).save(
      directory / "sixteen.png")
  image.convert("P").save(directory / "palette.gif")
  return sorted(directory.iterdir())


def test_predictor_decodes_and_resizes_as_tljax(exported, shared_dir, tmp_path):
  workdir, *_ = exported
  predictor = _load_predictor(workdir / "export" / "predict.py")
  source = shared_dir / "data" / "clothing-small" / "test"
  photos = [sorted((source / c).iterdir())[0] for c in sorted(os.listdir(source))]
  photos += _odd_photos(tmp_path / "odd", photos[0])
  for path in photos:
    assert np.array_equal(predictor.stored_form(path, [STORED_SIZE, STORED_SIZE, 3]),
                          tljax_images.load_stored(path, STORED_SIZE)), path
    # An IDX run's grey form (tljax.predict.stored_form), at MNIST's size.
    assert np.array_equal(predictor.stored_form(path, [28, 28]),
                          predict.stored_form(path, (28, 28))), path


_WITHOUT_JAX = textwrap.dedent("""
    import importlib.abc, runpy, sys
    BLOCKED = {blocked!r}
    class Block(importlib.abc.MetaPathFinder):
      def find_spec(self, name, path, target=None):
        if name.split(".")[0] in BLOCKED:
          raise ImportError(f"{{name}} is blocked: the predictor must not need it")
    sys.meta_path.insert(0, Block())
    sys.argv = sys.argv[1:]
    try:
      runpy.run_path(sys.argv[0], run_name="__main__")
    finally:
      assert not BLOCKED & {{m.split(".")[0] for m in sys.modules}}
""").format(blocked=set(BLOCKED))


def _run_predictor(script: pathlib.Path, *args) -> subprocess.CompletedProcess:
  """``python -I`` (no PYTHONPATH, no working directory on the path) with jax, flax and tljax
  unimportable."""
  env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "JAX", "XLA"))}
  return subprocess.run([sys.executable, "-I", "-c", _WITHOUT_JAX, str(script), *map(str, args)],
                        capture_output=True, text=True, env=env, cwd=script.parent.parent,
                        timeout=120)


@pytest.mark.parametrize("model", ["model.onnx", "model.int8.tflite"])
def test_predictor_runs_without_jax_or_tljax_and_writes_the_csv(exported, model, tmp_path):
  workdir, *_ = exported
  directory = workdir / "export"
  photos = workdir.parent / "photos" / "test"
  done = _run_predictor(directory / "predict.py", "--model", directory / model, photos / "hat",
                        photos / "shoes" / sorted(os.listdir(photos / "shoes"))[0],
                        "--output", tmp_path / "out.csv", "--top_k", "2")
  assert done.returncode == 0, done.stderr
  with open(tmp_path / "out.csv", newline="") as f:
    rows = list(csv.DictReader(f))
  paths = [*sorted((photos / "hat").iterdir()), photos / "shoes" / sorted(os.listdir(photos / "shoes"))[0]]
  assert [r["path"] for r in rows] == [str(p) for p in paths]
  assert list(rows[0]) == ["path", "label", "probability"]
  expected = runtimes.runner(directory / model)(
      np.stack([tljax_images.load_stored(p, STORED_SIZE) for p in paths]))
  assert [r["label"] for r in rows] == [CLASSES[i] for i in expected.argmax(1)]
  np.testing.assert_allclose([float(r["probability"]) for r in rows], expected.max(1),
                             rtol=0, atol=1e-6)
  assert len(done.stdout.splitlines()) == 1 + len(paths)  # The header, then one per image.


def test_predictor_bad_inputs_are_one_message_each(exported, tmp_path):
  workdir, *_ = exported
  photo = sorted((workdir.parent / "photos" / "test" / "hat").iterdir())[0]
  (tmp_path / "empty.jpg").touch()
  (tmp_path / "notes.jpg").write_text("not an image")
  (tmp_path / "nothing_here").mkdir()
  bad = [tmp_path / "empty.jpg", tmp_path / "notes.jpg", tmp_path / "missing.png",
         tmp_path / "nothing_here"]
  done = _run_predictor(workdir / "export" / "predict.py", photo, *bad,
                        "--output", tmp_path / "out.csv")
  assert done.returncode == 2
  errors = done.stderr.strip().splitlines()
  assert len(errors) == len(bad) and "Traceback" not in done.stderr, done.stderr
  assert all(e.startswith(f"error: {path}") for e, path in zip(errors, [bad[2], bad[3],
                                                                         bad[0], bad[1]])), errors
  assert len((tmp_path / "out.csv").read_text().splitlines()) == 2  # The good photo.
  unusable = _run_predictor(workdir / "export" / "predict.py", "--model", tmp_path / "notes.jpg",
                            photo)
  assert unusable.returncode == 2 and len(unusable.stderr.strip().splitlines()) == 1


def test_a_failing_format_is_recorded_and_loses_nothing_else(exported, monkeypatch, caplog,
                                                             tmp_path):
  workdir, run, test_images, labels, reference = exported

  def broken(*args, **kwargs):
    raise RuntimeError("calibration exploded")

  monkeypatch.setattr(onnx_format, "quantize", broken)
  directory = tmp_path / "export"
  with caplog.at_level(logging.INFO):
    results = deploy.write(directory, run.model, run.variables, run.view, run.class_names,
                           run.image_shape, formats=("onnx", "tflite"),
                           calibration_images=test_images, test_images=test_images,
                           test_labels=labels, test_probabilities=reference)
  assert results["failed"] == ["model.int8.onnx", "model.int8.tflite"]
  assert "calibration exploded" in results["files"]["model.int8.onnx"]["error"]
  errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
  assert len(errors) == 2 and all("was not written" in e for e in errors), errors
  assert sorted(p.name for p in directory.iterdir()) == ["model.json", "model.onnx",
                                                         "model.tflite", "predict.py"]
  meta = json.loads((directory / "model.json").read_text())
  assert meta["files"]["model.onnx"]["gate"] == "passed"
  assert meta["files"]["model.int8.tflite"]["gate"] == "not run"


def test_an_int8_file_below_the_gate_is_kept_under_a_failed_name(exported, caplog, tmp_path):
  workdir, run, test_images, labels, reference = exported
  shutil.copy(workdir / "export" / "model.int8.onnx", tmp_path / "model.int8.onnx")
  shutil.copy(workdir / "export" / "model.onnx", tmp_path / "model.onnx")
  state = deploy._Export(tmp_path, gate.TestSet(test_images, labels, reference),
                         max_int8_drop=-50.0)  # No int8 file can gain 50 points.
  with caplog.at_level(logging.WARNING):
    record = state.check(tmp_path / "model.int8.onnx", "int8")
  assert record["gate"] == "failed" and record["file"] == "model.int8.FAILED_GATE.onnx"
  assert sorted(p.name for p in tmp_path.iterdir()) == ["model.int8.FAILED_GATE.onnx",
                                                        "model.onnx"]
  warning, = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert "FAILED the accuracy gate" in warning


def test_an_int8_file_below_the_gate_is_quantized_again_with_its_first_layers_in_float32(
    exported, caplog, tmp_path, monkeypatch):
  workdir, run, test_images, labels, reference = exported
  built = graph.build(run.model, run.variables, run.view, run.image_shape)
  monkeypatch.setattr(deploy, "MAX_FLOAT_STAGES", 1)  # One retry a file: the mechanics.
  with caplog.at_level(logging.INFO):
    # The test photos calibrate and stand in for a validation split too: only the mechanics
    # count here.
    results = deploy.write(
        tmp_path, run.model, run.variables, run.view, CLASSES, run.image_shape,
        formats=("onnx", "tflite"), calibration_images=test_images, test_images=test_images,
        test_labels=labels, test_probabilities=reference, validation_images=test_images[::2],
        validation_labels=labels[::2], max_int8_drop=-50.0)
  kept = graph.leading_stages(built, 1)
  retries = [r.getMessage() for r in caplog.records if "quantizing again" in r.getMessage()]
  # Each file on its own: every layer in int8, then the first resolution in float32.
  assert [m.split(" with ")[0] for m in retries] == ["export: model.int8.onnx",
                                                    "export: model.int8.tflite"]
  assert all("validation accuracy" in m for m in retries)
  for name in ("model.int8.onnx", "model.int8.tflite"):
    assert results["files"][name]["float32_layers"] == list(kept)
    assert results["files"][name]["gate"] == "failed"
  # The kept layers run in float32, the rest in int8, in each file.
  onnx_model = onnx.load(tmp_path / "model.int8.FAILED_GATE.onnx")
  weight_of = {n.name: n.input[1] for n in onnx_model.graph.node if n.op_type == "Conv"}
  dequantized = {n.output[0] for n in onnx_model.graph.node if n.op_type == "DequantizeLinear"}
  convs = [op.output for op in built.ops if op.kind == "conv"]
  assert [c for c in convs if weight_of[f"{c}_conv"] not in dequantized] == [
      c for c in convs if c in kept]
  interpreter = litert.Interpreter(model_path=str(tmp_path / "model.int8.FAILED_GATE.tflite"))
  dtypes = {t["name"]: t["dtype"] for t in interpreter.get_tensor_details()}
  assert [c for c in convs if dtypes[c] == np.float32] == [c for c in convs if c in kept]
  assert all(dtypes[c] == np.int8 for c in convs if c not in kept)
  probabilities = runtimes.in_batches(runtimes.runner(
      tmp_path / "model.int8.FAILED_GATE.tflite"), test_images)
  assert np.mean(probabilities.argmax(1) == reference.argmax(1)) > 0.95


def test_leading_stages_are_the_layers_at_the_networks_first_resolutions(exported):
  _, run, *_ = exported
  built = graph.build(run.model, run.variables, run.view, run.image_shape)
  layers = [op.output for op in built.ops if op.kind not in graph.PREPROCESSING]
  first, second = graph.leading_stages(built, 1), graph.leading_stages(built, 2)
  assert graph.leading_stages(built, 0) == ()
  # At 96 px: Conv1 to block_1_expand at 48 x 48, then block_1_depthwise to block_3_expand.
  assert first == tuple(layers[:layers.index("block_1_expand_relu") + 1])
  assert second == tuple(layers[:layers.index("block_3_expand_relu") + 1])
  assert {built.shapes[name][:2] for name in second} == {(48, 48), (24, 24)}


def test_graph_folds_batchnorm_relu6_and_padding_into_the_convolutions(exported):
  _, run, test_images, *_ = exported
  built = graph.build(run.model, run.variables, run.view, run.image_shape)
  assert graph.describe(built) == {"crop": 1, "cast": 1, "resize": 1, "scale": 1, "conv": 52,
                                   "add": 10, "mean": 1, "dense": 1, "softmax": 1}
  # The stem, folded, against the model's Conv1 -> bn_Conv1 on real model input.
  conv = next(op for op in built.ops if op.kind == "conv")
  assert conv.output == "Conv1_relu" and conv.attrs["activation"] == "relu6"
  x = run.view(test_images[:4])
  expected = run.model.apply(run.variables, x, stop=3)  # input, Conv1, bn_Conv1.
  (top, bottom), (left, right) = conv.attrs["pads"]
  folded = jax.lax.conv_general_dilated(
      x, conv.attrs["kernel"], (2, 2), ((top, bottom), (left, right)),
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
      precision=jax.lax.Precision.HIGHEST) + conv.attrs["bias"]
  np.testing.assert_allclose(folded, expected, rtol=0, atol=2e-4 * float(jnp.abs(expected).max()))
  # Keras's ZeroPadding2D before a stride-2 depthwise convolution is its padding.
  block_1 = next(op for op in built.ops if op.output == "block_1_depthwise_relu")
  assert block_1.inputs == ("block_1_expand_relu",) and block_1.attrs["pads"] == ((0, 1), (0, 1))


def test_a_layer_kind_the_formats_lack_is_an_export_error(exported):
  _, run, *_ = exported

  class Swish(MobileNetV2):
    @property
    def layers(self):
      layers = super().layers
      return (*layers[:3], layer_stack.Layer("swish", "swish", ("bn_Conv1",)))

  model = Swish(alpha=1.0, num_classes=len(CLASSES))
  with pytest.raises(graph.ExportError, match="'swish'"):
    graph.build(model, run.variables, run.view, run.image_shape)
