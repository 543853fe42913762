"""Training that never lies, in-process runs of the trainer: a damaged checkpoint falls back to
the previous one, a diverged run stops (or skips, counted) and never saves non-finite values,
and every bad setting is refused in one line naming the field."""

import errno
import glob
import json
import logging
import os
import re
import shutil

import jax
import pytest
from ml_collections import config_dict

from conftest import TINY_RUN_STEPS, logged_losses, tiny_config
from ee_mllm_jax import experiment
from ee_mllm_jax import loading
from ee_mllm_jax.train import checkpoint as ckpt_lib
from ee_mllm_jax.train import loop
from ee_mllm_jax.train import plots
from ee_mllm_jax.train import progress

# Every test here trains (the tiny run, resumed under a fault): the full suite's tier.
pytestmark = pytest.mark.slow

STEPS = TINY_RUN_STEPS


def tiny_run_config(dataset, workdir, steps=STEPS, **overrides):
  return tiny_config(dataset, workdir, steps, **{"checkpoint.keep": 3, **overrides})


def train(config):
  return loop.train(config)


@pytest.fixture(scope="module")
def finished(tiny_run):
  """A 4-step run with checkpoints 2, 3, 4 and its per-step losses (conftest's, shared with the
  checkpoint tests: the tests here work on copies)."""
  config, workdir, *_ = tiny_run
  assert config.steps == STEPS and config.checkpoint.keep == 3
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


def edit_data_item(step_dir):
  (path,) = glob.glob(os.path.join(step_dir, "data", "process_0*.json"))
  with open(path) as f:
    state = json.load(f)
  state["next_batch"] -= 2  # the iterator would replay two batches
  with open(path, "w") as f:
    json.dump(state, f, indent=4)


DAMAGE = {
    "flipped bytes": flip_bytes,
    "truncated data file": truncate,
    "no _METADATA": lambda d: os.remove(os.path.join(d, "state", "_METADATA")),
    "no state item": lambda d: shutil.rmtree(os.path.join(d, "state")),
    "no data item": lambda d: shutil.rmtree(os.path.join(d, "data")),
    "edited data item": edit_data_item,
}


# The fast tier keeps one damage to the state and one to the data item; the rest run in the full suite.


@pytest.mark.parametrize("damage", DAMAGE)
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
    assert loading.all_finite(loading.load_model(step_dir)[1]), step_dir


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


# ----------------------------------------------------------------------------- issue 20: nothing lost, nothing mixed


def flip_bit(path, position, bit):
  with open(path, "r+b") as f:
    f.seek(position)
    byte = f.read(1)[0]
    f.seek(position)
    f.write(bytes([byte ^ (1 << bit)]))




def trainer_abstract_state(config):
  """The restore target the trainer builds for `config` (its shardings on the config's mesh)."""
  from ee_mllm_jax import sharding  # pylint: disable=g-import-not-at-top
  from ee_mllm_jax.models import EEMLLM  # pylint: disable=g-import-not-at-top
  from ee_mllm_jax.train.state import create_sharded_state, make_init_fn, make_optimizer  # pylint: disable=g-import-not-at-top
  exp = experiment.resolve(config)
  optim_cfg = experiment.optim_config(config, exp.total_steps)
  optimizer, _ = make_optimizer(optim_cfg)
  mesh = sharding.make_mesh(dict(config.mesh))
  return create_sharded_state(make_init_fn(EEMLLM(exp.model), optimizer, optim_cfg.trainable, seed=config.seed),
                              mesh)[2]


def test_single_bit_flips_in_the_array_files_never_pass_silently(finished, tiny_dataset, tmp_path):
  """Random (position, bit) pairs in the state's data files (values, compressed chunks and their
  index alike), each in a fresh copy. A flip that changes what Orbax reads (other numbers, or
  an error) must be refused by the trainer's restore, and, when it changes a parameter, by
  `load_model` (eval.py's path) in one line naming the checkpoint; a flip that changes nothing
  read is harmless. CRC-32 detects every single-bit error of the bytes it covers, so no flip
  that changes a value may pass (the sum of |x| at rtol 1e-3 let most of them through)."""
  import random  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  def raw(step_dir):
    tree = ocp.PyTreeCheckpointer().restore(os.path.join(step_dir, "state"))
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(tree)}

  source = os.path.join(finished[0], "checkpoints", str(STEPS))
  original = raw(source)
  files = sorted(glob.glob(os.path.join(source, "state", "ocdbt.process_0", "d", "*")))
  sizes = [os.path.getsize(f) for f in files]
  abstract = trainer_abstract_state(tiny_run_config(tiny_dataset, str(tmp_path / "unused")))
  clean = ckpt_lib.Checkpointer(os.path.dirname(source), async_save=False)
  clean.restore(STEPS, abstract)  # guard: the undamaged checkpoint restores onto this target
  clean.close()
  rng = random.Random(20)
  changed, params_changed = 0, 0
  for trial in range(120):  # until 8 flips changed what is read, 2 of them a parameter
    if changed >= 8 and params_changed >= 2:
      break
    (name,) = rng.choices(files, weights=sizes)
    position, bit = rng.randrange(os.path.getsize(name)), rng.randrange(8)
    copy = str(tmp_path / f"flip{trial}")
    shutil.copytree(os.path.dirname(source), copy)
    flip_bit(name.replace(os.path.dirname(source), copy), position, bit)
    step_dir = os.path.join(copy, str(STEPS))
    try:
      read = raw(step_dir)
      differs = [k for k in original if not np.array_equal(read[k], original[k])]
    except Exception:  # pylint: disable=broad-except
      differs = None  # unreadable
    if differs == []:
      continue  # the flip changed nothing that is read
    changed += 1
    checkpointer = ckpt_lib.Checkpointer(copy, async_save=False)
    with pytest.raises(Exception):  # noqa: B017 (any error: restore_latest sets the step aside)
      checkpointer.restore(STEPS, abstract)
    checkpointer.close()
    if differs and any(k.startswith("['params']") for k in differs):
      params_changed += 1
      with pytest.raises(loading.DamagedCheckpointError, match=f"^checkpoint {re.escape(step_dir)}.*"
                         + re.escape(differs[0]) + " does not match its checksum"):
        loading.load_model(step_dir)
  assert changed >= 8 and params_changed >= 2, (changed, params_changed)  # enough flips landed in what is read


