"""train.py as users run it, in subprocesses: SIGTERM or SIGKILL -> restart continues exactly;
SIGKILL leaves no worker behind; two jax.distributed processes on 127.0.0.1 train on disjoint data."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from conftest import ROOT, TEST_XLA_FLAGS, logged_losses, tiny_overrides
from tensorboard_events import event_files, metrics_scalars, read_scalars


def _command(dataset, workdir, steps, *extra, **overrides):
  flat = {**tiny_overrides(dataset, workdir, steps), **overrides}
  flat["data.buckets"] = "(" + ",".join(map(str, flat["data.buckets"])) + ",)"
  return [sys.executable, os.path.join(ROOT, "train.py"), "--config", os.path.join(ROOT, "configs/demo.py")] + \
      [f"--config.{k}={v}" for k, v in flat.items()] + list(extra)


def _env(devices):
  return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT,
              XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} {TEST_XLA_FLAGS}")


STEPS = 8


@pytest.fixture(scope="module")
def uninterrupted(tiny_dataset, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("full"))
  subprocess.run(_command(tiny_dataset, workdir, STEPS), env=_env(2), check=True, timeout=300, capture_output=True)
  return logged_losses(workdir)


def _start_and_wait(command, workdir, losses: int):
  """Starts train.py; returns once `losses` steps are in its metrics file."""
  proc = subprocess.Popen(command, env=_env(2), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  deadline = time.time() + 240
  while time.time() < deadline and proc.poll() is None:
    try:
      if len(logged_losses(workdir)) >= losses:
        return proc
    except (FileNotFoundError, ValueError):  # not written yet, or a line half-written
      pass
    time.sleep(0.05)
  raise AssertionError(f"train.py ended or hung before step {losses}: {proc.communicate()[0].decode()[-3000:]}")


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_a_stopped_run_restarts_exactly(uninterrupted, tiny_dataset, tmp_path, sig):
  """SIGTERM: a checkpoint, then a clean exit. SIGKILL: lands while asynchronous saves (one per
  step) are in flight. Either way a restart continues from the newest complete checkpoint, logs
  each step once (the metrics of steps after that checkpoint are rewritten) and reproduces the
  uninterrupted run's loss at every step, bit for bit."""
  workdir = str(tmp_path / "split")
  proc = _start_and_wait(_command(tiny_dataset, workdir, STEPS), workdir, losses=3)
  proc.send_signal(sig)
  out = proc.communicate(timeout=240)[0].decode()
  if sig == signal.SIGTERM:
    assert proc.returncode == 0 and "stopped at step" in out, out[-3000:]
  else:
    assert proc.returncode == -signal.SIGKILL
  assert max(logged_losses(workdir)) < STEPS

  subprocess.run(_command(tiny_dataset, workdir, STEPS), env=_env(2), check=True, timeout=300, capture_output=True)
  resumed = logged_losses(workdir)
  assert sorted(resumed) == list(range(1, STEPS + 1))
  assert resumed == uninterrupted  # bit-identical: the same loss at every step
  assert read_scalars(workdir, purge="session_log") == metrics_scalars(workdir)  # TensorBoard: each step once


# LoRA with dropout (its masks come from the step's rng) and the projector at its own rate.
LORA = {"model.llm.lora.rank": 4, "model.llm.lora.dropout": 0.1, "optim.trainable": "projector/|.*/lora_[ab]$",
        "optim.group_learning_rates": '(("projector/", 1e-4),)'}


@pytest.mark.slow
def test_a_killed_lora_run_restarts_exactly(tiny_dataset, tmp_path):
  """LLaVA#1200 / #1437: a LoRA run killed mid-save resumes, and its losses are the uninterrupted
  LoRA run's, bit for bit."""
  full, split = str(tmp_path / "full"), str(tmp_path / "split")
  subprocess.run(_command(tiny_dataset, full, STEPS, **LORA), env=_env(2), check=True, timeout=300, capture_output=True)
  proc = _start_and_wait(_command(tiny_dataset, split, STEPS, **LORA), split, losses=3)
  proc.send_signal(signal.SIGKILL)
  proc.communicate(timeout=240)
  assert max(logged_losses(split)) < STEPS
  subprocess.run(_command(tiny_dataset, split, STEPS, **LORA), env=_env(2), check=True, timeout=300, capture_output=True)
  assert logged_losses(split) == logged_losses(full)
  from ee_mllm_jax import loading  # pylint: disable=g-import-not-at-top
  assert loading.read_run_config(full)["model"]["llm"]["lora"]["rank"] == 4  # the adapters' settings travel

