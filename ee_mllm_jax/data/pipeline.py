"""The Grain input pipeline: LLaVA-format records -> fixed-shape batches for the model.

    MapDataset.source(records) -> shuffle(seed) -> [process shard] -> repeat(epochs)
      -> map(encode: tokenize, lay out, decode images) -> batch(collate: pad to a bucket)
      -> to_iter_dataset -> mp_prefetch(workers) -> DataIterator

Batch layout (B per-process batch, I = max_images, P = tokens_per_image, T = a bucket):

    pixel_values     (B, I, H, W, 3) float32   normalised; absent images are zeros
    image_valid      (B, I) bool
    input_ids        (B, T) int32              text tokens only, left-aligned, pad id after
    text_positions   (B, T) int32              position in the interleaved sequence (pad: 0)
    text_valid       (B, T) bool
    visual_positions (B, I*P) int32            image i at [i*P:(i+1)*P], consecutive (absent: 0)
    labels           (B, T) int32              next learned text token, else -100 (shifted)

Design choices:

* Every stage before `to_iter_dataset` is a MapDataset, so batch k is a pure function of
  (records, config, k). The iterator state is just "next batch k" (plus skip counts):
  restoring rebuilds the pipeline from batch k, which is exact, cheap, and independent of
  the number of worker processes. The same holds for skipped records (below).
* A bad record in "skip" mode becomes an empty row of its batch (all masks False, labels
  -100) rather than being filtered, so batch shapes, batch boundaries and the number of
  batches per process never depend on data quality (multi-host runs stay in lock-step).
  A batch whose rows are all empty has no target; the train step must guard the mean.
* Workers cannot report to the parent, so each batch carries the records skipped while
  building it; `DataIterator` strips them, logs each bad record once (id, file, reason)
  and keeps per-reason counts in `.stats` (also saved in the iterator state). Counts are
  occurrences: a bad record is counted again in every epoch that reads it.
* Finite datasets (evaluation, `num_epochs` set) are padded with empty rows to a whole
  number of batches, equal on every process.
"""

from __future__ import annotations

import bisect
import dataclasses
import json
import logging
import math
import os
from typing import Any, Iterator, Literal

from absl import flags
import grain
import numpy as np

from ee_mllm_jax.config import CLIP_MEAN, CLIP_STD
from ee_mllm_jax.data import images as image_lib
from ee_mllm_jax.data import text as text_lib

log = logging.getLogger(__name__)

BAD_RECORD_REASONS = (
    "malformed_json",  # a JSONL line that does not parse to an object
    "bad_conversation",  # missing/odd fields, unknown role
    "no_assistant_turn",
    "image_count_mismatch",  # number of <image> placeholders != number of images
    "too_many_images",  # more than DataConfig.max_images
    "too_long",  # text longer than the largest bucket
    "missing_image",
    "empty_image",  # 0-byte file
    "not_an_image",
    "corrupt_image",  # truncated, bad data, unconvertible
)


class BadRecordError(Exception):
  """A record that cannot be used. Names the record, its file and the reason."""

  def __init__(self, record_id: str, reason: str, message: str, source: str = ""):
    super().__init__(record_id, reason, message, source)
    self.record_id, self.reason, self.message, self.source = record_id, reason, message, source

  def __str__(self):
    return f"bad record {self.record_id!r} in {self.source or '?'} ({self.reason}): {self.message}"


