"""Intervals and verdicts for comparing models: seeds and questions as the two sources of noise.

A score here is a matrix `(S, Q)`: S seeds (training runs that differ in connector init and data
order) by Q scoring units, each unit the score of one question in [0, 100] (for MMBench's
CircularEval, one question's group of rotations). Every model of a comparison is scored on the
same units in the same order, and seed i of one model is paired with seed i of the other (the
same data order), so differences are taken unit by unit and seed by seed.

The two sources of noise, each with its own interval:

* **seeds**: the spread of the S per-seed means: Student's t interval with S - 1 degrees of
  freedom (S >= 2). It says how much another training run would move the score.
* **questions**: a percentile bootstrap over the Q units (the same resampled units for every
  seed, so the seed average is kept). It says how much another draw of the benchmark's
  questions would move the score.
* **both** (what a verdict uses): the half-widths added in quadrature, as for independent
  errors. With one seed it is the questions' interval alone, and says so (`sources`).

    diff = paired_difference(ee_mllm, llava)          # (S, Q) each -> Interval of the mean difference
    superiority(diff)                                 # "supported" / "contradicted" / "undecided"
    equivalence(scores_a, scores_b, margin=3.0)       # two one-sided tests at the 90% interval
    mean_of_benchmarks([open_diff, seed_diff])        # a headline over benchmarks: seeds paired across
                                                      # them, the question bootstrap stratified by benchmark

A benchmark is *informative* when its best model beats the answer prior (a model that always
gives the most frequent answer, or a uniform guess among the options) by more than 3 standard
deviations across seeds (`informative`); the rest stay out of headline means.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from scipy import stats

__all__ = ["Interval", "best_vs_prior", "equivalence", "equivalent", "informative", "interval", "mean_of_benchmarks",
           "paired_difference", "superiority"]

BOOTSTRAP_SAMPLES = 2000


@dataclasses.dataclass(frozen=True)
class Interval:
  """mean and [low, high] at `level`, from `sources` ("seeds", "questions" or "seeds+questions");
  `seeds` and `questions` are the half-widths of each source alone (nan where not estimated)."""

  mean: float
  low: float
  high: float
  level: float
  sources: str
  seeds: float
  questions: float

  @property
  def half_width(self) -> float:
    return (self.high - self.low) / 2

  def excludes(self, value: float = 0.0) -> bool:
    return not self.low <= value <= self.high

  def __str__(self) -> str:
    return f"{self.mean:.1f} ± {self.half_width:.1f}"

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


def _as_matrix(scores) -> np.ndarray:
  x = np.asarray(scores, np.float64)
  if x.ndim == 1:
    x = x[None]
  if x.ndim != 2 or x.shape[1] == 0:
    raise ValueError(f"scores must be (seeds, questions) with at least one question, got shape {x.shape}")
  if not np.all(np.isfinite(x)):
    raise ValueError("scores contain nan or inf")
  return x


def seed_half_width(per_seed: np.ndarray, level: float) -> float:
  """Student's t half-width of the mean of `per_seed` (nan with fewer than 2 seeds)."""
  s = len(per_seed)
  if s < 2:
    return math.nan
  return float(stats.t.ppf(0.5 + level / 2, s - 1) * np.std(per_seed, ddof=1) / math.sqrt(s))


def question_half_width(x: np.ndarray, level: float, *, samples: int = BOOTSTRAP_SAMPLES, seed: int = 0) -> float:
  """Percentile bootstrap over the columns (units) of `x` (S, Q): half the width of the central
  `level` range of the resampled grand means (the same columns for every seed)."""
  return stratified_half_width([x], level, samples=samples, seed=seed)


def stratified_half_width(strata: list[np.ndarray], level: float, *, samples: int = BOOTSTRAP_SAMPLES,
                          seed: int = 0) -> float:
  """Percentile bootstrap of the mean of the strata's grand means, each stratum `(S, Q_c)` (a
  benchmark) resampling its own units (the same units for every seed) independently of the others:
  half the width of the central `level` range. One stratum is `question_half_width`."""
  rng = np.random.default_rng(seed)
  means = np.zeros(samples)
  for x in strata:
    q = x.shape[1]
    unit_means = x.mean(axis=0)  # averaging the seeds first changes no grand mean
    idx = rng.integers(0, q, size=(samples, q))
    means += unit_means[idx].mean(axis=1)
  means /= len(strata)
  lo, hi = np.quantile(means, [0.5 - level / 2, 0.5 + level / 2])
  return float(hi - lo) / 2


def _combined(mean: float, h_seed: float, h_question: float, level: float) -> Interval:
  if math.isnan(h_seed):
    h, sources = h_question, "questions"
  else:
    h, sources = math.hypot(h_seed, h_question), "seeds+questions"
  return Interval(mean, mean - h, mean + h, level, sources, h_seed, h_question)


