"""Freeze rules as data: rules -> a label per parameter -> an optax transform.

A phase lists ordered rules ``"<action>:<pattern>"`` with action ``train`` or ``freeze``. The
first rule whose pattern matches a parameter path (``"block_11_expand/kernel"``) decides it.
A pattern is a regular expression matched against the whole path, or Keras's layer-index form
``layers[a:b]`` (a Python slice over the backbone's ``base_layers``, the layers of the Keras
application without its top, as ``keras.applications.MobileNetV2(include_top=False).layers``
lists them), which matches every parameter of those layers; a bound may also be a layer name, standing for
that layer's index. Every parameter must be decided by some rule, and every rule must decide
some parameter: either mistake is an error naming the culprits.

Example, the tutorial's fine-tune phase, twice (layer 100 is ``block_11_expand_relu``)::

    rules = ("freeze:layers[:100]", "train:.*")
    rules = ("freeze:layers[:block_11_expand_relu]", "train:.*")
"""

import dataclasses
import difflib
import re
from collections.abc import Mapping, Sequence
from typing import Any

import optax
from flax import traverse_util

from tljax.models.layer_stack import Layer

TRAIN = "train"
FREEZE = "freeze"
ACTIONS = (TRAIN, FREEZE)
_BOUND = r"\s*(-?\d*|[A-Za-z_][\w.]*)\s*"  # An index or a layer name.
_LAYER_SLICE = re.compile(rf"layers\[{_BOUND}(?::{_BOUND})?\]")

Params = Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class Rule:
  """One freeze rule: ``action`` applies to parameter paths matched by ``pattern``."""
  action: str
  pattern: str

  @classmethod
  def parse(cls, text: str) -> "Rule":
    """Parses ``"train:<pattern>"`` or ``"freeze:<pattern>"``."""
    action, sep, pattern = text.partition(":")
    action = action.strip()
    if not sep or action not in ACTIONS or not pattern.strip():
      raise ValueError(f"freeze rule {text!r} is not '<action>:<pattern>' with action in "
                       f"{ACTIONS}; e.g. 'freeze:layers[:100]' or 'train:predictions/.*'.")
    pattern = pattern.strip()
    if not _LAYER_SLICE.fullmatch(pattern):
      try:
        re.compile(pattern)
      except re.error as e:
        raise ValueError(f"freeze rule {text!r}: {pattern!r} is not a valid regular "
                         f"expression ({e}).") from None
    return cls(action, pattern)

  def matcher(self, base_layers: Sequence[Layer]):
    """Returns ``path -> bool`` for this rule's pattern."""
    slice_match = _LAYER_SLICE.fullmatch(self.pattern)
    if slice_match is None:
      regex = re.compile(self.pattern)
      return lambda path: regex.fullmatch(path) is not None
    names = [layer.name for layer in base_layers]
    start, stop = (self._index(bound, names) for bound in slice_match.groups())
    if slice_match.group(2) is None:  # layers[i]: a single layer
      selected = {names[start]} if start is not None else set()
    else:
      selected = set(names[slice(start, stop)])
    return lambda path: path.split("/", 1)[0] in selected

  def _index(self, bound: str | None, names: Sequence[str]) -> int | None:
    """A slice bound as an index: a number, or the position of the layer it names."""
    if not bound:
      return None
    if bound.lstrip("-").isdigit():
      return int(bound)
    if bound not in names:
      near = difflib.get_close_matches(bound, names, n=5)
      raise ValueError(f"freeze rule '{self.action}:{self.pattern}': the model has no layer "
                       f"{bound!r}; layers with similar names: {near}.")
    return names.index(bound)


@dataclasses.dataclass(frozen=True)
class RuleReport:
  """What one rule decided: how many parameter arrays and scalars it matched first."""
  rule: Rule
  arrays: int
  size: int


def parse_rules(rules: Sequence[str]) -> tuple[Rule, ...]:
  """Parses a phase's rule strings; an empty list is an error."""
  if not rules:
    raise ValueError("a phase needs at least one freeze rule, e.g. ('train:.*',).")
  return tuple(Rule.parse(text) for text in rules)


