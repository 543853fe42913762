"""What an eval.py output directory holds the predictions of: OUT/run.json.

    {"benchmark", "data": {path, sha256, image_root}, "model": {source, step, fingerprint, mode,
     attention, visual_ffn, composite_from_layer, dtype}, "prompt": {template, system_prompt,
     short_answer_prompt, ocr_tokens, max_new_tokens, likelihood, mmbench_rotations}}

A re-run resumes OUT/predictions.jsonl only when its header is the same, field for field;
otherwise it is refused naming the first field that differs (or, with --overwrite, the old
predictions are removed and the run starts afresh). Settings that do not change a prediction
(batch sizes, prefix reuse, the mesh, `limit`, `on_bad_image`: skipped questions are retried)
are not part of it.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

from ee_mllm_jax import storage

HEADER = "run.json"
RESULTS = ("predictions.jsonl", "metrics.json", "summary.json")


class MixedRunError(ValueError):
  """--out holds the predictions of another run (another benchmark, data, model, mode, prompt)."""


def sha256_file(path: str, block: int = 1 << 20) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(block), b""):
      h.update(chunk)
  return h.hexdigest()


def model_fingerprint(source: str) -> tuple[int | None, str | None]:
  """(step, fingerprint) of a model source. A train.py checkpoint step: its step and the sha256
  of its integrity record (the CRC-32 of every array, so any change of weights changes it); an
  HF directory: the sha256 of its config.json and of the names and sizes of its weight files."""
  from ee_mllm_jax import loading  # pylint: disable=g-import-not-at-top
  if os.path.isdir(os.path.join(source, "state")):
    step = int(os.path.basename(source)) if os.path.basename(source).isdigit() else None
    record = loading.read_json_item(source, "integrity")
    if record is None:
      return step, None
    return step, hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()
  h = hashlib.sha256()
  config = os.path.join(source, "config.json")
  if os.path.exists(config):
    h.update(open(config, "rb").read())
  for name in sorted(os.listdir(source)) if os.path.isdir(source) else []:
    if name.endswith((".safetensors", ".safetensors.index.json")):
      h.update(f"{name}:{os.path.getsize(os.path.join(source, name))}\n".encode())
  return None, h.hexdigest()


def make(benchmark: str, data: str, image_root: str | None, model, config) -> dict[str, Any]:
  """The header of a run of `model` (an EvalModel) on `benchmark`/`data` with eval.py's `config`."""
  step, fingerprint = model_fingerprint(model.source)
  return {
      "benchmark": benchmark,
      "data": {"path": os.path.abspath(data), "sha256": sha256_file(data),
               "image_root": os.path.abspath(image_root) if image_root else None},
      "model": {"source": model.source, "step": step, "fingerprint": fingerprint, "mode": model.mode,
                **model.cfg.mode.flags(), "trained_mode": model.cfg.weights_mode.flags(), "dtype": model.cfg.dtype},
      "prompt": {"template": model.template.name, "system_prompt": model.template.system,
                 "short_answer_prompt": config.short_answer_prompt, "ocr_tokens": config.ocr_tokens,
                 "max_new_tokens": config.max_new_tokens, "likelihood": config.likelihood,
                 "mmbench_rotations": config.mmbench_rotations},
  }


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def _short(value) -> str:
  text = repr(value)
  return text if len(text) <= 80 else text[:77] + "..."


def prepare(out_dir: str, header: dict[str, Any], *, overwrite: bool = False) -> str:
  """Makes `out_dir` hold `header`'s run: resumes when it already does, starts afresh with
  `overwrite`, otherwise raises MixedRunError naming the first differing field. -> "new",
  "resumed" or "overwritten"."""
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, HEADER)
  results = [name for name in RESULTS if os.path.exists(os.path.join(out_dir, name))]
  state = "new"
  if os.path.exists(path) or results:
    saved = None
    if os.path.exists(path):
      try:
        with open(path) as f:
          saved = json.load(f)
      except ValueError:
        saved = None
    if saved == json.loads(json.dumps(header)):
      return "resumed"
    if not overwrite:
      if saved is None:
        raise MixedRunError(f"--out {out_dir} holds {', '.join(results) or 'results'} without a readable {HEADER} "
                            "(what run wrote them is unknown); --overwrite starts afresh, or choose another --out")
      want, have = _flat(json.loads(json.dumps(header))), _flat(saved)
      field = next(k for k in list(want) + list(have) if want.get(k, "<absent>") != have.get(k, "<absent>"))
      raise MixedRunError(f"--out {out_dir} holds predictions of another run: {field} is "
                          f"{_short(have.get(field, '<absent>'))} there, {_short(want.get(field, '<absent>'))} now; "
                          "--overwrite starts afresh, or choose another --out")
    for name in results:
      os.remove(os.path.join(out_dir, name))
    state = "overwritten"
  with storage.atomic_open(path) as f:
    json.dump(header, f, indent=1)
  return state
