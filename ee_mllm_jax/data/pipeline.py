"""The Grain input pipeline: LLaVA-format records -> fixed-shape batches for the model.

    MapDataset.source(records) -> shuffle(seed) -> [process shard] -> repeat(epochs)
      -> map(encode: tokenize, lay out, decode images) -> batch(collate: pad to a bucket)
      -> to_iter_dataset -> mp_prefetch(workers) -> DataIterator

Reading the records file, and a bad record's error and counts, live in `data.records`.

Batches follow the contract of `ee_mllm_jax.batch` (B = the per-process batch, I =
`max_images`, P = `tokens_per_image`, T = the smallest bucket that fits the batch's longest
row): text left-aligned with the pad id after it, image i's tokens at [i*P:(i+1)*P] at
consecutive positions, labels already shifted (IGNORE_INDEX where nothing is learned).

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

import dataclasses
import logging
import math
import os
import threading
import time
from typing import Any, Literal

from absl import flags
import grain
import numpy as np

from ee_mllm_jax import batch as batch_lib
from ee_mllm_jax.config import CLIP_MEAN, CLIP_STD
from ee_mllm_jax.data import images as image_lib
from ee_mllm_jax.data import text as text_lib
from ee_mllm_jax.data.records import BadRecordError, BadRecordStats, Records, load_records

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Everything the pipeline needs. Image fields come from the model: `for_model`."""

  train_file: str = ""  # LLaVA JSON list or JSONL
  val_file: str = ""
  image_dir: str | None = None  # image paths are relative to it (default: the records file's dir)
  # Image paths must stay inside image_dir once resolved (`..`, absolute paths and symlinks
  # that point out are bad records); True allows them, for images kept elsewhere.
  allow_images_outside_root: bool = False
  tokenizer_file: str = ""  # HF tokenizer.json
  template: Literal["plain", "vicuna_v1", "chatml"] = "vicuna_v1"
  system_prompt: str | None = None  # None: the template's default
  # False: a record with one image has its <image> moved to the front of its message ("<image>\n"
  # + the rest, stripped), as LLaVA's preprocess_multimodal; True keeps it where the record puts
  # it. Records with several images always keep their order.
  image_in_place: bool = False
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


# ----------------------------------------------------------------------------- records -> rows


