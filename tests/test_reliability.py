"""Training that never lies, in-process runs of the trainer: a damaged checkpoint falls back to
the previous one, a diverged run stops (or skips, counted) and never saves non-finite values,
and every bad setting is refused in one line naming the field."""

import glob
import logging
import os
import shutil

import jax
import pytest
from ml_collections import config_dict

from conftest import logged_losses, tiny_config
from ee_mllm_jax import experiment
from ee_mllm_jax.train import checkpoint as ckpt_lib
from ee_mllm_jax.train import loop

STEPS = 4


def tiny_run_config(dataset, workdir, steps=STEPS, **overrides):
  return tiny_config(dataset, workdir, steps, **{"checkpoint.keep": 3, **overrides})


def train(config):
  try:
    return loop.train(config)
  finally:
    jax.set_mesh(None)  # the trainer sets its mesh for the process


@pytest.fixture(scope="module")
def finished(tiny_dataset, tmp_path_factory):
  """A 4-step run with checkpoints 2, 3, 4 and its per-step losses."""
  workdir = str(tmp_path_factory.mktemp("finished"))
  train(tiny_run_config(tiny_dataset, workdir))
  return workdir, logged_losses(workdir)


def largest_data_file(step_dir):
  files = glob.glob(os.path.join(step_dir, "state", "ocdbt.process_0", "d", "*"))
  return max(files, key=os.path.getsize)


def flip_bytes(step_dir):
  for path in glob.glob(os.path.join(step_dir, "state", "ocdbt.process_0", "d", "*")):
    if os.path.getsize(path) > 4096:  # the array data (parameters, optimizer moments)
      with open(path, "r+b") as f:  # 64 bytes at a quarter, half and three quarters; the size unchanged
        for at in (1, 2, 3):
          f.seek(os.path.getsize(path) * at // 4)
          f.write(b"\xff" * 64)


def truncate(step_dir):
  path = largest_data_file(step_dir)
  os.truncate(path, os.path.getsize(path) // 2)


DAMAGE = {
    "flipped bytes": flip_bytes,
    "truncated data file": truncate,
    "no _METADATA": lambda d: os.remove(os.path.join(d, "state", "_METADATA")),
    "no state item": lambda d: shutil.rmtree(os.path.join(d, "state")),
    "no data item": lambda d: shutil.rmtree(os.path.join(d, "data")),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_checkpoint_is_reported_and_the_previous_one_resumes(finished, tiny_dataset, tmp_path, damage,
                                                                        caplog):
  source, want = finished
  workdir = str(tmp_path / "run")
  shutil.copytree(source, workdir)
  ckpt_dir = os.path.join(workdir, "checkpoints")
  DAMAGE[damage](os.path.join(ckpt_dir, str(STEPS)))
  with caplog.at_level(logging.WARNING):
    summary = train(tiny_run_config(tiny_dataset, workdir))
  assert f"Checkpoint {ckpt_dir}/{STEPS} cannot be restored" in caplog.text
  assert f"Resuming from {ckpt_dir}/{STEPS - 1}, the newest checkpoint that restores" in caplog.text
  assert os.path.isdir(os.path.join(ckpt_dir, "damaged", str(STEPS)))  # kept for inspection
  assert summary["step"] == STEPS and not summary["stopped_early"]
  assert logged_losses(workdir) == want  # step 4 redone from step 3, bit-identical; each step logged once


def test_when_no_checkpoint_restores_the_run_fails_naming_each(finished, tiny_dataset, tmp_path):
  source, _ = finished
  workdir = str(tmp_path / "run")
  shutil.copytree(source, workdir)
  for step in (2, 3, 4):
    os.remove(os.path.join(workdir, "checkpoints", str(step), "state", "_METADATA"))
  with pytest.raises(RuntimeError, match=r"no checkpoint in .* restores: 4 \(.*\); 3 \(.*\); 2 \("):
    train(tiny_run_config(tiny_dataset, workdir))


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_a_diverging_run_stops_or_skips_and_never_saves_non_finite_values(tiny_dataset, tmp_path, policy):
  workdir = str(tmp_path / "run")
  config = tiny_run_config(tiny_dataset, workdir, **{"optim.learning_rate": 1e30, "optim.clip_norm": 0.0,
                                                 "on_nonfinite": policy})
  if policy == "stop":
    with pytest.raises(loop.NonFiniteError, match=r"step \d: non-finite loss .* its update was not applied"):
      train(config)
  else:
    summary = train(config)
    skipped = summary["skipped"]["updates skipped: non-finite loss or gradient"]
    assert 1 <= skipped < STEPS and summary["step"] == STEPS
  saved = glob.glob(os.path.join(workdir, "checkpoints", "[0-9]*"))
  assert saved
  for step_dir in saved:
    assert ckpt_lib.all_finite(ckpt_lib.load_model(step_dir)[1]), step_dir


def test_bad_settings_are_refused_naming_the_field(tiny_dataset, tmp_path):
  run = lambda **kw: train(tiny_run_config(tiny_dataset, str(tmp_path / "run"), **kw))
  with pytest.raises(experiment.ConfigError, match=r"tokenizer .* has 384 tokens but the model's vocabulary "
                                                   r"\(model.llm.vocab_size\) has 256"):
    run(**{"model.llm.vocab_size": 256})
  with pytest.raises(experiment.ConfigError, match="steps = 0 asks for num_epochs over the data, but num_epochs = 0"):
    run(steps=0, num_epochs=0.0)
  with pytest.raises(experiment.ConfigError, match="on_nonfinite must be 'stop' or 'skip', got 'maybe'"):
    run(on_nonfinite="maybe")
  with pytest.raises(FileNotFoundError, match="init_from.path '/nonexistent/ckpt' does not exist"):
    run(init_from=config_dict.ConfigDict(dict(path="/nonexistent/ckpt", kind="orbax")))
  assert all(issubclass(e, loop.USER_ERRORS) for e in (experiment.ConfigError, FileNotFoundError, loop.NonFiniteError))


def test_a_batch_that_does_not_divide_over_the_devices_is_warned_about(tiny_dataset, tmp_path, caplog):
  with caplog.at_level(logging.WARNING):
    summary = train(tiny_run_config(tiny_dataset, str(tmp_path / "run"), steps=1, **{"data.global_batch_size": 6}))
  assert summary["step"] == 1
  assert "global_batch_size 6 does not divide over the 8 data-parallel devices" in caplog.text
