"""Tokenizer loading, chat templates, and the text side of the interleaved layout.

A conversation is rendered to one prompt string exactly as LLaVA / Qwen2 render it, with
character spans marking what the model learns (assistant answers and their end-of-turn
token). The string is cut at each `<image>` placeholder, as LLaVA's
`tokenizer_image_token` does, and each piece is tokenised with offsets; a token is a
target when its characters overlap a learned span. Rendering whole strings (rather than
tokenising role markers and answers separately) keeps token boundaries identical to the
reference tokenisation, whatever the tokenizer's handling of spaces.

Every `<image>` is replaced by the image's P visual positions; text tokens take the
positions around them, so the interleaved sequence is 0..L-1 without gaps.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Sequence

import numpy as np
import tokenizers

from ee_mllm_jax.batch import IGNORE_INDEX
from ee_mllm_jax.data.records import BadRecordError

IMAGE_PLACEHOLDER = "<image>"
HUMAN, ASSISTANT = "human", "gpt"
_ROLES = {"human": HUMAN, "user": HUMAN, "gpt": ASSISTANT, "assistant": ASSISTANT}

# LLaVA-1.5's `conv_vicuna_v1`, the system prompt it trains and evaluates with (not
# `conv_llava_v1`'s "curious human ... the human's questions", which LLaVA-1.5 does not use).
VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's questions.")
CHATML_SYSTEM = "You are a helpful assistant."


def load_tokenizer(path: str) -> tokenizers.Tokenizer:
  """Any HF `tokenizer.json`."""
  return tokenizers.Tokenizer.from_file(str(path))


def token_id(tokenizer: tokenizers.Tokenizer, token: str) -> int:
  idx = tokenizer.token_to_id(token)
  if idx is None:
    raise ValueError(f"the tokenizer has no {token!r} token, which this chat template needs")
  return idx


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
  """How turns become a prompt string.

  plain:     LLaVA stage 1: the images, "\\n", then each answer + "\\n" (learned). Human
             text is dropped. LLaVA has no "\\n" after the image; here a text token must
             follow it, because only text tokens have logits: without one the first
             caption token would have no predictor that can see the image.
  vicuna_v1: LLaVA-1.5: "<s>{system} USER: {q} ASSISTANT: {a}</s>USER: ...". The space
             after "ASSISTANT:" is learned with the answer, as LLaVA's `preprocess_v1` masks:
             when it is a token of its own ("▁" before a digit, CJK, emoji...), ":" is
             trained to predict it. An empty answer trains only "</s>".
  chatml:    Qwen2: "<|im_start|>{role}\\n{text}<|im_end|>\\n" per turn, no BOS;
             the answer and its <|im_end|> are learned.
  """

  name: str
  system: str | None = None

  def __post_init__(self):
    if self.name not in TEMPLATE_NAMES:
      raise ValueError(f"unknown chat template {self.name!r}; known: {TEMPLATE_NAMES}")

  @property
  def bos(self) -> str | None:
    return None if self.name == "chatml" else "<s>"

  @property
  def end_of_turn(self) -> str:
    """The token that ends an assistant turn: generation stops on it."""
    return {"plain": "\n", "vicuna_v1": "</s>", "chatml": "<|im_end|>"}[self.name]

  def render(self, turns: Sequence[tuple[str, str]], *, prompt: bool) -> list[tuple[str, bool, bool]]:
    """Turns -> [(text, learned, content)] whose concatenation is the prompt string.

    `content` marks text that comes from the data (system prompt, messages), as opposed to
    the template's own markup: special tokens are recognised only in the markup.
    With `prompt`, the string ends with the assistant-turn opener (turns must end with
    a human turn): what a model is given before it generates the answer.
    """
    if self.name == "plain":
      images = "".join(IMAGE_PLACEHOLDER * text.count(IMAGE_PLACEHOLDER)
                       for role, text in turns if role == HUMAN)
      parts = [(images + "\n", False, False)]
      for role, text in turns:
        if role == ASSISTANT:
          parts += [(text, True, True), ("\n", True, False)]
      return parts
    if self.name == "vicuna_v1":
      parts = [(self.system if self.system is not None else VICUNA_SYSTEM, False, True), (" ", False, False)]
      for role, text in turns:
        if role == HUMAN:
          parts += [("USER: ", False, False), (text, False, True), (" ", False, False)]
        else:
          parts += [("ASSISTANT:", False, False), (" ", bool(text), False), (text, True, True),
                    ("</s>", True, False)]
      if prompt:
        parts.append(("ASSISTANT:", False, False))
      return parts
    system = self.system if self.system is not None else CHATML_SYSTEM
    parts = ([("<|im_start|>system\n", False, False), (system, False, True), ("<|im_end|>\n", False, False)]
             if system else [])
    for role, text in turns:
      if role == HUMAN:
        parts += [("<|im_start|>user\n", False, False), (text, False, True), ("<|im_end|>\n", False, False)]
      else:
        parts += [("<|im_start|>assistant\n", False, False), (text, True, True), ("<|im_end|>", True, False),
                  ("\n", False, False)]
    if prompt:
      parts.append(("<|im_start|>assistant\n", False, False))
    return parts


TEMPLATE_NAMES = ("plain", "vicuna_v1", "chatml")


@dataclasses.dataclass(frozen=True)
class Turns:
  """A parsed conversation: `turns` are (HUMAN | ASSISTANT, text)."""

  turns: tuple[tuple[str, str], ...]
  system: str | None = None
  answer: str | None = None  # prompt mode: the reference answer of the asked question
  question: str | None = None

  @property
  def num_images(self) -> int:
    return sum(text.count(IMAGE_PLACEHOLDER) for _, text in self.turns)

  def without_last_round(self) -> "Turns":
    """Drops the last human turn and everything after it (for truncation)."""
    last = max(i for i, (role, _) in enumerate(self.turns) if role == HUMAN)
    return dataclasses.replace(self, turns=self.turns[:last])


def image_first(text: str) -> str:
  """LLaVA's `preprocess_multimodal` on a message holding the image: "<image>\n" + the rest of
  the text, stripped ("<image>" alone when nothing else is left)."""
  rest = text.replace(IMAGE_PLACEHOLDER, "").strip()
  return (IMAGE_PLACEHOLDER + "\n" + rest).strip()


def parse_conversation(conversations, *, prompt_turn: int | None = None, image_in_place: bool = False) -> Turns:
  """LLaVA `conversations` -> Turns, validated.

  A record with one image has its `<image>` moved to the front of its message, as LLaVA's
  `preprocess_multimodal` does (`image_first`), unless `image_in_place`. Records with several
  images (interleaved) keep every placeholder where it is.

  For training (prompt_turn None) the conversation must contain an assistant answer.
  For prompting, the conversation is cut after human turn `prompt_turn` (-1: the last);
  the assistant reply that followed it, if any, becomes the reference answer.
  """
  if not isinstance(conversations, list) or not conversations:
    raise BadRecordError("bad_conversation", "'conversations' must be a non-empty list")
  system, turns = None, []
  for i, turn in enumerate(conversations):
    if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
      raise BadRecordError("bad_conversation", f"turn {i} has no string 'value'")
    role = turn.get("from")
    if role == "system" and i == 0:
      system = turn["value"]
      continue
    if role not in _ROLES:
      raise BadRecordError("bad_conversation", f"turn {i} has unknown role {role!r}")
    if _ROLES[role] == ASSISTANT and IMAGE_PLACEHOLDER in turn["value"]:
      raise BadRecordError("bad_conversation", f"assistant turn {i} contains {IMAGE_PLACEHOLDER}")
    turns.append((_ROLES[role], turn["value"]))
  if not image_in_place and sum(text.count(IMAGE_PLACEHOLDER) for _, text in turns) == 1:
    turns = [(role, image_first(text) if IMAGE_PLACEHOLDER in text else text) for role, text in turns]
  if prompt_turn is None:
    if not any(role == ASSISTANT for role, _ in turns):
      raise BadRecordError("no_assistant_turn", "conversation has no assistant ('gpt') turn")
    if turns[0][0] != HUMAN:
      raise BadRecordError("bad_conversation", "conversation does not start with a human turn")
    return Turns(tuple(turns), system)
  human = [i for i, (role, _) in enumerate(turns) if role == HUMAN]
  try:
    cut = human[prompt_turn]
  except IndexError:
    raise BadRecordError(
        "bad_conversation", f"no human turn {prompt_turn} to prompt with ({len(human)} human turns)") from None
  follows = turns[cut + 1] if cut + 1 < len(turns) else None
  answer = follows[1] if follows and follows[0] == ASSISTANT else None
  question = turns[cut][1].replace(IMAGE_PLACEHOLDER, "").strip()
  return Turns(tuple(turns[:cut + 1]), system, answer, question)


@dataclasses.dataclass(frozen=True)
class TextLayout:
  """One sample's text stream. n text tokens; L = n + images * P interleaved positions."""

  input_ids: np.ndarray  # (n,) int32
  positions: np.ndarray  # (n,) int32, interleaved position of each text token
  labels: np.ndarray  # (n,) int32, next learned text token or IGNORE_INDEX
  image_starts: tuple[int, ...]  # interleaved position of each image's first token
  length: int  # L