@dataclasses.dataclass
class Example:
  layout: text_lib.TextLayout
  pixels: np.ndarray  # (images, Y, X, C)
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
    self.image_dir = os.path.realpath(cfg.image_dir or os.path.dirname(os.path.abspath(source)))
    self.tokenizer = text_lib.load_tokenizer(cfg.tokenizer_file)
    self.plain_tokenizer = text_lib.as_text(self.tokenizer)  # for special-token strings inside messages
    self.template = text_lib.ChatTemplate(cfg.template, cfg.system_prompt)

  def __call__(self, record):
    if record is None:
      return None
    record_id = str(record.get("id", "?")) if isinstance(record, dict) else "?"
    try:
      return self._encode(record)
    except BadRecordError as e:
      error = e.named(record_id, self.source)
    if self.cfg.on_bad_record == "raise":
      raise error
    return Skipped(error.record_id, error.reason, str(error))

  def _encode(self, record) -> Example:
    cfg = self.cfg
    if not isinstance(record, dict):
      raise BadRecordError("bad_conversation", "record is not a JSON object")
    paths = record.get("image", [])
    paths = [paths] if isinstance(paths, str) else paths
    if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
      raise BadRecordError("bad_conversation", "'image' must be a path or a list of paths")
    turns = text_lib.parse_conversation(record.get("conversations"),
                                        prompt_turn=cfg.prompt_turn if self.prompt else None,
                                        image_in_place=cfg.image_in_place)
    placeholders = sum(t["value"].count(text_lib.IMAGE_PLACEHOLDER) for t in record["conversations"])
    if placeholders != len(paths):
      raise BadRecordError(
          "image_count_mismatch", f"{placeholders} {text_lib.IMAGE_PLACEHOLDER} placeholders for {len(paths)} images")
    layout = self._layout(turns)
    paths = paths[:len(layout.image_starts)]  # prompt cut / truncation may drop images
    if len(paths) > cfg.max_images:
      raise BadRecordError("too_many_images", f"{len(paths)} images, max_images is {cfg.max_images}")
    pixels = np.zeros((len(paths), cfg.image_size, cfg.image_size, 3), np.float32)
    for i, path in enumerate(paths):
      pixels[i] = image_lib.load_pixels(
          self._image_path(path), size=cfg.image_size, mean=cfg.image_mean,
          std=cfg.image_std, mode=cfg.image_preprocess, background=cfg.alpha_background)
    # The record's own fields (id, question_type, options, ...) travel with the row.
    meta = {**{k: v for k, v in record.items() if k != "conversations"}, "image": paths}
    if self.prompt:
      meta.setdefault("question", turns.question)
      meta.setdefault("answer", turns.answer)
      meta.setdefault("question_type", None)
    return Example(layout, pixels, meta)

  def _image_path(self, path: str) -> str:
    """The file `path` names, relative to the image directory; a path that leaves it (after
    resolving `..` and symlinks) is refused unless the config allows it."""
    if self.cfg.allow_images_outside_root:
      return os.path.join(self.image_dir, path)  # an absolute `path` replaces the directory
    return image_lib.contained_path(self.image_dir, path, hint="allow_images_outside_root=True allows it")

  def _layout(self, turns: text_lib.Turns) -> text_lib.TextLayout:
    """Never cuts inside a turn (or an image): too long is a bad record, or with
    `truncate_turns` whole trailing rounds go, keeping at least the first."""
    encode = lambda turns: text_lib.encode(self.tokenizer, self.template, turns,
                                           tokens_per_image=self.cfg.tokens_per_image, prompt=self.prompt,
                                           plain_tokenizer=self.plain_tokenizer)
    layout, limit = encode(turns), self.cfg.buckets[-1]
    while len(layout.input_ids) > limit:
      rounds = sum(role == text_lib.HUMAN for role, _ in turns.turns)
      if self.prompt or not self.cfg.truncate_turns or rounds <= 1:
        raise BadRecordError(
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
    cfg, B = self.cfg, self.batch_size
    longest = max((len(e.layout.input_ids) for e in examples if isinstance(e, Example)), default=0)
    T = batch_lib.text_bucket(cfg.buckets, longest)  # encoding refused longer text: one fits
    batch = batch_lib.empty(B, T, max_images=cfg.max_images, tokens_per_image=cfg.tokens_per_image,
                            image_size=cfg.image_size, pad_id=self.pad_id)
    skipped, meta = [], [None] * B
    for row, example in enumerate(examples):
      if isinstance(example, Skipped):
        skipped.append(dataclasses.astuple(example))
        meta[row] = {"id": example.record_id, "skipped": example.reason}
      if not isinstance(example, Example):
        continue
      layout = example.layout
      batch_lib.fill_row(batch, row, text_positions=layout.positions, image_starts=layout.image_starts,
                         input_ids=layout.input_ids, labels=layout.labels, pixel_values=example.pixels)
      meta[row] = example.meta
    batch["_skipped"] = skipped
    if self.with_meta:
      batch["_meta"] = meta
    return batch


# ----------------------------------------------------------------------------- iterator


def _exit_with_parent(worker_index: int, worker_count: int, poll_s: float = 0.5):
  """Grain worker init: a worker whose parent dies (even by SIGKILL, which runs no cleanup)
  exits within `poll_s` instead of living on as an orphan holding its memory. Once the workers
  are gone, multiprocessing's resource tracker sees its pipe close and exits too."""
  del worker_index, worker_count
  parent = os.getppid()

  def watch():
    while True:
      time.sleep(poll_s)
      if os.getppid() != parent:  # re-parented: the trainer is gone
        os._exit(1)

  threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def _let_grain_read_its_flags():
  """Grain reads an absl flag of its own when it starts worker processes (0.2.18:
  --grain_enable_multiprocess_worker_profiling, by `.value`), which raises before absl has parsed
  the command line: under pytest, or a script without absl.app.run. Marking only Grain's flags
  present lets them be read (at their defaults, or values set in code), as Grain itself does in
  its workers; the global parsed state, which absl logging and the application's own flags go by,
  stays as it was."""
  if flags.FLAGS.is_parsed():
    return
  for name in flags.FLAGS:
    if name.startswith("grain_") and not flags.FLAGS[name].present:
      flags.FLAGS[name].present = 1


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
        _let_grain_read_its_flags()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=cfg.worker_count, per_worker_buffer_size=cfg.worker_buffer_size),
            worker_init_fn=_exit_with_parent)
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
                  with_meta: bool = False, records: "Records | None" = None) -> DataIterator:
  """The general builder; the three below fix the arguments for their use. `records`: the
  already parsed `load_records(path)` (so a caller that also counts them reads the file once)."""
  shard = shard or grain.sharding.ShardByJaxProcess()  # made here: after jax.distributed.initialize
  if cfg.global_batch_size % shard.shard_count:
    raise ValueError(f"global_batch_size {cfg.global_batch_size} is not divisible by "
                     f"{shard.shard_count} processes")
  batch_size = cfg.global_batch_size // shard.shard_count
  records, stats = records if records is not None else load_records(path, cfg.on_bad_record)
  stats = BadRecordStats(dict(stats.counts))  # the iterator's own counts start from the file's
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


def make_train_iterator(cfg: DataConfig, *, shard=None, with_meta: bool = False,
                        records: "Records | None" = None) -> DataIterator:
  """Shuffled training batches from `cfg.train_file`, `cfg.num_epochs` epochs (None: forever)."""
  return make_iterator(cfg, cfg.train_file, shuffle=cfg.shuffle, num_epochs=cfg.num_epochs,
                       shard=shard, with_meta=with_meta, records=records)


def make_eval_iterator(cfg: DataConfig, *, path: str | None = None, shard=None,
                       with_meta: bool = False) -> DataIterator:
  """One ordered pass over `path` (default `cfg.val_file`) with labels, for validation loss."""
  return make_iterator(cfg, path or cfg.val_file, shard=shard, with_meta=with_meta)


def make_prompt_iterator(cfg: DataConfig, *, path: str | None = None, shard=None) -> DataIterator:
  """One ordered pass yielding `(batch, meta)`: each row's text stops after the
  assistant-turn opener of human turn `cfg.prompt_turn`; labels are all IGNORE_INDEX."""
  return make_iterator(cfg, path or cfg.val_file, prompt=True, shard=shard, with_meta=True)
