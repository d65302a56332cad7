"""``<workdir>/report.html``: one page to look at after a run, written at its end and by
``python -m tljax.report --workdir W`` for a finished one.

The page is built from what the run left in its work directory: ``summary.json`` (headline
numbers, per-class table, calibration, the exported files' measured accuracy), the data
audit's ``audit.json`` and ``audit_gallery.png`` where present, and the figures
(``curves.png``, ``confusion_matrix.png``, ``top_losses.png``, ``reliability.png``,
``samples.png``), linked as files beside the page. It needs no network and no script.
"""

import argparse
import html
import json
import logging
import pathlib
import sys
from collections.abc import Iterable, Sequence
from typing import Any

from tljax import exits, files, reporting

REPORT = "report.html"
AUDIT, AUDIT_GALLERY = "audit.json", "audit_gallery.png"
SUSPECTS_SHOWN = 20  # Rows of the audit's suspected label errors on the page.
STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1100px;
       color: #222; padding: 0 1em; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; }
table { border-collapse: collapse; margin: .6em 0; }
td, th { border: 1px solid #ddd; padding: .25em .6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
th { background: #f3f3f3; }
.headline td { font-size: 1.15em; }
.warning { background: #fff3cd; border: 1px solid #e0c060; padding: .5em .8em; }
img { max-width: 100%; border: 1px solid #eee; }
.muted { color: #777; }
"""


class ReportError(ValueError):
  """The work directory holds no finished run to report on."""


def _escape(value: Any) -> str:
  return html.escape(str(value))


def _number(value: Any, digits: int = 4) -> str:
  if value is None:
    return "-"
  if isinstance(value, float):
    return f"{value:.{digits}f}"
  return _escape(value)


def _percent(value: float | None) -> str:
  return "-" if value is None else f"{100 * value:.2f}%"


def table(header: Sequence[str], rows: Iterable[Sequence[Any]], css: str = "") -> str:
  """An HTML table; cells are escaped, floats shown to 4 places."""
  head = "".join(f"<th>{_escape(h)}</th>" for h in header)
  body = "".join("<tr>" + "".join(f"<td>{_number(c)}</td>" for c in row) + "</tr>"
                 for row in rows)
  return f'<table class="{css}"><tr>{head}</tr>{body}</table>'


def _image(workdir: pathlib.Path, name: str, alt: str) -> str:
  if not (workdir / name).is_file():
    return f'<p class="muted">({_escape(name)} was not written.)</p>'
  return f'<p><img src="{_escape(name)}" alt="{_escape(alt)}"></p>'


def _read_json(path: pathlib.Path) -> dict[str, Any] | None:
  try:
    return json.loads(path.read_text())
  except FileNotFoundError:
    return None
  except (OSError, ValueError) as e:
    logging.warning("report: %s is unreadable (%s); left out", path, e)
    return None


# ---------------------------------------------------------------------------------------------
# Sections.
# ---------------------------------------------------------------------------------------------


def headline(summary: dict[str, Any]) -> str:
  """Test accuracy, loss, macro F1, balanced accuracy, ECE and temperature, split sizes."""
  report, calibration = summary["classification_report"], summary.get("calibration") or {}
  supported = [c["recall"] for c in report["classes"] if c["support"]]
  balanced = sum(supported) / len(supported) if supported else None
  rows = [("test accuracy", _percent(summary["test_accuracy"])),
          ("test loss", summary["test_loss"]),
          ("macro F1", report["macro_avg"]["f1"]),
          ("balanced accuracy", balanced),
          ("expected calibration error", calibration.get("test_ece_after")),
          ("temperature", calibration.get("temperature")),
          ("test images", summary["test_examples"]),
          ("split sizes", ", ".join(f"{k} {v}" for k, v in summary["split_sizes"].items()))]
  audited = summary.get("audit") or {}
  warnings = f'<p class="warning">{_escape(audited["warning"])}</p>' if audited.get(
      "warning") else ""
  return warnings + table(("", "value"), rows, "headline")


def per_class(summary: dict[str, Any]) -> str:
  """The classification report as a table."""
  report = summary["classification_report"]
  rows = [(c["name"], c["precision"], c["recall"], c["f1"], c["support"])
          for c in report["classes"]]
  rows += [(name, r["precision"], r["recall"], r["f1"], r["support"]) for name, r in
           (("macro avg", report["macro_avg"]), ("weighted avg", report["weighted_avg"]))]
  return table(("class", "precision", "recall", "F1", "support"), rows)


def calibration_section(summary: dict[str, Any], workdir: pathlib.Path) -> str:
  """Temperature, test ECE and NLL before and after it, the reliability diagram."""
  record = summary.get("calibration")
  if not record:
    return '<p class="muted">This run was not calibrated.</p>'
  fitted = record["temperature"]
  about = (f"One temperature T = {fitted:.4f}, fitted on the validation split by its "
           "log-likelihood, divides the logits (folded into the head), in the JAX model, every "
           "exported file and predict." if fitted is not None else
           "No temperature was fitted (calibrate is off or there is no validation split).")
  rows = [("test ECE (%d bins)" % record["bins"], record["test_ece_before"],
           record["test_ece_after"]),
          ("test NLL", record["test_nll_before"], record["test_nll_after"])]
  if fitted is not None:
    rows.append(("validation NLL", record["validation_nll_before"],
                 record["validation_nll_after"]))
  return (f"<p>{_escape(about)}</p>" + table(("", "before", "after"), rows) +
          _image(workdir, "reliability.png", "reliability diagram"))


def exports_section(summary: dict[str, Any], workdir: pathlib.Path) -> str:
  """Each exported file: format, precision, size, measured test accuracy, gate."""
  model_json = _read_json(workdir / "export" / "model.json") or {}
  records = model_json.get("files") or (summary.get("export") or {}).get("files") or {}
  if not records:
    return '<p class="muted">No exported files.</p>'
  reference = model_json.get("jax_test_accuracy")  # The JAX file is the gate's reference.
  rows = [(r.get("file", name), r.get("format"), r.get("precision"),
           "-" if "bytes" not in r else f"{r['bytes'] / 1e6:.2f} MB",
           _percent(r.get("test_accuracy", reference if r.get("gate") == "reference" else None)),
           r.get("gate", "error"),
           r.get("error") or r.get("gate_reason") or "")
          for name, r in records.items()]
  return table(("file", "format", "precision", "size", "test accuracy", "gate", "note"), rows)


def audit_section(audit: dict[str, Any] | None, workdir: pathlib.Path) -> str:
  """The data audit's findings (``audit.json``) and its gallery of the top ones."""
  if audit is None:
    return '<p class="muted">No data audit in this work directory (audit.json).</p>'
  counts = audit.get("class_counts", {})
  splits = list(counts)
  classes = sorted({c for split in counts.values() for c in split})
  findings = [("exact duplicate groups", len(audit.get("exact_duplicates", []))),
              ("near-duplicate pairs", len(audit.get("near_duplicates", []))),
              ("suspected label errors", len(audit.get("suspected_label_errors", [])))]
  suspects = [(s["path"], s["label"], s["suggested"], s["score"])
              for s in audit.get("suspected_label_errors", [])[:SUSPECTS_SHOWN]]
  near = [(" | ".join(p["paths"]), p["similarity"])
          for p in audit.get("near_duplicates", [])[:SUSPECTS_SHOWN]]
  return "".join([
      table(("finding", "count"), findings),
      _image(workdir, AUDIT_GALLERY, "the audit's top findings"),
      "<h3>Class counts</h3>",
      table(("class", *splits), [(c, *(counts[s].get(c, 0) for s in splits))
                                 for c in classes]),
      "<h3>Most suspect labels</h3>",
      table(("path", "label", "suggested", "score"), suspects),
      "<h3>Near duplicates</h3>", table(("paths", "similarity"), near)])


def page(summary: dict[str, Any], audit: dict[str, Any] | None,
         workdir: pathlib.Path) -> str:
  """The whole report as one HTML document."""
  title = f"tljax run: {summary.get('dataset', '')} ({workdir.name})"
  sections = [
      ("Headline", headline(summary)),
      ("Training curves", _image(workdir, "curves.png", "loss and accuracy per epoch")),
      ("Confusion matrix (test)", _image(workdir, "confusion_matrix.png", "confusion matrix")),
      ("Per class (test)", per_class(summary)),
      ("Data audit", audit_section(audit, workdir)),
      ("Highest test losses", _image(workdir, "top_losses.png", "highest test losses")),
      ("Calibration", calibration_section(summary, workdir)),
      ("Exported files", exports_section(summary, workdir)),
      ("Sample predictions (test)", _image(workdir, "samples.png", "sample predictions")),
  ]
  body = "".join(f"<h2>{_escape(name)}</h2>\n{content}\n" for name, content in sections)
  return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
          f"<title>{_escape(title)}</title><style>{STYLE}</style></head>\n"
          f"<body><h1>{_escape(title)}</h1>\n{body}</body></html>\n")


def write_report(workdir: str | pathlib.Path) -> pathlib.Path:
  """Writes ``<workdir>/report.html`` from the finished run there; returns its path."""
  workdir = pathlib.Path(workdir)
  summary = _read_json(workdir / "summary.json")
  if summary is None:
    raise ReportError(f"{workdir} holds no finished run (no readable summary.json): finish "
                      "its training command, then write the report.")
  path = workdir / REPORT
  with files.atomic_open(path, "w") as f:
    f.write(page(summary, _read_json(workdir / AUDIT), workdir))
  return path


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m tljax.report",
                                   description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", required=True, help="work directory of a finished run")
  args = parser.parse_args(argv)
  reporting.setup_logging()
  try:
    logging.info("wrote %s", write_report(args.workdir))
  except ReportError as e:
    logging.error("%s", e)
    return exits.BAD_INPUT
  return exits.DONE


if __name__ == "__main__":
  sys.exit(main())
