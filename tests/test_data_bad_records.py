"""Bad input: a clear error naming the record and file, or skipped, counted and reported."""

import json
import logging
import pickle

from absl import flags
import grain
import numpy as np
import pytest
from PIL import Image

from ee_mllm_jax.config import ModelConfig
from ee_mllm_jax.data import pipeline, synthetic
from ee_mllm_jax.data import records as records_lib

ONE_PROCESS = grain.sharding.NoSharding()


def conv(question="<image>\nColour?", answer="red"):
  turns = [{"from": "human", "value": question}]
  return turns + ([{"from": "gpt", "value": answer}] if answer is not None else [])


# case -> (record or raw JSONL line, reason, what the error message must name)
CASES = {
    "missing_image": ({"id": "r-missing", "image": "nope.png", "conversations": conv()}, "nope.png"),
    "empty_image": ({"id": "r-empty", "image": "empty.png", "conversations": conv()}, "empty.png"),
    "corrupt_image": ({"id": "r-truncated", "image": "truncated.png", "conversations": conv()}, "truncated.png"),
    "not_an_image": ({"id": "r-text", "image": "text.png", "conversations": conv()}, "text.png"),
    "malformed_json": ('{"id": "r-json", "conversations": [', "line 2"),
    "no_assistant_turn": ({"id": "r-noanswer", "image": "good.png", "conversations": conv(answer=None)}, "r-noanswer"),
    "image_count_mismatch": ({"id": "r-count", "image": "good.png", "conversations": conv("Colour?")}, "r-count"),
    "too_long": ({"id": "r-long", "conversations": conv(" ".join(["colour"] * 300))}, "r-long"),
    "too_many_images": ({"id": "r-many", "image": ["good.png"] * 2, "conversations": conv("<image><image>")}, "r-many"),
    "bad_conversation": ({"id": "r-role", "conversations": [{"from": "robot", "value": "hi"}]}, "r-role"),
    "outside_image_root": ({"id": "r-escape", "image": "../secret.png", "conversations": conv()}, "secret.png"),
    "image_too_large": ({"id": "r-thin", "image": "thin.png", "conversations": conv()}, "thin.png"),
    "null_record": ("null", "line 2"),
}
READ_TIME = ("malformed_json", "null_record")  # dropped (and counted) when the file is read


@pytest.fixture(scope="module")
def base(tmp_path_factory):
  root = tmp_path_factory.mktemp("bad") / "images"
  root.mkdir()
  synthetic.generate(str(root / "syn"), num_train=8, num_val=4)
  Image.new("RGB", (40, 30), (255, 0, 0)).save(root / "good.png")
  Image.new("RGB", (40, 30), (0, 0, 255)).save(root.parent / "secret.png")  # outside the image root
  (root / "empty.png").write_bytes(b"")
  (root / "truncated.png").write_bytes((root / "good.png").read_bytes()[:70])
  (root / "text.png").write_text("hello, I am not an image\n")
  Image.new("RGB", (20000, 1), (255, 255, 255)).save(root / "thin.png", optimize=True)  # ~100 bytes; 1.2 GB padded
  return root


def config(base, records, **fields):
  path = base / f"records-{len(list(base.glob('records-*')))}.jsonl"
  path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
  cfg = pipeline.DataConfig.for_model(
      ModelConfig.preset("demo"), train_file=str(path), val_file=str(path), image_dir=str(base),
      tokenizer_file=str(base / "syn" / "tokenizer.json"), buckets=(64, 128), global_batch_size=2,
      read_threads=0)
  return cfg.replace(**fields)


GOOD = {"id": "r-good", "image": "good.png", "conversations": conv()}


