"""What an audit found, as ``audit.json`` holds it, and the test images with a copy in train.

Examples are named by their paths relative to the data root (a folder dataset), or
``train/<i>`` and ``test/<i>`` rows of the source's own splits (IDX, tfds: a validation split
held out of train keeps its rows in train).
"""

from collections.abc import Mapping, Sequence

from tljax.audit.duplicates import Example
from tljax.audit.label_errors import Suspect
from tljax.data import folder
from tljax.data.dataset import Dataset, Split


def example_paths(dataset: Dataset, splits: Mapping[str, Split], seed: int
                  ) -> dict[str, list[str]]:
  """Each split's examples' names, in row order."""
  files = dataset.split_files
  if files is not None:
    order = folder.train_order(len(files["train"]), seed)
    return {"train": [files["train"][i] for i in order[:len(splits["train"])]],
            "validation": list(files["validation"]), "test": list(files["test"])}
  n_train = len(splits["train"])
  return {"train": [f"train/{i}" for i in range(n_train)],
          "validation": [f"train/{n_train + i}" for i in range(len(splits["validation"]))],
          "test": [f"test/{i}" for i in range(len(splits["test"]))]}


def copies_of(split: str, groups: Sequence[Sequence[Example]],
              pairs: Sequence[tuple[Example, Example, float]]) -> tuple[set[int], set[int]]:
  """``(rows of split with a copy in train, the train rows that are those copies)``: exact
  duplicates (``groups``) and near duplicates (``pairs``) across train and ``split``."""
  held, train = set(), set()
  linked = [list(group) for group in groups] + [[a, b] for a, b, _ in pairs]
  for members in linked:
    in_split = {i for s, i in members if s == split}
    in_train = {i for s, i in members if s == "train"}
    if in_split and in_train:
      held |= in_split
      train |= in_train
  return held, train


def class_counts(splits: Mapping[str, Split], class_names: Sequence[str]
                 ) -> dict[str, dict[str, int]]:
  """``split -> class name -> examples``."""
  return {split: {name: int((s.labels == c).sum()) for c, name in enumerate(class_names)}
          for split, s in splits.items()}


def audit_record(paths: Mapping[str, Sequence[str]], groups: Sequence[Sequence[Example]],
                 pairs: Sequence[tuple[Example, Example, float]], suspects: Sequence[Suspect],
                 splits: Mapping[str, Split], class_names: Sequence[str], *,
                 max_listed: int) -> dict:
  """``audit.json``'s content: at most ``max_listed`` findings of each kind, most certain
  first (near duplicates by similarity, label errors by score)."""
  def path(example: Example) -> str:
    return paths[example[0]][example[1]]

  labels = splits["train"].labels
  return {
      "exact_duplicates": [{"paths": [path(e) for e in group]} for group in groups[:max_listed]],
      "near_duplicates": [{"paths": [path(a), path(b)], "similarity": round(s, 4)}
                          for a, b, s in pairs[:max_listed]],
      "suspected_label_errors": [
          {"path": paths["train"][s.index], "label": class_names[labels[s.index]],
           "suggested": class_names[s.suggested], "score": round(s.score, 4)}
          for s in suspects[:max_listed]],
      "class_counts": class_counts(splits, class_names)}
