"""MMBench's circular rotations, for files that hold each question once.

The circular MMBench files carry every rotation as its own row (index + k * 1_000_000, the
options shifted by k, the answer letter moved with them). A question that appears in one row
only can be expanded here the same way, so CircularEval runs on any MMBench TSV; questions
that already have rotations are left as they are.
"""

from __future__ import annotations

import collections
import dataclasses

from ee_mllm_jax.evaluation.readers import Question


def rotate(q: Question, k: int) -> Question:
  """Rotation k of a multiple-choice question: option i moves to letter (i - k) mod n."""
  letters, texts = list(q.options), list(q.options.values())
  correct = texts[letters.index(q.answers[0])]
  shifted = texts[k:] + texts[:k]
  return dataclasses.replace(q, qid=str(q.index + k * 1_000_000), index=q.index + k * 1_000_000,
                             options=dict(zip(letters, shifted)), answers=(letters[shifted.index(correct)],))


def with_rotations(questions: list[Question]) -> list[Question]:
  """Every single-row question followed by its other rotations (one per option)."""
  sizes = collections.Counter(q.index % 1_000_000 for q in questions)
  out = []
  for q in questions:
    out.append(q)
    if sizes[q.index % 1_000_000] == 1:
      out += [rotate(q, k) for k in range(1, len(q.options))]
  return out
