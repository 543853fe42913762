"""Batched evaluation of one benchmark (`evaluation.benchmarks`): prompts -> generation, greedy or sampled (and
option likelihoods where it ranks options, as SEED-Bench) -> predictions.jsonl -> metrics.json.

Questions about one image are batched together; with prefix reuse (the default) each batch
runs the vision tower and the prefill of [system text; image] once per distinct image
(`split_at_last_image` / `prefill_prefix`), and every question row continues from its image's
cache (`Cache.take_rows`). Shapes are fixed: B question rows, G image rows, text widths from a few
buckets, so jit compiles a handful of programs. Rows are sharded over the mesh's data axes.

predictions.jsonl is appended after every batch (one JSON object per question), so a re-run
with the same output directory skips what is done; SIGTERM stops after the current batch and
leaves the file whole.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import math
import os
import signal
import time
import zlib
from typing import Any, Iterable, Sequence

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from ee_mllm_jax import batch as batch_lib
from ee_mllm_jax import sharding
from ee_mllm_jax import signals
from ee_mllm_jax import storage
from ee_mllm_jax.data import images as image_lib
from ee_mllm_jax.data.records import BadRecordError
from ee_mllm_jax.data.text import IMAGE_PLACEHOLDER, TextLayout
from ee_mllm_jax.evaluation import benchmarks
from ee_mllm_jax.evaluation import prompts as prompts_lib
from ee_mllm_jax.evaluation.benchmarks import Benchmark, Question
from ee_mllm_jax.evaluation.model import EvalModel
from ee_mllm_jax.generate import generate, labelled_logprobs, prefill_prefix, split_at_last_image

log = logging.getLogger(__name__)
PREDICTIONS, METRICS = "predictions.jsonl", "metrics.json"


class EvalError(ValueError):
  """A question that cannot be evaluated (missing or corrupt image, prompt too long); names it."""


@dataclasses.dataclass(frozen=True)
class EvalSettings:
  batch_size: int = 16  # B: question rows per step
  images_per_batch: int = 0  # G: image (prefix) rows per step; 0: B / (questions per image in the data)
  max_new_tokens: int = 16
  reuse_prefix: bool = True
  likelihood: bool = True  # benchmarks that rank options (SEED-Bench): also rank them by likelihood
  on_bad_image: str = "raise"  # or "skip": counted and reported
  style: prompts_lib.PromptStyle = prompts_lib.PromptStyle()
  progress_bar: bool = True
  limit: int = 0  # > 0: only the first `limit` questions (a quick look)
  temperature: float = 0.0  # 0: greedy; > 0: sampled, top-p, from a key of `seed` and the batch's first question
  top_p: float = 1.0
  seed: int = 0


@dataclasses.dataclass
class _Item:
  q: Question
  layout: TextLayout  # the generation prompt
  prompt: str  # its rendered text
  options: list[TextLayout] | None = None  # SEED likelihood: one answered layout per option
  skipped: str | None = None  # why the question cannot be asked (skip mode: counted, not run)


def _round_up(n: int, m: int = 8) -> int:
  return max(m, -(-n // m) * m)


class Runner:
  """Compiled-once evaluation of one model; `run` does one benchmark."""

  def __init__(self, model: EvalModel, settings: EvalSettings = EvalSettings(), mesh=None):
    self.model, self.settings = model, settings
    self.mesh = mesh if mesh is not None else sharding.make_mesh((-1, 1, 1))
    self.params = jax.device_put(model.params, NamedSharding(self.mesh, PartitionSpec()))
    self.encoder = prompts_lib.Encoder(model.tokenizer, model.template, model.cfg.tokens_per_image)
    self.pad_id = model.tokenizer.token_to_id("<pad>") or 0
    if jax.process_count() > 1:
      raise NotImplementedError("evaluation runs in one process (any number of its devices); "
                                f"this job has {jax.process_count()} processes")
    self.dp = sharding.data_parallel_size(self.mesh)
    self.rows = _round_up(settings.batch_size, self.dp)  # B, a multiple of the data-parallel size
    self.image_rows = _round_up(settings.images_per_batch or settings.batch_size, self.dp)  # G

  def fit_image_rows(self, items: Sequence["_Item"]):
    """With images_per_batch = 0, G = B / (questions per image, rounded down), so that a batch of
    MMBench rotations computes 4 image prefixes, not B."""
    if self.settings.images_per_batch or not items:
      return
    per_image = max(1, len(items) // len({it.q.image_key for it in items}))
    self.image_rows = _round_up(-(-self.rows // per_image), self.dp)

  # -------------------------------------------------------------------------- inputs

  def items(self, benchmark: str | Benchmark, questions: Iterable[Question]) -> list[_Item]:
    """The questions' prompts. One that cannot be asked (too long for the model, or with an
    image marker in its text) is an EvalError naming it, or in skip mode (`on_bad_image`) an
    item marked skipped, counted like a bad image."""
    bench, s, out = benchmarks.get(benchmark), self.settings, []
    for q in questions:
      try:
        plain = bench.message(q, s.style, with_options=False) if bench.ranks_options and s.likelihood else None
        out.append(self.item(q, bench.message(q, s.style), plain))
      except EvalError as e:
        if self.settings.on_bad_image != "skip":
          raise
        log.warning("Skipping %s", e)
        out.append(_Item(q, None, "", skipped=str(e)))
    return out

  def check_layout(self, q: Question, layout: TextLayout):
    """EvalError naming `q` when its prompt cannot run: more text than the largest bucket, or
    other than the one image the prompt places (an "<image>" typed in the question)."""
    if len(layout.image_starts) != 1:
      raise EvalError(f"question {q.qid}: its text contains {IMAGE_PLACEHOLDER!r}, the marker of the image's place, "
                      "which a question cannot hold")
    if batch_lib.text_bucket(self.model.buckets, len(layout.input_ids)) is None:
      raise EvalError(f"question {q.qid}: its prompt has {len(layout.input_ids)} text tokens, more than the largest "
                      f"bucket ({self.model.buckets[-1]})")

  def item(self, q: Question, msg: str, plain: str | None = None) -> _Item:
    """`q` asked as the user message `msg`; with `plain` (the message without its options), each
    of its options is also scored as the answer to it (likelihood ranking)."""
    layout = self.encoder.prompt(msg)
    self.check_layout(q, layout)
    options = None if plain is None else [self.encoder.answered(plain, text) for text in q.options.values()]
    if options and any(len(option.image_starts) != 1 for option in options):
      raise EvalError(f"question {q.qid}: an option contains {IMAGE_PLACEHOLDER!r}, the marker of the image's "
                      "place, which a question cannot hold")
    rendered = "".join(t for t, _, _ in self.model.template.render(
        [("human", "<image>\n" + msg)], prompt=True))
    return _Item(q, layout, rendered, options)

  def pixels(self, q: Question) -> np.ndarray:
    m, cfg = self.model, self.model.cfg.vision
    kw = dict(size=cfg.image_size, mean=cfg.image_mean, std=cfg.image_std, mode=m.image_preprocess,
              background=m.alpha_background)
    try:
      if isinstance(q.image, bytes):
        return image_lib.load_pixels_from_bytes(q.image, f"the image of question {q.qid}", **kw)
      path = q.image
      if q.image_root is not None:  # the benchmark file's paths stay inside --image-root
        path = image_lib.contained_path(q.image_root, path)
      return image_lib.load_pixels(path, **kw)
    except BadRecordError as e:
      raise EvalError(f"question {q.qid}: {e}") from None

  def _collate(self, layouts: Sequence[TextLayout], pixels: Sequence[np.ndarray], rows: int) -> dict:
    """Host batch of `rows` rows (missing rows repeat the last one: their results are dropped)."""
    layouts = list(layouts) + [layouts[-1]] * (rows - len(layouts))
    pixels = list(pixels) + [pixels[-1]] * (rows - len(pixels))
    p, size = self.model.cfg.tokens_per_image, self.model.cfg.vision.image_size
    width = batch_lib.text_bucket(self.model.buckets, max(len(x.input_ids) for x in layouts)) or _round_up(
        max(len(x.input_ids) for x in layouts))
    batch = batch_lib.empty(rows, width, max_images=1, tokens_per_image=p, image_size=size, pad_id=self.pad_id)
    for r, (x, px) in enumerate(zip(layouts, pixels)):
      batch_lib.fill_row(batch, r, text_positions=x.positions, image_starts=x.image_starts, input_ids=x.input_ids,
                         labels=x.labels, pixel_values=px[None])
    return batch

  def _split(self, batch: dict, image_of_row: Sequence[int]) -> tuple[dict, dict, np.ndarray]:
    """(prefix batch of G image rows, the rest of every row with its labels, row -> image row)."""
    prefix, rest = split_at_last_image(batch)
    first = {}
    for r, g in enumerate(image_of_row):
      first.setdefault(g, r)
    reps = [first[g] for g in sorted(first)]
    reps += [reps[-1]] * (self.image_rows - len(reps))
    prefix = {k: v[reps] for k, v in prefix.items()}
    # Text after the prefix keeps its order by position, as `split_at_last_image` packs it.
    end = batch["visual_positions"].max(axis=1, keepdims=True)
    keep = batch["text_valid"] & (batch["text_positions"] > end)
    labels = np.full(rest["input_ids"].shape, batch_lib.IGNORE_INDEX, np.int32)
    for r in range(len(labels)):
      got = batch["labels"][r][keep[r]]
      labels[r, :len(got)] = got
    rest["labels"] = labels
    prefix = {k: v for k, v in batch_lib.pad_text(prefix, _round_up(prefix["input_ids"].shape[1])).items()}
    width = batch_lib.text_bucket(self.model.buckets, rest["input_ids"].shape[1]) or _round_up(
        rest["input_ids"].shape[1])
    rest = batch_lib.pad_text(rest, width)
    return prefix, rest, np.asarray(list(image_of_row), np.int32)

  # -------------------------------------------------------------------------- one batch

  def _shard(self, batch: dict) -> dict:
    return sharding.shard_batch(batch, self.mesh)

  def _prefix_cache(self, prefix: dict, image_of_row: np.ndarray):
    cache = prefill_prefix(self.params, self.model.cfg, self._shard(batch_lib.model_inputs(prefix)))
    return cache.take_rows(image_of_row)

  def _rng(self, qid: str):
    """Sampling's key for a batch: the seed's, folded with its first question's id, so that the
    same batch draws the same tokens in a resumed run as in one that was not stopped. None: greedy."""
    if self.settings.temperature <= 0:
      return None
    return jax.random.fold_in(jax.random.key(self.settings.seed), zlib.crc32(qid.encode()) & 0x7FFFFFFF)

  def _generate(self, items: list[_Item], pixels: list[np.ndarray], image_of_row: list[int]) -> list[str]:
    s, cfg = self.settings, self.model.cfg
    batch = self._collate([it.layout for it in items], [pixels[g] for g in image_of_row], self.rows)
    kw = dict(max_new_tokens=s.max_new_tokens, stop_ids=self.encoder.stop_ids, pad_id=self.pad_id,
              temperature=s.temperature, top_p=s.top_p if s.temperature > 0 else 1.0, rng=self._rng(items[0].q.qid))
    if s.reuse_prefix:
      prefix, rest, rows = self._split(batch, image_of_row + [image_of_row[-1]] * (self.rows - len(items)))
      cache = self._prefix_cache(prefix, rows)
      out = generate(self.params, cfg, self._shard(batch_lib.text_inputs(rest)), cache=cache, **kw)
    else:
      out = generate(self.params, cfg, self._shard(batch_lib.model_inputs(batch)), **kw)
    tokens, lengths = jax.device_get((out.tokens, out.lengths))
    stops = set(self.encoder.stop_ids)
    return [self.encoder.decode([t for t in tokens[r, :lengths[r]] if t not in stops]) for r in range(len(items))]

  def _option_logprobs(self, items: list[_Item], pixels: list[np.ndarray], image_of_row: list[int]) -> list[list[float]]:
    """Each question's options scored as the assistant's reply: 4 rows per question, every row
    continuing from its image's prefix cache (one forward over the text after the image)."""
    n_opt = len(items[0].options)
    rows = [g for g in image_of_row for _ in range(n_opt)]
    sums = self.score_layouts([o for it in items for o in it.options], pixels, rows, self.rows * n_opt)[0]
    return [sums[i * n_opt:(i + 1) * n_opt].tolist() for i in range(len(items))]

  def score_layouts(self, layouts: list[TextLayout], pixels: list[np.ndarray], image_of_row: list[int], total: int,
                    greedy: bool = False) -> tuple[np.ndarray, ...]:
    """`labelled_logprobs` of answered layouts (row r about image `pixels[image_of_row[r]]`) in a
    batch of `total` rows, each continuing from its image's prefix cache -> host arrays, one row each."""
    batch = self._collate(layouts, [pixels[g] for g in image_of_row], total)
    if self.settings.reuse_prefix:
      prefix, rest, rows = self._split(batch, image_of_row + [image_of_row[-1]] * (total - len(image_of_row)))
      out = labelled_logprobs(self.params, self.model.cfg, self._shard({k: rest[k] for k in batch_lib.TEXT_KEYS + (
          "labels",)}), cache=self._prefix_cache(prefix, rows), greedy=greedy)
    else:
      out = labelled_logprobs(self.params, self.model.cfg, self._shard({k: batch[k] for k in batch_lib.TRAIN_KEYS}),
                              greedy=greedy)
    return tuple(np.asarray(x)[:len(layouts)] for x in jax.device_get(out))

  # -------------------------------------------------------------------------- batching

  def _batches(self, items: list[_Item]) -> Iterable[list[_Item]]:
    """Whole image groups, in file order, until B questions or G images; a group larger than B
    is split."""
    groups: dict[str, list[_Item]] = collections.OrderedDict()
    for it in items:
      groups.setdefault(it.q.image_key, []).append(it)
    batch, images = [], 0
    for group in groups.values():
      while group:
        if images == self.image_rows or len(batch) == self.rows:
          yield batch
          batch, images = [], 0
        take = group[:self.rows - len(batch)]
        group = group[len(take):]
        batch += take
        images += 1
    if batch:
      yield batch

  # -------------------------------------------------------------------------- the run

  def predict(self, benchmark: str | Benchmark, items: list[_Item], sink, stop=lambda: False) -> dict[str, int]:
    """Runs `items`, calling `sink(records)` after every batch; -> counts (done, skipped, stopped)."""
    bench = benchmarks.get(benchmark)
    from tqdm import tqdm  # pylint: disable=g-import-not-at-top
    self.fit_image_rows(items)
    counts = collections.Counter()
    bar = tqdm(total=len(items), disable=not self.settings.progress_bar, unit="q", dynamic_ncols=True)
    start = time.perf_counter()
    try:
      for batch in self._batches(items):
        if stop():
          counts["stopped"] = 1
          break
        records, kept, pixels, image_of_row, seen = [], [], [], [], {}
        for it in batch:
          if it.skipped:
            records.append(dict(question_id=it.q.qid, skipped=it.skipped))
            counts["skipped"] += 1
            continue
          key = it.q.image_key
          if key not in seen:
            try:
              px = self.pixels(it.q)
            except EvalError as e:
              if self.settings.on_bad_image != "skip":
                raise
              seen[key] = e
              log.warning("Skipping %s", e)
            else:
              seen[key] = len(pixels)
              pixels.append(px)
          if isinstance(seen[key], EvalError):
            records.append(dict(question_id=it.q.qid, skipped=str(seen[key])))
            counts["skipped"] += 1
            continue
          kept.append(it)
          image_of_row.append(seen[key])
        if kept:
          outputs = self._generate(kept, pixels, image_of_row)
          scores = (self._option_logprobs(kept, pixels, image_of_row) if kept[0].options else [None] * len(kept))
          records += [record(bench, it, out, sc) for it, out, sc in zip(kept, outputs, scores)]
        sink(records)
        counts["done"] += len(batch)
        bar.update(len(batch))
        bar.set_postfix_str(f"{counts['done'] / (time.perf_counter() - start):.2f} questions/s")
    finally:
      bar.close()
    counts["seconds"] = time.perf_counter() - start
    return dict(counts)


