"""Intervals over seeds and questions, paired differences, verdicts and the informative rule:
coverage by simulation (the tolerance is the binomial spread of the simulated coverage), hand
computations, and crafted results files."""

import math

import numpy as np
import pytest

from ee_mllm_jax.evaluation import intervals as iv


def binomial_band(p: float, n: int, sds: float = 4.0) -> float:
  return sds * math.sqrt(p * (1 - p) / n)


def test_seed_interval_is_students_t_by_hand():
  # three seeds 40, 42, 44: sd 2, t_{0.975, 2} = 4.302653, half-width 4.302653 * 2 / sqrt(3)
  x = np.array([[40.0], [42.0], [44.0]])
  got = iv.interval(x)
  assert got.mean == pytest.approx(42.0)
  assert got.seeds == pytest.approx(4.302653 * 2 / math.sqrt(3), rel=1e-6)
  assert got.questions == 0.0  # one unit: no question noise
  assert got.sources == "seeds+questions" and got.half_width == pytest.approx(got.seeds)


def test_seed_interval_covers_the_true_mean_95_percent_of_the_time():
  rng = np.random.default_rng(0)
  n, true = 4000, 30.0
  per_seed = rng.normal(true, 5.0, size=(n, 3))
  covered = [abs(s.mean() - true) <= iv.seed_half_width(s, 0.95) for s in per_seed]
  assert abs(np.mean(covered) - 0.95) <= binomial_band(0.95, n)


def test_question_bootstrap_covers_the_true_accuracy():
  rng = np.random.default_rng(1)
  n, q, p = 600, 200, 0.4
  covered = []
  for i in range(n):
    x = 100.0 * (rng.random((1, q)) < p)
    h = iv.question_half_width(x, 0.95, samples=400, seed=i)
    covered.append(abs(x.mean() - 100 * p) <= h)
  # the percentile bootstrap under-covers slightly at finite Q; 4 binomial SDs hold it
  assert abs(np.mean(covered) - 0.95) <= binomial_band(0.95, n) + 0.01


def test_both_sources_add_in_quadrature_and_one_seed_uses_questions_only():
  rng = np.random.default_rng(2)
  x = rng.normal(50, 10, size=(4, 300)) + rng.normal(0, 3, size=(4, 1))
  got = iv.interval(x)
  assert got.half_width == pytest.approx(math.hypot(got.seeds, got.questions))
  one = iv.interval(x[0])
  assert one.sources == "questions" and math.isnan(one.seeds) and one.half_width == pytest.approx(one.questions)


def test_paired_difference_cancels_what_the_models_share():
  rng = np.random.default_rng(3)
  hard = rng.normal(50, 30, size=(3, 500))  # questions and seeds vary a lot, the same for both models
  diff = iv.paired_difference(hard + 2.0, hard)
  assert diff.mean == pytest.approx(2.0) and diff.half_width == pytest.approx(0.0, abs=1e-9)
  assert iv.superiority(diff) == "supported"
  assert iv.superiority(iv.paired_difference(hard, hard + 2.0)) == "contradicted"
  assert iv.interval(hard + 2.0).half_width > 1.0  # alone, either model's interval is wide


def test_superiority_is_undecided_when_the_interval_holds_zero():
  rng = np.random.default_rng(4)
  a = rng.normal(50, 10, size=(3, 100))
  b = a + rng.normal(0, 10, size=a.shape)  # no true difference, plenty of noise
  d = iv.paired_difference(a, b)
  assert d.low < 0 < d.high and iv.superiority(d) == "undecided"


def test_equivalence_two_one_sided_tests():
  rng = np.random.default_rng(5)
  base = rng.normal(50, 20, size=(3, 400))
  close = base + 0.5 + rng.normal(0, 1, size=base.shape)
  far = base + 10 + rng.normal(0, 1, size=base.shape)
  noisy = base + rng.normal(0, 40, size=base.shape)
  assert iv.equivalence(close, base, margin=3.0)[0] == "supported"
  assert iv.equivalence(far, base, margin=3.0)[0] == "contradicted"
  verdict, diff = iv.equivalence(noisy, base, margin=3.0)
  assert verdict == "undecided" and diff.level == pytest.approx(0.90)
  with pytest.raises(ValueError, match="margin"):
    iv.equivalence(close, base, margin=0)


def test_informative_rule_on_a_crafted_results_file():
  """One benchmark at its prior (every model within noise of a 25% guess), one learnt."""
  rng = np.random.default_rng(6)
  prior = 25.0
  guessing = {m: 100.0 * (rng.random((3, 300)) < 0.25) for m in ("llava", "ee-mllm", "flamingo")}
  learnt = dict(guessing, **{"ee-mllm": 100.0 * (rng.random((3, 300)) < 0.6)})
  ok, why = iv.informative(guessing, prior)
  assert not ok, why
  ok, why = iv.informative(learnt, prior)
  assert ok and why.startswith("ee-mllm:"), why
  # a large gap with a larger spread across seeds is not enough
  spread = {"llava": np.array([[30.0], [60.0], [90.0]])}
  assert not iv.informative(spread, prior)[0]
  assert not iv.informative({"llava": np.full((1, 10), 90.0)}, prior)[0]  # one seed: no spread to judge


def test_bad_scores_are_refused_with_their_shapes():
  with pytest.raises(ValueError, match=r"\(3, 4\) and \(3, 5\)"):
    iv.paired_difference(np.zeros((3, 4)), np.zeros((3, 5)))
  with pytest.raises(ValueError, match="nan"):
    iv.interval([[1.0, float("nan")]])
  with pytest.raises(ValueError, match="at least one question"):
    iv.interval(np.zeros((2, 0)))
