"""(Re)exports a finished run: ``python -m tljax.export --workdir W [--formats jax,onnx,tflite]
[--int8 on|off]``.

Writes ``<workdir>/export/`` (every format, ``predict.py``, ``model.json``), checks each file
in its runtime on the run's test split, and prints one line per file. Exit 0 when every file
was written and passed its gate, 1 when one failed (its message says which), 2 for a workdir
or flag it cannot use.
"""

import argparse
import logging
import sys
from collections.abc import Sequence

from tljax import exits, predict, reporting
from tljax.export import deploy, rerun


def _formats(text: str) -> tuple[str, ...]:
  formats = tuple(f.strip() for f in text.split(",") if f.strip())
  unknown = [f for f in formats if f not in deploy.FORMATS]
  if unknown or not formats:
    raise argparse.ArgumentTypeError(f"{text!r}: give formats among {','.join(deploy.FORMATS)}")
  return formats


def format_results(results: dict) -> str:
  """One line per file: name, size, gate and its reason, or the error."""
  lines = []
  for name, r in results["files"].items():
    size = f"{r['bytes'] / 1e6:7.2f} MB" if "bytes" in r else " " * 10
    what = r.get("error") or r.get("gate_reason") or ""
    lines.append(f"{r.get('file', name):<32} {size}  {r.get('gate', 'error'):<9} {what}")
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m tljax.export",
                                   description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", required=True, help="work directory of a finished run")
  parser.add_argument("--formats", type=_formats, default=deploy.FORMATS,
                      help="comma-separated: jax, onnx, tflite (default: all)")
  parser.add_argument("--int8", choices=("on", "off"), default="on",
                      help="also write int8 ONNX and LiteRT files (default: on)")
  parser.add_argument("--max_int8_drop", type=float, default=None,
                      help="accuracy points an int8 file may lose (default: the run's "
                           "export.max_int8_drop, else 1.0)")
  args = parser.parse_args(argv)
  reporting.setup_logging()
  try:
    run = predict.load_run(args.workdir)
  except predict.PredictError as e:
    logging.error("%s", e)
    return exits.BAD_INPUT
  overrides = {"formats": args.formats, "int8": args.int8 == "on"}
  if args.max_int8_drop is not None:
    overrides["max_int8_drop"] = args.max_int8_drop
  results = rerun.export_run(args.workdir, run, **overrides)
  print(format_results(results))
  return exits.FAILED if results["failed"] else exits.DONE


if __name__ == "__main__":
  sys.exit(main())
