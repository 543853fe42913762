"""LoRA as a setting of the model and the trainer, and frozen parameters held in the compute dtype.

* Adapters with B = 0 (their init) leave every mode's logits bit-identical; trained adapters merged
  into the kernels (`lora.merge`) give the adapted model's logits, in JAX, in transformers (self)
  and in our PyTorch composite class (composite: the aligner reuses the adapted v_proj / o_proj).
* A LoRA step changes the adapters and the projector only; the projector's own learning rate
  scales its update; frozen parameters sit in the compute dtype and stay bit-identical.
* Holding the frozen parameters in bf16 trains exactly as holding their bf16 rounding in float32.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ee_mllm_jax as eem
from batches import make_batch
from ee_mllm_jax import lora, sharding
from ee_mllm_jax import params as params_lib
from ee_mllm_jax.config import LoRA
from ee_mllm_jax.train.state import (OptimConfig, create_sharded_state, make_init_fn, make_optimizer, merge_params,
                                     split_params)
from ee_mllm_jax.train.step import make_train_step
from models import forward

BASE = eem.ModelConfig.preset("tiny")
ADAPTERS = LoRA(rank=4, alpha=8.0)
MODES = {"self": dict(attention="self"), "composite": dict(attention="composite", visual_ffn=False),
         "cross": dict(attention="cross", cross_every=1)}
PLANS = [[3, "img", 5], [2, "img", 7], [9], ["img", 4]]


def with_lora(cfg, adapters=ADAPTERS):
  return cfg.replace(llm=cfg.llm.replace(lora=adapters))


def _batch(cfg, seed=0):
  batch = make_batch(cfg, PLANS, max_images=1, seed=seed)
  rng = np.random.default_rng(seed + 1)
  labels = rng.integers(0, cfg.llm.vocab_size, batch["labels"].shape).astype(np.int32)
  batch["labels"] = np.where(batch["text_valid"] & (rng.random(labels.shape) < 0.7), labels, -100)
  return batch


def _random_b(params, seed=1, scale=0.3):
  """The adapters' B (zero at init) set to random values: adapters that have trained."""
  flat, key = params_lib.flatten(params), jax.random.key(seed)
  for path in sorted(flat):
    if path.endswith("/lora_b"):
      key, sub = jax.random.split(key)
      flat[path] = scale * jax.random.normal(sub, flat[path].shape, flat[path].dtype)
  return params_lib.unflatten(flat)


def _init(cfg):
  from flax import linen as nn  # pylint: disable=g-import-not-at-top
  return nn.meta.unbox(eem.EEMLLM(cfg).init(jax.random.key(0), **eem.batch.example(cfg))["params"])


def _assert_logits_close(got, want, batch):
  """To float32 rounding of reassociated sums: merging moves `scale * (x A) B` into `x (W + scale A B)`;
  each logit sums a few hundred products per layer, so 1e-5 of the logits' scale bounds it."""
  got, want = np.asarray(got), np.asarray(want)
  mask = np.asarray(batch["text_valid"])
  assert np.max(np.abs(got - want)[mask]) <= 1e-5 * np.max(np.abs(want[mask]))


