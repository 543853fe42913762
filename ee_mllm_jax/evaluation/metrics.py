"""Benchmark metrics, as lmms-eval and the official scripts define them. Pure functions on strings.

* TextVQA: the EvalAI answer processor (the VQA challenge's normalisation: punctuation, number
  words, articles, contractions; like EvalAI and lmms-eval it strips at most 32 periods, the 32 that
  `re.sub`'s third positional argument, `re.UNICODE`, sets as its count), then VQA accuracy: the
  mean over the ten leave-one-annotator-out subsets of min(#matching answers / 3, 1). Deliberate
  difference: a question with a single reference answer scores 1 when it matches, where lmms-eval
  leaves its only annotator out and scores 0 whatever the prediction.
* DocVQA: ANLS. Per question 1 - min over the answers of the normalised Levenshtein distance
  (lower-cased, whitespace collapsed; normalised by the longer of the two raw strings), set to 0
  below the 0.5 threshold (lmms-eval keeps exactly 0.5).
* MMBench: lmms-eval's rule-based option matching (`mmbench_option`: its `can_infer_option`, then
  `can_infer_text`); where lmms-eval would ask its GPT judge, a heuristic takes its place and the
  row is counted (`needed_judge` in the metrics). Then CircularEval: rows are grouped by
  `index % 1_000_000` and a group counts only if every rotation in it is right.
* SEED-Bench: the first character of the stripped output is the predicted letter, compared with
  the answer case-insensitively ("b) cat" answers B), as lmms-eval does.
"""

from __future__ import annotations

import collections
import re
from typing import Iterable, Mapping, Sequence

# ----------------------------------------------------------------------------- TextVQA (EvalAI)

# The VQA evaluation's contraction table: the apostrophe-less spelling -> the canonical one.
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's",
    "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll",
    "let's": "let's", "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's", "thered": "there'd",
    "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're", "theres": "there's",
    "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've", "theyll": "they'll",
    "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've",
    "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres": "where's",
    "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've", "wholl": "who'll",
    "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = ("a", "an", "the")
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
               "?", "!")
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")  # (sic) a period not followed by a digit
# EvalAI calls `PERIOD_STRIP.sub("", text, re.UNICODE)`: the flag lands in `count`, re.UNICODE == 32.
_PERIODS_STRIPPED = 32
_COMMA_BETWEEN_DIGITS = re.compile(r"(?<=\d)(,)+(?=\d)")


def _punctuation(text: str) -> str:
  out = text
  for p in PUNCTUATION:
    # A mark next to a space (or any text with a digit-comma-digit) is deleted, else it splits words.
    if p + " " in text or " " + p in text or _COMMA_BETWEEN_DIGITS.search(text) is not None:
      out = out.replace(p, "")
    else:
      out = out.replace(p, " ")
  return _PERIOD_STRIP.sub("", out, count=_PERIODS_STRIPPED)


def _digits_and_articles(text: str) -> str:
  words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
  words = [w for w in words if w not in ARTICLES]
  return " ".join(CONTRACTIONS.get(w, w) for w in words)


def normalize_vqa_answer(answer: str) -> str:
  """The EvalAI answer processor (lmms-eval `EvalAIAnswerProcessor`)."""
  text = answer.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
  text = text.replace("\n", " ").replace("\t", " ").strip()
  return _digits_and_articles(_punctuation(text))


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
  """Mean over leave-one-out subsets of the annotators' answers of min(#equal to prediction / 3, 1).

  One reference answer: 1.0 when it matches (deliberately; lmms-eval's leave-one-out leaves no
  annotator and scores every prediction 0)."""
  pred = normalize_vqa_answer(prediction)
  gts = [normalize_vqa_answer(a) for a in answers]
  if not gts:
    raise ValueError("vqa_accuracy needs at least one reference answer")
  if len(gts) == 1:  # a single annotator: nothing to leave out
    return float(gts[0] == pred)
  scores = [min(1.0, sum(g == pred for j, g in enumerate(gts) if j != i) / 3) for i in range(len(gts))]
  return sum(scores) / len(scores)


# ----------------------------------------------------------------------------- DocVQA (ANLS)


def levenshtein(a: str, b: str) -> int:
  if len(a) < len(b):
    a, b = b, a
  row = list(range(len(b) + 1))
  for i, ca in enumerate(a, 1):
    prev, row[0] = row[0], i
    for j, cb in enumerate(b, 1):
      prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
  return row[-1]


def anls(prediction: str, answers: Sequence[str], threshold: float = 0.5) -> float:
  """Average Normalised Levenshtein Similarity of one question (lmms-eval `anls`)."""
  if not answers:
    raise ValueError("anls needs at least one reference answer")
  det = " ".join(prediction.strip().lower().split())
  distances = []
  for answer in answers:
    gt = " ".join(answer.strip().lower().split())
    length = max(len(answer.upper()), len(prediction.upper()))
    distances.append(0.0 if length == 0 else levenshtein(gt, det) / length)
  score = 1.0 - min(distances)
  return 0.0 if score < threshold else score


# ----------------------------------------------------------------------------- multiple choice

