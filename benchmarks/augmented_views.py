"""Does the head phase gain from augmented views of the frozen base's features?

    python benchmarks/augmented_views.py --data_dir ../shared/data/clothing-small \\
        --weights ../shared/weights/mobilenet_v2_1.0_imagenet_no_top.h5

A head phase on a frozen base caches the base's pooled features of one view per image (the
evaluation view) and trains on them almost for free; augmenting it runs the base on every
step instead. Between the two: cache the features of a few augmented views per image (exact
for those views). This computes, with ``configs/folder_mnv2.py``'s settings, the pooled
features of the evaluation view and of ``--views`` augmented views (its random resized crop
and flip), then trains the head as that config's head phase does (Adam, batch, label
smoothing, epochs) on each schedule of views below, over ``--seeds`` seeds, and prints the
validation and test accuracy of each and the seconds each view's features took. Writes JSON.
"""

import argparse
import pathlib
import sys
import tempfile
import time

import jax
import numpy as np
import optax

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from configs import folder_mnv2  # noqa: E402
from timing import cpu_model, print_table, write_json  # noqa: E402
from tljax import models, steps  # noqa: E402
from tljax.data import load, transforms  # noqa: E402
from tljax.models import weights  # noqa: E402

HEAD = "predictions"


def pooled_features(model, variables, images, view, batch: int) -> np.ndarray:
  """``view(images)`` -> model input, through every layer before the head, ``batch`` at a time."""
  cut = next(i for i, layer in enumerate(model.layers) if layer.name == HEAD)
  forward = jax.jit(lambda x: model.apply(variables, x, stop=cut))
  out = []
  for start in range(0, len(images), batch):
    chunk = np.asarray(images[start:start + batch])
    out.append(np.asarray(forward(view(start, chunk))))
  return np.concatenate(out)


def train_head(head, features_of_epoch, labels, phase, batch: int, seed: int):
  """The head phase on cached features: ``features_of_epoch(e)`` are epoch e's inputs."""
  tx = optax.adam(phase.learning_rate)

  @jax.jit
  def step(params, opt_state, x, y):
    def loss(p):
      logits = x @ p["kernel"] + p["bias"]
      return steps.cross_entropy(logits, y, phase.label_smoothing).mean()
    grads = jax.grad(loss)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  params, opt_state = head, tx.init(head)
  order = np.random.default_rng(seed)
  for epoch in range(phase.epochs):
    features, permutation = features_of_epoch(epoch), order.permutation(len(labels))
    for start in range(0, len(labels) - batch + 1, batch):
      rows = permutation[start:start + batch]
      params, opt_state = step(params, opt_state, features[rows], labels[rows])
  return params


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--data_dir", required=True)
  parser.add_argument("--weights", required=True)
  parser.add_argument("--views", type=int, default=5, help="augmented views per image")
  parser.add_argument("--seeds", type=int, default=5)
  parser.add_argument("--json", default="augmented_views.json")
  args = parser.parse_args()

  config = folder_mnv2.get_config()
  config.data.dir, config.model.weights = args.data_dir, args.weights
  phase = config.phases[0]
  dataset, splits = load.load_splits(config, pathlib.Path(tempfile.mkdtemp()))
  model = models.create(config.model, dataset.num_classes)
  size = config.model.input_size
  view = transforms.EvalView.from_config(config)
  variables = weights.load_pretrained(args.weights, model, input_size=size,
                                      rng=jax.random.key(0))
  augmentation = transforms.Augmentation.from_config(config.data)

  def evaluation_view(_, images):
    return view(images)

  def augmented_view(view):
    def augmented(start, images):
      rng = jax.random.fold_in(jax.random.key(view), start)
      return transforms.training_input(rng, images, view=view, augmentation=augmentation)
    return augmented

  t0 = time.perf_counter()
  plain = {name: pooled_features(model, variables, split.images, evaluation_view,
                                 config.eval_batch_size) for name, split in splits.items()}
  plain_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  views = [pooled_features(model, variables, splits["train"].images, augmented_view(v),
                           config.eval_batch_size) for v in range(args.views)]
  view_s = (time.perf_counter() - t0) / args.views

  schedules = {
      "evaluation view (cached)": lambda e: plain["train"],
      "a new augmented view each epoch (= augmenting)": lambda e: views[e % args.views],
      "2 augmented views": lambda e: views[e % 2],
      "1 augmented view": lambda e: views[0],
      "evaluation view + 1 augmented view": lambda e: (plain["train"], views[0])[e % 2],
  }
  labels = {name: np.asarray(split.labels) for name, split in splits.items()}
  rows = []
  for name, features_of_epoch in schedules.items():
    accuracy = {"validation": [], "test": []}
    for seed in range(args.seeds):
      head = weights.load_pretrained(args.weights, model, input_size=size,
                                     rng=jax.random.key(seed))["params"][HEAD]
      head = train_head(head, features_of_epoch, labels["train"], phase, config.batch_size,
                        seed)
      for split in accuracy:
        logits = plain[split] @ head["kernel"] + head["bias"]
        accuracy[split].append(float(np.mean(np.argmax(logits, -1) == labels[split])))
    rows.append({"schedule": name, **{
        f"{split}_{stat}": 100 * getattr(np, stat)(values)
        for split, values in accuracy.items() for stat in ("mean", "std")}})
  print(f"{cpu_model()}; features: evaluation view of every split {plain_s:.1f} s, one "
        f"augmented view of train {view_s:.1f} s; {args.seeds} seeds, mean and std (%)")
  print_table(rows, [("schedule", "schedule", "s"), ("val", "validation_mean", ".2f"),
                     ("+-", "validation_std", ".2f"), ("test", "test_mean", ".2f"),
                     ("+-", "test_std", ".2f")])
  write_json(args.json, {"cpu": cpu_model(), "evaluation_view_s": plain_s,
                         "augmented_view_s": view_s, "seeds": args.seeds, "rows": rows})


if __name__ == "__main__":  # Decoding a folder starts processes, which import this module.
  main()
