"""Test batches: `ee_mllm_jax.batch.from_plans` with two image slots and one all-padding text
column, so that padding in both streams is always exercised."""

from ee_mllm_jax.batch import from_plans


def make_batch(cfg, plans, max_images=2, seed=0):
  return from_plans(cfg, plans, max_images=max_images, pad_columns=1, seed=seed)


# system prompt before the image; two images; text-only row; short row (padding everywhere)
MIXED_PLANS = [[3, "img", 5], [2, "img", 3, "img", 4], [7], ["img", 2]]
