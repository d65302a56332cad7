"""Trains and evaluates a transfer-learning run: ``python main.py --config configs/mnist_mnv2.py``.

Exit codes (``tljax.exits``): 0 done; 2 bad command line, configuration, input or work directory (the message
says which and how to fix it); 143 / 130 stopped by SIGTERM / Ctrl-C after saving a checkpoint
(rerun the same command to resume); 1 any other failure (a write failed mid-run, no
checkpoint could be restored, the loss is non-finite, a bug).
"""

import difflib
import logging
import os
import sys

import ml_collections
from absl import app, flags
from ml_collections import config_flags
from ml_collections.config_flags import config_path

from tljax import exits

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path to an ml_collections config file (see configs/).", lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Directory for checkpoints, metrics, plots and summary.json; rerunning "
    "with the same directory resumes.")
flags.mark_flags_as_required(["config", "workdir"])


def run(config: ml_collections.ConfigDict, workdir: str) -> int:
  """``train.run``; returns the exit code, with a failure logged as one message."""
  # Imported here, not at the top: a mistyped flag is reported before JAX loads.
  from tljax import checkpoint, checks, files, liveness, preemption, steps, train
  from tljax.data import dataset
  from tljax.models import weights
  # Failures of a run that had good inputs (exit 1), and the user's own mistakes (exit 2).
  run_failures = (checkpoint.CheckpointWriteError, checkpoint.CheckpointDamagedError,
                  files.OutputWriteError, steps.NonFiniteError, liveness.PeerLostError)
  input_errors = (checks.ConfigError, dataset.DataError, weights.WeightsError,
                  checkpoint.CheckpointError, files.WorkdirError)
  try:
    train.run(config, workdir)
  except preemption.Preempted as e:
    logging.warning("%s; rerun the same command to resume.", e)
    return e.exit_code
  except KeyboardInterrupt:
    logging.warning("interrupted: stopped at once; rerun the same command to resume from the "
                    "last checkpoint, if there is one.")
    return exits.INTERRUPTED
  except run_failures as e:
    return _failed(e, exits.FAILED)
  except input_errors as e:
    return _failed(e, exits.BAD_INPUT)
  except Exception as e:  # noqa: BLE001 - a bug: one message, the traceback on request
    return _failed(e, exits.FAILED, f"unexpected {type(e).__name__} (a bug in tljax): ",
                   " Rerun with --verbosity=1 for the traceback, and report it.")
  return exits.DONE


def _failed(error: Exception, code: int, before: str = "", after: str = "") -> int:
  """Logs ``error`` as one message (with its traceback under --verbosity=1); returns code."""
  logging.error("%s%s%s", before, error, after,
                exc_info=logging.getLogger().isEnabledFor(logging.DEBUG))
  return code


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing; a bad flag or ``--config.key=value`` exits with one message, code 2."""
  try:
    remaining = flags.FLAGS(argv)
    _CONFIG.value.keys()  # A config file that failed to load raises only when first read.
    return remaining
  except flags.Error as e:
    message = str(e)
  except OSError as e:
    message = " ".join(str(e).split())
  except (AttributeError, KeyError, IndexError, TypeError, ValueError) as e:
    message = _override_problem(argv) or f"--config: {e}"
  print(f"{argv[0]}: {message.rstrip('.')}. Run with --helpfull to list the flags.",
        file=sys.stderr)
  sys.exit(exits.BAD_INPUT)


def _override_problem(argv: list[str]) -> str | None:
  """Which ``--config.<key>`` names no setting: the closest key and the valid ones there."""
  config_file, overrides = None, []
  for i, arg in enumerate(argv):
    name, eq, value = arg.partition("=")
    if name == "--config":
      config_file = value if eq else next(iter(argv[i + 1:i + 2]), None)
    elif name.startswith("--config."):
      overrides.append(name[len("--config."):])
  try:
    config = flags.FLAGS["config"].parser.parse(config_file)
    return next(filter(None, (_missing_key(config, path) for path in overrides)), None)
  except Exception:  # noqa: BLE001 - then the parse error itself is reported
    return None


def _missing_key(config: ml_collections.ConfigDict, path: str) -> str | None:
  """Why ``--config.<path>`` names no setting of ``config``; None if it names one."""
  fields = config_path.split(path)
  node, where = config, "config"
  for i, field in enumerate(fields):
    if isinstance(node, (list, tuple)):
      if not isinstance(field, int):
        return f"--config.{path}: {where} is indexed by number, e.g. {where}[0]."
      if not -len(node) <= field < len(node):
        return f"--config.{path}: {where} has {len(node)} entries, so [{field}] does not exist."
      node, where = node[field], f"{where}[{field}]"
      continue
    if not isinstance(node, ml_collections.ConfigDict):
      return f"--config.{path}: {where} is a single setting, with no {field!r} inside."
    keys = sorted(node.keys())
    if field not in keys:
      close = difflib.get_close_matches(str(field), keys, n=1)
      rest = "".join(f"[{f}]" if isinstance(f, int) else f".{f}" for f in fields[i + 1:])
      hint = f" Did you mean --{where}.{close[0]}{rest}?" if close else ""
      return (f"--config.{path}: {where} has no key {field!r}.{hint} Its keys are: "
              f"{', '.join(keys)}.")
    node, where = node[field], f"{where}.{field}"
  return None


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}; settings go in --config.key=value",
                         exitcode=exits.BAD_INPUT)
  code = run(_CONFIG.value, _WORKDIR.value)
  if code == exits.INTERRUPTED:
    # After a second Ctrl-C, JAX's and Orbax's background threads may still be running, and
    # Python's shutdown around them can abort the process (exit 134): leave without it.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
  sys.exit(code)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
