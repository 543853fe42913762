"""Checkpoints carry their config: the directory alone rebuilds the model and its tokenizer, a
checkpoint of another model is refused naming the fields; the trainer reads its records once."""

import logging
import os
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from ml_collections import config_dict

from conftest import ROOT, TINY_RUN_STEPS, demo_config
from ee_mllm_jax import data as data_lib
from ee_mllm_jax import experiment
from ee_mllm_jax import loading
from ee_mllm_jax.batch import from_plans
from ee_mllm_jax.train import checkpoint as ckpt_lib
from models import forward, init_params

STEPS = TINY_RUN_STEPS


@pytest.fixture(scope="module")
def run(tiny_run):
  """One short in-process training run (conftest's, shared with the reliability tests); counts how
  often each records file is parsed."""
  return tiny_run


@pytest.mark.slow  # reads conftest's tiny training run
def test_the_trainer_sets_its_mesh_for_the_run_only(run):
  assert jax.sharding.get_abstract_mesh().empty


@pytest.mark.slow  # reads conftest's tiny training run
def test_the_train_records_are_parsed_once(run):
  *_, calls = run
  assert calls.count("train.json") == 1, calls


@pytest.mark.slow  # reads conftest's tiny training run
def test_a_checkpoint_directory_alone_rebuilds_its_model_and_tokenizer(run, tiny_dataset):
  config, workdir, summary, _ = run
  cfg, params = loading.load_model(workdir)  # the workdir; its checkpoints/ or one step work too
  want_cfg = experiment.model_config(config)
  assert cfg == want_cfg and cfg.attention == "composite"
  step_dir = os.path.join(workdir, "checkpoints", str(STEPS))
  assert loading.resolve_step_dir(workdir) == step_dir
  raw = ocp.PyTreeCheckpointer().restore(os.path.join(step_dir, "state"))["params"]  # no target: as saved
  assert jax.tree.structure(params) == jax.tree.structure(raw)
  for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(raw)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  logits = forward(cfg, params, from_plans(cfg, [[2, "img", 5]]))
  assert np.isfinite(np.asarray(logits)).all()

  run_config = loading.read_run_config(step_dir)
  assert run_config["data"]["template"] == "chatml" and run_config["experiment"]["steps"] == STEPS
  text = "<|im_start|>user\nWhat colour is the square?<|im_end|>"
  with open(os.path.join(tiny_dataset, "tokenizer.json")) as f:
    assert loading.load_tokenizer(step_dir).to_str() == data_lib.load_tokenizer(f.name).to_str()
  assert loading.load_tokenizer(workdir).encode(text).ids == data_lib.load_tokenizer(
      os.path.join(tiny_dataset, "tokenizer.json")).encode(text).ids
  # EE-MLLM-F style: the same weights, another mode
  assert loading.load_model(workdir, attention="self")[0].attention == "self"


@pytest.mark.slow  # reads conftest's tiny training run
def test_loading_a_model_for_inference_imports_no_grain(run):
  """eval.py's modules and `loading` load a checkpoint without the data pipeline (a fresh
  process: this one has imported Grain for the trainer)."""
  _, workdir, *_ = run
  code = ("import sys; from ee_mllm_jax import loading; from ee_mllm_jax.evaluation import cli, model; "
          f"m = model.from_checkpoint({workdir!r}); loading.load_model({workdir!r}); "
          "print(sorted(k for k in sys.modules if k == 'grain' or k.startswith('grain.')))")
  done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                        env=dict(os.environ, PYTHONPATH=ROOT))
  assert done.returncode == 0, done.stderr[-3000:]
  assert done.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.slow  # reads conftest's tiny training run
def test_restoring_a_checkpoint_of_another_model_names_the_fields(run, caplog):
  config, workdir, *_ = run
  cfg = experiment.model_config(config)
  deeper = cfg.replace(llm=cfg.llm.replace(depth=3, rope_theta=5e5))
  checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"))
  with pytest.raises(loading.ConfigMismatchError,
                     match=r"holds a different model \(llm.depth: checkpoint 2 vs run 3, "
                           r"llm.rope_theta: checkpoint 10000.0 vs run 500000.0\)"):
    checkpointer.restore(STEPS, None, model_config=deeper)
  with pytest.raises(loading.ConfigMismatchError, match=r"init_from .* \(llm.depth: checkpoint 2 vs run 3"):
    loading.load_pretrained(config_dict.ConfigDict(dict(path=workdir, kind="orbax")), deeper, None)
  # a mode switch on the same weights is allowed, and said
  with caplog.at_level(logging.WARNING):
    loading.check_model_config(cfg, cfg.replace(attention="self", remat="full"), "ckpt")
  assert "ckpt was trained in mode {'attention': 'composite', 'visual_ffn': False, 'composite_from_layer': 0}; " \
         "running it as self (LLaVA)" in caplog.text


def test_checkpoints_without_a_recorded_config_still_load_their_parameters(tmp_path):
  """Checkpoints written before checkpoints carried a config: parameters still load."""
  cfg = experiment.model_config(demo_config())
  cfg = cfg.replace(vision=cfg.vision.replace(depth=1), llm=cfg.llm.replace(depth=1))
  params = init_params(cfg)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(str(tmp_path / "params"), params)
  checkpointer.wait_until_finished()
  assert loading.read_run_config(str(tmp_path / "params")) is None
  with pytest.raises(ValueError, match="records no model config"):
    loading.load_model(str(tmp_path / "params"))
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), params)
  loaded = loading.load_params(str(tmp_path / "params"), abstract)
  for x, y in zip(jax.tree.leaves(loaded), jax.tree.leaves(params)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