def _special_added_tokens(tokenizer: tokenizers.Tokenizer) -> list[tuple[int, tokenizers.AddedToken]]:
  return sorted((i, t) for i, t in tokenizer.get_added_tokens_decoder().items()
                if t.special and t.content != IMAGE_PLACEHOLDER)


def _special_tokens(tokenizer: tokenizers.Tokenizer) -> tuple[str, ...]:
  return tuple(t.content for _, t in _special_added_tokens(tokenizer))


# The control tokens the templates' markup holds, and their stand-ins in text that also holds
# typed (forged) ones: Unicode noncharacters (never assigned to a character), of the control
# token's length so that character offsets stay.
CONTROL_TOKENS = ("<s>", "</s>", "<|im_start|>", "<|im_end|>")
_NONCHARACTERS = re.compile("[\ufdd0-\ufdef]")


def _stand_in(control: str) -> str:
  return chr(0xFDD0 + CONTROL_TOKENS.index(control)) + chr(0xFDEF) * (len(control) - 1)


def as_text(tokenizer: tokenizers.Tokenizer) -> tokenizers.Tokenizer:
  """A copy of `tokenizer` that encodes special-token strings as ordinary text.

  Each of the templates' control tokens (CONTROL_TOKENS) the tokenizer has also gets a stand-in
  (`_stand_in`): a non-special added token that `encode` writes in place of the markup's control
  tokens, so that one call tokenises text holding both, splitting at the control tokens exactly
  where `tokenizer` would."""
  plain = tokenizers.Tokenizer.from_str(tokenizer.to_str())
  plain.encode_special_tokens = True
  plain.add_tokens([tokenizers.AddedToken(_stand_in(t.content), special=False, normalized=False,
                                          single_word=t.single_word, lstrip=t.lstrip, rstrip=t.rstrip)
                    for _, t in _special_added_tokens(tokenizer) if t.content in CONTROL_TOKENS])
  return plain


