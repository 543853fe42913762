"""Attention implementations behind `attention_impl`: every one that runs on CPU ("xla",
"blocked", "chunked") equals the naive float64 reference in every mode, in values and
gradients; "chunked" never holds a score block wider than its key block, and "blocked" reads
only the keys up to each query block in self-attention."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import ee_mllm_jax as eem
from batches import MIXED_PLANS, make_batch
from jaxpr_shapes import shapes_in_jaxpr
from models import embed_image, forward, init_params
from reference import naive_llm_logits
from ee_mllm_jax.batch import model_inputs, visual_valid
from ee_mllm_jax.models import kernels as kernels_lib
from ee_mllm_jax.models.kernels import chunked as chunked_lib
from ee_mllm_jax.models.layers import Linear

# Small enough that every sequence spans several key blocks and S is not a multiple of it
# (tiny: 17 patch tokens in the tower; V = 32 visual + T text keys in the LLM).
BLOCK = 8
MODES = {"self": ("self", True), "composite": ("composite", False), "ee-mllm-f": ("composite", True)}


def config(impl, mode="composite"):
  attention, visual_ffn = MODES[mode]
  return eem.ModelConfig.preset("tiny", attention=attention, visual_ffn=visual_ffn).with_attention_impl(impl, BLOCK)


def scaled_norm_params(cfg):
  """Random (non-unit) norm scales, so that a misplaced norm cannot pass (as in test_model)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, x: x * (1 + 0.3 * jax.random.normal(jax.random.key(len(str(path))), x.shape))
      if "scale" in str(path) else x, init_params(cfg))


def naive_logits(cfg, params, batch):
  x_v = embed_image(cfg.with_attention_impl("xla"), params, batch["pixel_values"])
  valid_v = visual_valid(batch["image_valid"], batch["visual_positions"].shape[1])
  return naive_llm_logits(params["llm"], cfg, x_v, batch["input_ids"], batch["visual_positions"],
                          batch["text_positions"], valid_v, batch["text_valid"])


def relative_error(got, want, valid):
  got, want = np.asarray(got, np.float64)[valid], np.asarray(want, np.float64)[valid]
  return np.max(np.abs(got - want)) / np.max(np.abs(want))


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("impl", ["xla", "blocked", "chunked"])
def test_model_equals_naive_reference(impl, mode):
  """Padded rows, two images, a system prompt before an image (MIXED_PLANS); the tower runs
  the same implementation (its output is checked through the logits, the reference's visual
  tokens come from the "xla" tower)."""
  cfg = config(impl, mode)
  batch = make_batch(cfg, MIXED_PLANS)
  params = scaled_norm_params(cfg)
  got = forward(cfg, params, batch)
  assert relative_error(got, naive_logits(cfg, params, batch), batch["text_valid"]) < 1e-5
  assert np.all(np.isfinite(np.asarray(got)))  # padded rows too


def masked_loss(cfg, batch):
  model = eem.EEMLLM(cfg)
  inputs = model_inputs(batch)
  labels = np.where(batch["text_valid"], batch["input_ids"], -100).astype(np.int32)

  def loss(params):
    lp = jax.nn.log_softmax(model.apply({"params": params}, **inputs))
    nll = -jnp.take_along_axis(lp, np.maximum(labels, 0)[..., None], -1)[..., 0]
    return jnp.sum(nll * (labels >= 0)) / np.sum(labels >= 0)
  return loss


@pytest.mark.parametrize("mode,impl", [("self", "chunked"), ("composite", "chunked"), ("self", "blocked")])
@pytest.mark.slow
def test_gradients_equal_xla(mode, impl):
  """Every query kind (visual, text, padding), the tower, and in composite mode the aligner."""
  batch = make_batch(config("xla", mode), MIXED_PLANS)
  params = scaled_norm_params(config("xla", mode))
  grads = {i: jax.jit(jax.grad(masked_loss(config(i, mode), batch)))(params) for i in ("xla", impl)}
  flat_x = jax.tree_util.tree_flatten_with_path(grads["xla"])[0]
  flat_c = jax.tree.leaves(grads[impl])
  for (path, gx), gc in zip(flat_x, flat_c):
    gx, gc = np.asarray(gx), np.asarray(gc)
    assert np.all(np.isfinite(gc)), jax.tree_util.keystr(path)
    scale = max(np.max(np.abs(gx)), 1e-6)  # k_proj biases get ~0 gradient (softmax shift)
    assert np.max(np.abs(gc - gx)) / scale < 1e-4, jax.tree_util.keystr(path)