def test_a_torn_metrics_line_does_not_block_a_restart(finished, tiny_dataset, tmp_path):
  source, want = finished
  workdir = str(tmp_path / "run")
  shutil.copytree(source, workdir)
  with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
    f.write('{"step": 5, "loss": 0.12')  # killed in the middle of a line
  summary = train(tiny_run_config(tiny_dataset, workdir))
  assert summary["step"] == STEPS
  assert logged_losses(workdir) == want


class _FullDiskFile:
  """A file whose `full_at`-th write stores half its text and then fails as a full disk does."""

  def __init__(self, f, counter, full_at):
    self._f, self._counter, self._full_at = f, counter, full_at

  def write(self, text):
    self._counter["writes"] += 1
    if self._counter["writes"] == self._full_at:
      self._f.write(text[:len(text) // 2])
      self._f.flush()
      raise OSError(errno.ENOSPC, "No space left on device")
    return self._f.write(text)

  def __getattr__(self, name):
    return getattr(self._f, name)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self._f.close()


@pytest.mark.parametrize("where", ["metrics", "checkpoint", "plot"])
def test_a_full_disk_is_one_line_keeps_the_previous_checkpoint_and_a_restart_finishes(
    finished, tiny_dataset, tmp_path, monkeypatch, where):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from ee_mllm_jax import storage  # pylint: disable=g-import-not-at-top
  source, want = finished
  workdir = str(tmp_path / "run")
  shutil.copytree(source, workdir)
  ckpt_dir = os.path.join(workdir, "checkpoints")
  steps = STEPS + 2
  if where == "metrics":
    counter = {"writes": 0}
    real_open = open
    monkeypatch.setattr(progress, "open", lambda path, *a, **k: _FullDiskFile(real_open(path, *a, **k), counter, 2)
                        if str(path).endswith("metrics.jsonl") else real_open(path, *a, **k), raising=False)
    failing = os.path.join(workdir, "metrics.jsonl")
  elif where == "checkpoint":
    real_save = ocp.CheckpointManager.save

    def save(self, step, *args, **kwargs):
      if step == STEPS + 2:
        raise OSError(errno.ENOSPC, "No space left on device")
      return real_save(self, step, *args, **kwargs)

    monkeypatch.setattr(ocp.CheckpointManager, "save", save)
    failing = os.path.join(ckpt_dir, str(STEPS + 2))
  else:
    def plot(path, *args):
      raise OSError(errno.ENOSPC, "No space left on device", path)

    monkeypatch.setattr(plots, "loss_curve", plot)
    failing = os.path.join(workdir, "loss.png")
  with pytest.raises(storage.DiskFullError) as raised:
    train(tiny_run_config(tiny_dataset, workdir, steps=steps))
  assert isinstance(raised.value, loop.USER_ERRORS)  # train.py: "error: <this>", exit status 1
  assert re.fullmatch(r"no space left on \S+( \(.*\))? writing " + re.escape(failing), str(raised.value))
  assert os.path.isdir(os.path.join(ckpt_dir, str(STEPS)))  # the previous checkpoint is kept
  monkeypatch.undo()  # space freed
  summary = train(tiny_run_config(tiny_dataset, workdir, steps=steps))
  assert summary["step"] == steps and not summary["stopped_early"]
  losses = logged_losses(workdir)  # each step once
  assert sorted(losses) == list(range(1, steps + 1))
  assert {k: v for k, v in losses.items() if k <= STEPS} == want


def test_a_second_run_on_a_workdir_is_refused_naming_the_holder_and_a_stale_lock_is_not(tiny_dataset, tmp_path):
  """The holder is another process (as a second train.py would be); then it is SIGKILLed, leaving
  its lock file with its pid behind, and a run starts."""
  import signal  # pylint: disable=g-import-not-at-top
  import socket  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  from ee_mllm_jax import workdir_lock  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path / "run")
  holder = subprocess.Popen(
      [sys.executable, "-c", "import sys, time; from ee_mllm_jax import workdir_lock; "
       f"workdir_lock.WorkdirLock({workdir!r}).acquire(); print('locked', flush=True); time.sleep(120)"],
      stdout=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(
          os.path.abspath(__file__)))))
  try:
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(workdir_lock.WorkdirLockedError) as refused:
      train(tiny_run_config(tiny_dataset, workdir, steps=1))
    assert isinstance(refused.value, loop.USER_ERRORS)
    assert str(refused.value).startswith(f"workdir {workdir} is in use by another run (host {socket.gethostname()}, "
                                         f"pid {holder.pid}, lock ")
    assert not os.path.exists(os.path.join(workdir, "metrics.jsonl"))  # refused before writing anything
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
  with open(workdir_lock.lock_path(workdir)) as f:
    assert json.load(f)["pid"] == holder.pid  # the stale file is still there
  assert train(tiny_run_config(tiny_dataset, workdir, steps=1))["step"] == 1
  with open(workdir_lock.lock_path(workdir)) as f:
    assert json.load(f)["pid"] == os.getpid()
