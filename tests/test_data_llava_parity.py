"""`vicuna_v1` and `plain` token for token against LLaVA's own training preprocessing.

The expected `input_ids` and `labels` in tests/data/llava_parity.json came from running LLaVA's
`preprocess_multimodal`, `preprocess_v1` and `preprocess_plain` (llava/train/train.py of the
`llava-torch==1.2.2.post1` wheel, transformers 4.37.2, tokenizers 0.15.1) on the tokenizer that
tests/llama_tokenizer.py builds (LLaMA-style: byte fallback, split digits, dummy prefix; legacy and
non-legacy), through tests/tools/llava_reference.py, which regenerates the file. The cases were
checked by hand: the lone "▁" before a digit / CJK / emoji answer is learned, "<image>" moves to
the front of its message (single-image records), each round's answer and "</s>" are learned.

LLaVA's sequences hold one -200 per image and unshifted labels; ours are converted to that form.
Where LLaVA's reference is not right it is not compared:
* non-legacy multi-round: its length correction for slow non-legacy tokenizers miscounts on this
  one, so its mask check drops the sample (all labels ignored); input_ids are still compared.
* plain (stage 1): ours puts "\\n" after the images on purpose (see ChatTemplate), so the first
  caption word follows "\\n" (no dummy prefix); the learned text is compared instead.
"""

import json
import os

import numpy as np
import pytest

from ee_mllm_jax.batch import IGNORE_INDEX
from ee_mllm_jax.data import text as text_lib
import llama_tokenizer

IMAGE = -200  # LLaVA's IMAGE_TOKEN_INDEX
CASES = json.load(open(os.path.join(os.path.dirname(__file__), "data", "llava_parity.json"), encoding="utf-8"))["cases"]


@pytest.fixture(scope="module")
def tokenizers_by_legacy():
  return {legacy: llama_tokenizer.build(legacy) for legacy in (True, False)}


def llava_form(layout):
  """Our layout as LLaVA's sequence: text ids with -200 at each image, unshifted labels."""
  items = [(int(p), int(i)) for p, i in zip(layout.positions, layout.input_ids)] + [(s, IMAGE)
                                                                                     for s in layout.image_starts]
  items.sort()
  ids = [i for _, i in items]
  learned = set()  # indices t+1 of text tokens whose predecessor t has them as label
  for t in range(len(layout.input_ids) - 1):
    if layout.labels[t] != IGNORE_INDEX:
      learned.add(int(layout.positions[t + 1]))
  labels = [i if p in learned else IGNORE_INDEX for p, i in items]
  return ids, labels


def ours(tok, case):
  conv = [{"from": r, "value": v} for r, v in case["turns"]]
  if case["system"] is not None:
    conv = [{"from": "system", "value": case["system"]}] + conv
  turns = text_lib.parse_conversation(conv, **case["ours"])
  template = text_lib.ChatTemplate("vicuna_v1" if case["template"] == "v1" else "plain")
  return llava_form(text_lib.encode(tok, template, turns, tokens_per_image=3))


def dropped_by_llava(case):
  return all(label == IGNORE_INDEX for label in case["labels"])


@pytest.mark.parametrize("case", [c for c in CASES if c["template"] == "v1"],
                         ids=lambda c: f"{c['name']}-{'legacy' if c['legacy'] else 'nonlegacy'}")
def test_vicuna_v1_matches_llava_preprocess_v1(tokenizers_by_legacy, case):
  ids, labels = ours(tokenizers_by_legacy[case["legacy"]], case)
  assert ids == case["input_ids"]
  if dropped_by_llava(case):
    assert not case["legacy"] and sum(role == "human" for role, _ in case["turns"]) > 1
  else:
    assert labels == case["labels"]


@pytest.mark.parametrize("case", [c for c in CASES if c["template"] == "plain"],
                         ids=lambda c: f"{c['name']}-{'legacy' if c['legacy'] else 'nonlegacy'}")
def test_plain_learns_what_llava_preprocess_plain_learns(tokenizers_by_legacy, case):
  tok = tokenizers_by_legacy[case["legacy"]]
  ids, labels = ours(tok, case)
  decode = lambda xs: tok.decode([x for x in xs if x not in (IMAGE, IGNORE_INDEX)], skip_special_tokens=False)
  assert ids[:2] == case["input_ids"][:2] == [tok.token_to_id("<s>"), IMAGE]
  assert decode(labels) == decode(case["labels"])  # the caption and its "\n"
  assert decode(ids[2:]).lstrip() == decode(case["input_ids"][2:]).lstrip()


def test_the_lone_space_token_before_a_digit_answer_is_learned(tokenizers_by_legacy):
  tok = tokenizers_by_legacy[True]
  turns = text_lib.parse_conversation([{"from": "human", "value": "How many?"}, {"from": "gpt", "value": "2"}])
  layout = text_lib.encode(tok, text_lib.ChatTemplate("vicuna_v1"), turns, tokens_per_image=3)
  pieces = [tok.id_to_token(int(i)) for i in layout.input_ids]
  colon = len(pieces) - 4
  assert pieces[colon:] == [":", "▁", "2", "</s>"]
  assert [tok.id_to_token(int(x)) for x in layout.labels[colon:colon + 3]] == ["▁", "2", "</s>"]


def test_an_empty_answer_learns_only_the_end_of_turn(tokenizers_by_legacy):
  tok = tokenizers_by_legacy[True]
  turns = text_lib.parse_conversation([{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": ""}])
  layout = text_lib.encode(tok, text_lib.ChatTemplate("vicuna_v1"), turns, tokens_per_image=3)
  learned = [tok.id_to_token(int(x)) for x in layout.labels if x != IGNORE_INDEX]
  assert learned == ["</s>"]


@pytest.mark.parametrize("legacy", [True, False])
def test_text_typed_around_a_control_token_gains_no_extra_space_token(tokenizers_by_legacy, legacy):
  """`with </s> at` is the text it is, tokenised in one piece ("▁with ▁ < / s > ▁at"): no dummy
  prefix where the typed control-token strings are."""
  tok = tokenizers_by_legacy[legacy]
  plain = text_lib.as_text(tok)
  answer = "2 with </s> at <s> the end"
  turns = text_lib.parse_conversation([{"from": "human", "value": "Say </s> it"}, {"from": "gpt", "value": answer}])
  layout = text_lib.encode(tok, text_lib.ChatTemplate("vicuna_v1"), turns, tokens_per_image=3, plain_tokenizer=plain)
  got = [tok.id_to_token(int(i)) for i in layout.input_ids]
  assert got.count("</s>") == 1 and got.count("<s>") == 1 and got[0] == "<s>" and got[-1] == "</s>"
  start = len(got) - 1 - got[::-1].index(":")  # the ":" of the last "ASSISTANT:"
  expected = [tok.id_to_token(i) for i in plain.encode("ASSISTANT: " + answer, add_special_tokens=False).ids]
  assert got[start - 1:-1] == expected
  assert "".join(got[start + 1:-1]).replace("▁", " ").replace("<0x2F>", "/") == " " + answer
  question = [tok.id_to_token(i) for i in plain.encode("USER: Say </s> it", add_special_tokens=False).ids]
  assert any(got[k:k + len(question)] == question for k in range(len(got)))