def _special_spans(text: str, regions: list[tuple[int, int]], specials: Sequence[str]) -> list[tuple[int, int, int]]:
  """(start, end, k) of each occurrence of specials[k] inside the character regions."""
  spans = []
  for a, b in regions:
    for k, special in enumerate(specials):
      at = text.find(special, a, b)
      while at != -1 and at + len(special) <= b:
        spans.append((at, at + len(special), k))
        at = text.find(special, at + len(special), b)
  return sorted(spans)


def encode(tokenizer: tokenizers.Tokenizer, template: ChatTemplate, turns: Turns, *,
           tokens_per_image: int, prompt: bool = False, plain_tokenizer: tokenizers.Tokenizer | None = None,
           ) -> TextLayout:
  """Renders, tokenises and lays out one conversation (see the module docstring).

  Special tokens typed inside a message (`<|im_end|>`, `</s>`, ...) are encoded as the plain
  text they are, so data cannot forge turns: only the template's markup yields control
  tokens. Such text is tokenised as if the strings were ordinary text in the same call: no
  dummy prefix ("▁") is added where it is cut. `plain_tokenizer`: `as_text(tokenizer)`, made once
  by callers that encode many."""
  if turns.system is not None and template.name != "plain":
    template = dataclasses.replace(template, system=turns.system)
  parts = template.render(turns.turns, prompt=prompt)
  text = "".join(t for t, _, _ in parts)
  learned, content, markup, start = [], [], [], 0
  for part, is_learned, is_content in parts:
    if is_learned:
      learned.append((start, start + len(part)))
    (content if is_content else markup).append((start, start + len(part)))
    start += len(part)
  specials = _special_tokens(tokenizer)
  forged = _special_spans(text, content, specials)
  controls = _special_spans(text, markup, [t for t in CONTROL_TOKENS if t in specials])

  def tokenize(a: int, b: int):
    """(id, start, end) of text[a:b], special-token strings inside content encoded as text."""
    if not any(a <= s and e <= b for s, e, _ in forged):
      enc = tokenizer.encode(text[a:b], add_special_tokens=False)
      return [(i, a + x, a + y) for i, (x, y) in zip(enc.ids, enc.offsets)]
    if _NONCHARACTERS.search(text, a, b):
      raise BadRecordError("bad_conversation", "a message holds a control token's text and Unicode noncharacters "
                           "(U+FDD0..U+FDEF), which the tokenisation of that text reserves")
    # One call of the plain tokenizer, the template's control tokens written as their stand-ins.
    piece, stand_ins = list(text[a:b]), {}
    for s, e, _ in controls:
      if a <= s and e <= b:
        stand_ins[_stand_in(text[s:e])] = text[s:e]
        piece[s - a:e - a] = _stand_in(text[s:e])
    plain = plain_tokenizer if plain_tokenizer is not None else as_text(tokenizer)
    to_control = {plain.token_to_id(x): tokenizer.token_to_id(c) for x, c in stand_ins.items()}
    enc = plain.encode("".join(piece), add_special_tokens=False)
    return [(to_control.get(i, i), a + x, a + y) for i, (x, y) in zip(enc.ids, enc.offsets)]

  ids, targets, positions, image_starts = [], [], [], []
  bos = template.bos
  if template.name == "plain" and tokenizer.token_to_id(bos) is None:
    bos = None  # stage 1 also serves tokenizers without a BOS token (Qwen2's)
  if bos is not None:
    ids.append(token_id(tokenizer, bos))
    targets.append(False)
    positions.append(0)
  pos, offset = len(ids), 0
  pieces = text.split(IMAGE_PLACEHOLDER)
  for k, piece in enumerate(pieces):
    if piece:
      for tok, s, e in tokenize(offset, offset + len(piece)):
        targets.append(any((s < b and e > a) if e > s else a <= s < b for a, b in learned))
        ids.append(tok)
        positions.append(pos)
        pos += 1
    offset += len(piece) + len(IMAGE_PLACEHOLDER)
    if k < len(pieces) - 1:
      image_starts.append(pos)
      pos += tokens_per_image

  ids = np.asarray(ids, np.int32)
  positions = np.asarray(positions, np.int32)
  targets = np.asarray(targets, bool)
  # labels[t] = the next text token if it directly follows (no image between) and is learned.
  labels = np.full(len(ids), IGNORE_INDEX, np.int32)
  follows = (positions[1:] == positions[:-1] + 1) & targets[1:]
  labels[:-1] = np.where(follows, ids[1:], IGNORE_INDEX)
  if prompt:  # what a prompt's earlier answers would teach is not wanted at evaluation
    labels[:] = IGNORE_INDEX
  return TextLayout(ids, positions, labels, tuple(image_starts), pos)
