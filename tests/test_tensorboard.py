"""TensorBoard event files: the same scalars as metrics.jsonl (tags, steps, values), read back as
TensorBoard reads them (tensorboard_events.py); a resumed run shows each step once, with the
values it logged; the loss plot's log axis."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, tiny_config
from tensorboard_events import event_files, metrics_scalars, read_events, read_scalars
from ee_mllm_jax.train import plots
from ee_mllm_jax.train import progress
from ee_mllm_jax.train import tensorboard

PURGES = ("session_log", "preemption")  # TensorBoard's Python loader, its Rust data server


def _step_record(step, scale):
  return {"step": step, "applied": 1.0, "finite": 1.0, "grad_norm": 2.0 + step / scale, "learning_rate": 1e-3 * step,
          "loss": scale / step, "params_finite": 1.0, "tokens": 32.0, "text_len": 32, "tokens_per_s": 100.0 * scale,
          "step_time_s": 0.1 / scale, "flops_per_s": 1e9 * scale, "mfu": 0.01 * scale, "records_skipped": 1,
          "updates_skipped": step // 4}


def _eval_record(step, scale):
  return {"step": step, "val_loss": scale / step, "val_accuracy": 0.1 * step / scale, "answer_prior_accuracy": 0.25}


def _log(workdir, start, steps, scale, eval_every=2):
  """What a run from `start` writes: a step record per step, an eval record every `eval_every`."""
  metrics = progress.MetricsFile(os.path.join(workdir, "metrics.jsonl"), start, write=True, tensorboard_events=True)
  for step in steps:
    metrics.write(_step_record(step, scale))
    if step % eval_every == 0:
      metrics.write(_eval_record(step, scale), kind="eval")
  metrics.close()
  return metrics.events.path


def test_each_record_is_one_event_of_its_numeric_fields(tmp_path):
  path = _log(str(tmp_path), 0, range(1, 5), scale=1.0)
  assert event_files(str(tmp_path)) == [path]
  events, torn = read_events(path)
  assert not torn
  assert events[0].file_version == "brain.Event:2"
  assert events[1].session_log.status == events[1].session_log.START and events[1].step == 1
  assert [e.step for e in events[2:]] == [1, 2, 2, 3, 4, 4]  # a step record, and an eval record every 2
  scalars = read_scalars(str(tmp_path), purge="none")
  assert sorted(scalars) == sorted(
      ["train/loss", "train/learning_rate", "train/grad_norm", "train/tokens", "train/text_len", "perf/tokens_per_s",
       "perf/step_time_s", "perf/flops_per_s", "perf/mfu", "skipped/records_skipped", "skipped/updates_skipped",
       "eval/val_loss", "eval/val_accuracy", "eval/answer_prior_accuracy"])
  assert scalars == metrics_scalars(str(tmp_path))
  assert scalars["train/loss"] == {s: np.float32(1 / s) for s in range(1, 5)}
  assert scalars["eval/val_accuracy"] == {2: np.float32(0.2), 4: np.float32(0.4)}


def test_a_resumed_run_shows_each_step_once_with_the_values_it_logged(tmp_path):
  """A run logs steps 1-7 and is killed mid-record; the restart resumes from the checkpoint of
  step 3 and logs 4-9 with other values. TensorBoard (either loader) shows 1-3 of the first run
  and 4-9 of the second, as metrics.jsonl holds them."""
  workdir = str(tmp_path)
  first = _log(workdir, 0, range(1, 8), scale=1.0)
  os.truncate(first, os.path.getsize(first) - 7)  # killed in the middle of the last record
  assert read_events(first)[1]
  second = _log(workdir, 3, range(4, 10), scale=2.0)
  assert event_files(workdir) == [first, second]  # read in the order they were written
  want = metrics_scalars(workdir)
  assert sorted(want["train/loss"]) == list(range(1, 10)) and sorted(want["eval/val_loss"]) == [2, 4, 6, 8]
  for purge in PURGES:
    shown = read_scalars(workdir, purge=purge)
    assert shown == want, purge
    assert shown["train/loss"][3] == np.float32(1 / 3) and shown["train/loss"][4] == np.float32(2 / 4)
  with pytest.raises(AssertionError, match="a step shown twice"):
    read_scalars(workdir, purge="none")  # guard: both files hold steps 4-6


def test_only_a_writing_process_writes_events_and_close_is_safe_twice(tmp_path):
  metrics = progress.MetricsFile(str(tmp_path / "metrics.jsonl"), 0, write=False, tensorboard_events=True)
  metrics.write(_step_record(1, 1.0))
  metrics.close()
  assert metrics.events is None and os.listdir(tmp_path) == []  # another process than 0
  metrics = progress.MetricsFile(str(tmp_path / "metrics.jsonl"), 0, write=True, tensorboard_events=False)
  metrics.write(_step_record(1, 1.0))
  metrics.close()
  assert os.listdir(tmp_path) == ["metrics.jsonl"]  # config.tensorboard=False
  events = tensorboard.EventFile(str(tmp_path), 0)
  events.close()
  events.close()


@pytest.mark.slow  # a subprocess importing jax and torch (~5 s)
def test_tensorboardx_is_imported_without_torch_and_torch_still_imports():
  """tensorboardX imports torch when it can (2 s, 180 MB); the trainer does without it."""
  code = ("import sys; from ee_mllm_jax.train import tensorboard; tensorboard._tensorboardx(); "
          "assert 'tensorboardX' in sys.modules and 'torch' not in sys.modules, 'torch imported'; "
          "import importlib.util; importlib.util.find_spec('torch') and __import__('torch').zeros(1)")
  subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), timeout=120)


@pytest.mark.slow
def test_a_training_run_and_its_resume_write_the_scalars_of_metrics_jsonl(tiny_dataset, tmp_path):
  """train.py's trainer: loss, learning rate, grad norm, throughput, MFU, validation scores and
  skip counts at every step, equal to metrics.jsonl; resumed from an earlier checkpoint, the
  steps it redoes are shown once, with the resumed run's values."""
  from ee_mllm_jax.train import loop  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path / "run")
  config = lambda: tiny_config(tiny_dataset, workdir, 4, eval_every=2, eval_max_batches=1, eval_batch_size=8,
                               peak_flops_per_device=1e12, **{"checkpoint.keep": 3})
  loop.train(config())
  (first,) = event_files(workdir)
  want = metrics_scalars(workdir)
  assert sorted(want["train/loss"]) == [1, 2, 3, 4] and sorted(want["eval/val_accuracy"]) == [2, 4]
  assert sorted(want["perf/mfu"]) == [2, 3, 4]  # from the second step (the first compiles)
  assert {"skipped/records_skipped", "skipped/updates_skipped", "train/grad_norm", "train/learning_rate",
          "eval/val_loss", "eval/val_accuracy_blank_images"} <= set(want)
  assert read_scalars(workdir, purge="none") == want
  before = read_scalars(workdir, purge="none")

  for step in (3, 4):  # as if killed after step 4 with only checkpoint 2 written
    shutil.rmtree(os.path.join(workdir, "checkpoints", str(step)))
  os.truncate(first, os.path.getsize(first) - 5)
  loop.train(config())
  assert len(event_files(workdir)) == 2
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    assert [json.loads(line)["step"] for line in f] == [1, 2, 2, 3, 4, 4]
  want = metrics_scalars(workdir)
  assert read_scalars(workdir, purge="session_log") == want
  assert want["perf/step_time_s"][2] == before["perf/step_time_s"][2]  # kept from the first run
  assert want["perf/step_time_s"][4] != before["perf/step_time_s"][4]  # the resumed run's timing
  # The Rust data server ignores SessionLog: a series' points go when the resumed run logs that
  # step or an earlier one again. The resumed run's first step compiles and has no throughput, so
  # there the killed run's stays (tensorboard.py's note).
  assert 3 not in want["perf/mfu"]
  stale = {tag: {**series, 3: before[tag][3]} for tag, series in want.items() if tag.startswith("perf/")}
  assert read_scalars(workdir, purge="preemption") == {**want, **stale}


