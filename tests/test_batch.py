"""The batch contract: builders agree with it, breaking it is an error naming the key, and
generation refuses a prompt that ends with an image."""

import jax
import numpy as np
import pytest

import ee_mllm_jax as eem
from ee_mllm_jax import batch as batch_lib
from ee_mllm_jax.generate import prefill_prefix, split_at_last_image
from batches import MIXED_PLANS, make_batch
from models import init_params

CFG = eem.ModelConfig.preset("tiny")


def test_builders_follow_the_contract():
  batch = batch_lib.from_plans(CFG, MIXED_PLANS)
  sizes = batch_lib.validate(batch, CFG, keys=batch_lib.TRAIN_KEYS)
  assert (sizes["B"], sizes["I"], sizes["T"]) == (4, 2, 9)  # longest text row: 2 + 3 + 4
  assert (batch["labels"] == batch_lib.IGNORE_INDEX).all()
  spec = batch_lib.abstract(CFG, batch_size=4, text_len=9, max_images=2, labels=True)
  assert {k: (v.shape, v.dtype) for k, v in spec.items()} == {k: (v.shape, v.dtype) for k, v in batch.items()}
  example = batch_lib.example(CFG, max_images=2)
  assert example["image_valid"].all() and example["text_valid"].all()
  assert example["text_positions"].min() == 2 * CFG.tokens_per_image  # text after both images
  padded = batch_lib.pad_text(batch, 12)
  assert padded["input_ids"].shape == (4, 12) and not padded["text_valid"][:, 9:].any()
  assert (padded["labels"][:, 9:] == batch_lib.IGNORE_INDEX).all()



def test_a_row_is_filled_from_its_example_and_text_takes_the_smallest_bucket_that_fits():
  assert [batch_lib.text_bucket((16, 32), n) for n in (0, 16, 17, 32, 33)] == [16, 16, 32, 32, None]
  p = CFG.tokens_per_image
  batch = batch_lib.empty(2, 16, max_images=2, tokens_per_image=p, image_size=CFG.vision.image_size)
  pixels = np.ones((1, CFG.vision.image_size, CFG.vision.image_size, 3), np.float32)
  batch_lib.fill_row(batch, 1, text_positions=[0, 1, 2 + p], image_starts=[2], input_ids=[5, 6, 7],
                     labels=[6, -100, -100], pixel_values=pixels)
  assert batch["text_valid"][1].tolist() == [True] * 3 + [False] * 13 and not batch["text_valid"][0].any()
  assert batch["input_ids"][1, :3].tolist() == [5, 6, 7] and batch["labels"][1, :4].tolist() == [6, -100, -100, -100]
  assert batch["image_valid"][1].tolist() == [True, False] and (batch["pixel_values"][1, 0] == 1).all()
  assert batch["visual_positions"][1, :p].tolist() == list(range(2, 2 + p))
  assert not batch["visual_positions"][1, p:].any()
  batch_lib.validate(batch, CFG, keys=batch_lib.TRAIN_KEYS)
  with pytest.raises(ValueError, match="2 images for 1 image positions"):
    batch_lib.fill_row(batch, 0, text_positions=[0], image_starts=[1], pixel_values=np.repeat(pixels, 2, axis=0))