@pytest.mark.parametrize("mode", list(MODES))
def test_zero_b_is_the_base_model_and_merged_adapters_are_the_adapted_one(mode):
  base_cfg = BASE.replace(**MODES[mode])
  cfg = with_lora(base_cfg)
  params = _init(cfg)
  adapted = sorted(lora.adapters(params))
  expected = {f"llm/layers/{m}" for m in ("self_attn/q_proj", "self_attn/k_proj", "self_attn/v_proj",
                                           "self_attn/o_proj", "mlp/gate_proj", "mlp/up_proj", "mlp/down_proj")}
  if mode == "cross":
    expected |= {f"llm/cross/{m}" for m in ("q_proj", "k_proj", "v_proj", "o_proj", "ffn/up_proj", "ffn/down_proj")}
  assert set(adapted) == expected  # every decoder projection but lm_head, stacked over layers
  a, b = lora.adapters(params)["llm/layers/self_attn/o_proj"]
  assert a.shape == (BASE.llm.depth, BASE.llm.num_heads, BASE.llm.head_dim, 4) and b.shape == (BASE.llm.depth, 4, 64)

  batch = _batch(cfg)
  base_logits = forward(base_cfg, lora.merge(params, ADAPTERS.scale), batch)
  np.testing.assert_array_equal(forward(cfg, params, batch), base_logits)  # B = 0: exactly the base

  trained = _random_b(params)
  adapted_logits = forward(cfg, trained, batch)
  assert np.max(np.abs(np.asarray(adapted_logits) - np.asarray(base_logits))) > 0.1  # the adapters act
  _assert_logits_close(forward(base_cfg, lora.merge(trained, ADAPTERS.scale), batch), adapted_logits, batch)


def test_adapters_without_a_lora_config_are_refused_by_name():
  params = _init(with_lora(BASE))
  with pytest.raises(ValueError, match="_proj holds LoRA adapters but the config has no `lora`"):
    forward(BASE, params, _batch(BASE))


@functools.cache
def _setup(cfg, trainable, lr=1e-2, groups=()):
  mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  model = eem.EEMLLM(cfg)
  tx, schedule = make_optimizer(OptimConfig(learning_rate=lr, total_steps=10, warmup_steps=0, trainable=trainable,
                                            group_learning_rates=groups))
  init, shardings, _ = create_sharded_state(make_init_fn(model, tx, trainable), mesh)
  step = jax.jit(make_train_step(model, tx, schedule, trainable), donate_argnums=0)
  return init, step


def _train(cfg, trainable, steps=2, **kw):
  init, step = _setup(cfg, trainable, **kw)
  state = init()
  before = jax.device_get(state["params"])
  for i in range(steps):
    state, metrics = step(state, _batch(cfg, i))
    assert bool(metrics["applied"])
  return before, jax.device_get(state)


def test_a_lora_step_trains_the_adapters_and_the_projector_only():
  cfg = with_lora(BASE.replace(attention="composite", visual_ffn=False, dtype="bfloat16"))
  before, state = _train(cfg, lora.TRAINABLE)
  flat_before, flat_after = params_lib.flatten(before), params_lib.flatten(state["params"])
  trained = {k for k in flat_before if lora.is_adapter(k) or k.startswith("projector/")}
  for k, x in flat_before.items():
    if k in trained:
      assert x.dtype == jnp.float32 and not np.array_equal(x, flat_after[k]), k
    else:  # the frozen base: held in the compute dtype, unchanged to the bit
      assert x.dtype == jnp.bfloat16, k
      np.testing.assert_array_equal(x, flat_after[k], err_msg=k)
  moments = [x for x in jax.tree.leaves(state["opt_state"]) if x.ndim > 0]
  assert len(moments) == 2 * len(trained)  # Adam's mu and nu for the trained parameters only


def test_the_projector_group_trains_at_its_own_learning_rate():
  """AdamW's first step moves each element by about lr: the projector's update at rate 1e-3 is
  a tenth of its update at the base rate 1e-2, and the adapters' updates are the same bits."""
  cfg = with_lora(BASE.replace(attention="composite", visual_ffn=False))
  before, one_rate = _train(cfg, lora.TRAINABLE, steps=1)
  _, grouped = _train(cfg, lora.TRAINABLE, steps=1, groups=(("projector/", 1e-3),))
  start, plain, own = (params_lib.flatten(t) for t in (before, one_rate["params"], grouped["params"]))
  for k in start:
    if k.startswith("projector/"):
      np.testing.assert_allclose(own[k] - start[k], 0.1 * (plain[k] - start[k]), rtol=1e-3, atol=1e-9, err_msg=k)
    else:
      np.testing.assert_array_equal(own[k], plain[k], err_msg=k)


