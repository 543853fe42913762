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


def test_mean_of_one_benchmark_is_its_interval():
  rng = np.random.default_rng(7)
  x = 100.0 * (rng.random((3, 150)) < 0.4) + rng.normal(0, 2, size=(3, 1))
  got, ref = iv.mean_of_benchmarks([x], samples=500, seed=3), iv.interval(x, samples=500, seed=3)
  assert got.seeds == ref.seeds and got.questions == ref.questions and got.sources == ref.sources
  assert (got.mean, got.low, got.high, got.level) == pytest.approx((ref.mean, ref.low, ref.high, ref.level))
  assert iv.mean_of_benchmarks([x[0]]).sources == "questions"


def test_mean_of_benchmarks_is_the_mean_of_their_means_whatever_their_sizes():
  rng = np.random.default_rng(8)
  a, b = rng.normal(10, 5, size=(3, 40)), rng.normal(80, 5, size=(3, 400))
  got = iv.mean_of_benchmarks([a, b], samples=200)
  assert got.mean == pytest.approx((a.mean() + b.mean()) / 2)  # not the pooled mean over 440 units
  assert got.mean != pytest.approx(np.concatenate([a, b], axis=1).mean(), abs=1.0)


def test_stratified_bootstrap_matches_brute_force_and_the_normal_approximation():
  """Benchmarks with different means, spreads and sizes: a brute-force bootstrap (each benchmark's
  full (S, Q) matrix resampled on its own, every seed kept) and the normal approximation
  1.96 * sqrt(sum var_c / Q_c) / C agree with the stratified half-width; pooling the units into
  one benchmark would not (the gap between the benchmarks' means adds to its spread)."""
  rng = np.random.default_rng(9)
  mats = [100.0 * (rng.random((3, 100)) < 0.15), rng.uniform(0, 100, size=(3, 150)),
          100.0 * (rng.random((3, 200)) < 0.85)]
  got = iv.stratified_half_width(mats, 0.95, samples=4000, seed=1)
  brute_rng = np.random.default_rng(123)
  means = []
  for _ in range(3000):
    means.append(np.mean([x[:, brute_rng.integers(0, x.shape[1], x.shape[1])].mean() for x in mats]))
  lo, hi = np.quantile(means, [0.025, 0.975])
  assert got == pytest.approx((hi - lo) / 2, rel=0.08)
  normal = 1.959964 * math.sqrt(sum(x.mean(axis=0).var() / x.shape[1] for x in mats)) / len(mats)
  assert got == pytest.approx(normal, rel=0.08)
  # the same units pooled and resampled as one benchmark (weights drift with the draw): wider
  pooled = np.concatenate(mats, axis=1)
  assert iv.question_half_width(pooled, 0.95, samples=4000, seed=1) > 1.3 * got
  assert iv.mean_of_benchmarks(mats, samples=4000, seed=1).questions == pytest.approx(got)


def test_mean_of_benchmarks_pairs_the_seeds_across_benchmarks():
  """Seed i of every benchmark is one training run: a run that is good on one benchmark and as
  bad on the other has an average headline, so the seeds' spread cancels."""
  rng = np.random.default_rng(10)
  base = rng.uniform(0, 100, size=(1, 80)).repeat(4, axis=0)
  shift = np.array([[-6.0], [2.0], [5.0], [-1.0]])
  got = iv.mean_of_benchmarks([base + shift, base - shift], samples=200)
  assert got.seeds == pytest.approx(0.0, abs=1e-9)
  assert iv.mean_of_benchmarks([base + shift, base + shift], samples=200).seeds > 5.0  # the same shift adds up
  with pytest.raises(ValueError, match="same seeds"):
    iv.mean_of_benchmarks([np.zeros((3, 5)), np.zeros((2, 5))])
  with pytest.raises(ValueError, match="no benchmarks"):
    iv.mean_of_benchmarks([])


def test_equivalent_reads_a_90_percent_interval_against_the_margin():
  def at(low, high):
    return iv.Interval((low + high) / 2, low, high, 0.90, "seeds+questions", math.nan, math.nan)

  assert iv.equivalent(at(-2.9, 2.9), margin=3.0) == "supported"
  assert iv.equivalent(at(-3.0, 1.0), margin=3.0) == "undecided"  # touching the margin is not inside
  assert iv.equivalent(at(3.0, 9.0), margin=3.0) == "contradicted"
  assert iv.equivalent(at(-9.0, -3.5), margin=3.0) == "contradicted"
  assert iv.equivalent(at(-1.0, 4.0), margin=3.0) == "undecided"
  with pytest.raises(ValueError, match="margin"):
    iv.equivalent(at(0, 1), margin=-1.0)


def test_best_vs_prior_shows_its_working():
  got = iv.best_vs_prior({"a": np.array([[30.0], [32.0], [34.0]]), "b": np.array([[20.0], [20.0], [20.0]])}, 25.0)
  assert got["best"] == "a" and got["mean"] == pytest.approx(32.0) and got["sd"] == pytest.approx(2.0)
  assert got["gap"] == pytest.approx(7.0) and got["threshold"] == pytest.approx(6.0) and got["ok"]
  assert got["reason"] == "a: 32.0 vs prior 25.0 (gap 7.0, 3 SD = 6.0)"
  assert not iv.best_vs_prior({"a": np.array([[30.0], [32.0], [34.0]])}, 25.0, sds=4.0)["ok"]  # 7 < 8