@pytest.mark.parametrize("key,bad,message", [
    ("input_ids", lambda x: x.astype(np.float32), "batch['input_ids'] has dtype float32; expected an integer"),
    ("text_valid", lambda x: x.astype(np.int32), "batch['text_valid'] has dtype int32; expected a bool"),
    ("text_positions", lambda x: x[:, :-1], "batch['text_positions'] has shape (4, 9): its T = 9 disagrees with 10 from batch['input_ids']"),
    ("pixel_values", lambda x: x[:, :, :16], "batch['pixel_values'] has shape (4, 2, 16, 32, 3): its Y = 16"),
    ("visual_positions", lambda x: x[:, :-1], "batch['visual_positions'] has 31 columns; expected image slots 2 x 16"),
    ("image_valid", lambda x: x[0], "batch['image_valid'] has shape (2,); expected rank 2"),
])
def test_a_broken_batch_is_refused_naming_the_key(key, bad, message):
  batch = make_batch(CFG, MIXED_PLANS)
  batch[key] = bad(batch[key])
  with pytest.raises(batch_lib.BatchError) as direct:
    batch_lib.validate(batch, CFG)
  assert message in str(direct.value)
  # the model checks at trace time, before anything runs
  params = jax.eval_shape(lambda: init_params(CFG))
  with pytest.raises(batch_lib.BatchError, match=key):
    jax.eval_shape(lambda p: eem.EEMLLM(CFG).apply({"params": p}, **batch_lib.model_inputs(batch)), params)


def test_a_missing_key_is_named():
  batch = batch_lib.model_inputs(make_batch(CFG, MIXED_PLANS))
  del batch["visual_positions"]
  with pytest.raises(batch_lib.BatchError, match="batch has no 'visual_positions'"):
    batch_lib.validate(batch, CFG)


@pytest.mark.slow
def test_generate_refuses_a_prompt_that_ends_with_an_image():
  params = init_params(CFG)
  batch = make_batch(CFG, [[3, "img", 5], [3, "img"], [4]])  # row 1 ends with its image
  with pytest.raises(ValueError, match=r"rows \[1\] have no text after its last image"):
    eem.generate(params, CFG, batch, max_new_tokens=2)
  # after a cached prefix, a row with no text left is the same mistake
  prefix, rest = split_at_last_image(make_batch(CFG, [[3, "img", 5], [3, "img"]]))
  with pytest.raises(ValueError, match=r"rows \[1\] have no text after the cached prefix"):
    eem.generate(params, CFG, rest, cache=prefill_prefix(params, CFG, prefix), max_new_tokens=2)
  # empty rows (padding a batch of prompts) are fine, and so is text-only
  ok = make_batch(CFG, [[3, "img", 5], [4], []])
  assert eem.generate(params, CFG, ok, max_new_tokens=2).tokens.shape == (3, 2)


def test_two_valid_tokens_at_one_position_are_refused_naming_the_row():
  batch = make_batch(CFG, MIXED_PLANS)  # padding: every pad at position 0, which is fine
  batch_lib.check_distinct_positions(batch)
  bad = dict(batch, text_positions=batch["text_positions"].copy())
  row = 1  # [2, img, 3, img, 4]
  first_text = int(np.flatnonzero(batch["text_valid"][row])[0])
  bad["text_positions"][row, first_text] = batch["visual_positions"][row, 0]  # onto the row's first image token
  with pytest.raises(batch_lib.BatchError, match=rf"rows \[{row}\] have two valid tokens at one position"):
    batch_lib.check_distinct_positions(bad)
  with pytest.raises(batch_lib.BatchError, match="positions in a row must be distinct"):
    eem.generate(init_params(CFG), CFG, bad, max_new_tokens=1)


def test_cache_pad_and_repeat():
  params = init_params(CFG)
  batch = make_batch(CFG, [[3, "img", 5], [2, "img", 1]])
  cache = prefill_prefix(params, CFG, batch)
  grown = cache.pad(cache.size + 3)
  assert grown.size == cache.size + 3 and not np.asarray(grown.valid[:, cache.size:]).any()
  assert int(grown.index) == int(cache.index) == cache.size
  np.testing.assert_array_equal(np.asarray(grown.k[:, :, :cache.size]), np.asarray(cache.k))
  tiled = cache.repeat(3)
  assert tiled.k.shape[1] == 6
  np.testing.assert_array_equal(np.asarray(tiled.pos[3:6]), np.repeat(np.asarray(cache.pos[1:2]), 3, axis=0))
  with pytest.raises(ValueError, match="cannot shrink"):
    cache.pad(cache.size - 1)
