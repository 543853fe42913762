"""The per-layer mode schedule (composite_from_layer=n: layers [0, n) self, [n, L) composite):
the naive reference with the mask switching at layer n, its ends equal the two modes, two scans
with the right work in each, cached generation, gradients, and one parameter tree for every n."""

import flax.errors
import flax.linen as nn
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

import ee_mllm_jax as eem
from batches import MIXED_PLANS, make_batch
from jaxpr_shapes import shapes_in_jaxpr
from models import forward, greedy_by_full_forward, init_params
from test_model import assert_close_on_valid, naive_logits
from ee_mllm_jax.batch import model_inputs
from ee_mllm_jax.models.llm import DecoderLayer
from ee_mllm_jax.params import abstract_params

DEPTH = 4


def config(n, visual_ffn=False, attention="composite"):
  base = eem.ModelConfig.preset("tiny")
  return base.replace(llm=base.llm.replace(depth=DEPTH), attention=attention, visual_ffn=visual_ffn,
                      composite_from_layer=n)


def noisy_norms(params):
  """Random (non-unit) norm scales, so that a misplaced layer boundary cannot pass."""
  return jax.tree_util.tree_map_with_path(
      lambda path, x: x * (1 + 0.3 * jax.random.normal(jax.random.key(len(str(path))), x.shape))
      if "scale" in str(path) else x, params)


@pytest.fixture(scope="module")
def setup():
  cfg = config(0)
  return make_batch(cfg, MIXED_PLANS), noisy_norms(init_params(cfg))


@pytest.mark.parametrize("visual_ffn", [False, True])
@pytest.mark.parametrize("n", [1, 2, 3])
def test_schedule_equals_naive_reference_switching_at_layer_n(setup, n, visual_ffn):
  batch, params = setup
  cfg = config(n, visual_ffn)
  assert cfg.layer_schedule == (("self", n), ("composite", DEPTH - n))
  assert_close_on_valid(forward(cfg, params, batch), naive_logits(cfg, params, batch), batch["text_valid"], 1e-5)


@pytest.mark.parametrize("visual_ffn", [False, True])
def test_schedule_ends_are_the_two_modes(setup, visual_ffn):
  batch, params = setup
  valid = batch["text_valid"]
  all_self = np.asarray(forward(config(DEPTH, visual_ffn), params, batch))[valid]
  np.testing.assert_array_equal(all_self, np.asarray(forward(config(0, True, "self"), params, batch))[valid])
  all_composite = np.asarray(forward(config(0, visual_ffn), params, batch))[valid]
  np.testing.assert_allclose(all_composite, np.asarray(naive_logits(config(0, visual_ffn), params, batch))[valid],
                             rtol=0, atol=1e-5 * np.max(np.abs(all_composite)))
  assert config(DEPTH, visual_ffn).layer_schedule == (("self", DEPTH),)


def test_every_n_computes_a_different_function_but_the_last_layers_mode_is_unread(setup):
  """Guards the tests above: moving the boundary by one layer changes the logits, except from
  L - 1 to L: the last layer's visual update (the only thing its mode changes) is read by no one,
  since that layer's text queries attend to keys of its inputs."""
  batch, params = setup
  valid = batch["text_valid"]
  outs = [np.asarray(forward(config(n), params, batch))[valid] for n in range(DEPTH + 1)]
  for i in range(DEPTH - 1):
    assert np.max(np.abs(outs[i] - outs[i + 1])) > 1e-4, f"n={i} and n={i + 1} agree"
  np.testing.assert_allclose(outs[DEPTH - 1], outs[DEPTH], rtol=0, atol=1e-5 * np.max(np.abs(outs[DEPTH])))


def test_one_parameter_tree_for_every_n():
  shapes = [jax.tree.map(lambda x: (x.shape, x.dtype), abstract_params(config(n))) for n in range(DEPTH + 1)]
  assert all(s == shapes[0] for s in shapes)
  layers = jax.tree.leaves(abstract_params(config(2))["llm"]["layers"])
  assert layers and all(x.shape[0] == DEPTH for x in layers)  # still one (L, ...) stack


def scans(jaxpr, out=None):
  """(length, shapes computed in its body) for every scan in the jaxpr, nested ones included."""
  out = [] if out is None else out
  for eqn in jaxpr.eqns:
    subs = list(jax.extend.core.jaxprs_in_params(eqn.params))
    if eqn.primitive.name == "scan":
      out.append((eqn.params["length"], shapes_in_jaxpr(subs[0])))
    for sub in subs:
      scans(sub, out)
  return out


