"""Records and how they go bad: reading a LLaVA records file, and the one error and counter
for a record that cannot be used.

A record is one training or evaluation example: a dict with "conversations", optional
"image" path(s) and an "id". The image and text code (`data.images`, `data.text`) raise
`BadRecordError` with a reason from BAD_RECORD_REASONS and a message naming the file or the
turn; the pipeline, which knows the record and its file, names them (`BadRecordError.named`)
before raising it or, in skip mode, counting it in `BadRecordStats`.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging

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
    "outside_image_root",  # the path (symlinks resolved) leaves the image directory
    "image_too_large",  # side or aspect ratio beyond data.images' bounds (read from the header)
    "null_record",  # a JSON null where a record should be
)


class BadRecordError(Exception):
  """A record (or one of its images) that cannot be used; `reason` is one of BAD_RECORD_REASONS.

  Raised without a record by code that sees one image or one conversation (its message is then
  all `str` shows, as eval.py's questions quote it); `named` adds the record id and its file."""

  def __init__(self, reason: str, message: str, record_id: str | None = None, source: str = ""):
    super().__init__(reason, message, record_id, source)  # all of them: a worker process pickles it
    self.reason, self.message, self.record_id, self.source = reason, message, record_id, source

  def named(self, record_id: str, source: str) -> "BadRecordError":
    """The same error, naming record `record_id` of file `source`."""
    return BadRecordError(self.reason, self.message, record_id, source)

  def __str__(self):
    if self.record_id is None:
      return self.message
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


Records = tuple[list[dict], BadRecordStats]


def load_records(path: str, on_bad_record: str = "raise") -> Records:
  """A LLaVA JSON list or a JSONL file -> records (each with a string "id").

  A JSONL line that is not a UTF-8 JSON object, and a `null` in a JSON list, is a bad record
  (named by its line / index; skipped and counted with on_bad_record="skip"). Duplicate ids
  are warned about, with their count."""
  stats = BadRecordStats()
  path = str(path)

  def bad(record_id: str, reason: str, message: str) -> None:
    error = BadRecordError(reason, message, record_id, path)
    if on_bad_record == "raise":
      raise error
    log.warning("Skipping %s", error)
    stats.add(reason)

  if path.endswith(".jsonl"):
    records = []
    with open(path, "rb") as f:
      for line_no, raw in enumerate(f, 1):
        try:
          line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
          bad(f"line {line_no}", "malformed_json", f"not UTF-8 ({e.reason} at byte {e.start} of the line)")
          continue
        if not line.strip():
          continue
        try:
          record = json.loads(line)
        except ValueError as e:
          bad(f"line {line_no}", "malformed_json", str(e))
          continue
        if record is None:
          bad(f"line {line_no}", "null_record", "the record is null")
          continue
        if not isinstance(record, dict):
          bad(f"line {line_no}", "malformed_json", f"expected a JSON object, got {type(record).__name__}")
          continue
        records.append(record)
  else:
    with open(path, "rb") as f:
      raw = f.read()
    try:
      text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
      line = raw.count(b"\n", 0, e.start) + 1
      raise ValueError(f"{path} is not UTF-8: {e.reason} at byte {e.start} (line {line})") from None
    try:
      records = json.loads(text)
    except ValueError as e:  # one broken JSON document: nothing to skip to
      raise ValueError(f"{path} is not valid JSON ({e}); JSONL input can skip bad lines") from None
    if not isinstance(records, list):
      raise ValueError(f"{path}: expected a JSON list of records")
    nulls = [i for i, r in enumerate(records) if r is None]
    for i in nulls:  # None marks padding rows in the pipeline: a null record must not become one
      bad(f"index {i}", "null_record", "the record is null")
    if nulls:
      records = [r for r in records if r is not None]
  for i, record in enumerate(records):
    if isinstance(record, dict):
      record["id"] = str(record.get("id", i))
  ids = collections.Counter(r["id"] for r in records if isinstance(r, dict))
  duplicated = {k: n for k, n in ids.items() if n > 1}
  if duplicated:
    log.warning("%s: %d record ids occur more than once (%d records in all), e.g. %s", path, len(duplicated),
                sum(duplicated.values()), ", ".join(repr(k) for k in list(duplicated)[:3]))
  return records, stats
