"""Two processes stream a folder of photos and train as one process does.

Process 0 decodes the photos into the shared cache and writes the split lists; each process
then reads from the cache the rows of its own device, half of what one process reads. A
separate module from tests/test_distributed.py, so that the two run side by side under
``pytest -n 2``.
"""

import importlib.util
import re

import numpy as np

from helpers import MULTIPROCESS_TOLERANCE as TOLERANCE
from helpers import TESTS, launcher, make_folder, read_variables, worst_difference
from tljax import train
from tljax.data import dataset

# The tiny photo job of helpers.tiny_folder_config, streamed, with SGD and BatchNorm in
# inference mode: float32 sums in another order across processes stay at rounding level. The
# fine-tune trains the last convolution and the head (cheap to compile).
CONFIG_FILE = """
import sys
sys.path.insert(0, {tests!r})
from helpers import tiny_folder_config

def get_config():
  config = tiny_folder_config({root!r}, stream="on")
  for phase in config.phases:
    phase.optimizer, phase.batchnorm = "sgd", "inference"
  config.phases[1].rules = ("freeze:layers[:151]", "train:.*")
  config.distributed.timeout_s = 120
  return config
"""


def test_two_processes_stream_a_folder_as_one_process_trains_on_it(tmp_path, monkeypatch):
  root = make_folder(tmp_path / "photos", {"red": 12, "green": 12, "blue": 12}, ext="jpg")
  config_file = tmp_path / "folder_config.py"
  config_file.write_text(CONFIG_FILE.format(tests=str(TESTS), root=str(root)))
  launch = launcher(tmp_path, config_file)
  two = launch(tmp_path / "two", processes=2, devices_each=1, hooks="count_rows_read")
  assert [code for code, _ in two] == [0, 0], two[0][1][-3000:] + two[1][1][-3000:]
  assert "decoded 36 images in" in two[0][1]  # By process 0, into the cache both read.
  rows_read = [int(re.search(r"ROWS READ: (\d+)", log).group(1)) for _, log in two]
  spec = importlib.util.spec_from_file_location("folder_config", config_file)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  getitem, read = dataset.RowView.__getitem__, [0]

  def counted(self, index):
    read[0] += 0 if isinstance(index, slice) else np.size(self.rows[index])
    return getitem(self, index)

  monkeypatch.setattr(dataset.RowView, "__getitem__", counted)
  train.run(module.get_config(), tmp_path / "one")  # One process, one device, same batches.
  # Each process reads its device's half of every batch and every image once (the audit's
  # pixel digests); process 0 also the images its plots show, as the one process does.
  images, shown = 36, rows_read[0] - rows_read[1]
  assert rows_read[1] > images and shown >= 9  # At least the 3x3 sample plot.
  assert read[0] == 2 * (rows_read[1] - images) + images + shown
  for split in ("train", "validation", "test"):
    assert ((tmp_path / "two" / "splits" / f"{split}.txt").read_text()
            == (tmp_path / "one" / "splits" / f"{split}.txt").read_text())
  assert worst_difference(read_variables(tmp_path / "one"),
                          read_variables(tmp_path / "two")) < TOLERANCE
  np.testing.assert_array_equal(
      np.load(tmp_path / "one" / "test_predictions.npz")["predictions"],
      np.load(tmp_path / "two" / "test_predictions.npz")["predictions"])
