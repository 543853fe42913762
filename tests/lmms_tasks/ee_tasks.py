"""lmms-eval task functions over the synthetic set's benchmark files (tests/test_lmms_plugin.py
writes the YAMLs beside a copy of this file, with the data paths filled in). The prompts are
eval.py's (LLaVA-1.5's layout); the TextVQA score is lmms-eval's own `textvqa_process_results`.

Docs are rows of a JSON Lines file: a benchmark row with `image`, the absolute path of its image.
"""

from lmms_eval.tasks.textvqa.utils import textvqa_process_results  # noqa: F401  (the YAML's process_results)
from PIL import Image


def doc_to_visual(doc):
  with Image.open(doc["image"]) as img:
    img.load()
    return [img.copy()]


def textvqa_doc_to_text(doc, lmms_eval_specific_kwargs=None):
  """lmms-eval's TextVQA layout (pre_prompt, question, post_prompt), the question as written."""
  kw = lmms_eval_specific_kwargs or {}
  return f"{kw.get('pre_prompt', '')}{doc['question']}{kw.get('post_prompt', '')}"


def textvqa_doc_to_target(doc):
  return doc["answers"][0]


def seed_doc_to_text(doc, lmms_eval_specific_kwargs=None):
  """The question without its options, as an open one (post_prompt: the short-answer line): each
  option is scored as the answer to it (eval.py's likelihood ranking of SEED-Bench's options)."""
  return textvqa_doc_to_text(doc, lmms_eval_specific_kwargs)


def seed_doc_to_choice(doc):
  return [doc[f"choice_{c}"] for c in "abcd"]


def seed_doc_to_target(doc):
  return "ABCD".index(doc["answer"])