@pytest.mark.parametrize("mode", list(MODES))
def test_frozen_parameters_in_bf16_train_as_their_bf16_rounding_in_float32(mode):
  """The trainable parameters' trajectory is the one of a state whose frozen parameters hold the
  same (bf16-rounded) values in float32, bit for bit: the model computes in bf16 either way."""
  cfg = BASE.replace(dtype="bfloat16", **MODES[mode])
  trainable = "projector/|llm/layers/mlp/" if mode != "cross" else "llm/cross/|resampler/"
  init, step = _setup(cfg, trainable)
  state = init()
  train, frozen = split_params(jax.device_get(state["params"]), trainable)
  assert {x.dtype for x in jax.tree.leaves(frozen)} == {jnp.dtype(jnp.bfloat16)}
  as_f32 = jax.tree.map(lambda x: np.asarray(x, np.float32), frozen)
  reference = dict(jax.device_get(state), params=merge_params(train, as_f32))
  plain_step = jax.jit(make_train_step(eem.EEMLLM(cfg), *make_optimizer(
      OptimConfig(learning_rate=1e-2, total_steps=10, warmup_steps=0, trainable=trainable)), trainable))
  for i in range(3):
    state, m = step(state, _batch(cfg, i))
    reference, m_ref = plain_step(reference, _batch(cfg, i))
    assert float(m["loss"]) == float(m_ref["loss"])
  got = split_params(jax.device_get(state["params"]), trainable)
  want = split_params(jax.device_get(reference["params"]), trainable)
  jax.tree.map(np.testing.assert_array_equal, got[0], want[0])  # the trajectory: bit for bit
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x, np.float32), y), got[1], as_f32)