def record(benchmark: str | Benchmark, it: _Item, output: str, option_scores: list[float] | None) -> dict[str, Any]:
  """One predictions.jsonl line: ids, prompt, raw output, then the benchmark's (parsed, truth, score)."""
  return dict(question_id=it.q.qid, prompt=it.prompt, output=output,
              **benchmarks.get(benchmark).record(it.q, output, option_scores))


def score(benchmark: str | Benchmark, records: Sequence[dict]) -> dict[str, Any]:
  """metrics.json from all predictions of a benchmark (skipped questions counted, not scored)."""
  done = [r for r in records if "skipped" not in r]
  return {"questions": len(done), "skipped": len(records) - len(done), **benchmarks.get(benchmark).summary(done)}


def read_predictions(path: str) -> list[dict]:
  """The complete lines of predictions.jsonl (a torn last line, from a kill, is dropped and
  rewritten away)."""
  if not os.path.exists(path):
    return []
  with open(path, encoding="utf-8") as f:
    lines = f.readlines()
  records, good = [], 0
  for line in lines:
    try:
      records.append(json.loads(line))
    except ValueError:
      break
    if not line.endswith("\n"):
      records.pop()
      break
    good += 1
  if good != len(lines):
    log.warning("%s: dropping %d incomplete line(s) at the end", path, len(lines) - good)
    storage.atomic_write(path, "".join(lines[:good]))
  return records


