"""eval.py runs FastV and VisionZip as `--config.*` mode overrides on a self-trained checkpoint: the
model is the config with that reduction, named so, and the runner answers under it (VisionZip
alone: reusing the image prefix changes nothing)."""

import pytest

from test_eval import CFG, _eval_py_config, _lines, _runner, bench, checkpoint  # noqa: F401 (fixtures)
from test_eval_benchmarks import circular_rows, write_mmbench
from ee_mllm_jax.evaluation import benchmarks, runner as runner_lib


@pytest.mark.slow
def test_reduction_overrides_load_name_and_answer(checkpoint, tmp_path):  # noqa: F811
  from ee_mllm_jax.evaluation import cli  # pylint: disable=g-import-not-at-top
  config = _eval_py_config()
  assert config.fastv_layer is None and config.visionzip_dominant is None  # as trained
  config.attention, config.fastv_layer, config.fastv_ratio = "composite", 1, 0.5
  config.visionzip_dominant, config.visionzip_contextual = 12, 2
  model = cli.load_model(config, checkpoint=checkpoint, hf=None)
  assert model.cfg == CFG.run_as(attention="composite", fastv_layer=1, fastv_ratio=0.5, visionzip_dominant=12,
                                 visionzip_contextual=2)
  assert model.mode == "EE-MLLM-F: composite, visual FFN, on self-trained weights + VisionZip 12+2 + FastV K=1 R=50%"
  assert model.cfg.tokens_per_image == 14
  path = str(tmp_path / "mmbench.tsv")
  write_mmbench(path, circular_rows())
  qs = benchmarks.get("mmbench").read(path)
  runner_lib.evaluate(_runner(model, reuse_prefix=False), "mmbench", qs, str(tmp_path / "fastv"))
  assert len(_lines(str(tmp_path / "fastv"))) == 7
  config.fastv_layer = None  # VisionZip alone does not depend on the text: prefix reuse is exact
  zipped = cli.load_model(config, checkpoint=checkpoint, hf=None)
  out = {}
  for reuse in (True, False):
    runner_lib.evaluate(_runner(zipped, reuse_prefix=reuse), "mmbench", qs, str(tmp_path / str(reuse)))
    out[reuse] = [r["output"] for r in _lines(str(tmp_path / str(reuse)))]
  assert out[True] == out[False] and len(out[True]) == 7
  with pytest.raises(cli.UsageError, match="fastv_layer"):
    config.fastv_layer = 5
    cli.load_model(config, checkpoint=checkpoint, hf=None)
