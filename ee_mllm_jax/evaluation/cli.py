"""eval.py's work: flags -> model -> one benchmark, a question file (`--predict`: every question
answered, nothing scored), or one question about one image -> text."""

from __future__ import annotations

import json
import os

from ee_mllm_jax import batch as batch_lib
from ee_mllm_jax import loading
from ee_mllm_jax import mode as mode_lib
from ee_mllm_jax import sharding
from ee_mllm_jax import storage
from ee_mllm_jax.evaluation import benchmarks
from ee_mllm_jax.evaluation import model as model_lib
from ee_mllm_jax.evaluation import prompts as prompts_lib
from ee_mllm_jax.evaluation import questions as questions_lib
from ee_mllm_jax.evaluation import run_header
from ee_mllm_jax.evaluation import runner as runner_lib


class UsageError(ValueError):
  """Flags that do not make a command."""


USER_ERRORS = (UsageError, FileNotFoundError, benchmarks.BenchmarkFormatError, runner_lib.EvalError,
               loading.ConfigMismatchError, batch_lib.BatchError, run_header.MixedRunError, storage.DiskFullError)


def load_model(config, *, checkpoint: str | None, hf: str | None) -> model_lib.EvalModel:
  if bool(checkpoint) == bool(hf):
    raise UsageError("give exactly one of --checkpoint and --hf")
  mode = {k: config[k] for k in mode_lib.FLAGS if k in config}
  kw = dict(template=config.template, system_prompt=config.system_prompt, dtype=config.dtype, **mode)
  try:
    if checkpoint:
      return model_lib.from_checkpoint(checkpoint, preset=config.preset, **kw)
    return model_lib.from_hf(hf, **kw)
  except ValueError as e:  # no recorded config, an unknown preset, a mode flag that does not apply, ...
    if isinstance(e, loading.ConfigMismatchError):
      raise
    raise UsageError(str(e)) from None


def settings(config) -> runner_lib.EvalSettings:
  if config.on_bad_image not in ("raise", "skip"):
    raise UsageError(f"--config.on_bad_image must be 'raise' or 'skip', got {config.on_bad_image!r}")
  if config.batch_size < 1 or config.max_new_tokens < 1:
    raise UsageError("--config.batch_size and --config.max_new_tokens must be >= 1")
  if config.temperature < 0 or not 0 < config.top_p <= 1:
    raise UsageError(f"--config.temperature must be >= 0 and --config.top_p in (0, 1], got {config.temperature} "
                     f"and {config.top_p}")
  style = prompts_lib.PromptStyle(short_answer=config.short_answer_prompt, ocr_tokens=config.ocr_tokens)
  return runner_lib.EvalSettings(batch_size=config.batch_size, images_per_batch=config.images_per_batch,
                                 max_new_tokens=config.max_new_tokens, reuse_prefix=config.reuse_prefix,
                                 likelihood=config.likelihood, on_bad_image=config.on_bad_image, style=style,
                                 progress_bar=config.progress_bar, limit=config.limit,
                                 temperature=float(config.temperature), top_p=float(config.top_p), seed=config.seed)


def header(bench, data: str, image_root: str | None, model, config) -> dict:
  """OUT/run.json (`run_header`): with "sampling" {temperature, top_p, seed} when sampled (a greedy
  run's header is as before); a question file's prompt holds only what shapes its prompt."""
  out = run_header.make(bench.name, data, image_root, model, config)
  if isinstance(bench, questions_lib.QuestionFile):  # asked as written: no answer-style line, no options
    out["prompt"] = {k: out["prompt"][k] for k in ("template", "system_prompt", "max_new_tokens")}
  if config.temperature > 0:
    out["sampling"] = dict(temperature=float(config.temperature), top_p=float(config.top_p), seed=config.seed)
  return out


def ask(runner: runner_lib.Runner, image: str, question: str) -> str:
  """The model's answer to one question about one image file."""
  if not os.path.exists(image):
    raise FileNotFoundError(f"--image {image} does not exist")
  q = benchmarks.Question("cli", os.path.abspath(image), "cli", question, ("",))
  item = runner.item(q, question)  # the user's words as they are, no answer-style suffix
  return runner._generate([item], [runner.pixels(q)], [0])[0]  # pylint: disable=protected-access


def run(config, *, checkpoint=None, hf=None, benchmark=None, data=None, image_root=None, out=None, image=None,
        question=None, overwrite=False, predict=None) -> tuple[str, bool]:
  """-> (what to print, whether the run completed: False after SIGTERM). The benchmark (or
  `predict`'s question) file is read (and a bad one refused) before the model loads; `out`
  resumes only the predictions of this very run (`run_header`), or with `overwrite` starts afresh."""
  if predict:
    if benchmark or data or image or question:
      raise UsageError("--predict answers a question file; leave out --benchmark, --data, --image and --question")
    if not os.path.exists(predict):
      raise FileNotFoundError(f"--predict {predict} does not exist")
    benchmark, data = questions_lib.QuestionFile(), predict
  elif image or question:
    if not (image and question):
      raise UsageError("--image and --question go together")
    if benchmark or data:
      raise UsageError("--image/--question ask one question; leave out --benchmark and --data")
    if not os.path.exists(image):
      raise FileNotFoundError(f"--image {image} does not exist")
  elif not (benchmark and data):
    raise UsageError("give --benchmark and --data (or --predict QUESTIONS, or --image and --question)")
  elif not os.path.exists(data):
    raise FileNotFoundError(f"--data {data} does not exist")
  if not image:  # a bad benchmark file is reported before a model is loaded
    try:
      bench = benchmarks.get(benchmark)  # a QuestionFile object is returned as it is
    except ValueError as e:
      raise UsageError(str(e)) from None
    questions = bench.read(data, image_root)
    if config.mmbench_rotations:  # MMBench rows without rotations get them; others are as read
      questions = bench.expand(questions)
  run_settings = settings(config)
  model = load_model(config, checkpoint=checkpoint, hf=hf)
  try:
    mesh = sharding.make_mesh(dict(config.mesh))
  except ValueError as e:
    raise UsageError(f"--config.mesh: {e}") from None
  if image:
    run_settings = runner_lib.EvalSettings(**{**run_settings.__dict__, "batch_size": 1, "progress_bar": False})
    return ask(runner_lib.Runner(model, run_settings, mesh), image, question), True
  out = out or os.path.join("eval_out", "predict" if predict else bench.name)
  with storage.writing(out):
    run_header.prepare(out, header(bench, data, image_root, model, config), overwrite=overwrite)
    summary = runner_lib.evaluate(runner_lib.Runner(model, run_settings, mesh), bench, questions, out)
    summary.update(model=model.source, data=os.path.abspath(data), out=os.path.abspath(out))
    with open(os.path.join(out, "summary.json"), "w") as f:
      json.dump(summary, f, indent=1)
  return runner_lib.summary_table(summary, bench), not summary["run"]["stopped"]
