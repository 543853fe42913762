"""A small LLaMA-style tokenizer, built deterministically (no files, no downloads).

LLaMA / Vicuna's sentencepiece BPE as a `tokenizer.json` has: byte fallback (`<0x00>`..`<0xFF>`
at ids 3..258, so characters outside the vocabulary such as CJK and emoji become UTF-8 bytes),
split digits (no piece holds two digits or "▁" and a digit: " 2" is "▁", "2"), a dummy prefix
("▁" before the text), spaces as "▁", and `<unk>`, `<s>`, `</s>` at ids 0, 1, 2.

legacy=True:  normaliser Prepend("▁") + Replace(" ", "▁"): every piece of text between two
              special tokens gets the dummy prefix ("</s>USER" -> "</s>", "▁USER"), as
              llava-1.5-7b-hf's tokenizer.json and transformers' legacy LLaMA tokenizers do.
legacy=False: Metaspace(prepend_scheme="first"): only the start of the text gets it
              ("</s>USER" -> "</s>", "USER"), as transformers' non-legacy LLaMA tokenizers.

Only `tokenizers` is imported: tests/tools/llava_reference.py builds the same tokenizer for
LLaVA's reference code in another environment.
"""

from __future__ import annotations

import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

SPECIALS = ["<unk>", "<s>", "</s>"]
BYTES = [f"<0x{b:02X}>" for b in range(256)]

CORPUS = [
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions.",
    "USER: What colour is the cat? ASSISTANT: The cat is red.",
    "USER: How many dogs are there? Answer the question using a single word or phrase. ASSISTANT: There are 3 dogs.",
    "USER: Which option? A. red B. blue C. green D. yellow Answer with the option's letter from the given choices "
    "directly. ASSISTANT: B",
    "Describe the image in detail. The picture shows a small house near a river, with trees and a blue sky.",
    "Be brief. You are a helpful assistant. Wie heißt das? Grüße, café, naïve. Yes, no, maybe.",
    "Compare with this one please. What is written on the sign? The sign says STOP. And now? It is blue.",
    "0 1 2 3 4 5 6 7 8 9 10 25 100 2024 3.5 1,000 (a) [b] {c} <d> \"e\" 'f' #g $h %i &j *k +l =m @n ~o |p ^q",
]


def build(legacy: bool = True, vocab_size: int = 520) -> tokenizers.Tokenizer:
  """The same tokenizer on every machine: BPE trained on CORPUS (words split at "▁", digits
  and punctuation alone), then rebuilt with the byte-fallback pieces in LLaMA's places."""
  trainer_tok = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
  trainer_tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Metaspace(replacement="▁"), pre_tokenizers.Digits(individual_digits=True),
      pre_tokenizers.Punctuation()])
  trainer_tok.train_from_iterator(CORPUS * 3, trainers.BpeTrainer(
      vocab_size=vocab_size, special_tokens=[], show_progress=False, min_frequency=2))
  learned = trainer_tok.to_str()
  import json  # pylint: disable=g-import-not-at-top
  model = json.loads(learned)["model"]
  vocab = {t: i for i, t in enumerate(SPECIALS + BYTES)}
  for piece, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1]):
    vocab.setdefault(piece, len(vocab))
  merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
  tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True,
                                        fuse_unk=True))
  if legacy:
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
  else:
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
  tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                   decoders.Strip(" ", 1, 0)])
  tok.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False) for t in SPECIALS])
  return tok