def label_params(params: Params, rules: Sequence[Rule],
                 base_layers: Sequence[Layer]) -> tuple[dict, tuple[RuleReport, ...]]:
  """Labels every parameter ``train`` or ``freeze`` by the first matching rule.

  Returns the label tree (same structure as ``params``) and one report per rule.
  Raises ValueError naming uncovered parameters or rules that decide nothing.
  """
  flat = traverse_util.flatten_dict(params, sep="/")
  matchers = [rule.matcher(base_layers) for rule in rules]
  labels, counts, sizes, uncovered = {}, [0] * len(rules), [0] * len(rules), []
  for path, value in flat.items():
    index = next((i for i, match in enumerate(matchers) if match(path)), None)
    if index is None:
      uncovered.append(path)
      continue
    labels[path] = rules[index].action
    counts[index] += 1
    sizes[index] += int(value.size)
  if uncovered:
    raise ValueError(f"{len(uncovered)} parameters match no freeze rule, e.g. "
                     f"{uncovered[:6]}; end the rules with a catch-all such as 'train:.*' "
                     "or 'freeze:.*'.")
  idle = [rule for rule, count in zip(rules, counts) if count == 0]
  if idle:
    raise ValueError(f"freeze rules {[f'{r.action}:{r.pattern}' for r in idle]} match no "
                     "parameter that an earlier rule has not already decided; parameter "
                     f"paths look like {list(flat)[:3]}. Fix or remove them.")
  reports = tuple(RuleReport(r, c, s) for r, c, s in zip(rules, counts, sizes))
  return traverse_util.unflatten_dict(labels, sep="/"), reports


def split(tree: Params, labels: Params) -> tuple[dict, dict]:
  """Splits a params-shaped tree into its ``train`` and ``freeze`` parts (nested dicts)."""
  flat_labels = traverse_util.flatten_dict(labels)
  parts = {TRAIN: {}, FREEZE: {}}
  for path, value in traverse_util.flatten_dict(tree).items():
    parts[flat_labels[path]][path] = value
  return (traverse_util.unflatten_dict(parts[TRAIN]),
          traverse_util.unflatten_dict(parts[FREEZE]))


def merge(*parts: Params) -> dict:
  """Inverse of ``split``: one tree from disjoint partial trees."""
  flat = {}
  for part in parts:
    flat.update(traverse_util.flatten_dict(part))
  return traverse_util.unflatten_dict(flat)


def trainable_layers(labels: Params) -> frozenset[str]:
  """Names of the layers that have at least one trainable parameter."""
  return frozenset(path[0] for path, label in traverse_util.flatten_dict(labels).items()
                   if label == TRAIN)


def masked_optimizer(tx: optax.GradientTransformation,
                     labels: Params) -> optax.GradientTransformation:
  """``tx`` on trainable parameters; frozen ones get zero updates and no optimizer state."""
  return optax.multi_transform({TRAIN: tx, FREEZE: optax.set_to_zero()}, labels)


def format_report(reports: Sequence[RuleReport]) -> str:
  """A small table: rule, parameter arrays matched, and scalars trained or frozen."""
  lines = [f"{'rule':<36} {'arrays':>6} {'trainable':>12} {'frozen':>12}"]
  for r in reports:
    trainable, frozen = (r.size, 0) if r.rule.action == TRAIN else (0, r.size)
    lines.append(f"{r.rule.action + ':' + r.rule.pattern:<36} {r.arrays:>6} "
                 f"{trainable:>12,} {frozen:>12,}")
  total_train = sum(r.size for r in reports if r.rule.action == TRAIN)
  total_frozen = sum(r.size for r in reports if r.rule.action == FREEZE)
  lines.append(f"{'total':<36} {sum(r.arrays for r in reports):>6} "
               f"{total_train:>12,} {total_frozen:>12,}")
  return "\n".join(lines)


def expand_presets(rules: Sequence[str],
                   presets: Mapping[str, tuple[str, ...]]) -> tuple[str, ...]:
  """Replaces each ``"preset:<name>"`` entry with ``presets[name]`` (the backbone's
  ``PRESETS``)."""
  expanded = []
  for text in rules:
    if text.startswith("preset:"):
      name = text.split(":", 1)[1].strip()
      if name not in presets:
        raise ValueError(f"freeze preset {name!r} is not one of {sorted(presets)}.")
      expanded.extend(presets[name])
    else:
      expanded.append(text)
  return tuple(expanded)