def interval(scores, *, level: float = 0.95, samples: int = BOOTSTRAP_SAMPLES, seed: int = 0) -> Interval:
  """The mean of `scores` (S, Q) (or (Q,): one seed) and its interval from both sources."""
  x = _as_matrix(scores)
  mean = float(x.mean())
  return _combined(mean, seed_half_width(x.mean(axis=1), level),
                   question_half_width(x, level, samples=samples, seed=seed), level)


def mean_of_benchmarks(matrices, *, level: float = 0.95, samples: int = BOOTSTRAP_SAMPLES, seed: int = 0) -> Interval:
  """The mean over benchmarks of each benchmark's mean score, `matrices` one `(S, Q_c)` per
  benchmark (any Q_c, one S: row i of every matrix is seed i), and its interval: Student's t over
  the S per-seed means of the benchmark means (seeds paired across benchmarks), in quadrature with
  a bootstrap that resamples each benchmark's units on their own (stratified: no benchmark gains or
  loses weight). One matrix gives `interval`'s answer."""
  xs = [_as_matrix(m) for m in matrices]
  if not xs:
    raise ValueError("no benchmarks to average")
  if len({x.shape[0] for x in xs}) != 1:
    raise ValueError(f"every benchmark needs the same seeds, got shapes {[x.shape for x in xs]}")
  per_seed = np.mean([x.mean(axis=1) for x in xs], axis=0)
  return _combined(float(per_seed.mean()), seed_half_width(per_seed, level),
                   stratified_half_width(xs, level, samples=samples, seed=seed), level)


def paired_difference(a, b, **kw) -> Interval:
  """The interval of mean(a - b): `a` and `b` (S, Q) on the same units, seed i paired with seed i."""
  a, b = _as_matrix(a), _as_matrix(b)
  if a.shape != b.shape:
    raise ValueError(f"paired scores need one shape (seeds, questions), got {a.shape} and {b.shape}")
  return interval(a - b, **kw)


def superiority(diff: Interval) -> str:
  """"supported" when the interval of a difference lies above 0, "contradicted" below, else
  "undecided"."""
  if diff.low > 0:
    return "supported"
  if diff.high < 0:
    return "contradicted"
  return "undecided"


def equivalent(diff: Interval, *, margin: float) -> str:
  """The verdict of two one-sided tests from the (2 level - 1) interval of a difference (90% for
  tests at 5%): "supported" inside (-margin, margin), "contradicted" wholly outside, else
  "undecided"."""
  if margin <= 0:
    raise ValueError(f"margin must be > 0, got {margin}")
  if -margin < diff.low and diff.high < margin:
    return "supported"
  if diff.low >= margin or diff.high <= -margin:
    return "contradicted"
  return "undecided"


def equivalence(a, b, *, margin: float, level: float = 0.95, **kw) -> tuple[str, Interval]:
  """"About as good": two one-sided tests at `level`, i.e. the (2 level - 1) interval of
  mean(a - b) (90% for 95%). "supported" when it lies inside (-margin, margin), "contradicted"
  when it lies wholly outside, else "undecided". Fix the margin before looking at the data."""
  if margin <= 0:
    raise ValueError(f"margin must be > 0, got {margin}")
  diff = paired_difference(a, b, level=2 * level - 1, **kw)
  return equivalent(diff, margin=margin), diff


def best_vs_prior(models: dict[str, np.ndarray], prior: float, *, sds: float = 3.0) -> dict:
  """The informative rule's working: the best model by mean (`best`), its `mean` and the `sd` of
  its per-seed means, `gap` = mean - prior, `threshold` = sds * sd, `ok` = gap > threshold (False
  with one seed) and a one-line `reason`."""
  if not models:
    raise ValueError("no models")
  per_seed = {name: _as_matrix(x).mean(axis=1) for name, x in models.items()}
  best = max(per_seed, key=lambda n: per_seed[n].mean())
  s = per_seed[best]
  mean, gap = float(s.mean()), float(s.mean()) - prior
  if len(s) < 2:
    return dict(best=best, mean=mean, sd=math.nan, gap=gap, threshold=math.nan, ok=False,
                reason=f"{best}: one seed, no spread to judge by")
  sd = float(np.std(s, ddof=1))
  return dict(best=best, mean=mean, sd=sd, gap=gap, threshold=sds * sd, ok=gap > sds * sd,
              reason=f"{best}: {mean:.1f} vs prior {prior:.1f} (gap {gap:.1f}, {sds:g} SD = {sds * sd:.1f})")


def informative(models: dict[str, np.ndarray], prior: float, *, sds: float = 3.0) -> tuple[bool, str]:
  """Whether a benchmark tells models apart from guessing: its best model (by mean) beats `prior`
  by more than `sds` standard deviations of that model's per-seed means. -> (verdict, reason)."""
  d = best_vs_prior(models, prior, sds=sds)
  return d["ok"], d["reason"]
