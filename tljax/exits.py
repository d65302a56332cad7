"""Every exit code of tljax's commands (``main.py``, ``python -m tljax.predict``), in one place.

A scheduler or a shell script tells from the code alone what happened and whether a rerun of
the same command resumes.
"""

import signal

DONE = 0
FAILED = 1          # A run with good inputs failed: a write failed mid-run, no checkpoint
                    # could be restored, the loss is non-finite, a bug.
BAD_INPUT = 2       # The command line, configuration, input or work directory is wrong.
INTERRUPTED = 128 + signal.SIGINT    # 130: stopped by Ctrl-C.
PREEMPTED = 128 + signal.SIGTERM     # 143: stopped by SIGTERM after saving a checkpoint.


def of_signal(signum: int) -> int:
  """What a shell reports for a process that ``signum`` ended: 128 + its number."""
  return 128 + signum
