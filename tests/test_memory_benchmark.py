"""benchmarks/memory.py on the tiny preset: XLA's compiled figures are per device, and equal the
parts the benchmark computes from shapes, dtypes and shardings; FSDP divides the sharded
parameters and the optimizer state by the mesh size; `--batch` is rows per device; the fit search
finds the largest batch within a budget."""

import os
import sys

import jax
import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import memory  # noqa: E402  pylint: disable=g-import-not-at-top

from ee_mllm_jax import batch as batch_lib  # noqa: E402
from ee_mllm_jax import experiment  # noqa: E402
from ee_mllm_jax import params as params_lib  # noqa: E402

BATCH, TEXT_LEN, FSDP = 2, 16, 4


@pytest.fixture(scope="module")
def config():
  """LLaVA-1.5 stage 2 (projector + LLM trained, tower frozen; bf16 compute, f32 parameters) at
  the tiny preset."""
  c = memory.load_config(os.path.join(memory.ROOT, "configs", "llava15_7b_stage2.py:self"))
  c.model.preset = "tiny"
  return c


@pytest.fixture(scope="module")
def rows(config):
  if jax.device_count() < FSDP:
    pytest.skip(f"needs {FSDP} devices (the conftest simulates 8)")
  return {n: memory.step_memory(config, {"fsdp": n}, BATCH, TEXT_LEN, remat="full", attention_impl="xla")
          for n in (1, FSDP)}


def test_per_device_figures_are_the_sum_of_their_parts(rows, config):
  for n, r in rows.items():
    assert r["devices"] == n and r["mesh"] == ("1" if n == 1 else f"fsdp={n}")
    assert min(r["params"], r["opt_state"], r["batch_bytes"], r["other"], r["temp"]) > 0, r
    # XLA's argument bytes per device = this device's shards of the state and the batch
    assert r["arguments"] == r["params"] + r["opt_state"] + r["batch_bytes"] + r["other"], r
    assert r["peak"] == r["arguments"] + r["outputs"] - r["aliased"] + r["temp"], r
    assert r["aliased"] <= min(r["arguments"], r["outputs"]), r


def test_one_device_holds_every_byte(rows, config):
  r = rows[1]
  cfg = experiment.model_config(config)
  inputs = batch_lib.abstract(cfg, batch_size=BATCH, text_len=TEXT_LEN, labels=True)
  assert r["batch_bytes"] == sum(x.size * x.dtype.itemsize for x in inputs.values())
  assert r["params_sharded"] == 0
  # every parameter, in bf16 or f32; AdamW's two f32 moments of the trainable ones (+ step counts)
  n_params = sum(x.size for x in jax.tree.leaves(params_lib.abstract_params(cfg)))
  assert 2 * n_params <= r["params"] <= 4 * n_params and 0 < r["trainable"] < n_params
  assert 8 * r["trainable"] <= r["opt_state"] < 8 * r["trainable"] + 64


def test_fsdp_divides_the_sharded_state_and_keeps_the_batch_per_device(rows):
  one, sharded = rows[1], rows[FSDP]
  replicated = sharded["params"] - sharded["params_sharded"]
  # the leaves FSDP splits hold 1/N of their bytes per device, the rest is whole on each device
  assert FSDP * sharded["params_sharded"] + replicated == one["params"]
  assert FSDP * sharded["params_sharded"] > 0.9 * one["params"]  # the tiny preset's widths divide by 4
  assert sharded["opt_state"] < one["opt_state"] / (FSDP / 2)
  # so XLA's figure is per device, not the mesh's total
  assert sharded["arguments"] < one["arguments"] / 2
  # --batch is rows per device: N times the global rows, the same bytes per device
  assert sharded["global_batch"] == FSDP * one["global_batch"] == FSDP * BATCH
  assert sharded["batch_bytes"] == one["batch_bytes"]


def test_markdown_table_has_a_row_per_measurement(rows):
  table = [dict(r, recipe="stage2", mode="self", fits={24.0: 7, 40.0: 12}) for r in rows.values()]
  lines = memory.markdown(table, [24.0, 40.0]).splitlines()
  assert len(lines) == 2 + len(table)
  assert all(line.count("|") == lines[0].count("|") for line in lines)
  assert "largest batch, 24 GiB" in lines[0] and lines[2].split("|")[3].strip() == "1"
  assert lines[3].split("|")[-2].strip() == "12"


@pytest.mark.parametrize("start", [1, 5, 32, 100])
@pytest.mark.parametrize("peak", [lambda b: 3 + 0.5 * b, lambda b: 3 + 0.5 * b + 0.01 * b * b,
                                  lambda b: 3 + 2 * (b // 8) * 8, lambda b: 1 + b ** 0.7, lambda b: 50 + b])
def test_largest_batch_equals_exhaustive_search(peak, start):
  for budget in (0.5, 10, 24, 40, 80, 1e4):
    probes = []
    got = memory.largest_batch(lambda b: probes.append(b) or peak(b), budget, start, limit=1024)
    want = max([0] + [b for b in range(1, 1025) if peak(b) <= budget])
    assert got == want, (budget, start, probes)
    assert len(set(probes)) <= 2 * np.log2(1024) + 2, probes


def test_affine_peaks_take_few_probes():
  probes = []
  assert memory.largest_batch(lambda b: probes.append(b) or 3 + 0.5 * b, 80, 32) == 154
  assert len(set(probes)) == 4, probes  # 32, 64, then the line's crossing and one past it


def test_mesh_and_flags():
  assert memory.parse_mesh("1") == {"data": 1, "fsdp": 1, "tensor": 1}
  assert memory.parse_mesh("data=2,fsdp=4") == {"data": 2, "fsdp": 4, "tensor": 1}
  assert memory.mesh_name(memory.parse_mesh("data=2, fsdp=4")) == "data=2,fsdp=4"
  with pytest.raises(ValueError):
    memory.parse_mesh("fsdb=8")
  flags = memory.xla_flags("--a --xla_force_host_platform_device_count=2", 8, no_licm=True)
  assert flags == f"--a {memory.LICM_FLAG} --xla_force_host_platform_device_count=8"
  assert memory.xla_flags(flags, 4, no_licm=True) == flags  # enough devices already: no re-execution
  assert memory.xla_flags("", 1, no_licm=False) == ""