@dataclasses.dataclass
class BadRecordStats:
  """How many bad records were skipped, per reason (see BAD_RECORD_REASONS)."""

  counts: dict[str, int] = dataclasses.field(
      default_factory=lambda: dict.fromkeys(BAD_RECORD_REASONS, 0))

  @property
  def total(self) -> int:
    return sum(self.counts.values())

  def add(self, reason: str, n: int = 1):
    self.counts[reason] = self.counts.get(reason, 0) + n

  def __str__(self):
    parts = ", ".join(f"{k}={v}" for k, v in self.counts.items() if v)
    return f"{self.total} bad records skipped" + (f" ({parts})" if parts else "")


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Everything the pipeline needs. Image fields come from the model: `for_model`."""

  train_file: str = ""  # LLaVA JSON list or JSONL
  val_file: str = ""
  image_dir: str | None = None  # image paths are relative to it (default: the records file's dir)
  tokenizer_file: str = ""  # HF tokenizer.json
  template: Literal["plain", "vicuna_v1", "chatml"] = "vicuna_v1"
  system_prompt: str | None = None  # None: the template's default
  global_batch_size: int = 8  # split evenly over processes
  buckets: tuple[int, ...] = (64, 128, 256)  # allowed text lengths T
  truncate_turns: bool = False  # too long: drop trailing rounds instead of a bad record
  max_images: int = 1  # I
  image_size: int = 336
  tokens_per_image: int = 576  # P
  image_mean: tuple[float, float, float] = CLIP_MEAN
  image_std: tuple[float, float, float] = CLIP_STD
  image_preprocess: Literal["pad", "resize", "crop"] = "pad"  # pad: LLaVA expand2square
  alpha_background: Literal["white", "mean"] = "white"
  shuffle: bool = True  # training only
  seed: int = 0
  num_epochs: int | None = None  # training; None repeats forever (reshuffled each epoch)
  worker_count: int = 0  # processes; 0 decodes in the calling process
  worker_buffer_size: int = 2  # batches each worker keeps ready
  read_threads: int = 1  # threads per process; 0 = synchronous
  prefetch_batches: int = 2
  on_bad_record: Literal["raise", "skip"] = "raise"
  prompt_turn: int = -1  # prompt mode: which human turn to ask (-1: the last)

  def __post_init__(self):
    if not self.buckets or list(self.buckets) != sorted(set(self.buckets)):
      raise ValueError(f"buckets must be strictly increasing, got {self.buckets}")
    if self.on_bad_record not in ("raise", "skip"):
      raise ValueError(f"on_bad_record must be 'raise' or 'skip', got {self.on_bad_record!r}")
    if self.image_preprocess not in ("pad", "resize", "crop"):
      raise ValueError(f"unknown image_preprocess {self.image_preprocess!r}")
    text_lib.ChatTemplate(self.template)  # validates the name

  def replace(self, **changes) -> "DataConfig":
    return dataclasses.replace(self, **changes)

  @classmethod
  def for_model(cls, model_config, **fields) -> "DataConfig":
    """Image size, mean/std and P from a ModelConfig."""
    vision = model_config.vision
    return cls(image_size=vision.image_size, image_mean=tuple(vision.image_mean),
               image_std=tuple(vision.image_std),
               tokens_per_image=model_config.tokens_per_image, **fields)


# ----------------------------------------------------------------------------- records


def load_records(path: str, on_bad_record: str = "raise") -> tuple[list[dict], BadRecordStats]:
  """A LLaVA JSON list or a JSONL file -> records (each with a string "id")."""
  stats = BadRecordStats()
  path = str(path)
  if path.endswith(".jsonl"):
    records = []
    with open(path, encoding="utf-8") as f:
      for line_no, line in enumerate(f, 1):
        if not line.strip():
          continue
        try:
          record = json.loads(line)
          if not isinstance(record, dict):
            raise ValueError(f"expected a JSON object, got {type(record).__name__}")
        except ValueError as e:
          error = BadRecordError(f"line {line_no}", "malformed_json", str(e), path)
          if on_bad_record == "raise":
            raise error from None
          log.warning("Skipping %s", error)
          stats.add("malformed_json")
          continue
        records.append(record)
  else:
    with open(path, encoding="utf-8") as f:
      try:
        records = json.load(f)
      except ValueError as e:  # one broken JSON document: nothing to skip to
        raise ValueError(f"{path} is not valid JSON ({e}); JSONL input can skip bad lines") from None
    if not isinstance(records, list):
      raise ValueError(f"{path}: expected a JSON list of records")
  for i, record in enumerate(records):
    if isinstance(record, dict):
      record["id"] = str(record.get("id", i))
  return records, stats


@dataclasses.dataclass
class Example:
  layout: text_lib.TextLayout
  pixels: np.ndarray  # (images, H, W, 3)
  meta: dict[str, Any]


@dataclasses.dataclass
class Skipped:
  record_id: str
  reason: str
  message: str


class EncodeRecord:
  """record -> Example (or Skipped in skip mode; None is an empty padding row)."""

  def __init__(self, cfg: DataConfig, source: str, *, prompt: bool):
    self.cfg, self.source, self.prompt = cfg, source, prompt
    self.image_dir = cfg.image_dir or os.path.dirname(os.path.abspath(source))
    self.tokenizer = text_lib.load_tokenizer(cfg.tokenizer_file)
    self.template = text_lib.ChatTemplate(cfg.template, cfg.system_prompt)

  def __call__(self, record):
    if record is None:
      return None
    record_id = str(record.get("id", "?")) if isinstance(record, dict) else "?"
    try:
      return self._encode(record)
    except (text_lib.ConversationError, image_lib.ImageError) as e:
      error = BadRecordError(record_id, e.reason, e.message, self.source)
    if self.cfg.on_bad_record == "raise":
      raise error
    return Skipped(error.record_id, error.reason, str(error))

  def _encode(self, record) -> Example:
    cfg = self.cfg
    if not isinstance(record, dict):
      raise text_lib.ConversationError("bad_conversation", "record is not a JSON object")
    paths = record.get("image", [])
    paths = [paths] if isinstance(paths, str) else paths
    if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
      raise text_lib.ConversationError("bad_conversation", "'image' must be a path or a list of paths")
    turns = text_lib.parse_conversation(record.get("conversations"),
                                        prompt_turn=cfg.prompt_turn if self.prompt else None)
    placeholders = sum(t["value"].count(text_lib.IMAGE_PLACEHOLDER) for t in record["conversations"])
    if placeholders != len(paths):
      raise text_lib.ConversationError(
          "image_count_mismatch", f"{placeholders} {text_lib.IMAGE_PLACEHOLDER} placeholders for {len(paths)} images")
    layout = self._layout(turns)
    paths = paths[:len(layout.image_starts)]  # prompt cut / truncation may drop images
    if len(paths) > cfg.max_images:
      raise text_lib.ConversationError("too_many_images", f"{len(paths)} images, max_images is {cfg.max_images}")
    pixels = np.zeros((len(paths), cfg.image_size, cfg.image_size, 3), np.float32)
    for i, path in enumerate(paths):
      pixels[i] = image_lib.load_pixels(
          os.path.join(self.image_dir, path), size=cfg.image_size, mean=cfg.image_mean,
          std=cfg.image_std, mode=cfg.image_preprocess, background=cfg.alpha_background)
    # The record's own fields (id, question_type, options, ...) travel with the row.
    meta = {**{k: v for k, v in record.items() if k != "conversations"}, "image": paths}
    if self.prompt:
      meta.setdefault("question", turns.question)
      meta.setdefault("answer", turns.answer)
      meta.setdefault("question_type", None)
    return Example(layout, pixels, meta)

  def _layout(self, turns: text_lib.Turns) -> text_lib.TextLayout:
    """Never cuts inside a turn (or an image): too long is a bad record, or with
    `truncate_turns` whole trailing rounds go, keeping at least the first."""
    encode = lambda turns: text_lib.encode(self.tokenizer, self.template, turns,
                                           tokens_per_image=self.cfg.tokens_per_image, prompt=self.prompt)
    layout, limit = encode(turns), self.cfg.buckets[-1]
    while len(layout.input_ids) > limit:
      rounds = sum(role == text_lib.HUMAN for role, _ in turns.turns)
      if self.prompt or not self.cfg.truncate_turns or rounds <= 1:
        raise text_lib.ConversationError(
            "too_long", f"{len(layout.input_ids)} text tokens do not fit the largest bucket ({limit})"
            + ("" if self.cfg.truncate_turns else "; truncate_turns=True would drop trailing turns"))
      turns = turns.without_last_round()
      layout = encode(turns)
    return layout


class Collate:
  """Examples -> one fixed-shape batch (see the module docstring), plus side fields."""

  def __init__(self, cfg: DataConfig, batch_size: int, pad_id: int, *, with_meta: bool):
    self.cfg, self.batch_size, self.pad_id, self.with_meta = cfg, batch_size, pad_id, with_meta

  def __call__(self, examples) -> dict[str, Any]:
    cfg, B, I, P, S = self.cfg, self.batch_size, self.cfg.max_images, self.cfg.tokens_per_image, self.cfg.image_size
    good = [e for e in examples if isinstance(e, Example)]
    longest = max((len(e.layout.input_ids) for e in good), default=0)
    T = cfg.buckets[bisect.bisect_left(cfg.buckets, longest)]
    batch = {
        "pixel_values": np.zeros((B, I, S, S, 3), np.float32),
        "image_valid": np.zeros((B, I), bool),
        "input_ids": np.full((B, T), self.pad_id, np.int32),
        "text_positions": np.zeros((B, T), np.int32),
        "text_valid": np.zeros((B, T), bool),
        "visual_positions": np.zeros((B, I * P), np.int32),
        "labels": np.full((B, T), text_lib.IGNORE_INDEX, np.int32),
    }
    skipped, meta = [], [None] * B
    for row, example in enumerate(examples):
      if isinstance(example, Skipped):
        skipped.append(dataclasses.astuple(example))
        meta[row] = {"id": example.record_id, "skipped": example.reason}
      if not isinstance(example, Example):
        continue
      layout, n, k = example.layout, len(example.layout.input_ids), len(example.pixels)
      batch["input_ids"][row, :n] = layout.input_ids
      batch["text_positions"][row, :n] = layout.positions
      batch["text_valid"][row, :n] = True
      batch["labels"][row, :n] = layout.labels
      batch["pixel_values"][row, :k] = example.pixels
      batch["image_valid"][row, :k] = True
      for i, start in enumerate(layout.image_starts):
        batch["visual_positions"][row, i * P:(i + 1) * P] = np.arange(start, start + P)
      meta[row] = example.meta
    batch["_skipped"] = skipped
    if self.with_meta:
      batch["_meta"] = meta
    return batch


# ----------------------------------------------------------------------------- iterator


class DataIterator(grain.DatasetIterator):
  """Yields batches (or `(batch, meta)` with `with_meta`); state = next batch index.

  A grain DatasetIterator, so `grain.checkpoint.CheckpointSave(it)` /
  `CheckpointRestore(it)` save and restore it next to the train state with orbax.
  `meta` is a list with one dict per row: the record's fields except "conversations"
  (id, image paths, ...) and, in prompt mode, always question (the record's, else the
  asked human turn without <image>), answer (the record's, else the assistant reply that
  followed) and question_type (None if the record has none). A skipped record's row is
  {"id", "skipped": reason}; padding rows are None.
  """

  def __init__(self, batches: grain.MapDataset, cfg: DataConfig, stats: BadRecordStats,
               *, with_meta: bool):
    super().__init__()
    self._batches, self._cfg, self._with_meta = batches, cfg, with_meta
    self.stats = stats  # starts with what reading the records file skipped
    self._next = 0
    self._iterator = None
    self._logged: set[str] = set()

  def __len__(self) -> int:
    """Number of batches (a huge number when repeating forever)."""
    return len(self._batches)

  def _grain_iterator(self):
    if self._iterator is None:
      cfg = self._cfg
      ds = self._batches[self._next:].to_iter_dataset(grain.ReadOptions(
          num_threads=cfg.read_threads, prefetch_buffer_size=cfg.prefetch_batches))
      if cfg.worker_count > 0:
        if not flags.FLAGS.is_parsed():  # Grain reads its absl flags; entry points without
          flags.FLAGS.mark_as_parsed()  # absl.app.run (pytest, scripts) get their defaults
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=cfg.worker_count, per_worker_buffer_size=cfg.worker_buffer_size))
      self._iterator = iter(ds)
    return self._iterator

  def __next__(self):
    try:
      batch = next(self._grain_iterator())
    except StopIteration:
      if self.stats.total:
        log.warning("End of data: %s", self.stats)
      raise
    self._next += 1
    for record_id, reason, message in batch.pop("_skipped"):
      self.stats.add(reason)
      if record_id not in self._logged:  # once per record, not once per epoch
        self._logged.add(record_id)
        log.warning("Skipping %s [%s]", message, self.stats)
    meta = batch.pop("_meta", None)
    return (batch, meta) if self._with_meta else batch

  def get_state(self) -> dict[str, Any]:
    return {"next_batch": self._next, "skipped": dict(self.stats.counts)}

  def set_state(self, state: dict[str, Any]):
    self._stop()
    self._next = int(state["next_batch"])
    self.stats = BadRecordStats({k: int(v) for k, v in state["skipped"].items()})

  def start_prefetch(self):
    self._grain_iterator().start_prefetch()

  def _stop(self):
    if self._iterator is not None:
      self._iterator.close()
      self._iterator = None

  def close(self):
    self._stop()
    super().close()


def make_iterator(cfg: DataConfig, path: str, *, prompt: bool = False, shuffle: bool = False,
                  num_epochs: int | None = 1, shard: grain.sharding.ShardOptions | None = None,
                  with_meta: bool = False) -> DataIterator:
  """The general builder; the three below fix the arguments for their use."""
  shard = shard or grain.sharding.ShardByJaxProcess()  # made here: after jax.distributed.initialize
  if cfg.global_batch_size % shard.shard_count:
    raise ValueError(f"global_batch_size {cfg.global_batch_size} is not divisible by "
                     f"{shard.shard_count} processes")
  batch_size = cfg.global_batch_size // shard.shard_count
  records, stats = load_records(path, cfg.on_bad_record)
  if not records:
    raise ValueError(f"{path}: no records")
  encode = EncodeRecord(cfg, str(path), prompt=prompt)
  pad_id = encode.tokenizer.token_to_id("<pad>") or 0

  ds = grain.MapDataset.source(records)
  if shuffle:
    ds = ds.shuffle(seed=cfg.seed)  # reshuffled in every epoch (the epoch folds into the seed)
  if shard.drop_remainder:
    ds = ds[:len(ds) // shard.shard_count * shard.shard_count]
  ds = ds[shard.shard_index::shard.shard_count]
  if num_epochs is not None:  # pad every process to the same whole number of batches
    per_process = math.ceil(math.ceil(len(records) / shard.shard_count) / batch_size) * batch_size
    if per_process > len(ds):
      ds = grain.MapDataset.concatenate([ds, grain.MapDataset.source([None] * (per_process - len(ds)))])
  if num_epochs != 1:
    ds = ds.repeat(num_epochs)
  # (drop_remainder only matters for a finite dataset, which is padded to whole batches;
  # without it Grain's length of an infinite batched dataset can overflow.)
  ds = ds.map(encode).batch(batch_size, drop_remainder=num_epochs is None,
                            batch_fn=Collate(cfg, batch_size, pad_id, with_meta=with_meta))
  return DataIterator(ds, cfg, stats, with_meta=with_meta)


def make_train_iterator(cfg: DataConfig, *, shard=None, with_meta: bool = False) -> DataIterator:
  """Shuffled training batches from `cfg.train_file`, `cfg.num_epochs` epochs (None: forever)."""
  return make_iterator(cfg, cfg.train_file, shuffle=cfg.shuffle, num_epochs=cfg.num_epochs,
                       shard=shard, with_meta=with_meta)


def make_eval_iterator(cfg: DataConfig, *, path: str | None = None, shard=None,
                       with_meta: bool = False) -> DataIterator:
  """One ordered pass over `path` (default `cfg.val_file`) with labels, for validation loss."""
  return make_iterator(cfg, path or cfg.val_file, shard=shard, with_meta=with_meta)


def make_prompt_iterator(cfg: DataConfig, *, path: str | None = None, shard=None) -> DataIterator:
  """One ordered pass yielding `(batch, meta)`: each row's text stops after the
  assistant-turn opener of human turn `cfg.prompt_turn`; labels are all -100."""
  return make_iterator(cfg, path or cfg.val_file, prompt=True, shard=shard, with_meta=True)


def iterate_records(cfg: DataConfig, path: str) -> Iterator[Example | Skipped]:
  """Encodes records one by one in this process (debugging, validating a dataset)."""
  encode = EncodeRecord(cfg, str(path), prompt=False)
  for record in load_records(path, cfg.on_bad_record)[0]:
    yield encode(record)
