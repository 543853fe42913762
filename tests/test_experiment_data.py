"""benchmarks/experiment_data.py: the letter exercises the experiment's LLM is pretrained on
point at the option the hint names, in LLaVA-1.5's multiple-choice layout, with the right letter
spread evenly; and they are deterministic."""

import collections
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import experiment_data  # noqa: E402
from ee_mllm_jax.data import synthetic  # noqa: E402
from ee_mllm_jax.evaluation import prompts  # noqa: E402


def _records(n):
  """Train records as the synthetic set writes them, every question type."""
  maker = synthetic.SceneMaker(32, "easy")
  import numpy as np  # pylint: disable=g-import-not-at-top
  out = []
  for i in range(n):
    rng = np.random.default_rng([0, i])
    kind = synthetic.QUESTION_TYPES[i % len(synthetic.QUESTION_TYPES)]
    _, (q,) = maker.make(rng, kind, 1)
    out.append({"id": f"train-{i:06d}", "image": "x.png", "question_types": [q.kind],
                "conversations": [{"from": "human", "value": synthetic._human_value(q, True)},
                                  {"from": "gpt", "value": q.answer}]})
  return out


def test_each_exercise_points_at_the_option_its_hint_names():
  records = _records(160)
  exercises = experiment_data.letter_exercises(records)
  assert len(exercises) == len(records)
  letters = collections.Counter()
  for record, ex in zip(records, exercises):
    human, gpt = ex["conversations"]
    lines = human["value"].split("\n")
    assert "<image>" not in human["value"] and lines[-1] == prompts.CHOOSE_LETTER
    hint, question, options = lines[0], lines[1], dict(line.split(". ", 1) for line in lines[2:-1])
    assert list(options) == list("ABCD") and len(set(options.values())) == 4
    assert hint.startswith("The answer is ") and options[gpt["value"]] == hint[len("The answer is "):-1]
    truth = record["conversations"][1]["value"]
    if record["question_types"][0].startswith("choice"):  # the record's own options and letter
      assert gpt["value"] == truth and question in record["conversations"][0]["value"]
    else:
      assert options[gpt["value"]] == truth
    letters[gpt["value"]] += 1
  assert min(letters.values()) >= 0.15 * len(records), letters  # no letter a text-only shortcut could favour


def test_exercises_are_deterministic():
  records = _records(40)
  assert experiment_data.letter_exercises(records) == experiment_data.letter_exercises(records)
