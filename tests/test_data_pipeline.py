"""The Grain pipeline: batch layout, buckets, resume, sharding, epochs, prompt mode."""

import json
import os
import subprocess
import sys
import textwrap

import grain
import numpy as np
import pytest
from PIL import Image

from ee_mllm_jax.config import ModelConfig
from ee_mllm_jax.data import pipeline, synthetic
from ee_mllm_jax.data import text as text_lib
from ee_mllm_jax.data.records import BadRecordError

ONE_PROCESS = grain.sharding.NoSharding()
ARRAY_KEYS = {"pixel_values", "image_valid", "input_ids", "text_positions", "text_valid",
              "visual_positions", "labels"}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  root = tmp_path_factory.mktemp("synthetic")
  return synthetic.generate(str(root), num_train=44, num_val=20, max_turns=3)


@pytest.fixture(scope="module")
def cfg(dataset):
  return dataset.data_config(ModelConfig.preset("demo"), global_batch_size=8, buckets=(64, 128, 256),
                             template="vicuna_v1", read_threads=0)


def take(iterator, n):
  return [next(iterator) for _ in range(n)]


def assert_batches_equal(a, b):
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def check_layout(batch, cfg):
  """The batch contract (docs/design.md, "Batch contract"), row by row."""
  B, I, P, S = cfg.global_batch_size, cfg.max_images, cfg.tokens_per_image, cfg.image_size
  T = batch["input_ids"].shape[1]
  assert set(batch) == ARRAY_KEYS and T in cfg.buckets
  shapes = {"pixel_values": ((B, I, S, S, 3), np.float32), "image_valid": ((B, I), np.bool_),
            "input_ids": ((B, T), np.int32), "text_positions": ((B, T), np.int32),
            "text_valid": ((B, T), np.bool_), "visual_positions": ((B, I * P), np.int32),
            "labels": ((B, T), np.int32)}
  for key, (shape, dtype) in shapes.items():
    assert batch[key].shape == shape and batch[key].dtype == dtype, key
  lengths = batch["text_valid"].sum(1)
  assert T == min(b for b in cfg.buckets if b >= lengths.max())  # the smallest bucket that fits
  for row in range(B):
    n, valid = lengths[row], batch["text_valid"][row]
    assert valid[:n].all() and not valid[n:].any()  # left-aligned
    text_pos = batch["text_positions"][row]
    assert (text_pos[n:] == 0).all() and (batch["labels"][row, n:] == -100).all()
    images = batch["image_valid"][row]
    vis = batch["visual_positions"][row].reshape(I, P)
    assert (vis[~images] == 0).all() and (batch["pixel_values"][row][~images] == 0).all()
    for image in vis[images]:
      np.testing.assert_array_equal(image, np.arange(image[0], image[0] + P))  # consecutive
    everything = np.sort(np.concatenate([text_pos[:n], vis[images].ravel()]))
    np.testing.assert_array_equal(everything, np.arange(len(everything)))  # a permutation of 0..L-1
    # labels[t] is the next text token when it directly follows t.
    ids, labels = batch["input_ids"][row], batch["labels"][row]
    for t in np.flatnonzero(labels != -100):
      assert t + 1 < n and text_pos[t + 1] == text_pos[t] + 1 and labels[t] == ids[t + 1]


def test_batches_follow_the_layout_contract(cfg, dataset):
  it = pipeline.make_train_iterator(cfg, shard=ONE_PROCESS, with_meta=True)
  tokenizer = text_lib.load_tokenizer(cfg.tokenizer_file)
  records = {r["id"]: r for r in json.load(open(dataset.train_file))}
  for batch, meta in take(it, 6):
    check_layout(batch, cfg)
    for row, m in enumerate(meta):
      record = records[m["id"]]
      ids, labels = batch["input_ids"][row], batch["labels"][row]
      # Learned tokens are exactly the assistant answers, each ended by </s>.
      learned = tokenizer.decode(labels[labels != -100].tolist(), skip_special_tokens=False)
      answers = [t["value"] for t in record["conversations"] if t["from"] == "gpt"]
      assert learned.replace(" ", "") == "".join(a.replace(" ", "") + "</s>" for a in answers)
      # The image sits where "<image>" was: right after "USER: ", before "\n<question>".
      start = batch["visual_positions"][row, 0]
      pos, valid = batch["text_positions"][row], batch["text_valid"][row]
      before = tokenizer.decode(ids[valid & (pos < start)].tolist(), skip_special_tokens=False)
      after = tokenizer.decode(ids[valid & (pos > start)].tolist(), skip_special_tokens=False)
      assert before.endswith("USER: ") and after.startswith("\n" + record["conversations"][0]["value"][8:])
    assert batch["image_valid"].all()
  it.close()


def write_records(tmp_path, records, name="records.json"):
  path = tmp_path / name
  if name.endswith(".jsonl"):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
  else:
    path.write_text(json.dumps(records))
  return str(path)


