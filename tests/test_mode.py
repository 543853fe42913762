"""The interaction mode has one home (`ee_mllm_jax.mode`): every seam reads and writes it the same way.

The properties: EE-MLLM-F (composite on self-trained weights) keeps the visual FFN wherever the
switch is made (a config, a checkpoint, an HF record, the PyTorch class); flags that do not apply
to a mode are refused, not ignored; records round-trip; the checkpoint check derives what changes
the parameters from the mode; every mode field is a command-line override and checks run on the
final config.
"""

import dataclasses
import os
import subprocess
import sys

import pytest

import ee_mllm_jax as eem
from ee_mllm_jax import experiment
from ee_mllm_jax import loading
from ee_mllm_jax import mode as mode_lib
from ee_mllm_jax.mode import Composite, Cross, Self
from conftest import ROOT, TEST_XLA_FLAGS, demo_config, tiny_overrides

LLAVA = eem.ModelConfig.preset("llava-1.5-7b")


def test_switching_self_weights_to_composite_keeps_the_visual_ffn_everywhere():
  """EE-MLLM-F is composite with the visual FFN on self-trained weights, whichever road switches:
  a config, a checkpoint's recorded config (also one that recorded the unread visual_ffn=False of a
  self run, as runs trained with `--config.model.attention=self` did), and an HF record."""
  f = LLAVA.run_as(attention="composite")
  assert f.mode == Composite(visual_ffn=True) and f.trained_mode == Self()
  assert f.mode_name == "EE-MLLM-F: composite, visual FFN, on self-trained weights"
  recorded = {**eem.ModelConfig.preset("tiny").to_dict(), "mode": None}
  del recorded["mode"], recorded["trained_mode"]
  for legacy in (dict(attention="self", visual_ffn=False, composite_from_layer=0),  # the flat form of old runs
                 dict(attention="self", visual_ffn=True)):
    cfg = eem.ModelConfig.from_dict({**recorded, **legacy})
    assert cfg.mode == Self()
    assert loading.with_overrides(cfg, dict(attention="composite")).mode == Composite(visual_ffn=True)
    assert loading.with_overrides(cfg, dict(attention="composite", visual_ffn=False)).mode == Composite()
  for record in (None, {"attention": "self", "visual_ffn": True, "composite_from_layer": 0}):
    mode, trained = mode_lib.from_hf_record({"ee_mllm": record}, 32)
    assert (mode, trained) == (Self(), Self())
    assert mode_lib.parse({"attention": "composite"}, base=mode) == Composite(visual_ffn=True)
  # composite-trained weights stay as they were trained
  assert eem.ModelConfig.preset("tiny").run_as(attention="composite").mode == Composite(visual_ffn=False)


def test_flags_that_do_not_apply_are_refused_not_ignored():
  for flags, message in ((dict(attention="self", visual_ffn=False), "visual_ffn=False does not apply to "
                                                                     "attention='self': self mode implies visual_ffn=True"),
                         (dict(attention="self", composite_from_layer=2), "composite_from_layer=2 does not apply"),
                         (dict(attention="composite", cross_every=2), "composite mode has no cross_every"),
                         (dict(attention="bogus"), "attention must be one of"),
                         (dict(visual_flop=True), "unknown mode flag")):
    with pytest.raises(ValueError, match=message):
      mode_lib.parse(flags)
  # what a mode implies may be stated (configs that spell out visual_ffn=True for self, False for cross)
  assert mode_lib.parse(dict(attention="self", visual_ffn=True, composite_from_layer=0)) == Self()
  assert mode_lib.parse(dict(attention="cross", visual_ffn=False, cross_every=2)) == Cross(every=2)
  with pytest.raises(ValueError, match=r"composite_from_layer must be an int in \[0, 2\]"):
    eem.ModelConfig.preset("tiny", composite_from_layer=3)
  with pytest.raises(ValueError, match="llm.depth 2 is not a multiple of cross_every 4"):
    eem.ModelConfig.preset("tiny", attention="cross")
  with pytest.raises(ValueError, match="weights trained in cross mode cannot run as composite"):
    eem.ModelConfig.preset("tiny", attention="cross", cross_every=2).run_as(attention="composite")
  with pytest.raises(ValueError, match="must be an ee_mllm_jax.mode.Mode"):
    eem.ModelConfig(mode="composite")


