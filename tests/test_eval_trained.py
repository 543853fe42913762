"""eval.py end to end on a small *trained* model: it beats the answer prior on a benchmark file in
the real TextVQA format, and blank images take that advantage away.

The tiny preset learns the synthetic count question ("How many circles are there?", answers 1-4)
in a few hundred steps on 2 CPU cores; the other types need the demo model and thousands of steps
(`configs/demo_bench.py`). The val questions go into a TextVQA-format file (`data` list,
`question_id`, `question`, ten `answers`, the image), and eval.py (the real command, in a
subprocess) scores it with the EvalAI accuracy.
"""

import collections
import json
import os
import subprocess
import sys

import pytest
from PIL import Image

import conftest
from ee_mllm_jax.train import loop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 400
pytestmark = pytest.mark.slow  # a model trained to an accuracy, then eval.py in subprocesses


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """(workdir, dataset dir): the tiny model (self attention) trained on count questions only."""
  tmp = tmp_path_factory.mktemp("trained")
  dataset, workdir = str(tmp / "data"), str(tmp / "run")
  config = conftest.tiny_config(dataset, workdir, STEPS, **{
      "model.attention": "self", "model.visual_ffn": True, "synthetic.num_train": 2000, "synthetic.num_val": 200,
      "synthetic.mix.color": 0.0, "synthetic.mix.shape": 0.0, "synthetic.mix.position": 0.0,
      "data.global_batch_size": 16, "optim.learning_rate": 3e-3, "checkpoint.every_steps": STEPS,
      "log_every": 100})
  loop.train(config)
  return workdir, dataset


def _textvqa_file(records, path, image_of=lambda r: r["image"]):
  data = [{"question_id": i, "question": r["question"], "image_id": os.path.splitext(os.path.basename(r["image"]))[0],
           "image_path": image_of(r), "answers": [r["answer"]] * 10} for i, r in enumerate(records)]
  with open(path, "w") as f:
    json.dump({"dataset_name": "textvqa", "dataset_version": "0.5.1", "data": data}, f)


def _eval(workdir, data, image_root, out):
  env = {**os.environ, "XLA_FLAGS": conftest.TEST_XLA_FLAGS, "JAX_PLATFORMS": "cpu"}
  run = subprocess.run([sys.executable, "eval.py", "--checkpoint", workdir, "--benchmark", "textvqa", "--data", data,
                        "--image-root", image_root, "--out", out, "--config.short_answer_prompt=",
                        "--config.progress_bar=false"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert run.returncode == 0, run.stderr[-3000:]
  with open(os.path.join(out, "metrics.json")) as f:
    return json.load(f)


def test_a_trained_model_beats_the_answer_prior_and_blank_images_do_not(trained, tmp_path):
  workdir, dataset = trained
  with open(os.path.join(dataset, "train.json")) as f:
    train = json.load(f)
  with open(os.path.join(dataset, "val.json")) as f:
    val = json.load(f)
  assert {r["question_type"] for r in val} == {"count"}
  # The answer prior: always the most frequent train answer (what a model blind to the image reaches).
  answers = collections.Counter(t["value"].strip() for r in train for t in r["conversations"] if t["from"] == "gpt")
  best = answers.most_common(1)[0][0]
  prior = sum(r["answer"] == best for r in val) / len(val)

  _textvqa_file(val, str(tmp_path / "count_val.json"))
  metrics = _eval(workdir, str(tmp_path / "count_val.json"), dataset, str(tmp_path / "out"))
  accuracy = metrics["accuracy"]
  assert accuracy > prior + 0.1, f"accuracy {accuracy:.3f} vs answer prior {prior:.3f}"

  # Guard: the same questions about blank (mean-colour) images fall back to about the prior.
  blank = str(tmp_path / "blank.png")
  with Image.open(os.path.join(dataset, val[0]["image"])) as im:
    Image.new("RGB", im.size, (128, 128, 128)).save(blank)
  _textvqa_file(val, str(tmp_path / "blank_val.json"), image_of=lambda r: blank)
  blind = _eval(workdir, str(tmp_path / "blank_val.json"), str(tmp_path), str(tmp_path / "out_blank"))
  blind_accuracy = blind["accuracy"]
  assert blind_accuracy < accuracy - 0.1, f"blank images {blind_accuracy:.3f} vs real ones {accuracy:.3f}"
