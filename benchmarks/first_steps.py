"""Did a commit change what the demo computes, or only its last bits? (issue 19)

A full demo run takes ~10 minutes and its accuracy moves by several points with the seed
and with rounding, so bisecting a drop run by run is slow and can mislead. This compares the
first steps instead, on identical inputs:

    PYTHONPATH=<checkout A> python benchmarks/first_steps.py dump a.npz [--steps 20]
    PYTHONPATH=<checkout B> python benchmarks/first_steps.py dump b.npz [--steps 20]
    python benchmarks/first_steps.py compare a.npz b.npz

`dump` builds configs/demo.py's data, model and train state exactly as train.py does (the
checkout's own code: run it with that checkout on PYTHONPATH; it uses only APIs that exist
since commit 10ab24f) and writes the initial parameters, every batch (input_ids, labels,
positions, pixel values...), the loss, the gradient norm and the per-parameter gradient norms
of steps 0..N-1, the first step's full gradients and the parameters after N steps. `compare`
reports, per kind, how many arrays differ and by how much: integer arrays (data, template,
labels) must be equal; float ones are measured in ulps of the array's largest magnitude. A
change of data/template/labels/init/optimizer shows as a differing batch or init array or a
loss that moves at step 0/1; rounding shows as gradients a few ulps apart and parameters
after N steps ~1e-6 of the update apart. (Parameters whose true gradient is zero, such as the
tower's k_proj bias, carry pure rounding noise: compare them by absolute value.)
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np


def dump(out: str, steps: int, config_file: str, data_dir: str | None):
  # Imported here: `compare` needs neither jax nor the package.
  # pylint: disable=g-import-not-at-top
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  from flax.traverse_util import flatten_dict

  import ee_mllm_jax
  from ee_mllm_jax import batch as batch_lib, data as data_lib, experiment, sharding
  from ee_mllm_jax.models.mllm import EEMLLM
  from ee_mllm_jax.sharding import LOGICAL_AXIS_RULES
  from ee_mllm_jax.train.state import create_sharded_state, make_init_fn, make_optimizer
  from ee_mllm_jax.train.step import make_train_step, masked_cross_entropy
  # pylint: enable=g-import-not-at-top

  print("package:", os.path.dirname(ee_mllm_jax.__file__), flush=True)
  config = experiment.load_config_file(config_file)
  if data_dir:
    config.synthetic.dir = data_dir
  exp = experiment.resolve(config)
  train_iter = data_lib.make_train_iterator(exp.data, with_meta=False, records=exp.train_records)
  model = EEMLLM(exp.model)
  optim_cfg = experiment.optim_config(config, exp.total_steps)
  optimizer, schedule = make_optimizer(optim_cfg)
  mesh = sharding.make_mesh(dict(config.mesh))
  jax.set_mesh(mesh)
  init, state_sh, _ = create_sharded_state(make_init_fn(model, optimizer, optim_cfg.trainable, seed=config.seed),
                                           mesh)
  state = init(None)
  step = jax.jit(make_train_step(model, optimizer, schedule, optim_cfg.trainable, config.accum_steps),
                 in_shardings=(state_sh, sharding.batch_sharding(mesh, (exp.data.global_batch_size,))),
                 out_shardings=(state_sh, None), donate_argnums=0)

  def mean_loss(params, batch, rng):
    with nn.logical_axis_rules(LOGICAL_AXIS_RULES):
      logits = model.apply({"params": params}, **batch_lib.model_inputs(batch), rngs={"dropout": rng})
    total, count = masked_cross_entropy(logits, batch["labels"])
    return total / jnp.maximum(count, 1.0)

  grad_fn = jax.jit(jax.value_and_grad(mean_loss))
  flat = lambda tree: flatten_dict(jax.device_get(tree), sep="/")  # noqa: E731
  record = {f"init/{k}": np.asarray(v) for k, v in flat(state["params"]).items()}
  for i in range(steps):
    batch = next(train_iter)
    batch = batch_lib.pad_text(batch, batch["input_ids"].shape[1])
    record.update({f"batch{i}/{k}": np.asarray(v) for k, v in batch.items()})
    _, grads = grad_fn(state["params"], {k: jnp.asarray(v) for k, v in batch.items()},
                       jax.random.fold_in(state["rng"], state["step"]))
    for k, g in flat(grads).items():
      record[f"gradnorm{i}/{k}"] = np.linalg.norm(np.asarray(g, np.float64))
      if i == 0:
        record[f"grad0/{k}"] = np.asarray(g)
    state, metrics = step(state, batch)
    metrics = jax.device_get(metrics)
    record[f"loss{i}"], record[f"grad_norm{i}"] = np.asarray(metrics["loss"]), np.asarray(metrics["grad_norm"])
    print(f"step {i}: loss {float(metrics['loss']):.9g} grad norm {float(metrics['grad_norm']):.9g}", flush=True)
  record.update({f"final/{k}": np.asarray(v) for k, v in flat(state["params"]).items()})
  np.savez(out, **record)
  print("wrote", out)


def compare(path_a: str, path_b: str) -> dict[str, tuple]:
  """Per kind of array (batch, init, grad0, gradnorm, loss, grad_norm, final): (arrays,
  differing, worst difference in ulps of the array's largest magnitude, its name)."""
  a, b = np.load(path_a), np.load(path_b)
  steps = [sum(1 for f in x.files if f.startswith("loss")) for x in (a, b)]
  if steps[0] != steps[1]:  # the parameters after N steps are comparable only at one N
    print(f"{steps[0]} vs {steps[1]} steps: the parameters after them are not compared")
    keep = lambda names: {f for f in names if not f.startswith("final/")}  # noqa: E731
  else:
    keep = set
  only = sorted(keep(a.files) ^ keep(b.files))
  if only:
    print("in one file only:", only[:10])
  kinds: dict[str, list] = {}
  for name in sorted(keep(a.files) & keep(b.files)):
    x, y = a[name], b[name]
    kind = name.split("/")[0].rstrip("0123456789")
    if x.shape != y.shape or (x.dtype.kind in "iub" and not np.array_equal(x, y)):
      kinds.setdefault(kind, []).append((np.inf, name, None))  # integers (ids, labels, positions) differ
      continue
    if x.dtype.kind in "iub" or x.size == 0:
      kinds.setdefault(kind, []).append((0.0, name, None))
      continue
    scale = float(np.max(np.abs(x)))
    diff = float(np.max(np.abs(x.astype(np.float64) - y)))
    ulp = float(np.spacing(np.float32(scale))) if scale else 1.0
    kinds.setdefault(kind, []).append((diff / ulp, name, scale))
  result = {}
  for kind, rows in kinds.items():
    # Arrays a million times smaller than the kind's largest (a zero true gradient) hold only
    # rounding noise; they are counted, not ranked.
    top = max([r[2] for r in rows if r[2] is not None], default=0.0)
    ranked = [r for r in rows if r[2] is None or r[2] >= 1e-6 * top] or rows
    worst = max(ranked)
    result[kind] = (len(rows), sum(r[0] > 0 for r in rows), worst[0], worst[1])
    print(f"{kind:9s} {len(rows):4d} arrays, {result[kind][1]:4d} differ; worst {worst[0]:.3g} ulps ({worst[1]}), "
          f"median {np.median([r[0] for r in ranked]):.3g}" + (f"; {len(rows) - len(ranked)} noise-only arrays"
                                                               if len(ranked) < len(rows) else ""))
  n = sum(1 for f in a.files if f.startswith("loss"))
  for i in range(n):
    if f"loss{i}" in b.files and f"grad_norm{i}" in a.files and f"grad_norm{i}" in b.files:
      print(f"step {i}: loss {float(a[f'loss{i}']):.9g} vs {float(b[f'loss{i}']):.9g}, grad norm "
            f"{float(a[f'grad_norm{i}']):.9g} vs {float(b[f'grad_norm{i}']):.9g}")
  finals = [f for f in keep(a.files) if f.startswith("final/") and f in b.files]
  if finals:
    apart = sum(np.sum((a[f].astype(np.float64) - b[f]) ** 2) for f in finals) ** 0.5
    moved = sum(np.sum((a[f].astype(np.float64) - a["init/" + f[6:]]) ** 2) for f in finals) ** 0.5
    print(f"parameters after {n} steps: |a - b| = {apart:.3g}, |a - a_init| = {moved:.3g} (ratio {apart / moved:.3g})")
  return result


def main(argv=None):
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  sub = parser.add_subparsers(dest="command", required=True)
  d = sub.add_parser("dump")
  d.add_argument("out")
  d.add_argument("--steps", type=int, default=20)
  d.add_argument("--config", default=os.path.join(root, "configs", "demo.py"))
  d.add_argument("--data_dir", default=None, help="synthetic.dir (share one generated dataset between checkouts)")
  c = sub.add_parser("compare")
  c.add_argument("a")
  c.add_argument("b")
  args = parser.parse_args(argv)
  if args.command == "dump":
    dump(args.out, args.steps, args.config, args.data_dir)
  else:
    compare(args.a, args.b)


if __name__ == "__main__":
  sys.exit(main())