def make_image(tmp_path, name, colour=(255, 0, 0), size=(50, 30)):
  Image.new("RGB", size, colour).save(tmp_path / name)
  return name


def test_multiple_images_and_text_only_samples(cfg, tmp_path):
  a, b = make_image(tmp_path, "a.png"), make_image(tmp_path, "b.png", (0, 0, 255))
  records = [
      {"id": "two", "image": [a, b], "conversations": [
          {"from": "human", "value": "<image>\nand <image>\nSame colour?"}, {"from": "gpt", "value": "no"}]},
      {"id": "none", "conversations": [{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "hello"}]},
      {"id": "one", "image": a, "conversations": [
          {"from": "human", "value": "<image>\nColour?"}, {"from": "gpt", "value": "red"}]},
  ]
  cfg = cfg.replace(max_images=2, global_batch_size=4, train_file=write_records(tmp_path, records))
  batch, meta = next(pipeline.make_iterator(cfg, cfg.train_file, shard=ONE_PROCESS, with_meta=True))
  check_layout(batch, cfg)
  assert [m and m["id"] for m in meta] == ["two", "none", "one", None]  # padded to a full batch
  np.testing.assert_array_equal(batch["image_valid"], [[1, 1], [0, 0], [1, 0], [0, 0]])
  P = cfg.tokens_per_image
  first, second = batch["visual_positions"][0, 0], batch["visual_positions"][0, P]
  assert second > first + P  # text ("\nand ") between the two images
  red = batch["pixel_values"][2, 0].mean((0, 1))
  blue = batch["pixel_values"][0, 1].mean((0, 1))
  assert red[0] > red[2] and blue[2] > blue[0]
  assert not batch["text_valid"][3].any() and (batch["labels"][3] == -100).all()


def test_text_is_padded_to_the_smallest_fitting_bucket(cfg, tmp_path):
  words = lambda n: " ".join(["colour"] * n)
  records = [{"id": str(n), "conversations": [{"from": "human", "value": words(n)}, {"from": "gpt", "value": "ok"}]}
             for n in (1, 20, 1, 1)]
  cfg = cfg.replace(template="chatml", buckets=(16, 32, 64), global_batch_size=2,
                    train_file=write_records(tmp_path, records))
  batches = list(pipeline.make_iterator(cfg, cfg.train_file, shard=ONE_PROCESS))
  assert [b["input_ids"].shape[1] for b in batches] == [64, 32]
  for b in batches:
    check_layout(b, cfg)


@pytest.mark.parametrize("workers", [0, pytest.param(2, marks=pytest.mark.slow)])
def test_resume_gives_the_batches_of_an_uninterrupted_run(cfg, workers):
  cfg = cfg.replace(worker_count=workers)  # 44 records, batch 8: the next batches cross an epoch
  it = pipeline.make_train_iterator(cfg, shard=ONE_PROCESS)
  take(it, 4)
  state = json.loads(json.dumps(it.get_state()))
  expected = take(it, 4)
  it.close()
  resumed = pipeline.make_train_iterator(cfg, shard=ONE_PROCESS)
  resumed.set_state(state)
  assert_batches_equal(take(resumed, 4), expected)
  resumed.close()


def test_resume_through_an_orbax_checkpoint(cfg, tmp_path):
  ocp = pytest.importorskip("orbax.checkpoint")
  it = pipeline.make_train_iterator(cfg, shard=ONE_PROCESS)
  take(it, 3)
  manager = ocp.CheckpointManager(tmp_path / "ckpt", options=ocp.CheckpointManagerOptions(max_to_keep=2))
  state = {"step": np.array(3)}
  manager.save(3, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                          data=grain.checkpoint.CheckpointSave(it)))
  manager.wait_until_finished()
  expected = take(it, 3)
  fresh = pipeline.make_train_iterator(cfg, shard=ONE_PROCESS)
  restored = manager.restore(3, args=ocp.args.Composite(state=ocp.args.StandardRestore(state),
                                                        data=grain.checkpoint.CheckpointRestore(fresh)))
  assert restored.data is fresh and int(restored.state["step"]) == 3
  assert_batches_equal(take(fresh, 3), expected)
  manager.close()


def test_epochs_are_reshuffled_permutations(cfg):
  cfg = cfg.replace(num_epochs=2, global_batch_size=6)  # 44 -> 48 rows an epoch
  ids = [m["id"] for _, meta in pipeline.make_train_iterator(cfg, shard=ONE_PROCESS, with_meta=True)
         for m in meta if m]
  first, second = ids[:44], ids[44:]
  assert sorted(first) == sorted(second) == sorted(f"train-{i:06d}" for i in range(44))
  assert first != second and first != sorted(first)