@pytest.mark.parametrize("reason", list(CASES))
def test_raise_mode_names_the_record_the_file_and_the_reason(base, reason):
  bad, names = CASES[reason]
  cfg = config(base, [GOOD, bad])
  with pytest.raises(records_lib.BadRecordError) as info:
    list(pipeline.make_eval_iterator(cfg, shard=ONE_PROCESS))
  error = info.value
  assert error.reason == reason
  assert names in str(error) and cfg.val_file in str(error)
  if reason not in READ_TIME:
    assert error.record_id == bad["id"]


@pytest.mark.parametrize("reason", list(CASES))
def test_skip_mode_counts_reports_and_leaves_an_empty_row(base, reason, caplog):
  bad, _ = CASES[reason]
  cfg = config(base, [GOOD, bad, GOOD], on_bad_record="skip")
  it = pipeline.make_eval_iterator(cfg, shard=ONE_PROCESS, with_meta=True)
  with caplog.at_level(logging.WARNING, logger="ee_mllm_jax.data"):  # the pipeline's and the reader's
    batches = list(it)
  assert it.stats.counts[reason] == 1 and it.stats.total == 1
  assert reason in caplog.text and (bad["id"] if isinstance(bad, dict) else "line 2") in caplog.text
  metas = [m for _, meta in batches for m in meta]
  assert [m and m["id"] for m in metas].count("r-good") == 2
  if reason not in READ_TIME:
    (row,) = [i for i, m in enumerate(metas) if m and m.get("skipped")]
    assert metas[row] == {"id": bad["id"], "skipped": reason}
    batch = batches[row // 2][0]
    assert not batch["text_valid"][row % 2].any() and not batch["image_valid"][row % 2].any()
    assert (batch["labels"][row % 2] == -100).all()


@pytest.mark.slow
def test_with_worker_processes_errors_and_counts_reach_the_parent(base):
  records = [GOOD] + [bad for bad, _ in CASES.values()] + [GOOD]
  cfg = config(base, records, worker_count=2, on_bad_record="skip", num_epochs=1)
  parsed = flags.FLAGS.is_parsed()
  it = pipeline.make_train_iterator(cfg, shard=ONE_PROCESS)
  batches = list(it)
  it.close()
  assert flags.FLAGS.is_parsed() == parsed  # starting Grain's workers leaves absl's parse state alone
  assert len(batches) == 7  # 13 parsed records (2 lines dropped when read) -> 13 rows, padded to 14
  assert it.stats.counts == {reason: 1 for reason in records_lib.BAD_RECORD_REASONS}
  assert sum(b["text_valid"].any(1).sum() for b in batches) == 2
  it = pipeline.make_train_iterator(cfg.replace(on_bad_record="raise", shuffle=False,
                                                train_file=config(base, [GOOD, CASES["corrupt_image"][0]]).train_file),
                                    shard=ONE_PROCESS)
  with pytest.raises(records_lib.BadRecordError) as info:
    list(it)
  it.close()
  assert info.value.reason == "corrupt_image" and info.value.record_id == "r-truncated"


def test_skipping_keeps_resume_exact_and_restores_the_counts(base):
  records = [dict(GOOD, id=f"g{i}") for i in range(5)] + [bad for bad, _ in list(CASES.values())[:4]]
  cfg = config(base, records, on_bad_record="skip")
  it = pipeline.make_train_iterator(cfg, shard=ONE_PROCESS)
  for _ in range(5):
    next(it)
  state = json.loads(json.dumps(it.get_state()))
  counts = dict(it.stats.counts)
  expected = [next(it) for _ in range(6)]
  resumed = pipeline.make_train_iterator(cfg, shard=ONE_PROCESS)
  resumed.set_state(state)
  assert resumed.stats.counts == counts
  for a, b in zip(expected, [next(resumed) for _ in range(6)]):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
  assert resumed.stats.counts == it.stats.counts
  assert it.stats.total > sum(counts.values())  # the second epoch counted its bad records again


def test_image_paths_stay_inside_the_image_root_unless_allowed(base):
  """`..`, an absolute path and a symlink that points out are refused; a symlink that stays
  inside is fine; allow_images_outside_root reads them all."""
  (base / "inside_link.png").unlink(missing_ok=True)
  (base / "outside_link.png").unlink(missing_ok=True)
  (base / "inside_link.png").symlink_to(base / "good.png")
  (base / "outside_link.png").symlink_to(base.parent / "secret.png")
  escapes = {"r-dotdot": "../secret.png", "r-absolute": str(base.parent / "secret.png"),
             "r-symlink": "outside_link.png"}
  records = [dict(GOOD, id="r-inside", image="inside_link.png")]
  records += [dict(GOOD, id=k, image=v) for k, v in escapes.items()]
  cfg = config(base, records, on_bad_record="skip")
  it = pipeline.make_eval_iterator(cfg, shard=ONE_PROCESS, with_meta=True)
  metas = [m for _, meta in it for m in meta]
  assert it.stats.counts["outside_image_root"] == 3 and it.stats.total == 3
  assert {m["id"]: m.get("skipped") for m in metas if m} == {"r-inside": None, **dict.fromkeys(escapes,
                                                                                            "outside_image_root")}
  allowed = pipeline.make_eval_iterator(cfg.replace(allow_images_outside_root=True), shard=ONE_PROCESS)
  batches = list(allowed)
  assert allowed.stats.total == 0
  blue = [b["pixel_values"][r, 0, 10, 10] for b in batches for r in range(2) if b["image_valid"][r, 0]]
  assert len(blue) == 4 and sum(p[2] > p[0] for p in blue) == 3  # the secret image is blue, good.png red


def test_a_file_that_is_not_utf8_is_named_with_its_line(base, tmp_path):
  good = json.dumps(GOOD).encode()
  jsonl = tmp_path / "latin1.jsonl"
  jsonl.write_bytes(good + b"\n" + json.dumps(dict(GOOD, id="r-latin")).encode().replace(b"Colour", b"Col\xf6ur") + b"\n")
  with pytest.raises(records_lib.BadRecordError, match=r"line 2.*latin1.jsonl.*not UTF-8"):
    records_lib.load_records(str(jsonl))
  records, stats = records_lib.load_records(str(jsonl), on_bad_record="skip")
  assert len(records) == 1 and stats.counts["malformed_json"] == 1
  listing = tmp_path / "latin1.json"
  listing.write_bytes(b"[" + good + b",\n" + good.replace(b"Colour", b"Col\xf6ur") + b"]")
  with pytest.raises(ValueError, match=r"latin1.json is not UTF-8: .* \(line 2\)"):
    records_lib.load_records(str(listing))


def test_null_records_and_duplicate_ids(base, tmp_path, caplog):
  listing = tmp_path / "records.json"
  listing.write_text(json.dumps([GOOD, None, GOOD, dict(GOOD, id="r-other")]))
  with pytest.raises(records_lib.BadRecordError, match="index 1.*null_record"):
    records_lib.load_records(str(listing))
  with caplog.at_level(logging.WARNING, logger=records_lib.__name__):
    records, stats = records_lib.load_records(str(listing), on_bad_record="skip")
  assert [r["id"] for r in records] == ["r-good", "r-good", "r-other"] and stats.counts["null_record"] == 1
  assert "1 record ids occur more than once (2 records in all), e.g. 'r-good'" in caplog.text


def test_one_error_for_a_bad_record_named_where_the_record_is_known():
  error = records_lib.BadRecordError("missing_image", "image file not found: a.png")
  assert str(error) == "image file not found: a.png"  # as the image code raises it (eval quotes it so)
  named = error.named("r-7", "train.jsonl")
  assert str(named) == "bad record 'r-7' in train.jsonl (missing_image): image file not found: a.png"
  copy = pickle.loads(pickle.dumps(named))  # worker processes send it to the parent
  assert (copy.reason, copy.message, copy.record_id, copy.source, str(copy)) == (
      named.reason, named.message, named.record_id, named.source, str(named))