@pytest.mark.slow
def test_chunked_generation_equals_xla(mode="self"):
  batch = make_batch(config("xla", mode), MIXED_PLANS)
  params = init_params(config("xla", mode))
  out = {impl: eem.generate(params, config(impl, mode), batch, max_new_tokens=6) for impl in ("xla", "chunked")}
  np.testing.assert_array_equal(np.asarray(out["chunked"].tokens), np.asarray(out["xla"].tokens))
  np.testing.assert_allclose(np.asarray(out["chunked"].logprobs), np.asarray(out["xla"].logprobs), atol=1e-5)


@pytest.mark.parametrize("mode", ["self", "composite"])
def test_chunked_holds_no_score_block_wider_than_a_block(mode):
  """Score-like arrays end in (queries, keys). "xla" has (Q, S) ones over all keys, in the LLM
  and in the tower; "chunked" only (block, block) ones."""
  batch = model_inputs(make_batch(config("xla", mode), [[3, "img", 5, "img", 4]] * 2))  # V 32, T 13
  params = init_params(config("xla", mode))
  s, t, p = 32 + 13, 13, config("xla").vision.num_patches + 1  # LLM keys, text queries, tower tokens

  def score_shapes(impl):
    cfg = config(impl, mode)
    jaxpr = jax.make_jaxpr(lambda prm: eem.EEMLLM(cfg).apply({"params": prm}, **batch))(params)
    return {shape[-2:] for shape in shapes_in_jaxpr(jaxpr.jaxpr) if len(shape) == 5
            and shape[-2] in (s, t, p, BLOCK) and shape[-1] in (s, p, BLOCK)}

  assert score_shapes("xla") >= {(s if mode == "self" else t, s), (p, p)}
  assert score_shapes("chunked") == {(BLOCK, BLOCK)}


def test_decode_step_scores_one_row_per_head():
  """A decode step (one query against a 64-slot cache): "xla" makes one (1, S) score row per
  head and nothing larger; "chunked" no per-head score array over the cache at all."""
  cfg = config("xla", "self")
  params = init_params(cfg)
  batch = make_batch(cfg, MIXED_PLANS)
  _, cache = jax.eval_shape(lambda prm: eem.EEMLLM(cfg).apply({"params": prm}, **model_inputs(batch), cache_size=64,
                                                              method="prefill"), params)
  ids = np.zeros((4, 1), np.int32)
  pos = np.full((4, 1), 60, np.int32)
  valid = np.ones((4, 1), bool)
  c = cfg.llm
  g = c.num_heads // c.num_kv_heads

  def all_shapes(impl):
    model = eem.EEMLLM(config(impl, "self"))
    jaxpr = jax.make_jaxpr(lambda prm, cch: model.apply({"params": prm}, ids, pos, valid, cch, method="extend"))(
        params, cache)
    return shapes_in_jaxpr(jaxpr.jaxpr)

  def shapes(impl):
    return {sh for sh in all_shapes(impl) if len(sh) >= 2 and sh[-1] == 64 and sh[-2] == 1}

  row = (4, c.num_kv_heads, g, 1, 64)  # (B, K, G, 1, S) float32 scores
  assert row in shapes("xla")
  assert {sh for sh in shapes("xla") if len(sh) == 5} <= {row, (4, 1, 1, 1, 64)}  # and the mask
  assert not {sh for sh in shapes("chunked") if len(sh) == 5}
  # nor a copy of one layer's keys/values out of the stacked cache (which "xla" takes)
  layer_kv = (4, 64, c.num_kv_heads, c.head_dim)
  assert layer_kv in all_shapes("xla") and layer_kv not in all_shapes("chunked")


def test_auto_picks_a_cpu_implementation():
  """The crossovers of `choose_impl` on CPU, and "auto" (the default) is what the model runs."""
  assert jax.default_backend() == "cpu"
  assert eem.ModelConfig.preset("tiny").llm.attention_impl == "auto"
  sds = lambda n, heads: jax.ShapeDtypeStruct((1, n, heads, 16), jnp.float32)
  few, long = sds(8, 4), sds(4096, 2)
  seq = kernels_lib.AUTO_BLOCKED_MIN_QUERIES + 1
  choose = kernels_lib.choose_impl
  assert choose(few, sds(64, 2), None) == "xla"  # a short prompt, a decode step on a short cache
  assert choose(few, long, None, stacked=True) == "chunked"  # a decode step on a long cache, read in place
  assert choose(few, long, None) == "blocked"  # composite's text queries over a long [visual; text]
  assert choose(sds(seq, 4), sds(seq, 2), None, same_tokens=True) == "blocked"  # self-mode prefill
  assert choose(sds(seq - 1, 4), sds(seq - 1, 2), None, same_tokens=True) == "xla"
  assert choose(sds(seq, 4), sds(seq, 2), None, same_tokens=True, causal=False) == "blocked"  # the tower
  cfg = config("auto", "self")
  batch = make_batch(cfg, MIXED_PLANS)
  params = init_params(cfg)
  np.testing.assert_array_equal(np.asarray(forward(cfg, params, batch)),
                                np.asarray(forward(config("xla", "self"), params, batch)))