def test_two_processes_get_disjoint_halves(cfg):
  cfg = cfg.replace(global_batch_size=6)
  seen = []
  for index in range(2):
    shard = grain.sharding.ShardOptions(shard_index=index, shard_count=2)
    batches = list(pipeline.make_eval_iterator(cfg, path=cfg.train_file, shard=shard, with_meta=True))
    assert len(batches) == 8 and all(b["input_ids"].shape[0] == 3 for b, _ in batches)  # 22 -> 24 rows
    seen.append([m["id"] for _, meta in batches for m in meta if m])
  assert not set(seen[0]) & set(seen[1])
  assert sorted(seen[0] + seen[1]) == sorted(f"train-{i:06d}" for i in range(44))
  # Training shards split the shuffled order, so they are disjoint within an epoch too.
  train = [{m["id"] for _, meta in take(pipeline.make_train_iterator(
      cfg, shard=grain.sharding.ShardOptions(i, 2), with_meta=True), 7) for m in meta} for i in range(2)]
  assert not train[0] & train[1] and len(train[0] | train[1]) == 42


SHARD_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax
    jax.distributed.initialize(coordinator_address=sys.argv[1], num_processes=2,
                               process_id=int(sys.argv[2]), initialization_timeout=60)
    from ee_mllm_jax.data import pipeline
    cfg = pipeline.DataConfig(**json.loads(sys.argv[3]))
    it = pipeline.make_eval_iterator(cfg, with_meta=True)  # default sharding: ShardByJaxProcess
    ids = [m["id"] for _, meta in it for m in meta if m]
    json.dump({"process": jax.process_index(), "ids": ids}, open(sys.argv[4], "w"))
""")


def test_shard_by_jax_process_after_distributed_initialize(cfg, tmp_path):
  import portpicker  # a Grain dependency
  address = f"127.0.0.1:{portpicker.pick_unused_port()}"
  fields = {k: getattr(cfg, k) for k in ("val_file", "tokenizer_file", "image_size", "tokens_per_image")}
  fields["global_batch_size"] = 4
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": os.getcwd()}
  procs = [subprocess.Popen(
      ["timeout", "120", sys.executable, "-c", SHARD_SCRIPT, address, str(i), json.dumps(fields),
       str(tmp_path / f"out{i}.json")], env=env, stderr=subprocess.PIPE, text=True) for i in range(2)]
  for p in procs:
    _, err = p.communicate(timeout=150)
    assert p.returncode == 0, err[-3000:]
  outs = [json.load(open(tmp_path / f"out{i}.json")) for i in range(2)]
  assert [o["process"] for o in outs] == [0, 1]
  assert not set(outs[0]["ids"]) & set(outs[1]["ids"])
  assert sorted(outs[0]["ids"] + outs[1]["ids"]) == sorted(f"val-{i:06d}" for i in range(20))


def test_prompt_batches_stop_after_the_assistant_opener(cfg, dataset):
  tokenizer = text_lib.load_tokenizer(cfg.tokenizer_file)
  val = {r["id"]: r for r in json.load(open(dataset.val_file))}
  batches = list(pipeline.make_prompt_iterator(cfg.replace(template="chatml"), shard=ONE_PROCESS))
  assert len(batches) == 3  # 20 records -> 24 rows
  rows = 0
  for batch, meta in batches:
    assert set(batch) == ARRAY_KEYS and (batch["labels"] == -100).all()
    for row, m in enumerate(meta):
      if m is None:
        assert not batch["text_valid"][row].any()
        continue
      rows += 1
      record = val[m["id"]]
      assert (m["answer"], m["question_type"], m["question"]) == (
          record["answer"], record["question_type"], record["question"])
      n = batch["text_valid"][row].sum()
      text = tokenizer.decode(batch["input_ids"][row, :n].tolist(), skip_special_tokens=False)
      assert text.endswith(record["conversations"][0]["value"][len("<image>"):] + "<|im_end|>\n<|im_start|>assistant\n")
  assert rows == 20


def test_truncate_turns_drops_trailing_rounds_and_their_images(cfg, tmp_path):
  a = make_image(tmp_path, "a.png")
  long_question = " ".join(["colour"] * 60)
  record = {"id": "long", "image": [a, a], "conversations": [
      {"from": "human", "value": "<image>\nColour?"}, {"from": "gpt", "value": "red"},
      {"from": "human", "value": "<image>\n" + long_question}, {"from": "gpt", "value": "blue"}]}
  cfg = cfg.replace(template="chatml", buckets=(32, 64), max_images=2,
                    train_file=write_records(tmp_path, [record]), global_batch_size=1)
  with pytest.raises(BadRecordError, match="too_long"):
    next(pipeline.make_train_iterator(cfg, shard=ONE_PROCESS))
  batch = next(pipeline.make_train_iterator(cfg.replace(truncate_turns=True), shard=ONE_PROCESS))
  check_layout(batch, cfg)
  np.testing.assert_array_equal(batch["image_valid"], [[True, False]])
  tokenizer = text_lib.load_tokenizer(cfg.tokenizer_file)
  labels = batch["labels"][0]
  assert tokenizer.decode(labels[labels != -100].tolist(), skip_special_tokens=False) == "red<|im_end|>"
