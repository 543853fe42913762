"""Export to a stock HF LLaVA directory that transformers loads with no custom code.

    python -m ee_mllm_jax.convert.export --checkpoint RUN_DIR[/checkpoints/STEP] --out DIR

writes `model*.safetensors` (sharded above --max_shard_gb), a complete `config.json`
(LlavaConfig; under "ee_mllm" the mode that runs, the one the weights were trained in ("trained"),
and the chat template and system prompt; `model_type` "ee_mllm" unless it is a plain self-trained
LLaVA, so that stock transformers warns instead of silently running another model),
`generation_config.json`, the run's `tokenizer.json` with `tokenizer_config.json`, and the processor files
(`preprocessor_config.json`, `processor_config.json`, `chat_template.jinja`), so that
`LlavaForConditionalGeneration.from_pretrained(DIR)` and `AutoProcessor.from_pretrained(DIR)`
work. `--out` must be empty or new; `--overwrite` replaces an earlier export, removing every
weight file and index the new one does not write. The chat template is the run's (plain / vicuna_v1 / chatml, with its system prompt):
`processor.apply_chat_template(messages, add_generation_prompt=True)` builds the prompt the
model was trained on; an image item of a user message renders as "<image>\\n" (LLaVA's
"<image>\\n{question}" form). Tensor names come from the one name map (`convert.names`),
read backwards; each tensor is produced from the parameters as its shard is written.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
from typing import Any, Mapping

import numpy as np

from ee_mllm_jax.config import ModelConfig
from ee_mllm_jax.convert import hf_config, names, safetensors_io

IMAGE_TOKEN = "<image>"
# Weight files and indices an earlier export (ours or transformers') may have left in a directory.
WEIGHT_PATTERNS = ("*.safetensors", "*.safetensors.index.json", "*.bin", "*.bin.index.json", "*.pt", "*.pth")


class ExportError(ValueError):
  """An export that cannot be written as asked (a one-line error on the command line)."""


def planned_tensors(cfg: ModelConfig, params: Mapping[str, Any], dtype=None) -> list[safetensors_io.PlannedTensor]:
  """(HF name, shape, dtype, produce) for every tensor of the LLaVA checkpoint, in name-map
  order; `dtype` (default: each parameter's own) is the dtype written."""
  import jax  # pylint: disable=g-import-not-at-top

  from ee_mllm_jax import params as params_lib  # pylint: disable=g-import-not-at-top

  flat = params_lib.flatten(params)
  table = names.name_map(cfg)
  missing = sorted(set(table) - set(flat))
  if missing:
    raise ValueError(f"params lack {missing[:5]}, which a {cfg.vision.kind} + LLM LLaVA needs")
  extra = sorted(set(flat) - set(table))
  if extra:
    raise ValueError(f"params have {extra[:5]}, which the LLaVA layout has no place for")
  out = []
  for path, (name, hook) in table.items():
    leaf = flat[path]
    out_dtype = _dtype(dtype or leaf.dtype)
    layers = range(leaf.shape[0]) if "{i}" in name else [None]
    for i in layers:
      shape = leaf.shape[1:] if i is not None else leaf.shape
      hf_shape = jax.eval_shape(hook.to_hf, jax.ShapeDtypeStruct(shape, leaf.dtype)).shape

      def produce(leaf=leaf, i=i, hook=hook):
        return np.asarray(hook.to_hf(np.asarray(leaf[i] if i is not None else leaf)))

      out.append((name.format(i=i) if i is not None else name, tuple(hf_shape), out_dtype, produce))
  return out


def _dtype(d) -> np.dtype:
  import ml_dtypes  # pylint: disable=g-import-not-at-top
  if not isinstance(d, str):  # a numpy / ml_dtypes dtype or scalar type
    return np.dtype(d)
  name = {"bf16": "bfloat16", "fp16": "float16", "f16": "float16", "fp32": "float32", "f32": "float32"}.get(d, d)
  if name == "bfloat16":
    return np.dtype(ml_dtypes.bfloat16)
  try:
    dtype = np.dtype(name)
  except TypeError:
    raise ExportError(f"unknown dtype {d!r} (bfloat16 / bf16, float16 / fp16, float32 / fp32)") from None
  if dtype.kind != "f":
    raise ExportError(f"dtype {d!r} is not a floating-point type")
  return dtype


# ----------------------------------------------------------------------------- tokenizer, processor


def _content_macro() -> str:
  # A message's text: a string as is; a list of items with images as "<image>\n" (LLaVA's form).
  return ("{%- macro content(m) -%}{%- if m['content'] is string -%}{{ m['content'] }}{%- else -%}"
          "{%- for c in m['content'] -%}{%- if c['type'] == 'image' -%}{{ '<image>\\n' }}"
          "{%- elif c['type'] == 'text' -%}{{ c['text'] }}{%- endif -%}{%- endfor -%}{%- endif -%}{%- endmacro -%}")


def chat_template(template: str, system_prompt: str | None, *, bos: bool) -> str:
  """The Jinja form of `data.text.ChatTemplate(template, system_prompt).render(..., prompt=...)`,
  with `bos_token` first where our encoder puts it and the tokenizer does not add it itself."""
  from ee_mllm_jax.data import text as text_lib  # pylint: disable=g-import-not-at-top

  if template not in text_lib.TEMPLATE_NAMES:
    raise ValueError(f"unknown chat template {template!r}")
  j = json.dumps  # Python string -> Jinja string literal (same escapes)
  head = _content_macro() + ("{{- bos_token -}}" if bos else "")
  if template == "plain":
    return head + ("{%- for m in messages if m['role'] == 'user' -%}{%- if m['content'] is string -%}"
                   "{{ '<image>' * (m['content'].count('<image>')) }}{%- else -%}{%- for c in m['content'] "
                   "if c['type'] == 'image' -%}<image>{%- endfor -%}{%- endif -%}{%- endfor -%}{{ '\\n' }}"
                   "{%- for m in messages if m['role'] == 'assistant' -%}{{ content(m) }}{{ '\\n' }}{%- endfor -%}")
  if template == "vicuna_v1":
    default = system_prompt if system_prompt is not None else text_lib.VICUNA_SYSTEM
    return head + (
        "{%- if messages[0]['role'] == 'system' -%}{%- set system = content(messages[0]) -%}"
        "{%- set messages = messages[1:] -%}{%- else -%}{%- set system = " + j(default) + " -%}{%- endif -%}"
        "{{ system }}{{ ' ' }}{%- for m in messages -%}{%- if m['role'] == 'user' -%}"
        "{{ 'USER: ' }}{{ content(m) }}{{ ' ' }}{%- else -%}{{ 'ASSISTANT: ' }}{{ content(m) }}{{ '</s>' }}"
        "{%- endif -%}{%- endfor -%}{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}")
  default = system_prompt if system_prompt is not None else text_lib.CHATML_SYSTEM
  return head + (
      "{%- if messages[0]['role'] == 'system' -%}{%- set system = content(messages[0]) -%}"
      "{%- set messages = messages[1:] -%}{%- else -%}{%- set system = " + j(default) + " -%}{%- endif -%}"
      "{%- if system -%}{{ '<|im_start|>system\\n' }}{{ system }}{{ '<|im_end|>\\n' }}{%- endif -%}"
      "{%- for m in messages -%}{{ '<|im_start|>' + m['role'] + '\\n' }}{{ content(m) }}{{ '<|im_end|>\\n' }}"
      "{%- endfor -%}{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}")


def _with_image_token(tokenizer_json: str, vocab_size: int) -> tuple[str, int]:
  """(tokenizer JSON with an `<image>` special token, its id), adding one where the
  vocabulary has room; the id must be below the model's vocab_size."""
  import tokenizers  # pylint: disable=g-import-not-at-top

  tok = tokenizers.Tokenizer.from_str(tokenizer_json)
  idx = tok.token_to_id(IMAGE_TOKEN)
  if idx is None:
    size = tok.get_vocab_size(with_added_tokens=True)
    if size >= vocab_size:
      raise ValueError(f"the tokenizer has no {IMAGE_TOKEN!r} token and its {size} tokens fill the model's "
                       f"vocabulary of {vocab_size}: there is no id for the image placeholder LLaVA needs")
    tok.add_special_tokens([tokenizers.AddedToken(IMAGE_TOKEN, special=True, normalized=False)])
    idx = tok.token_to_id(IMAGE_TOKEN)
    tokenizer_json = tok.to_str()
  if idx >= vocab_size:
    raise ValueError(f"{IMAGE_TOKEN!r} has id {idx}, outside the model's vocabulary of {vocab_size}")
  return tokenizer_json, idx


def _special(tok, *candidates) -> str | None:
  return next((c for c in candidates if tok.token_to_id(c) is not None), None)


def image_processor_config(cfg: ModelConfig, image_preprocess: str) -> dict:
  """LlavaImageProcessor settings that reproduce `data.images.preprocess(mode=image_preprocess)`."""
  v, size = cfg.vision, cfg.vision.image_size
  d = dict(image_processor_type="LlavaImageProcessor", do_convert_rgb=True, do_rescale=True,
           rescale_factor=1 / 255, do_normalize=True, image_mean=list(v.image_mean), image_std=list(v.image_std),
           resample=3, do_resize=True, do_pad=image_preprocess == "pad")
  if image_preprocess == "resize":
    d.update(size={"height": size, "width": size}, do_center_crop=False, crop_size={"height": size, "width": size})
  else:
    d.update(size={"shortest_edge": size}, do_center_crop=True, crop_size={"height": size, "width": size})
  return d


def export_hf(cfg: ModelConfig, params: Mapping[str, Any], out_dir: str, *, tokenizer_json: str,
              template: str = "vicuna_v1", system_prompt: str | None = None, image_preprocess: str = "pad",
              dtype=None, max_shard_bytes: int = 5 << 30, overwrite: bool = False, peft_dir: str | None = None) -> str:
  """Writes the LLaVA directory for in-memory `params`; returns `out_dir`. A non-empty `out_dir`
  is refused unless `overwrite` (then weight files and indices it does not write are removed).
  LoRA adapters (`cfg.llm.lora`) are merged into their kernels: the directory is the plain model;
  with `peft_dir` they are written there instead, as a PEFT adapter over `out_dir`'s base."""
  import tokenizers  # pylint: disable=g-import-not-at-top

  from ee_mllm_jax import lora  # pylint: disable=g-import-not-at-top
  from ee_mllm_jax.convert import peft_adapter  # pylint: disable=g-import-not-at-top
  from ee_mllm_jax.data import text as text_lib  # pylint: disable=g-import-not-at-top

  if cfg.llm.lora is not None:
    if peft_dir:
      peft_adapter.write_adapter(cfg, params, peft_dir, base_model=os.path.abspath(out_dir), dtype=dtype)
      params = lora.without_adapters(params)
    else:
      params = lora.merge(params, cfg.llm.lora.scale)
    cfg = cfg.replace(llm=cfg.llm.replace(lora=None))
  elif peft_dir:
    raise ExportError("--peft writes LoRA adapters, and this model has none")
  tokenizer_json, image_id = _with_image_token(tokenizer_json, cfg.llm.vocab_size)
  tok = tokenizers.Tokenizer.from_str(tokenizer_json)
  end_of_turn = text_lib.ChatTemplate(template).end_of_turn
  if template == "plain":  # captions end with "\n", an ordinary token: generation stops on it
    eos_id = tok.encode(end_of_turn, add_special_tokens=False).ids[-1]
    eos = _special(tok, "</s>", "<|endoftext|>")
  else:
    eos_id, eos = tok.token_to_id(end_of_turn), end_of_turn
    if eos_id is None:
      raise ValueError(f"the tokenizer has no {end_of_turn!r} token, which ends a {template} turn")
  bos = _special(tok, "<s>", "<|begin_of_text|>") if template != "chatml" else None
  adds_specials = bool(tok.encode("", add_special_tokens=True).ids)
  pad = _special(tok, "<pad>", "<unk>", "<|endoftext|>")
  pad_id = tok.token_to_id(pad) if pad else None
  hf = hf_config.config_to_hf(cfg, image_token_index=image_id, pad_token_id=pad_id)
  hf["ee_mllm"].update(template=template, system_prompt=system_prompt)  # what eval.py --hf prompts with
  torch_dtype = _dtype(dtype or cfg.param_dtype).name
  hf.update(dtype=torch_dtype)
  hf["text_config"].update(bos_token_id=tok.token_to_id(bos) if bos else None, eos_token_id=eos_id,
                           pad_token_id=pad_id)

  if os.path.isdir(out_dir) and os.listdir(out_dir) and not overwrite:
    raise ExportError(f"{out_dir} is not empty; pass --overwrite to replace what it holds")
  os.makedirs(out_dir, exist_ok=True)
  written = safetensors_io.write_checkpoint(out_dir, planned_tensors(cfg, params, dtype),
                                            max_shard_bytes=max_shard_bytes)
  stale = {f for pattern in WEIGHT_PATTERNS for f in glob.glob(os.path.join(out_dir, pattern))}
  for f in sorted(stale - {os.path.join(out_dir, name) for name in written}):
    os.remove(f)

  def write(name, obj):
    with open(os.path.join(out_dir, name), "w", encoding="utf-8") as f:
      if isinstance(obj, str):
        f.write(obj)
      else:
        json.dump(obj, f, indent=2, ensure_ascii=False)

  write("config.json", hf)
  write("generation_config.json", dict(bos_token_id=hf["text_config"]["bos_token_id"], eos_token_id=eos_id,
                                       pad_token_id=pad_id, do_sample=False))
  write("tokenizer.json", tokenizer_json)
  template_text = chat_template(template, system_prompt, bos=bool(bos) and not adds_specials)
  unk = _special(tok, "<unk>")
  write("tokenizer_config.json", dict(
      tokenizer_class="PreTrainedTokenizerFast", bos_token=bos, eos_token=eos, pad_token=pad,
      unk_token=unk, image_token=IMAGE_TOKEN, extra_special_tokens={"image_token": IMAGE_TOKEN},
      model_max_length=hf["text_config"]["max_position_embeddings"], chat_template=template_text,
      clean_up_tokenization_spaces=False))
  write("preprocessor_config.json", image_processor_config(cfg, image_preprocess))
  write("processor_config.json", dict(
      processor_class="LlavaProcessor", patch_size=cfg.vision.patch_size,
      vision_feature_select_strategy=hf["vision_feature_select_strategy"],
      num_additional_image_tokens=1 if cfg.vision.class_token else 0, image_token=IMAGE_TOKEN))
  write("chat_template.jinja", template_text)
  return out_dir


def export_checkpoint(checkpoint: str, out_dir: str, **kwargs) -> str:
  """A train.py checkpoint (run dir, its checkpoints/ or one step) -> the LLaVA directory, with
  the tokenizer, template and system prompt the run recorded."""
  from ee_mllm_jax import loading  # pylint: disable=g-import-not-at-top

  if not os.path.exists(checkpoint):
    raise ExportError(f"checkpoint {checkpoint} does not exist")
  try:
    run = loading.read_run_config(checkpoint)
  except (FileNotFoundError, ValueError) as e:  # no step in it, an unreadable config
    raise ExportError(f"{checkpoint}: {e}") from None
  if run is None or not run.get("tokenizer"):
    raise ExportError(f"{checkpoint} records no config/tokenizer (written before checkpoints carried them)")
  trained = ModelConfig.from_dict(run["model"])
  if not trained.mode.visual_in_decoder:
    raise ExportError(f"{checkpoint}: a {trained.mode_name} model has no HF LLaVA equivalent; only self and "
                      "composite models export to the LLaVA layout")
  cfg, params = loading.load_model(checkpoint)
  data = run.get("data") or {}
  return export_hf(cfg, params, out_dir, tokenizer_json=run["tokenizer"], template=data.get("template", "vicuna_v1"),
                   system_prompt=data.get("system_prompt"), image_preprocess=data.get("image_preprocess", "pad"),
                   **kwargs)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--checkpoint", required=True, help="a run dir, its checkpoints/ dir, or one step")
  parser.add_argument("--out", required=True, help="the HF directory to write")
  parser.add_argument("--dtype", default=None, help="dtype written (default: the parameters'), e.g. bfloat16 / bf16")
  parser.add_argument("--max_shard_gb", type=float, default=5.0)
  parser.add_argument("--overwrite", action="store_true", help="replace an earlier export in --out")
  parser.add_argument("--peft", default=None, help="LoRA runs: write the adapters to this PEFT adapter directory "
                      "and the unmerged base to --out (default: merge them into --out)")
  args = parser.parse_args(argv)
  try:
    out = export_checkpoint(args.checkpoint, args.out, dtype=_dtype(args.dtype) if args.dtype else None,
                            max_shard_bytes=int(args.max_shard_gb * (1 << 30)), overwrite=args.overwrite,
                            peft_dir=args.peft)
  except (ExportError, FileNotFoundError) as e:  # user errors: one line, exit 1
    sys.exit(f"error: {e}")
  print(f"wrote {out}")


if __name__ == "__main__":
  main()