def self_attention_case(seed=0, b=3, s=37, n=4, kv=2, h=16):
  """Self-attention over rows whose memory order is not position order (a visual stream
  first, text before and after it), with padding (position 0, invalid) in the middle and at
  the end: valid positions distinct, as the batch contract has them."""
  rng = np.random.default_rng(seed)
  q = rng.standard_normal((b, s, n, h)).astype(np.float32)
  k, v = (rng.standard_normal((b, s, kv, h)).astype(np.float32) for _ in range(2))
  pos = np.stack([rng.permutation(s) for _ in range(b)]).astype(np.int32)
  valid = rng.random((b, s)) > 0.2
  valid[0] = True  # one row without padding
  pos = np.where(valid, pos, 0)
  return q, k, v, pos, valid


def float64_attention(q, k, v, q_pos, k_pos, k_valid):
  g = q.shape[2] // k.shape[2]
  k, v = (np.repeat(np.asarray(x, np.float64), g, axis=2) for x in (k, v))
  s = np.einsum("bqnh,bsnh->bnqs", np.asarray(q, np.float64), k) / np.sqrt(q.shape[-1])
  mask = (k_valid[:, None, :] & (k_pos[:, None, :] <= q_pos[:, :, None]))[:, None]
  w = np.where(mask, np.exp(s - np.max(np.where(mask, s, -np.inf), -1, keepdims=True)), 0.0)
  return np.einsum("bnqs,bsnh->bqnh", w / w.sum(-1, keepdims=True), v)


@pytest.mark.parametrize("block", [8, 37, 64])
def test_blocked_self_attention_equals_float64_reference(block):
  """Values against float64 and gradients against "xla", on valid rows (padding rows are
  finite and ignored by callers), for blocks that split the row unevenly, exactly, and not at
  all."""
  q, k, v, pos, valid = self_attention_case()
  run = lambda impl: lambda q, k, v: kernels_lib.attend(q, k, v, pos, pos, valid, impl=impl, block=block,
                                                        same_tokens=True)
  out = np.asarray(jax.jit(run("blocked"))(q, k, v))
  assert np.all(np.isfinite(out))
  with np.errstate(invalid="ignore"):  # a padding query may see no key at all: NaN in the reference
    want = float64_attention(q, k, v, pos, pos, valid)[valid]
  np.testing.assert_allclose(out[valid], want, rtol=0, atol=1e-5 * np.max(np.abs(want)))
  # Gradients of a loss over valid rows only; against the dense reference implementation.
  w = np.random.default_rng(1).standard_normal(out.shape).astype(np.float32) * valid[..., None, None]
  grads = {impl: jax.grad(lambda *x: jnp.sum(run(impl)(*x) * w), argnums=(0, 1, 2))(q, k, v)
           for impl in ("xla", "blocked")}
  for got, ref in zip(grads["blocked"], grads["xla"]):
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=0, atol=1e-5 * np.max(np.abs(ref)))


def test_blocked_reads_keys_up_to_each_query_block():
  """In self-attention, query block i's scores span keys [0, (i + 1) * block): the set of
  score widths is exactly those prefix lengths, so about half of the (Q, S) block is computed.
  Without `same_tokens` (queries that are not the keys) every block spans all S keys."""
  q, k, v, pos, valid = self_attention_case(s=37, h=6)
  block, g = 8, q.shape[2] // k.shape[2]

  def widths(same_tokens):
    jaxpr = jax.make_jaxpr(lambda q, k, v: kernels_lib.attend(q, k, v, pos, pos, valid, impl="blocked", block=block,
                                                               same_tokens=same_tokens))(q, k, v)
    return {sh[-1] for sh in shapes_in_jaxpr(jaxpr.jaxpr) if len(sh) == 5 and sh[3] == g and sh[2] <= block
            and sh[-1] not in (1, 6)}  # not the row maxima/sums, nor q

  assert widths(True) == {8, 16, 24, 32, 37}
  assert widths(False) == {37}