def _descendants(pid: int) -> set[int]:
  out = subprocess.run(["ps", "-eo", "pid=,ppid="], capture_output=True, text=True, check=True).stdout
  children: dict[int, list[int]] = {}
  for line in out.splitlines():
    p, pp = map(int, line.split())
    children.setdefault(pp, []).append(p)
  found, todo = set(), [pid]
  while todo:
    for child in children.get(todo.pop(), []):
      found.add(child)
      todo.append(child)
  return found


def _alive(pid: int) -> bool:
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().split(")")[-1].split()[0] != "Z"  # a zombie has exited
  except FileNotFoundError:
    return False


@pytest.mark.slow
def test_sigkill_leaves_no_worker_process_behind(tiny_dataset, tmp_path):
  workdir = str(tmp_path / "run")
  proc = _start_and_wait(_command(tiny_dataset, workdir, 500, **{"data.worker_count": 2}), workdir, losses=2)
  tree = _descendants(proc.pid)
  assert len(tree) >= 2, tree  # the Grain workers (and multiprocessing's resource tracker)
  proc.kill()
  proc.communicate(timeout=60)
  deadline = time.time() + 10
  while time.time() < deadline and any(_alive(p) for p in tree):
    time.sleep(0.2)
  assert not [p for p in tree if _alive(p)], "processes outlived the trainer"


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_train_on_disjoint_data(tiny_dataset, tmp_path):
  """... in lock-step, each global batch padded to the bucket its longest row needs (one
  all-gathered length), not to the config's largest bucket."""
  workdir, port = str(tmp_path / "run"), _free_port()
  procs = [subprocess.Popen(
      ["timeout", "240"] + _command(tiny_dataset, workdir, 3, "--config.log_record_ids=True",
                                    f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                                    f"--process_id={i}", **{"data.buckets": (24, 32, 48, 256)}),
      env=_env(2), stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for i in range(2)]
  outs = [p.communicate(timeout=300)[0].decode() for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-3000:]
  assert "done at step 3/3" in outs[0] and "done at step" not in outs[1]  # only process 0 reports
  ids = []
  for i in range(2):
    with open(os.path.join(workdir, f"record_ids.process{i}.txt")) as f:
      ids.append({line.split("\t")[1].strip() for line in f})
  assert len(ids[0]) == len(ids[1]) == 3 * 4  # 3 steps x 4 rows per process
  assert not ids[0] & ids[1]
  assert sorted(logged_losses(workdir)) == [1, 2, 3]
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    lengths = [json.loads(line)["text_len"] for line in f if "loss" in line]
  assert lengths and all(t in (24, 32, 48) for t in lengths), lengths  # never the 256 bucket
  assert len(event_files(workdir)) == 1  # TensorBoard events: process 0's only,
  assert read_scalars(workdir, purge="none") == metrics_scalars(workdir)  # equal to its metrics.jsonl


@pytest.mark.slow
def test_an_unknown_config_field_is_one_line_naming_it(tiny_dataset, tmp_path):
  for field, message in (("--config.foo=1", "the config has no field 'foo'"),
                         ("--config.optim.learning_rat=0.1",
                          "the config has no field 'learning_rat' (did you mean 'learning_rate'?)")):
    proc = subprocess.run(_command(tiny_dataset, str(tmp_path / "run"), 1, field), env=_env(1),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == f"error: {field}: {message}"


@pytest.mark.slow
def test_a_second_train_py_on_a_running_workdir_is_refused_naming_the_holder(tiny_dataset, tmp_path):
  """Two train.py on one workdir: the second exits 1 with one line naming the first (host, pid)
  and writes nothing; the first is untouched."""
  workdir = str(tmp_path / "run")
  first = _start_and_wait(_command(tiny_dataset, workdir, 500), workdir, losses=1)
  try:
    second = subprocess.run(["timeout", "240"] + _command(tiny_dataset, workdir, 500), env=_env(2),
                            capture_output=True, text=True, timeout=300)
    assert second.returncode == 1, second.stderr[-3000:]
    assert second.stderr.strip().splitlines()[-1].startswith(
        f"error: workdir {workdir} is in use by another run (host {socket.gethostname()}, pid {first.pid}, lock ")
    assert first.poll() is None  # still training
  finally:
    first.kill()
    first.communicate(timeout=60)
  steps = sorted(logged_losses(workdir))  # each step once: the refused run wrote no metrics
  assert steps == list(range(1, len(steps) + 1))
