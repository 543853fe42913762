"""The user message LLaVA-1.5's eval scripts write, and its token layout in the chat template the
model was trained with (`ee_mllm_jax.data.text`, the training code path). Each benchmark
(`evaluation.benchmarks`) fills the layout:

    textvqa   "{question}[\\nReference OCR token: a, b, c]\\n{SHORT_ANSWER}"
    docvqa    "{question}\\n{SHORT_ANSWER}"
    mmbench   "[{hint}\\n]{question}\\nA. ...\\nB. ...[\\nC. ...]\\n{CHOOSE_LETTER}"
    seedbench "{question}\\nA. ...\\nB. ...\\nC. ...\\nD. ...\\n{CHOOSE_LETTER}"
    chartqa   "{question}\\n{SHORT_ANSWER}"

Each message starts with "<image>\\n", as LLaVA's do. The likelihood method asks the question
without its options and scores each option as the assistant's reply (its tokens and the
end-of-turn token, so that an option which is a prefix of another is not favoured).
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import tokenizers

from ee_mllm_jax.data import text as text_lib

SHORT_ANSWER = "Answer the question using a single word or phrase."
CHOOSE_LETTER = "Answer with the option's letter from the given choices directly."


@dataclasses.dataclass(frozen=True)
class PromptStyle:
  short_answer: str = SHORT_ANSWER  # "" drops the line (a model trained without it)
  choose_letter: str = CHOOSE_LETTER
  ocr_tokens: bool = True  # TextVQA: the file's OCR tokens, as LLaVA's textvqa eval gives them


def user_message(question: str, options: Mapping[str, str] | None = None, *, hint: str | None = None,
                 context: Sequence[str] = (), style: PromptStyle = PromptStyle()) -> str:
  """LLaVA-1.5's layout of a user message (after "<image>\\n"): [hint], the question, then the
  lettered options and `style.choose_letter`, or the `context` lines and `style.short_answer`
  (a style line that is "" is left out). The synthetic dataset's questions use it too."""
  lines = [hint] if hint else []
  lines.append(question)
  if options:
    lines += [f"{letter}. {text}" for letter, text in options.items()]
    suffix = style.choose_letter
  else:
    lines += list(context)
    suffix = style.short_answer
  if suffix:
    lines.append(suffix)
  return "\n".join(lines)


class Encoder:
  """Messages -> `TextLayout`s in a chat template (one image per prompt)."""

  def __init__(self, tokenizer: tokenizers.Tokenizer, template: text_lib.ChatTemplate, tokens_per_image: int):
    self.tokenizer, self.template, self.tokens_per_image = tokenizer, template, tokens_per_image
    self.plain = text_lib.as_text(tokenizer)

  def _encode(self, turns, prompt: bool) -> text_lib.TextLayout:
    return text_lib.encode(self.tokenizer, self.template, text_lib.Turns(tuple(turns)),
                           tokens_per_image=self.tokens_per_image, prompt=prompt, plain_tokenizer=self.plain)

  def prompt(self, user_message: str) -> text_lib.TextLayout:
    """The generation prompt: it ends with the assistant-turn opener."""
    return self._encode([(text_lib.HUMAN, text_lib.IMAGE_PLACEHOLDER + "\n" + user_message)], prompt=True)

  def answered(self, user_message: str, answer: str) -> text_lib.TextLayout:
    """The conversation with `answer` as the reply; labels mark the reply's tokens and end of turn."""
    return self._encode([(text_lib.HUMAN, text_lib.IMAGE_PLACEHOLDER + "\n" + user_message),
                         (text_lib.ASSISTANT, answer)], prompt=False)

  @property
  def stop_ids(self) -> tuple[int, ...]:
    return (text_lib.token_id(self.tokenizer, self.template.end_of_turn),) if self.template.name != "plain" else (
        tuple(self.tokenizer.encode("\n", add_special_tokens=False).ids[:1]))

  def decode(self, ids) -> str:
    return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=True).strip()