def test_fully_masked_rows_are_finite_with_finite_gradients():
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.standard_normal((1, 3, 4, 16)), jnp.float32)
  k, v = (jnp.asarray(rng.standard_normal((1, 20, 2, 16)), jnp.float32) for _ in range(2))
  q_pos = jnp.asarray([[-1, 5, 30]])  # the first query sees no key
  k_pos, k_valid = jnp.arange(20)[None], jnp.ones((1, 20), bool)
  f = lambda q, k, v: jnp.sum(kernels_lib.attend(q, k, v, q_pos, k_pos, k_valid, impl="chunked", block=BLOCK))
  out = kernels_lib.attend(q, k, v, q_pos, k_pos, k_valid, impl="chunked", block=BLOCK)
  np.testing.assert_array_equal(np.asarray(out[0, 0]), 0.0)
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.grad(f, argnums=(0, 1, 2))(q, k, v))


def test_config_round_trip_and_validation():
  cfg = config("chunked")
  assert eem.ModelConfig.from_dict(cfg.to_dict()) == cfg
  assert (cfg.llm.attention_impl, cfg.vision.attention_block) == ("chunked", BLOCK)
  with pytest.raises(ValueError, match="attention_impl"):
    cfg.llm.replace(attention_impl="flash")
  with pytest.raises(ValueError, match="attention_block"):
    cfg.vision.replace(attention_block=0)


def test_aligner_without_grouping_projects_directly():
  """G = 1 (multi-head attention): `repeated_input` is the projection itself, with no reshaped
  or summed copy of the kernel; G > 1 folds it, under a checkpoint."""
  x = jnp.ones((2, 3, 4, 8))
  for repeats, folds in [(1, False), (2, True)]:
    lin = Linear((4 * repeats, 8), (16,), ("heads", "head_dim", "embed"))
    params = lin.init(jax.random.key(0), jnp.ones((2, 3, 4 * repeats, 8)))
    jaxpr = jax.make_jaxpr(lambda p: lin.apply(p, x, repeats, method="repeated_input"))(params)
    assert ("reduce_sum" in str(jaxpr)) == folds
    # the fold is recomputed in the backward pass rather than saved as a residual
    assert ({e.primitive.name for e in jaxpr.jaxpr.eqns} == {"remat2"}) == folds
    want = lin.apply(params, jnp.repeat(x, repeats, axis=2))
    np.testing.assert_allclose(lin.apply(params, x, repeats, method="repeated_input"), want, rtol=1e-6)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("new_queries_only", [False, True])
def test_block_pairs_to_skip_are_those_whose_mask_allows_nothing(causal, new_queries_only):
  """The chunked kernel decides which (query block, key block) pairs to skip before its loops:
  exactly the pairs whose `_block_mask` is all False (shifted last blocks, pads, unsorted
  positions), the forward's and the backward's (new queries only)."""
  rng = np.random.default_rng(1)
  nq, s, blk = 21, 27, 8  # neither a multiple of the block: both last blocks shifted
  q_pos = jnp.asarray(rng.integers(0, 40, (3, nq))) if causal else None
  k_pos = jnp.asarray(rng.integers(10, 60, (3, s)))
  k_valid = jnp.asarray(rng.random((3, s)) < 0.3).at[:, 8:16].set(False)  # key block 1: all pads
  qblk, nqb, kblk, nkb = chunked_lib._blocks(jnp.zeros((3, nq)), jnp.zeros((3, s, 1, 1)), blk)
  table = chunked_lib._pairs_allowed(q_pos, k_pos, k_valid, nq, s, qblk, nqb, kblk, nkb, new_queries_only)
  for qi in range(nqb):
    for ki in range(nkb):
      mask, _, _, q_new = chunked_lib._block_mask(qi, qblk, ki, kblk, nq, s, q_pos, k_pos, k_valid)
      if new_queries_only:
        mask = mask & q_new[:, None]
      assert bool(table[qi, ki]) == bool(jnp.any(mask)), (qi, ki)
  assert not bool(jnp.all(table))  # guard: some pair is skipped


def test_chunked_under_a_batch_sharded_mask_reduces_outside_its_loops():
  """Which block pairs to skip is one reduction over the batch before the loops, not one
  `jnp.any(mask)` per pair: with the batch sharded over devices, no all-reduce runs per pair."""
  mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
  sharded = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, P("data")))
  q, k = sharded((8, 64, 4, 16), jnp.float32), sharded((8, 64, 2, 16), jnp.float32)
  pos, valid = sharded((8, 64), jnp.int32), sharded((8, 64), bool)
  loss = lambda q, k, v, p, m: jnp.sum(kernels_lib.attend(q, k, v, p, p, m, impl="chunked", block=16))
  hlo = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, k, k, pos, valid).compile().as_text()
  reduces = [line for line in hlo.splitlines() if " all-reduce(" in line or " all-reduce-start(" in line]
  assert reduces  # guard: the table's reduction over the sharded batch is there
  assert not [line for line in reduces if "while/body" in line], reduces
