"""lmms-eval's `ee_mllm` model (the `lmms` extra; registered by `ee_mllm_jax.lmms_eval_plugin`):
a train.py checkpoint or an HF export, in any mode, through eval.py's runner.

    lmms-eval --model ee_mllm --model_args checkpoint=RUN[,attention=composite,visual_ffn=false,
        composite_from_layer=8,template=...,system_prompt=...,dtype=...] --tasks TASKS --batch_size 16

`checkpoint` is what eval.py's `--checkpoint` takes (a run dir, its checkpoints/ dir, one step) or
an HF directory (`*.safetensors`, as `--hf`); the mode keywords are eval.py's `--config.<flag>`s.
The task's text is the user message, asked after the image in the checkpoint's chat template.

* generate_until: requests grouped by their generation settings (`max_new_tokens`, `temperature`
  or `do_sample`, `top_p`), then batched as eval.py batches a benchmark: questions about one
  image together, the vision tower and the image prefix computed once per image, fixed shapes.
  `until` strings cut the answer after generation (decoding stops at the template's end of turn).
* loglikelihood: each (context, continuation) as the assistant's reply to the context
  (`Encoder.answered`: the continuation's tokens and the end of turn, leading whitespace of lm-eval's
  target delimiter dropped), scored by `generate.labelled_logprobs` from the image's cached prefix.
  Returns (negative log-likelihood, is_greedy) (inside a GenerationResult, which lmms-eval 0.7.3
  unwraps): lmms-eval 0.7 picks a multiple-choice answer by the smallest value ("the actual
  loss"), so the option eval.py's likelihood ranking picks (SEED-Bench's `likelihood_choice`) is
  lmms-eval's choice.

One image per request (a model of this project reads one); one process (lmms-eval's accelerate
ranks are not used; the mesh's data axis spans the devices instead).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
from typing import Any, Sequence

import numpy as np
from lmms_eval.api.instance import GenerationResult, Instance
from lmms_eval.api.model import lmms
from PIL import Image
from tqdm import tqdm

from ee_mllm_jax import mode as mode_lib
from ee_mllm_jax import sharding
from ee_mllm_jax.data import images as image_lib
from ee_mllm_jax.evaluation import benchmarks
from ee_mllm_jax.evaluation import model as model_lib
from ee_mllm_jax.evaluation import runner as runner_lib

log = logging.getLogger(__name__)


def is_hf_dir(path: str) -> bool:
  """An HF directory holds safetensors weights; a train.py run or step holds Orbax files."""
  return os.path.isdir(path) and any(n.endswith(".safetensors") or n == "model.safetensors.index.json"
                                     for n in os.listdir(path))


def load(checkpoint: str, **kw) -> model_lib.EvalModel:
  if is_hf_dir(checkpoint):
    kw.pop("preset", None)
    return model_lib.from_hf(checkpoint, **kw)
  return model_lib.from_checkpoint(checkpoint, **kw)


def cut(text: str, until: Sequence[str]) -> str:
  """`text` up to the first of the `until` strings."""
  for stop in until:
    if stop:
      text = text.split(stop)[0]
  return text


class EEMLLM(lmms):
  """An EvalModel behind lmms-eval's simple-model API (`generate_until`, `loglikelihood`)."""

  is_simple = True

  def __init__(self, checkpoint: str, *, preset: str | None = None, template: str | None = None,
               system_prompt: str | None = None, dtype: str | None = None, batch_size: int | str = 16,
               images_per_batch: int = 0, max_new_tokens: int = 16, reuse_prefix: bool = True,
               device: Any = None, max_batch_size: Any = None, **mode):
    super().__init__()
    del device, max_batch_size  # the mesh takes every local device
    unknown = sorted(set(mode) - set(mode_lib.FLAGS))
    if unknown:
      raise ValueError(f"ee_mllm: unknown model_args {unknown}; it takes checkpoint, preset, template, "
                       f"system_prompt, dtype, images_per_batch, max_new_tokens, reuse_prefix and the mode flags "
                       f"{list(mode_lib.FLAGS)}")
    if not isinstance(batch_size, int):  # lmms-eval's default "1" or "auto"
      batch_size = int(batch_size) if str(batch_size).isdigit() else 16
    self.model = load(str(checkpoint), preset=preset, template=template, system_prompt=system_prompt, dtype=dtype,
                      **mode)
    self.settings = runner_lib.EvalSettings(batch_size=batch_size, images_per_batch=int(images_per_batch),
                                            max_new_tokens=int(max_new_tokens), reuse_prefix=bool(reuse_prefix),
                                            progress_bar=False)
    self.runner = runner_lib.Runner(self.model, self.settings, sharding.make_mesh(dict(data=-1, fsdp=1, tensor=1)))
    self._sources: dict[str, Instance] = {}  # image key -> a request with that image (one call's)
    log.warning("ee_mllm: %s, %s", self.model.source, self.model.mode)

  # -------------------------------------------------------------------------- requests -> items

  def _visual(self, req: Instance) -> Image.Image:
    """The request's one image (a model of this project reads one per question)."""
    doc_to_visual, doc_id, task, split = req.args[2:6]
    visuals = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual is not None else []
    visuals = [v for v in (visuals or []) if v is not None]
    if len(visuals) != 1 or not isinstance(visuals[0], Image.Image):
      raise runner_lib.EvalError(f"task {task} doc {doc_id}: ee_mllm reads one image per question, the task gives "
                                 f"{len(visuals)} visual(s) {[type(v).__name__ for v in visuals]}")
    return visuals[0]

  def _question(self, i: int, req: Instance) -> benchmarks.Question:
    """Request i as a question whose image key is its image's content (equal images share their
    prefix); the image itself is decoded again for its batch, so that memory holds one batch's."""
    img = self._visual(req)
    key = hashlib.sha256(f"{img.mode}{img.size}".encode() + img.tobytes()).hexdigest()
    self._sources.setdefault(key, req)
    return benchmarks.Question(str(i), b"", key, req.args[0], ("",))

  def _pixels(self, key: str) -> np.ndarray:
    req, m, cfg = self._sources[key], self.model, self.model.cfg.vision
    img = self._visual(req)
    try:
      return image_lib.preprocess(img, size=cfg.image_size, mean=cfg.image_mean, std=cfg.image_std,
                                  mode=m.image_preprocess, background=m.alpha_background)
    except Exception as e:  # an exotic mode Pillow cannot convert
      raise runner_lib.EvalError(f"task {req.args[4]} doc {req.args[3]}: cannot convert its image ({img.mode}): "
                                 f"{e}") from None

  def _run(self, items: list, step, desc: str) -> dict[int, Any]:
    """`step(batch, pixels, image_of_row)` over eval.py's batches of `items` -> {request index: result}."""
    self.runner.fit_image_rows(items)
    out = {}
    try:
      with tqdm(total=len(items), desc=desc, disable=self.rank != 0) as bar:
        for batch in self.runner._batches(items):  # pylint: disable=protected-access
          keys = list(dict.fromkeys(it.q.image_key for it in batch))
          image_of_row = [keys.index(it.q.image_key) for it in batch]
          for it, result in zip(batch, step(batch, [self._pixels(k) for k in keys], image_of_row)):
            out[int(it.q.qid)] = result
          bar.update(len(batch))
    finally:
      self._sources.clear()
    return out

  # -------------------------------------------------------------------------- the lmms API

  def generate_until(self, requests: list[Instance]) -> list[str]:
    groups: dict[tuple, list[int]] = {}
    for i, req in enumerate(requests):
      groups.setdefault(self._sampling(req.args[1]), []).append(i)
    out: dict[int, str] = {}
    try:
      for (max_new, temperature, top_p, until), indices in groups.items():
        self.runner.settings = dataclasses.replace(self.settings, max_new_tokens=max_new, temperature=temperature,
                                                   top_p=top_p)
        items = [self.runner.item(self._question(i, requests[i]), requests[i].args[0]) for i in indices]
        step = self.runner._generate  # pylint: disable=protected-access
        out.update({i: cut(text, until) for i, text in self._run(items, step, "ee_mllm generate").items()})
    finally:
      self.runner.settings = self.settings
    return [out[i] for i in range(len(requests))]

  def _sampling(self, gen_kwargs: dict | None) -> tuple:
    """(max_new_tokens, temperature, top_p, until) of a request; greedy unless do_sample (or a
    temperature > 0 without do_sample=False)."""
    kw = dict(gen_kwargs or {})
    until = kw.get("until") or ()
    until = (until,) if isinstance(until, str) else tuple(until)
    temperature = float(kw.get("temperature") or 0.0)
    if kw.get("do_sample") is False:
      temperature = 0.0
    top_p = float(kw.get("top_p") or 1.0) if temperature > 0 else 1.0
    return int(kw.get("max_new_tokens") or self.settings.max_new_tokens), temperature, top_p, until

  def loglikelihood(self, requests: list[Instance]) -> list[GenerationResult]:
    items = []
    for i, req in enumerate(requests):
      context, target, _, doc_id, task, split = req.args
      continuation = target if isinstance(target, str) else target(self.task_dict[task][split][doc_id])
      q = self._question(i, req)
      layout = self.runner.encoder.answered(context, str(continuation).lstrip())
      self.runner.check_layout(q, layout)
      items.append(runner_lib._Item(q, layout, context))  # pylint: disable=protected-access

    def step(batch, pixels, image_of_row):
      sums, _, greedy = self.runner.score_layouts([it.layout for it in batch], pixels, image_of_row,
                                                  self.runner.rows, greedy=True)
      # Wrapped: lmms-eval 0.7.3's evaluator turns every model output that is not a str or a
      # GenerationResult into str(output), so a bare (float, bool) tuple would reach its
      # multiple-choice scoring as text; a GenerationResult's text is passed on as it is.
      return [GenerationResult(text=(-float(s), bool(g))) for s, g in zip(sums, greedy)]

    got = self._run(items, step, "ee_mllm loglikelihood")
    return [got[i] for i in range(len(requests))]

  def generate_until_multi_round(self, requests):
    raise NotImplementedError("ee_mllm answers one question per image (generate_until), not multi-round tasks")
