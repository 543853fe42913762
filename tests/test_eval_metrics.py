"""Benchmark metrics on hand-computed cases (lmms-eval / official definitions)."""

import pytest

from ee_mllm_jax.evaluation import metrics as m


@pytest.mark.parametrize("raw, normalised", [
    ("The Two Dogs.", "2 dogs"),  # article dropped, number word -> digit, final period stripped
    ("a cat", "cat"),
    ("an", ""),
    ("3.5", "3.5"),  # a period inside a number stays
    ("1,000", "1000"),  # a comma between digits goes
    ("dont", "don't"),  # contraction table
    ("yes!", "yes"),
    ("coca-cola", "coca cola"),  # a hyphen without spaces around it splits the word
    ("left - right", "left right"),  # next to a space it is deleted
    ("it's", "it 's"),
])
def test_evalai_normalisation(raw, normalised):
  assert m.normalize_vqa_answer(raw) == normalised


def test_two_and_2_are_the_same_answer():
  assert m.vqa_accuracy("two", ["2"] * 10) == 1.0
  assert m.vqa_accuracy("The dog", ["dog"] * 10) == 1.0


@pytest.mark.parametrize("matches, expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_vqa_accuracy_averages_the_ten_leave_one_out_subsets(matches, expected):
  # k matching answers: k subsets lose one (k-1 matches), 10-k keep all k; each min(matches/3, 1).
  answers = ["red"] * matches + ["blue"] * (10 - matches)
  assert m.vqa_accuracy("Red", answers) == pytest.approx(expected)


def test_anls_just_above_and_below_the_threshold():
  gt = "abcdefghij"  # 10 characters: each edit is 0.1 of normalised distance
  assert m.anls("abcdefxxxx", [gt]) == pytest.approx(0.6)  # 4 edits: NL 0.4, similarity kept
  assert m.anls("abcdexxxxx", [gt]) == pytest.approx(0.5)  # exactly 0.5 is kept (lmms-eval)
  assert m.anls("abcdxxxxxx", [gt]) == 0.0  # 6 edits: similarity 0.4 < 0.5 -> 0
  assert m.anls("  ABCDEFGHIJ ", [gt]) == 1.0  # case-insensitive, whitespace-trimmed
  assert m.anls("abcdexxxxx", ["zzz", gt]) == pytest.approx(0.5)  # best over the answers


def test_levenshtein():
  assert m.levenshtein("kitten", "sitting") == 3
  assert m.levenshtein("", "abc") == 3


OPTIONS = {"A": "red", "B": "blue", "C": "green", "D": "dark blue"}


@pytest.mark.parametrize("output, letter", [
    ("B", "B"), ("B.", "B"), ("(C)", "C"), ("The answer is A.", "A"),
    ("green", "C"),  # a unique option text
    ("dark blue", None),  # "blue" and "dark blue" both inside: ambiguous
    ("A or B", None),  # two letters
    ("I cannot tell", None),  # unparseable
    ("", None),
])
def test_option_extraction(output, letter):
  assert m.extract_option(output, OPTIONS) == letter


def test_circular_eval_group_with_one_wrong_rotation_counts_as_wrong():
  rows = [dict(index=i + k * 1_000_000, correct=ok, category=cat, l2_category="perception")
          for i, cat, oks in ((0, "colour", (True, True, False, True)), (1, "shape", (True,) * 4),
                              (2, "shape", (True, True, True, True)))
          for k, ok in enumerate(oks)]
  result = m.circular_eval(rows)
  assert result["groups"] == 3 and result["rows"] == 12
  assert result["circular_accuracy"] == pytest.approx(2 / 3)
  assert result["row_accuracy"] == pytest.approx(11 / 12)
  assert result["per_category"] == {"colour": 0.0, "shape": 1.0}
  assert result["per_l2_category"] == {"perception": pytest.approx(2 / 3)}


def test_seed_letter_is_the_first_character():
  assert m.seed_letter(" B. blue") == "B"
  assert m.seed_letter("") == ""
