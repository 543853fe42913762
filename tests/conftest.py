import os

# Sharding tests need several devices; set before jax is imported anywhere. The tests' models
# are tiny, so compiling dominates: LLVM's optimisation level 0 compiles ~35% faster (HLO
# passes, and so the computed values and XLA's FLOP counts, are unchanged).
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0"
os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count=8 {TEST_XLA_FLAGS}")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache per test session, inherited by the train.py subprocesses:
# programs that several tests (or several runs of train.py) compile are built once.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  import tempfile  # pylint: disable=g-import-not-at-top
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="ee_mllm_jax_test_xla_cache_")
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "-1"

import json  # noqa: E402

import pytest  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A synthetic dataset small enough to train the tiny preset on in seconds.
TINY_DATA = dict(seed=0, num_train=96, num_val=16, image_size=32, vocab_size=384, max_turns=1)


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
  """Each compiled XLA:CPU program holds ~7 memory mappings until its cache entry goes; the suite
  compiles thousands, and a process past vm.max_map_count (65530) segfaults in whatever maps next
  (seen in the compilation cache's write). Programs are released after each test module (shared
  ones come back from the persistent cache)."""
  yield
  import gc  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  jax.clear_caches()
  gc.collect()

def demo_config():
  """configs/demo.py's get_config(), the experiment every trainer test starts from."""
  from ee_mllm_jax import experiment  # pylint: disable=g-import-not-at-top
  return experiment.load_config_file(os.path.join(ROOT, "configs", "demo.py"))


def tiny_overrides(dataset: str, workdir: str, steps: int) -> dict:
  """Flat `--config.<key>` overrides that train the tiny preset on `dataset` (TINY_DATA)."""
  return dict(workdir=workdir, steps=steps, log_every=1, eval_every=-1, progress_bar=False, seed=0,
              **{"model.preset": "tiny", "model.llm.vocab_size": TINY_DATA["vocab_size"],
                 "synthetic.dir": dataset, "synthetic.num_train": TINY_DATA["num_train"],
                 "synthetic.num_val": TINY_DATA["num_val"], "synthetic.image_size": TINY_DATA["image_size"],
                 "synthetic.vocab_size": TINY_DATA["vocab_size"], "data.global_batch_size": 8,
                 "data.buckets": (32,), "checkpoint.every_steps": 1, "checkpoint.keep": 2})


def set_overrides(config, overrides: dict):
  """Sets flat dotted keys ({"optim.learning_rate": ...}) on an experiment config; returns it."""
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def tiny_config(dataset: str, workdir: str, steps: int, **overrides):
  """configs/demo.py with `tiny_overrides` and then `overrides` ({"optim.learning_rate": ...})."""
  return set_overrides(demo_config(), {**tiny_overrides(dataset, workdir, steps), **overrides})


def logged_losses(workdir: str) -> dict[int, float]:
  """{step: loss} from a run's metrics.jsonl; a step logged twice is an error (a resumed run
  must not repeat its steps)."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  steps = [r["step"] for r in records if "loss" in r]
  assert len(steps) == len(set(steps)), f"a step logged twice: {steps}"
  return {r["step"]: r["loss"] for r in records if "loss" in r}


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
  """Generated once per session with the demo config's question mix and TINY_DATA's sizes, so
  that trainer runs (in this process or in subprocesses) find it ready."""
  from ee_mllm_jax.data import synthetic  # pylint: disable=g-import-not-at-top
  args = {**demo_config().synthetic.to_dict(), **TINY_DATA}
  del args["dir"]
  root = str(tmp_path_factory.mktemp("data") / "synthetic")
  synthetic.ensure_dataset(root, **args)
  return root


TINY_RUN_STEPS = 4


@pytest.fixture(scope="session")
def tiny_run(tiny_dataset, tmp_path_factory):
  """One TINY_RUN_STEPS-step in-process run of the tiny preset (checkpoints 2, 3, 4 kept), shared
  by the checkpoint and reliability tests, which only read it or work on a copy:
  (config, workdir, summary, the basenames of the records files parsed during the run)."""
  from unittest import mock  # pylint: disable=g-import-not-at-top
  from ee_mllm_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  from ee_mllm_jax.train import loop  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path_factory.mktemp("tiny_run"))
  config = tiny_config(tiny_dataset, workdir, TINY_RUN_STEPS, **{"checkpoint.keep": 3})
  calls = []
  real = data_lib.load_records

  def counting(path, *args, **kwargs):
    calls.append(os.path.basename(path))
    return real(path, *args, **kwargs)

  with mock.patch.object(data_lib, "load_records", counting), \
       mock.patch.object(data_lib.pipeline, "load_records", counting):
    summary = loop.train(config)
  return config, workdir, summary, calls
