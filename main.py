"""Trains and evaluates a transfer-learning run: ``python main.py --config configs/mnist_mnv2.py``.

Exit codes: 0 done; 2 bad configuration or input (the message says which and how to fix it);
143 stopped by SIGTERM after saving a checkpoint (rerun the same command to resume); 1 any
other failure.
"""

import logging
import sys

from absl import app, flags
from ml_collections import config_flags

from tljax import checkpoint, data, preemption, train, weights

EXIT_BAD_INPUT = 2

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path to an ml_collections config file (see configs/).", lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Directory for checkpoints, metrics, plots and summary.json; rerunning "
    "with the same directory resumes.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}; settings go in --config.key=value")
  try:
    train.run(_CONFIG.value, _WORKDIR.value)
  except preemption.Preempted as e:
    logging.warning("%s; rerun the same command to resume.", e)
    sys.exit(train.EXIT_PREEMPTED)
  except (ValueError, KeyError, data.DataError, weights.WeightsError,
          checkpoint.CheckpointError) as e:
    logging.error("%s", e)
    sys.exit(EXIT_BAD_INPUT)


if __name__ == "__main__":
  app.run(main)