@pytest.mark.parametrize("n", [1, 3])
def test_two_scans_one_per_mode(setup, n):
  """A self scan of n layers (all-token queries, V+T x V+T scores, visual FFN) and a composite
  scan of L - n layers (text queries only, no square scores, no visual FFN), nothing else."""
  _, params = setup
  cfg = config(n)
  batch = model_inputs(make_batch(cfg, [[3, "img", 5, "img", 4]] * 2))  # V = 32, T = 13, S = 45
  jaxpr = jax.make_jaxpr(lambda p: eem.EEMLLM(cfg).apply({"params": p}, **batch))(params)
  c, b, v, t, s = cfg.llm, 2, 32, 13, 45
  g = c.num_heads // c.num_kv_heads
  all_queries, square = (b, s, c.num_heads, c.head_dim), (b, c.num_kv_heads, g, s, s)
  text_scores, visual_ffn = (b, c.num_kv_heads, g, t, s), (b, v, c.mlp_dim)
  decoder = [(length, shapes) for length, shapes in scans(jaxpr.jaxpr) if text_scores in shapes or square in shapes]
  assert [length for length, _ in decoder] == [n, DEPTH - n]
  (_, self_run), (_, composite_run) = decoder
  assert {all_queries, square, visual_ffn} <= self_run
  assert text_scores in composite_run and not {all_queries, square, visual_ffn} & composite_run


@pytest.mark.parametrize("visual_ffn", [False, True])
def test_greedy_with_cache_equals_repeated_full_forward(setup, visual_ffn):
  """Prefill runs the schedule, decode steps the shared extend phase: same tokens as rerunning
  the whole scheduled model per token."""
  batch, params = setup
  cfg = config(2, visual_ffn)
  steps = 6
  out = eem.generate(params, cfg, batch, max_new_tokens=steps)
  want_tokens, want_logprobs = greedy_by_full_forward(cfg, params, batch, steps)
  np.testing.assert_array_equal(np.asarray(out.tokens), want_tokens)
  np.testing.assert_allclose(np.asarray(out.logprobs), want_logprobs, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_gradient_reaches_every_layer_and_matches_finite_differences(setup):
  """The slices of the one `layers/` stack each get their own run's gradient."""
  batch, params = setup
  cfg = config(2)
  inputs = model_inputs(batch)
  valid = jnp.asarray(batch["text_valid"])

  def loss(p):
    logits = eem.EEMLLM(cfg).apply({"params": p}, **inputs)
    return jnp.sum(jnp.where(valid[..., None], jax.nn.log_softmax(logits), 0.0)[..., :7])

  grads = jax.jit(jax.grad(loss))(params)
  for name, g in jax.tree_util.tree_leaves_with_path(grads["llm"]["layers"]):
    per_layer = np.abs(np.asarray(g)).reshape(DEPTH, -1).max(1)
    assert (per_layer > 0).all(), f"{jax.tree_util.keystr(name)}: zero gradient in layer {per_layer.argmin()}"
  direction = jax.tree.map(lambda x: 0.01 * jax.random.normal(jax.random.key(x.size), x.shape, x.dtype), params)
  eps = 1e-2
  f = jax.jit(loss)
  shifted = lambda sign: f(jax.tree.map(lambda p, d: p + sign * eps * d, params, direction))
  numeric = (shifted(1) - shifted(-1)) / (2 * eps)
  analytic = sum(jnp.vdot(g, d) for g, d in zip(jax.tree.leaves(grads), jax.tree.leaves(direction)))
  assert abs(float(numeric) - float(analytic)) < 1e-2 * abs(float(analytic)), (float(numeric), float(analytic))


@pytest.mark.parametrize("cfg", [config(2), eem.ModelConfig.preset("tiny", attention="cross", cross_every=1)],
                         ids=["schedule", "cross"])
def test_rngs_reach_the_layers_that_run_through_a_view(cfg):
  """Schedule runs and cross groups read slices of `layers/` through a lifted view
  (`stack_view`), so an rng passed to `apply` reaches every decoder layer: dropout added to a
  layer would run there (a detached `.apply` would raise for want of the rng)."""
  batch = model_inputs(make_batch(cfg, [[3, "img", 5, "img", 4]]))
  params = jax.eval_shape(lambda: nn.meta.unbox(eem.EEMLLM(cfg).init(jax.random.key(0), **batch)["params"]))
  drawn = []

  def probe(next_fun, args, kwargs, context):
    if isinstance(context.module, DecoderLayer) and context.method_name == "forward":
      context.module.make_rng("dropout")
      drawn.append(context.module.scope.path)
    return next_fun(*args, **kwargs)

  def run(rngs):
    with nn.intercept_methods(probe):
      return jax.eval_shape(lambda p: eem.EEMLLM(cfg).apply({"params": p}, **batch, rngs=rngs), params)

  run({"dropout": jax.random.key(1)})
  runs = cfg.mode.schedule(cfg.llm.depth) if cfg.mode.visual_in_decoder else [(None, 1)] * (1 + (cfg.mode.every > 1))
  assert len(set(drawn)) == len(runs)  # every scan's layer drew one
  with pytest.raises(flax.errors.InvalidRngError):
    run({})