LETTERS = "ABCDE"  # lmms-eval looks for these five, whatever the question's options
# The formats a letter may be written in, tried one at a time in this order (lmms-eval's).
_LETTER_FORMATS = (("", "."), ("", ","), ("", ":"), ("", ")"), ("", ")."), ("(", ")"), ("(", ")."), (":", ""),
                   (":", ","), (":", "."), (":", ")"), (":", ")."))


def infer_letter(output: str) -> str | None:
  """lmms-eval's `can_infer_option` rules. The output's whitespace-separated words are searched:
  1. exactly one bare capital A-E among them is the answer, unless "A" is among them and the
     output has more than 3 words (then "A" may be the article: this step gives nothing);
  2. else each format in turn ("B.", "B,", "B:", "B)", "B).", "(B)", "(B).", ":B", ...): the first
     format that exactly one letter is written in gives that letter.
  Lower-case letters are not letters here."""
  if "Failed to obtain answer via API" in output:  # lmms-eval's judge-failure marker
    return None
  words = output.split()
  bare = [c for c in LETTERS if c in words]
  if len(bare) == 1 and not ("A" in words and len(words) > 3):
    return bare[0]
  for prefix, suffix in _LETTER_FORMATS:
    found = [c for c in LETTERS if prefix + c + suffix in words]
    if len(found) == 1:
      return found[0]
  return None


def infer_text(output: str, options: Mapping[str, str]) -> str | None:
  """lmms-eval's `can_infer_text`: the one option whose text (lower-cased) is inside the output
  (lower-cased); None when none or several are."""
  lower = output.lower()
  found = [letter for letter, text in options.items() if str(text).lower() in lower]
  return found[0] if len(found) == 1 else None


def _heuristic_option(output: str, options: Mapping[str, str]) -> str | None:
  """What stands in for lmms-eval's GPT judge: exactly one option letter among the output's words
  once punctuation is removed, else exactly one option text inside it (case-insensitive)."""
  words = output
  for ch in ".()[],:;!*#{}":
    words = words.replace(ch, " ")
  words = words.split()
  letters = [letter for letter in options if letter in words]
  if len(letters) == 1:
    return letters[0]
  if letters:
    return None  # several letters: ambiguous, and the text test would be no better
  return infer_text(output, options)


def mmbench_option(output: str, options: Mapping[str, str]) -> tuple[str | None, str]:
  """(letter or None, how it was read) for an MMBench output, as lmms-eval reads it.

  "rule": lmms-eval's rule-based matching (`infer_letter`, then `infer_text`) on the stripped
  output decided, as it does in lmms-eval. Otherwise lmms-eval asks a GPT judge; here
  `_heuristic_option` answers instead ("heuristic"), or nothing does ("unparsed")."""
  output = output.strip()
  letter = infer_letter(output) or infer_text(output, options)
  if letter is not None:
    return letter, "rule"
  letter = _heuristic_option(output, options)
  return letter, ("heuristic" if letter is not None else "unparsed")


def extract_option(output: str, options: Mapping[str, str]) -> str | None:
  """The option letter an output names (`mmbench_option`), or None."""
  return mmbench_option(output, options)[0]


def seed_letter(output: str) -> str:
  """lmms-eval SEED-Bench: the first character of the stripped output, here upper-cased."""
  return output.strip()[:1].upper()


def seed_correct(output: str, answer: str) -> bool:
  """lmms-eval SEED-Bench: the first character of the stripped output equals the answer,
  case-insensitively ("b) cat" and "b" answer B)."""
  return output.strip()[:1].lower() == answer.lower().strip()


def circular_groups(indices: Iterable[int]) -> dict[int, list[int]]:
  """MMBench rotations: {index % 1_000_000: [row numbers]} in file order."""
  groups: dict[int, list[int]] = collections.defaultdict(list)
  for row, index in enumerate(indices):
    groups[int(index) % 1_000_000].append(row)
  return dict(groups)


def _ratio(hits: int, total: int) -> float:
  return hits / total if total else 0.0


def circular_eval(rows: Sequence[Mapping]) -> dict:
  """rows: {"index", "correct" (bool), "category", "l2_category"} per MMBench row (rotation).
  -> overall / per category / per l2-category CircularEval accuracy over groups, the number of
  groups, and the per-row (non-circular) accuracy."""
  groups = circular_groups(r["index"] for r in rows)
  # A group is right only if every rotation is; it belongs to its first row's categories.
  verdicts = [dict(correct=all(rows[m]["correct"] for m in members), category=rows[members[0]].get("category"),
                   l2_category=rows[members[0]].get("l2_category")) for members in groups.values()]
  return {"circular_accuracy": _ratio(sum(v["correct"] for v in verdicts), len(verdicts)),
          "groups": len(verdicts), "rows": len(rows),
          "row_accuracy": _ratio(sum(bool(r["correct"]) for r in rows), len(rows)),
          "per_category": accuracy_by([v for v in verdicts if v["category"] is not None], "category"),
          "per_l2_category": accuracy_by([v for v in verdicts if v["l2_category"] is not None], "l2_category")}


def accuracy_by(rows: Sequence[Mapping], field: str) -> dict[str, float]:
  """{value of `field`: mean of "correct"} over rows."""
  hits, totals = collections.Counter(), collections.Counter()
  for r in rows:
    hits[r[field]] += bool(r["correct"])
    totals[r[field]] += 1
  return {str(k): hits[k] / totals[k] for k in sorted(totals, key=str)}
