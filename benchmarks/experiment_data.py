"""Step 1 of benchmarks/data_efficiency.py: the synthetic set, the files cut from it, and the
text an LLM is pretrained on (the conversations without their images, and letter exercises)."""

from __future__ import annotations

import json
import os
import time

import numpy as np
from PIL import Image

from data_efficiency_settings import MIX, OPEN_TYPES, Scale
from ee_mllm_jax import data as data_lib
from ee_mllm_jax import storage
from ee_mllm_jax.data import scenes
from ee_mllm_jax.evaluation import prompts as prompts_lib


def dataset(scale: Scale, work: str) -> tuple[data_lib.SyntheticDataset, dict[str, str]]:
  """The synthetic set and the files cut from it: train_N (nested), pretrain (with images),
  pretrain_text (images removed, and letter exercises), letters (those exercises alone),
  letters_val (exercises from the val set's questions, to score the skill), open_val (TextVQA
  format), open_blank_val (the same questions, each on a blank image)."""
  need = max(scale.sizes) + scale.pretrain
  fresh, t0 = not os.path.exists(os.path.join(work, "data", "manifest.json")), time.perf_counter()
  ds = data_lib.ensure_dataset(os.path.join(work, "data"), seed=0, num_train=need, num_val=scale.val,
                               image_size=scale.image_size, difficulty="easy", vocab_size=scale.vocab, max_turns=1,
                               mix=dict(MIX))
  if fresh:
    write_json(ds.path("generated_in.json"), dict(seconds=time.perf_counter() - t0))
  files = {f"train_{n}": ds.path(f"splits/train_{n}.json") for n in scale.sizes}
  files.update(pretrain=ds.path("splits/pretrain.json"), pretrain_text=ds.path("splits/pretrain_text.json"),
               letters=ds.path("splits/letters.json"), letters_val=ds.path("splits/letters_val.json"),
               open_val=ds.path("open_val.json"), open_blank_val=ds.path("open_blank_val.json"))
  if all(os.path.exists(f) for f in files.values()):
    return ds, files
  with open(ds.train_file) as f:
    records = json.load(f)
  pool, pre = records[:max(scale.sizes)], records[max(scale.sizes):need]
  os.makedirs(ds.path("splits"), exist_ok=True)
  for n in scale.sizes:
    write_json(files[f"train_{n}"], pool[:n])
  write_json(files["pretrain"], pre)
  letters = letter_exercises(pre)
  write_json(files["pretrain_text"], [text_only(r) for r in pre] + letters)
  write_json(files["letters"], letters)
  with open(ds.val_file) as f:
    val = json.load(f)
  write_json(files["letters_val"], letter_exercises([dict(r, question_types=[r["question_type"]]) for r in val],
                                                    seed=1))
  Image.new("RGB", (scale.image_size,) * 2, scenes.BACKGROUND).save(ds.path("blank.png"))
  for name, image in (("open_val", None), ("open_blank_val", "blank.png")):
    write_json(files[name], {"data": [
        dict(question_id=r["id"], image_id=os.path.splitext(os.path.basename(image or r["image"]))[0],
             image_path=image or r["image"], question=r["question"], answers=[r["answer"]] * 10,
             question_type=r["question_type"]) for r in val if r["question_type"] in OPEN_TYPES]})
  return ds, files


def text_only(record: dict) -> dict:
  """A conversation with its image removed: the text an LLM is pretrained on."""
  turns = [dict(t, value=t["value"].replace("<image>", "").strip()) for t in record["conversations"]]
  return {"id": record["id"] + "-text", "conversations": turns}


def letter_exercises(records: list[dict], seed: int = 0) -> list[dict]:
  """Text-only multiple-choice exercises in LLaVA-1.5's layout whose hint gives the answer: one per
  record, from its first question. They teach the pretrained LLM to point at the option that says
  something (a Vicuna can; a 4-layer LM trained on a few thousand conversations cannot), so that
  alignment only has to teach what the image shows. Open questions get three distractors drawn
  from the same question type's answers; multiple-choice ones keep their options."""
  rng = np.random.default_rng(seed)
  answers: dict[str, set] = {}
  for r in records:
    answers.setdefault(r["question_types"][0], set()).add(r["conversations"][1]["value"])
  out = []
  for r in records:
    kind, (human, gpt) = r["question_types"][0], r["conversations"][:2]
    lines = human["value"].replace("<image>", "").strip().split("\n")
    if kind.startswith("choice"):  # "question", "A. x", ..., the letter line
      options = dict(line.split(". ", 1) for line in lines[1:-1])
      question, answer = lines[0], options[gpt["value"]]
    else:
      question, answer = lines[0], gpt["value"]
      others = sorted(answers[kind] - {answer})
      picks = [others[i] for i in rng.permutation(len(others))[:3]] + [answer]
      options = dict(zip(scenes.LETTERS, [picks[i] for i in rng.permutation(len(picks))]))
    letter = next(k for k, v in options.items() if v == answer)
    message = prompts_lib.user_message(question, options, hint=f"The answer is {answer}.")
    out.append({"id": r["id"] + "-letters", "conversations": [{"from": "human", "value": message},
                                                              {"from": "gpt", "value": letter}]})
  return out


def ds_seconds(ds) -> float | None:
  """Minutes the dataset took to generate (None when it was made by an older version of this script)."""
  path = ds.path("generated_in.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)["seconds"] / 60


def write_json(path: str, obj):
  storage.atomic_write(path, json.dumps(obj))