def evaluate(runner: Runner, benchmark: str | Benchmark, questions: Sequence[Question], out_dir: str) -> dict[str, Any]:
  """Predicts what `out_dir/predictions.jsonl` lacks, then writes `metrics.json`. -> summary
  {benchmark (its name), mode, metrics, run: counts and questions/s}."""
  benchmark = benchmarks.get(benchmark)
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, PREDICTIONS)
  if runner.settings.limit > 0:
    questions = questions[:runner.settings.limit]
  wanted = {q.qid for q in questions}
  done = {r["question_id"] for r in read_predictions(path) if "skipped" not in r}  # skipped ones are retried
  todo = runner.items(benchmark, [q for q in questions if q.qid not in done])
  # SIGTERM (a preemption) stops after the current batch; what is written stays, a rerun resumes.
  with signals.StopOnSignal((signal.SIGTERM,)) as stop, open(path, "a", encoding="utf-8") as f:
    def sink(records):
      f.writelines(json.dumps(r) + "\n" for r in records)
      f.flush()
      os.fsync(f.fileno())
    counts = runner.predict(benchmark, todo, sink, stop=lambda: stop.requested)
  latest = {r["question_id"]: r for r in read_predictions(path)}  # a retried question's last record
  records = [latest[q.qid] for q in questions if q.qid in latest]
  result = score(benchmark, records)
  storage.atomic_write(os.path.join(out_dir, METRICS), json.dumps(result, indent=1))
  seconds = counts.get("seconds", 0.0)
  run = dict(resumed=len(done & wanted), predicted=counts.get("done", 0), skipped=counts.get("skipped", 0),
             stopped=bool(counts.get("stopped")), seconds=seconds,
             questions_per_s=counts.get("done", 0) / seconds if seconds > 0 else math.nan,
             complete=len(records) == len(wanted))
  return dict(benchmark=benchmark.name, mode=runner.model.mode, metrics=result, run=run)


def summary_table(summary: dict[str, Any], benchmark: Benchmark | None = None) -> str:
  """A few lines for the terminal: the mode, the headline numbers, per-category scores
  (`benchmark`: the object that ran, where it is not in the registry)."""
  m, run = summary["metrics"], summary["run"]
  lines = [f"{summary['benchmark']}  |  mode: {summary['mode']}",
           f"  questions {m['questions']}  skipped {m['skipped']}  ({run['predicted']} predicted now, "
           f"{run['resumed']} resumed, {run['questions_per_s']:.2f} questions/s)"]
  lines += benchmarks.get(benchmark or summary["benchmark"]).metric_lines(m)
  if run["stopped"]:
    lines.append("  stopped by SIGTERM: re-run with the same --out to finish")
  return "\n".join(lines)
