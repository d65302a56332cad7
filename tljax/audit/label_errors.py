"""Suspected label errors: out-of-sample class probabilities from a k-fold linear head on the
pooled features, ranked by confident learning (Northcutt et al., 2021).

Each training example's probabilities come from a softmax regression fitted on the other
folds, so a mislabelled image cannot vouch for its own label. An example is suspect where
the class it most confidently belongs to (the most probable of the classes whose probability
reaches that class's own threshold, the mean probability the class gets on the examples
labelled with it) is not its label; its score is that class's probability minus its label's.
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax


class Suspect(NamedTuple):
  index: int        # The example's row in its split.
  suggested: int    # The class it most confidently belongs to.
  score: float      # p(suggested) - p(label), out of sample: in (0, 1], higher more suspect.


@functools.partial(jax.jit, static_argnames=("num_classes", "folds", "steps"))
def _fit_folds(x_ND, labels_N, fold_N, *, num_classes: int, folds: int, steps: int,
               learning_rate: float, l2: float):
  """Each fold's softmax regression (``[folds, D, C]``, ``[folds, C]``), fitted by full-batch
  Adam on the examples of the other folds."""
  train_KN = (fold_N[None, :] != jnp.arange(folds)[:, None]).astype(jnp.float32)
  onehot_NC = jax.nn.one_hot(labels_N, num_classes)

  def loss(params):
    w_KDC, b_KC = params
    logits_KNC = jnp.einsum("nd,kdc->knc", x_ND, w_KDC) + b_KC[:, None, :]
    nll_KN = -jnp.sum(onehot_NC * jax.nn.log_softmax(logits_KNC), axis=-1)
    per_fold = jnp.sum(nll_KN * train_KN, axis=1) / jnp.sum(train_KN, axis=1)
    return jnp.sum(per_fold) + l2 * jnp.sum(w_KDC ** 2)  # The folds are independent.

  tx = optax.adam(learning_rate)
  params = (jnp.zeros((folds, x_ND.shape[1], num_classes)), jnp.zeros((folds, num_classes)))

  def step(carry, _):
    params, opt_state = carry
    updates, opt_state = tx.update(jax.grad(loss)(params), opt_state)
    return (optax.apply_updates(params, updates), opt_state), None

  (params, _), _ = jax.lax.scan(step, (params, tx.init(params)), None, length=steps)
  return params


def out_of_sample_probabilities(features_ND: np.ndarray, labels_N: np.ndarray, num_classes: int,
                                *, folds: int = 5, seed: int = 0, steps: int = 200,
                                learning_rate: float = 0.01, l2: float = 0.03) -> np.ndarray:
  """float32 [N, C]: each example's class probabilities from the linear head fitted on the
  ``folds - 1`` folds it is not in (folds drawn at random, seeded); features standardised."""
  n = len(labels_N)
  if n < folds:
    raise ValueError(f"{n} training examples are too few for {folds} folds.")
  fold_N = np.random.default_rng(seed).permutation(n) % folds
  x = (features_ND - features_ND.mean(0)) / (features_ND.std(0) + 1e-6)
  w_KDC, b_KC = _fit_folds(jnp.asarray(x, jnp.float32), jnp.asarray(labels_N), jnp.asarray(fold_N),
                           num_classes=num_classes, folds=folds, steps=steps,
                           learning_rate=learning_rate, l2=l2)
  w_KDC, b_KC = np.asarray(w_KDC), np.asarray(b_KC)
  logits_NC = np.zeros((n, num_classes), np.float32)
  for k in range(folds):
    logits_NC[fold_N == k] = x[fold_N == k] @ w_KDC[k] + b_KC[k]
  return np.asarray(jax.nn.softmax(logits_NC, axis=-1))


def confident_suspects(probabilities_NC: np.ndarray, labels_N: np.ndarray) -> list[Suspect]:
  """The examples whose confident class differs from their label, most suspect first."""
  n, num_classes = probabilities_NC.shape
  thresholds_C = np.array([probabilities_NC[labels_N == c, c].mean() if np.any(labels_N == c)
                           else 1.0 for c in range(num_classes)])
  above = probabilities_NC >= thresholds_C
  confident_N = np.argmax(np.where(above, probabilities_NC, -1.0), axis=1)
  given_N = probabilities_NC[np.arange(n), labels_N]
  suspect = above.any(axis=1) & (confident_N != labels_N)
  scores = probabilities_NC[np.arange(n), confident_N] - given_N
  ranked = sorted(np.flatnonzero(suspect), key=lambda i: -scores[i])
  return [Suspect(int(i), int(confident_N[i]), float(scores[i])) for i in ranked]