def test_records_round_trip_and_name_both_modes():
  """A config's JSON, the HF record and the flat flags give back the same modes; the display names
  the trained mode only where it differs."""
  cfgs = [LLAVA, LLAVA.run_as(attention="composite", composite_from_layer=8),
          LLAVA.run_as(attention="composite", visual_ffn=False), LLAVA.replace(attention="composite", visual_ffn=False),
          LLAVA.replace(attention="cross", cross_every=8, resampler_latents=64, cross_media="all")]
  for cfg in cfgs:
    assert eem.ModelConfig.from_dict(cfg.to_dict()) == cfg
    assert mode_lib.parse(cfg.mode.flags(), base=Self()) == cfg.mode
    if cfg.mode.visual_in_decoder:
      hf = {"ee_mllm": mode_lib.to_hf_record(cfg.mode, cfg.weights_mode)}
      assert mode_lib.from_hf_record(hf, 32) == (cfg.mode, cfg.weights_mode)
      assert mode_lib.hf_model_type(cfg.mode, cfg.weights_mode) == ("llava" if cfg == LLAVA else "ee_mllm")
  assert [c.mode_name for c in cfgs] == [
      "self (LLaVA)",
      "EE-MLLM-F: composite, visual FFN, from layer 8 (layers 0-7 self), on self-trained weights",
      "EE-MLLM-F: composite (EE-MLLM), on self-trained weights",
      "composite (EE-MLLM)",
      "cross (Flamingo): a block every 8 layers, 64 resampler latents"]


def test_the_mode_decides_what_shapes_parameters_and_which_layers_run_the_visual_ffn():
  depth = 4
  assert Composite(visual_ffn=False, from_layer=1).schedule(depth) == (("self", 1), ("composite", 3))
  assert [Composite(visual_ffn=False, from_layer=1).visual_ffn_in(k) for k in ("self", "composite")] == [True, False]
  assert Self().schedule(depth) == (("self", 4),) and Self().self_layers(depth) == 4
  assert Cross().self_layers(depth) == 0 and not Cross().visual_ffn_in("self")
  # composite and self share one parameter tree; cross settings other than `media` change it
  assert Self().params_key() == Composite(True, 2).params_key() != Cross().params_key()
  assert Cross(media="all").params_key() == Cross().params_key() != Cross(every=2).params_key()
  tiny = eem.ModelConfig.preset("tiny", attention="self")
  loading.check_model_config(tiny, tiny.replace(attention="cross", cross_every=2), "ckpt")  # an LLM starts Flamingo
  cross = tiny.replace(attention="cross", cross_every=2)
  loading.check_model_config(cross, cross.replace(cross_media="all"), "ckpt")
  with pytest.raises(loading.ConfigMismatchError, match=r"mode.cross_ffn_mult: checkpoint 4 vs run 2"):
    loading.check_model_config(cross, cross.replace(cross_ffn_mult=2), "ckpt")
  assert set(eem.ModelConfig.runtime_fields()) == {
      "dtype", "param_dtype", "remat", "scan_unroll", "vision.attention_impl", "vision.attention_block",
      "llm.attention_impl", "llm.attention_block"}


def test_every_mode_field_is_an_override_and_checks_see_the_final_config():
  """`--config.model.<flag>` exists for every mode flag of every config built on model_section,
  and the depth a cross layout needs may come from the same command line (checked once, at the end)."""
  config = demo_config()
  assert set(mode_lib.FLAGS) <= set(config.model.keys())
  config.model.preset, config.model.attention, config.model.cross_every = "tiny", "cross", 3
  config.model.llm.depth = 6
  assert experiment.model_config(config).mode == Cross(every=3)
  config.model.llm.depth = 4
  with pytest.raises(ValueError, match="llm.depth 4 is not a multiple of cross_every 3"):
    experiment.model_config(config)
  config = demo_config()
  config.model.attention = "self"  # the README's LLaVA demo: no visual_ffn to contradict it
  assert experiment.model_config(config).mode == Self()


def _train(dataset, workdir, *flags, timeout=300):
  flat = {**tiny_overrides(dataset, workdir, 1), "checkpoint.every_steps": 1}
  flat["data.buckets"] = "(" + ",".join(map(str, flat["data.buckets"])) + ",)"
  command = [sys.executable, os.path.join(ROOT, "train.py"), "--config", os.path.join(ROOT, "configs/demo.py")]
  command += [f"--config.{k}={v}" for k, v in flat.items()] + list(flags)
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT, XLA_FLAGS=f"--xla_force_host_platform_device_count=1 "
             f"{TEST_XLA_FLAGS}")
  return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


@pytest.mark.slow  # train.py in a subprocess
def test_a_tiny_cross_run_starts_from_command_line_overrides_alone(tiny_dataset, tmp_path):
  bad = _train(tiny_dataset, str(tmp_path / "bad"), "--config.model.attention=cross")
  assert bad.returncode == 1, bad.stderr[-2000:]
  assert bad.stderr.strip().splitlines()[-1] == (
      "error: config.model: llm.depth 2 is not a multiple of cross_every 4: cross mode places a cross-attention "
      "block before the last layer of every group of cross_every layers")
  run = _train(tiny_dataset, str(tmp_path / "ok"), "--config.model.attention=cross", "--config.model.cross_every=2",
               "--config.model.resampler_latents=4", "--config.model.resampler_depth=1")
  assert run.returncode == 0, run.stderr[-3000:]
  cfg, _ = loading.load_model(str(tmp_path / "ok"))
  assert cfg.mode == Cross(every=2, resampler_latents=4, resampler_depth=1)
  assert dataclasses.replace(cfg, mode=Self()).mode_name == "self (LLaVA)"
