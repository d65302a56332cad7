"""Exact duplicates (the same decoded pixels) and near duplicates (nearly the same pooled
features) within and across splits.

An example is named by ``(split, index)``: its row in that split.
"""

import hashlib
from collections.abc import Mapping, Sequence

import numpy as np

Example = tuple[str, int]

# The split pairs whose near duplicates matter: a copy across splits makes validation or test
# optimistic; one within train weighs an image twice. (Within validation or test they only
# repeat a score.)
NEAR_DUPLICATE_PAIRS = (("train", "validation"), ("train", "test"), ("validation", "test"),
                        ("train", "train"))
_ROWS_AT_ONCE = 1024  # Images read (from a memory-mapped cache) and hashed at a time.


def pixel_digests(images) -> list[bytes]:
  """A digest of each image's decoded pixels (uint8 [N, ...], an array or a ``RowView``)."""
  digests = []
  for start in range(0, len(images), _ROWS_AT_ONCE):
    rows = np.arange(start, min(start + _ROWS_AT_ONCE, len(images)))
    block = np.ascontiguousarray(images[rows])  # An index array reads a RowView's rows.
    digests += [hashlib.blake2b(row.tobytes(), digest_size=16).digest() for row in block]
  return digests


def exact_groups(digests: Mapping[str, Sequence[bytes]]) -> list[list[Example]]:
  """Groups of two or more examples with the same pixel digest (``split -> digests``), each
  in split then row order; groups ordered by their first example."""
  by_digest: dict[bytes, list[Example]] = {}
  for split, split_digests in digests.items():
    for i, digest in enumerate(split_digests):
      by_digest.setdefault(digest, []).append((split, i))
  order = {split: k for k, split in enumerate(digests)}
  return sorted((group for group in by_digest.values() if len(group) > 1),
                key=lambda group: (order[group[0][0]], group[0][1]))


def _unit(features_ND: np.ndarray) -> np.ndarray:
  norms = np.linalg.norm(features_ND, axis=1, keepdims=True)
  return features_ND / np.maximum(norms, 1e-12)


def similar_pairs(a_ND: np.ndarray, b_MD: np.ndarray, threshold: float, *,
                  same: bool) -> list[tuple[int, int, float]]:
  """``(i, j, cosine similarity)`` of the rows of ``a`` and ``b`` more similar than
  ``threshold``; ``same``: ``a`` is ``b``, and each pair is listed once (i < j)."""
  if not len(a_ND) or not len(b_MD):
    return []
  a, b = _unit(a_ND), _unit(b_MD)
  pairs = []
  for start in range(0, len(a), _ROWS_AT_ONCE):
    similarity = a[start:start + _ROWS_AT_ONCE] @ b.T
    rows, cols = np.nonzero(similarity > threshold)
    rows = rows + start
    keep = cols > rows if same else np.ones(len(rows), bool)
    pairs += [(int(i), int(j), float(similarity[i - start, j]))
              for i, j in zip(rows[keep], cols[keep])]
  return pairs


def near_pairs(features: Mapping[str, np.ndarray], digests: Mapping[str, Sequence[bytes]],
               threshold: float) -> list[tuple[Example, Example, float]]:
  """Pairs of examples (of ``NEAR_DUPLICATE_PAIRS``) whose pooled features, less their mean
  over every split, have a cosine similarity above ``threshold`` but whose pixels differ
  (those are exact duplicates), most similar first.

  The mean is what every photo's features share (pooled ReLU6 outputs are all positive);
  without it any two photos on a plain background look alike (docs/audit.md).
  """
  mean_D = np.concatenate([f for f in features.values() if len(f)]).mean(axis=0)
  features = {split: f - mean_D if len(f) else f for split, f in features.items()}
  found = []
  for split_a, split_b in NEAR_DUPLICATE_PAIRS:
    if split_a not in features or split_b not in features:
      continue
    for i, j, s in similar_pairs(features[split_a], features[split_b], threshold,
                                 same=split_a == split_b):
      if digests[split_a][i] != digests[split_b][j]:
        found.append(((split_a, i), (split_b, j), s))
  return sorted(found, key=lambda pair: -pair[2])