def test_the_loss_plot_has_a_log_axis_with_plain_labels():
  history = [{"step": s, "loss": 6.0 / s} for s in range(1, 41)]
  fig = plots.loss_figure(history, [{"step": 20, "val_loss": 0.4, "val_accuracy": 0.5}])
  ax = fig.axes[0]
  assert ax.get_yscale() == "log"
  fig.canvas.draw()
  labels = [t.get_text() for t in ax.get_yticklabels(minor=False) + ax.get_yticklabels(minor=True) if t.get_text()]
  assert labels and all(label.replace(".", "").isdigit() for label in labels), labels  # 0.2, 0.5, 1, 2, 5
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  plt.close(fig)


@pytest.mark.slow
def test_skipped_updates_are_counted_at_the_step_that_skipped(tiny_dataset, tmp_path):
  """A diverging run with on_nonfinite="skip": skipped/updates_skipped rises by one at each step
  whose update was not applied and ends at the summary's count."""
  from ee_mllm_jax.train import loop  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path / "run")
  summary = loop.train(tiny_config(tiny_dataset, workdir, 4, on_nonfinite="skip",
                                   **{"optim.learning_rate": 1e30, "optim.clip_norm": 0.0}))
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  counts = read_scalars(workdir, purge="none")["skipped/updates_skipped"]
  assert counts == metrics_scalars(workdir)["skipped/updates_skipped"]
  assert list(counts.values()) == list(np.cumsum([1 - r["applied"] for r in records]))
  assert counts[4] == summary["skipped"]["updates skipped: non-finite loss or gradient"] >= 1
