"""train.py as users run it, in subprocesses: SIGTERM -> checkpoint -> restart continues
exactly; two jax.distributed processes on 127.0.0.1 train on disjoint data."""

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from ee_mllm_jax.data import synthetic

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = dict(seed=0, num_train=96, num_val=16, image_size=32, vocab_size=384, max_turns=1)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  """Generated once here, so that concurrent processes find it ready (same arguments as the
  runs: the demo config's mix with DATA's sizes)."""
  spec = importlib.util.spec_from_file_location("demo_config", os.path.join(ROOT, "configs/demo.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  args = {**module.get_config().synthetic.to_dict(), **DATA}
  root = str(tmp_path_factory.mktemp("data") / "synthetic")
  del args["dir"]
  synthetic.ensure_dataset(root, **args)
  return root


def _command(dataset, workdir, steps, *extra):
  overrides = dict(workdir=workdir, steps=steps, log_every=1, eval_every=-1, progress_bar=False, seed=0,
                   **{"model.preset": "tiny", "model.llm.vocab_size": DATA["vocab_size"],
                      "synthetic.dir": dataset, "synthetic.num_train": DATA["num_train"],
                      "synthetic.num_val": DATA["num_val"], "synthetic.image_size": DATA["image_size"],
                      "synthetic.vocab_size": DATA["vocab_size"], "data.global_batch_size": 8,
                      "data.buckets": "(32,)", "checkpoint.every_steps": 1, "checkpoint.keep": 2})
  return [sys.executable, os.path.join(ROOT, "train.py"), "--config", os.path.join(ROOT, "configs/demo.py")] + \
      [f"--config.{k}={v}" for k, v in overrides.items()] + list(extra)


def _env(devices):
  return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
              PYTHONPATH=ROOT)


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  return {r["step"]: r["loss"] for r in records if "loss" in r}


def test_sigterm_checkpoints_and_a_restart_continues_exactly(dataset, tmp_path):
  steps = 8
  full, split = str(tmp_path / "full"), str(tmp_path / "split")
  subprocess.run(_command(dataset, full, steps), env=_env(2), check=True, timeout=300, capture_output=True)

  proc = subprocess.Popen(_command(dataset, split, steps), env=_env(2), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT)
  deadline = time.time() + 240
  while time.time() < deadline and proc.poll() is None:
    if os.path.exists(os.path.join(split, "metrics.jsonl")) and len(_losses(split)) >= 3:
      proc.send_signal(signal.SIGTERM)
      break
    time.sleep(0.05)
  out = proc.communicate(timeout=240)[0].decode()
  assert proc.returncode == 0, out[-3000:]
  stopped_at = max(_losses(split))
  assert "stopped at step" in out and stopped_at < steps, out[-2000:]

  subprocess.run(_command(dataset, split, steps), env=_env(2), check=True, timeout=300, capture_output=True)
  resumed = _losses(split)
  assert sorted(resumed) == list(range(1, steps + 1))
  assert resumed == _losses(full)  # bit-identical: the same loss at every step


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_train_on_disjoint_data(dataset, tmp_path):
  workdir, port = str(tmp_path / "run"), _free_port()
  procs = [subprocess.Popen(
      ["timeout", "240"] + _command(dataset, workdir, 3, "--config.log_record_ids=True",
                                    f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                                    f"--process_id={i}"),
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
  assert sorted(_losses(workdir)) == [1, 2, 3]