@pytest.mark.slow
def test_merged_adapters_equal_the_adapted_model_in_transformers_and_the_torch_composite_class(tmp_path):
  """A tiny LLaVA (CLIP + LLaMA, GQA) with trained adapters: its merged weights, written in the
  HF layout export uses, give transformers (self) and our PyTorch class (composite) the adapted
  JAX model's logits on LLaVA's processor inputs."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  import shutil  # pylint: disable=g-import-not-at-top
  from ee_mllm_jax.convert import load_hf_llava, safetensors_io  # pylint: disable=g-import-not-at-top
  from ee_mllm_jax.convert.export import planned_tensors  # pylint: disable=g-import-not-at-top
  from ee_mllm_jax.torch import EEMLLMForConditionalGeneration  # pylint: disable=g-import-not-at-top
  from test_torch_composite import jax_batch, processor_inputs  # pylint: disable=g-import-not-at-top
  from test_vs_hf import tiny_hf_llava  # pylint: disable=g-import-not-at-top

  base_dir, merged_dir = tmp_path / "base", tmp_path / "merged"
  tiny_hf_llava("clip-llama").save_pretrained(base_dir)
  cfg, base = load_hf_llava(str(base_dir))
  params, _ = params_lib.overlay(_init(with_lora(cfg)), base)
  params = _random_b(params, scale=0.2)
  merged_dir.mkdir()
  safetensors_io.write_checkpoint(str(merged_dir), planned_tensors(cfg, lora.merge(params, ADAPTERS.scale)))
  shutil.copy(base_dir / "config.json", merged_dir / "config.json")

  hf = transformers.LlavaForConditionalGeneration.from_pretrained(merged_dir).eval()
  composite = EEMLLMForConditionalGeneration.from_pretrained(merged_dir, attention="composite", visual_ffn=False).eval()
  inputs = processor_inputs(hf.config, tmp_path)
  batch, text = jax_batch(inputs, cfg.tokens_per_image)
  for model, mode in ((hf, dict(attention="self")), (composite, dict(attention="composite", visual_ffn=False))):
    with torch.no_grad():
      want = model(**inputs).logits.numpy()
    adapted = with_lora(cfg.replace(**mode))
    got, unadapted = np.asarray(forward(adapted, params, batch)), np.asarray(forward(adapted, base_with_zero_b(params),
                                                                                      batch))
    for row in range(want.shape[0]):
      n = int(text[row].sum())
      scale = np.max(np.abs(want[row, text[row]]))
      assert np.max(np.abs(got[row, :n] - want[row, text[row]])) < 1e-4 * scale, (mode, row)
      assert np.max(np.abs(unadapted[row, :n] - want[row, text[row]])) > 1e-2 * scale  # the adapters matter


def base_with_zero_b(params):
  return jax.tree_util.tree_map_with_path(
      lambda path, x: jnp.zeros_like(x) if jax.tree_util.keystr(path).endswith("['lora_b']") else x, params)


@pytest.mark.slow
def test_a_lora_run_trains_exports_merged_and_reloads(tiny_dataset, tmp_path):
  """train.py's loop with LoRA (dropout on, the projector at its own rate) on the tiny preset: the
  checkpoint holds the adapters beside the frozen base (bf16 here), eval's loader reads them, and
  export writes the merged plain model, which loads back as `lora.merge` of the trained parameters."""
  from conftest import tiny_config  # pylint: disable=g-import-not-at-top
  from ee_mllm_jax import loading  # pylint: disable=g-import-not-at-top
  from ee_mllm_jax.convert import export as export_lib, load_hf_llava  # pylint: disable=g-import-not-at-top
  from ee_mllm_jax.train import loop  # pylint: disable=g-import-not-at-top
  workdir, out = str(tmp_path / "run"), str(tmp_path / "hf")
  config = tiny_config(tiny_dataset, workdir, 3, **{
      "model.attention": "self", "model.dtype": "bfloat16", "model.llm.lora.rank": 4,
      "model.llm.lora.dropout": 0.1, "optim.trainable": lora.TRAINABLE,
      "optim.group_learning_rates": (("projector/", 1e-4),)})
  loop.train(config)
  cfg, params = loading.load_model(workdir)
  assert cfg.llm.lora == LoRA(rank=4, dropout=0.1)
  assert any(np.any(np.asarray(b) != 0) for _, b in lora.adapters(params).values())  # B has trained
  export_lib.main(["--checkpoint", workdir, "--out", out])
  exported_cfg, exported = load_hf_llava(out)
  assert exported_cfg.llm.lora is None
  merged = params_lib.flatten(lora.merge(params, cfg.llm.lora.scale))
  assert set(params_lib.flatten(exported)) == set(merged)
  for k, v in params_lib.flatten(exported).items():
    np.testing.assert_array_equal(np.asarray(v), np.asarray(merged[k], np.float32), err_msg=k)
  # PEFT's own reading of the adapter directory over the unmerged base merges to the same weights.
  peft = pytest.importorskip("peft")
  transformers = pytest.importorskip("transformers")
  base_dir, adapter_dir = str(tmp_path / "base"), str(tmp_path / "adapter")
  export_lib.main(["--checkpoint", workdir, "--out", base_dir, "--peft", adapter_dir])
  base_cfg, base = load_hf_llava(base_dir)
  assert base_cfg.llm.lora is None
  unmerged = params_lib.flatten(lora.without_adapters(params))
  for k, v in params_lib.flatten(base).items():
    np.testing.assert_array_equal(np.asarray(v), np.asarray(unmerged[k], np.float32), err_msg=k)
  model = peft.PeftModel.from_pretrained(transformers.LlavaForConditionalGeneration.from_pretrained(base_dir),
                                         adapter_dir).merge_and_unload()
  want = transformers.LlavaForConditionalGeneration.from_pretrained(out).state_dict()
  got = model.state_dict()
  assert set(got) == set(want)
  for k, v in want.items():
    scale = max(float(v.abs().max()), 1e-6)
    assert float((got[k] - v).abs().max()) <= 1e-6 * scale, k


def test_group_dtypes_round_trip_through_orbax_and_an_older_float32_checkpoint_restores_cast(tmp_path):
  from ee_mllm_jax.train import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  cfg, trainable = with_lora(BASE.replace(dtype="bfloat16")), lora.TRAINABLE
  mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  tx = make_optimizer(OptimConfig(total_steps=10, trainable=trainable))[0]
  init, _, abstract = create_sharded_state(make_init_fn(eem.EEMLLM(cfg), tx, trainable), mesh)
  state = init()
  expected = jax.device_get(state)
  dtypes = lambda tree: {k: v.dtype for k, v in params_lib.flatten(tree).items()}
  assert {v for k, v in dtypes(expected["params"]).items() if lora.is_adapter(k)} == {jnp.dtype(jnp.float32)}
  checkpointer = ckpt_lib.Checkpointer(str(tmp_path / "now"), keep=1)
  checkpointer.save(1, state, force=True)
  checkpointer.wait()
  restored = jax.device_get(checkpointer.restore(1, abstract))
  assert dtypes(restored["params"]) == dtypes(expected["params"])
  jax.tree.map(np.testing.assert_array_equal, restored, expected)

  # A checkpoint written before frozen parameters were held in bf16 (everything float32).
  older = dict(expected, params=jax.tree.map(lambda x: np.asarray(x, np.float32), expected["params"]))
  older["params"] = params_lib.unflatten({k: (v + np.float32(1e-3) if not lora.is_adapter(k) else v)
                                          for k, v in params_lib.flatten(older["params"]).items()})
  checkpointer = ckpt_lib.Checkpointer(str(tmp_path / "older"), keep=1)
  checkpointer.save(1, jax.tree.map(jnp.asarray, older), force=True)
  checkpointer.wait()
  restored = jax.device_get(checkpointer.restore(1, abstract))
  assert dtypes(restored["params"]) == dtypes(expected["params"])
  for k, v in params_lib.flatten(restored["params"]).items():
    want = params_lib.flatten(older["params"])[k]
    np.testing.assert_array_equal(v, want.astype(v.dtype), err_msg=k)


@pytest.mark.slow
def test_the_llava_lora_recipe_trains_the_tiny_preset(tiny_dataset, tmp_path):
  """configs/llava15_7b_lora.py as published (rank 128, alpha 256, dropout 0.05, lr 2e-4, projector
  2e-5, bf16, remat), only shrunk to the tiny preset and the synthetic set, trains end to end."""
  import json  # pylint: disable=g-import-not-at-top
  from conftest import ROOT, TINY_DATA, logged_losses, set_overrides, tiny_overrides  # pylint: disable=g-import-not-at-top
  from ee_mllm_jax import experiment, loading  # pylint: disable=g-import-not-at-top
  from ee_mllm_jax.train import loop  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, ROOT)  # the recipe imports configs.*
  config = experiment.load_config_file(os.path.join(ROOT, "configs", "llava15_7b_lora.py"))
  set_overrides(config, {**tiny_overrides(tiny_dataset, str(tmp_path), 2), "init_from.path": "", "steps": 2,
                         "data.tokenizer_file": "", "data.worker_count": 0, "data.buckets": (128,)})
  assert config.model.llm.lora.rank == 128 and config.optim.group_learning_rates == (("projector/", 2e-5),)
  loop.train(config)
  cfg, params = loading.load_model(str(tmp_path))
  assert cfg.llm.lora == LoRA(rank=128, alpha=256.0, dropout=0.05) and cfg.dtype == "bfloat16"
  assert TINY_DATA["vocab_size"] == cfg.llm.vocab_size
  assert logged_losses(str(tmp_path)).keys() == {1, 2}
  with open(os.path.join(str(tmp_path), "metrics.jsonl")) as f:
    assert all(json.loads(line).get("applied", 1.0) == 1.0 for line in f)  # every row fits: both steps train
  assert any(np.any(np.asarray(b) != 0) for _, b in lora.adapters(params).values())
