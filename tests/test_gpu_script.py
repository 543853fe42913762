"""benchmarks/gpu.sh, the one-GPU run of issue 23, dry-run on the CPU at the tiny preset, so that its
argument plumbing, shapes and compiles cannot rot while no GPU runs it."""

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu.sh")


def run_script(*args, timeout=900, **env):
  # One CPU device (conftest forces 8 for the sharding tests); the script adds its own XLA flags.
  env = dict(os.environ, PYTHON=sys.executable, XLA_FLAGS="", **env)
  return subprocess.run(["bash", SCRIPT, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


def test_unknown_argument_is_refused():
  done = run_script("--dryrun", timeout=60)
  assert done.returncode == 2
  assert "unknown argument --dryrun" in done.stderr


def test_refuses_to_run_without_a_gpu():
  done = run_script(timeout=300, JAX_PLATFORMS="cpu")
  assert done.returncode != 0
  assert "JAX sees no GPU" in done.stderr
  assert "[1/3]" not in done.stdout  # no step started


@pytest.mark.slow  # three benchmark scripts compile their tiny models: ~1-2 minutes on 2 cores
@pytest.mark.skipif(not os.environ.get("EE_MLLM_SLOW"), reason="about 2 minutes: set EE_MLLM_SLOW=1")
def test_dry_run_prints_every_section():
  done = run_script("--dry-run")
  out = done.stdout
  assert done.returncode == 0, (out[-3000:], done.stderr[-3000:])
  assert "DRY RUN" in out and "jax " in out

  # 1. prefill: a row per mode and V, the tower, the ratio tables, the PyTorch rows.
  assert "=== [1/3] prefill table" in out
  prefill_cmd = re.search(r"^\$ \S+ benchmarks/prefill\.py (.*)$", out, re.M).group(1)
  assert "--preset tiny" in prefill_cmd and "--dtype bfloat16" in prefill_cmd
  assert "--torch" in prefill_cmd  # torch and transformers are installed here (the test extra)
  for framework, mode in [("torch", "self"), ("torch", "composite")]:
    assert re.search(rf"^\s*{framework}\s+\S+( \(port\))?\s+{mode}\s+16\s", out, re.M), (framework, mode)
  for mode in ("self", "composite", "cross", "tower"):
    for v in (16, 32):
      assert re.search(rf"^\s*jax\s+\S+\s+{mode}\s+{v}\s+.*\d", out, re.M), (mode, v)
  assert "self / composite:" in out and "self / cross:" in out
  assert re.search(r"^--- \[1/3\] prefill table.*: \d+ s$", out, re.M)

  # 2. the stage-1 train step: both modes, tokens/s, projector-only, bf16 parameters.
  assert "=== [2/3] stage-1 train step" in out
  assert "params bfloat16, trainable 'projector/'" in out
  for mode in ("composite", "self"):
    assert re.search(rf"^\s+{mode}\s*:\s+[\d.]+ ms/step .* [\d.]+ tokens/s \(\d+ text\) .* TFLOP/s", out, re.M), mode
  assert "self / composite: measured time" in out
  assert re.search(r"^--- \[2/3\] stage-1 train step.*: \d+ s$", out, re.M)

  # 3. decode, beside transformers' generate.
  assert "=== [3/3] decode" in out
  assert re.search(r"^\$ \S+ benchmarks/decode\.py --preset tiny", out, re.M)
  assert "--skip-torch" not in out
  assert re.search(r"^--- \[3/3\] decode.*: \d+ s$", out, re.M)

  assert re.search(r"^=== total wall time: \d+ s", out, re.M)
