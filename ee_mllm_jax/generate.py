"""Cached generation: prefill a KV cache with [visual; prompt], then decode text tokens.

Letters (docs/design.md, "Letters"): B batch, T prompt length (text stream), S cache slots, V visual
tokens; new tokens are counted by `max_new_tokens`.

The cache (`ee_mllm_jax.batch.Cache`) stores keys/values by slot and every token's position; the
mask compares positions only, so a batch of unequal prompts shares one write index. Each row
writes its prompt into the same slots (pads marked invalid, so no row sees another's pads)
and its i-th new token into slot `index + i` at its own position `last prompt position + 1 + i`.
A prompt must end with a text token (chat templates do: "ASSISTANT:"), since only text tokens
produce logits; `generate` refuses a row whose last valid token is an image.

In composite mode nothing here computes a visual query or a V x V score: the prefill is the
model's two-stream forward, and a decode step is one text query per row against the cache.
In cross mode the cache's slots hold text only; each cross block's keys/values of the images
are computed once by the prefill and carried in the cache (`Cache.cross_k` ...) for every step.

Image-prefix reuse. A row's keys/values up to and including its last image depend on that
prefix alone: later text never changes earlier tokens; in composite mode a visual token sees
only itself, and in self mode it also sees the text before it (a system prompt), which is part
of the prefix. Keys are RoPE-rotated by position, so a prefix is cached at fixed positions and
the rest of each prompt continues after them:

    prefix, rest = split_at_last_image(batch)                  # host-side numpy
    cache = prefill_prefix(params, cfg, prefix)                # once per image (+ system text)
    out = generate(params, cfg, rest, cache=cache, max_new_tokens=32)
    # n questions about each image: rest rows b*n ... b*n+n-1 share prefix row b
    out = generate(params, cfg, questions, cache=cache.repeat(n), max_new_tokens=32)
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ee_mllm_jax import batch as batch_lib
from ee_mllm_jax.batch import MODEL_KEYS, TEXT_KEYS, Cache, last_valid_index, next_positions
from ee_mllm_jax.config import ModelConfig
from ee_mllm_jax.models import EEMLLM

__all__ = ["Generation", "decode", "generate", "labelled_logprobs", "prefill", "prefill_prefix", "sample_token",
           "split_at_last_image"]


class Generation(NamedTuple):
  tokens: jax.Array  # (B, max_new_tokens) int32; `pad_id` after a row's stop token
  lengths: jax.Array  # (B,) int32: tokens generated, the stop token included
  logprobs: jax.Array  # (B, max_new_tokens) float32: log-softmax of the logits at each chosen token; 0 after stop


def sample_token(logits: jax.Array, rng: jax.Array | None, *, temperature: float | jax.Array = 0.0,
                 top_p: float | jax.Array = 1.0) -> jax.Array:
  """(B, vocab) logits -> (B,) int32 tokens: argmax if temperature == 0, else a sample from
  softmax(logits / temperature) restricted to the smallest set of tokens whose mass >= top_p.
  `temperature` and `top_p` may be traced (then temperature > 0 and top_p < 1 are assumed:
  `_decode` chooses greedy / nucleus statically and passes only the values traced)."""
  if _known(temperature) and temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  if rng is None:
    raise ValueError("sampling (temperature > 0) needs an explicit rng")
  if _known(top_p) and not 0.0 < top_p <= 1.0:
    raise ValueError(f"top_p must be in (0, 1], got {top_p}")
  logits = logits.astype(jnp.float32) / temperature
  if not _known(top_p) or top_p < 1.0:
    desc = -jnp.sort(-logits, axis=-1)
    probs = jax.nn.softmax(desc, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs  # the top token has 0 < top_p: always kept
    cutoff = jnp.min(jnp.where(mass_before < top_p, desc, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits >= cutoff, logits, -jnp.inf)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def _known(x) -> bool:
  """Whether a sampling setting is a Python number (static) rather than an array."""
  return isinstance(x, (int, float))


@functools.partial(jax.jit, static_argnames=("cfg", "cache_size"))
def _prefill(params, cfg, batch, cache_size):
  return EEMLLM(cfg).apply({"params": params}, *(batch[k] for k in MODEL_KEYS), cache_size, method="prefill")


def prefill(params, cfg: ModelConfig, batch: dict[str, Any], *,
            cache_size: int | None = None) -> tuple[jax.Array, Cache]:
  """Vision tower + one forward over [visual; prompt] (a `batch.py` batch) -> next-token logits
  (B, vocab) at each row's last valid text token, and the cache (V + T slots, or `cache_size`)."""
  return _prefill(params, cfg, batch_lib.model_inputs(batch), cache_size)


def prefill_prefix(params, cfg: ModelConfig, prefix_batch: dict[str, Any]) -> Cache:
  """The reusable cache of an image prefix: system text and images, at their positions (the
  prefix half of `split_at_last_image`). Continue it with `generate(..., cache=)`."""
  return prefill(params, cfg, prefix_batch)[1]


@functools.partial(jax.jit, static_argnames=("cfg", "cache_size"))
def _extend_prompt(params, cfg, text, cache, cache_size):
  cache = cache.pad(cache_size)
  logits, cache = EEMLLM(cfg).apply({"params": params}, *(text[k] for k in TEXT_KEYS), cache, method="extend")
  last = last_valid_index(text["text_positions"], text["text_valid"])
  return jnp.take_along_axis(logits, last[:, None, None], axis=1)[:, 0], cache


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens", "greedy", "nucleus", "stop_ids", "pad_id"))
def _decode(params, cfg, logits, cache, next_pos, rng, max_new_tokens, greedy, nucleus, temperature, top_p, stop_ids,
            pad_id):
  """`greedy` (temperature == 0) and `nucleus` (top_p < 1) choose the program; the values of
  `temperature` and `top_p` are traced, so a new value compiles nothing."""
  model, step_params = _step_model(params, cfg)
  if greedy:
    temperature = 0.0
  elif not nucleus:
    top_p = 1.0
  b, n = logits.shape[0], max_new_tokens
  stops = jnp.asarray(stop_ids, jnp.int32)
  is_stop = lambda t: jnp.isin(t, stops) if stop_ids else jnp.zeros(t.shape, bool)

  def choose(logits, i):  # token i, chosen from the logits that follow token i - 1
    key = None if rng is None else jax.random.fold_in(rng, i)
    tok = sample_token(logits, key, temperature=temperature, top_p=top_p)
    return tok, jnp.take_along_axis(jax.nn.log_softmax(logits), tok[:, None], axis=1)[:, 0]

  tok, lp = choose(logits, 0)
  state = dict(i=jnp.int32(1), last=tok, done=is_stop(tok), cache=cache,
               tokens=jnp.full((b, n), pad_id, jnp.int32).at[:, 0].set(tok),
               logprobs=jnp.zeros((b, n), jnp.float32).at[:, 0].set(lp))

  def body(s):
    i = s["i"]
    logits, cache = model.apply({"params": step_params()}, s["last"][:, None], (next_pos + i - 1)[:, None],
                                ~s["done"][:, None], s["cache"], method="extend")
    tok, lp = choose(logits[:, 0], i)
    tok, lp = jnp.where(s["done"], pad_id, tok), jnp.where(s["done"], 0.0, lp)
    return dict(i=i + 1, last=tok, done=s["done"] | is_stop(tok), cache=cache,
                tokens=jax.lax.dynamic_update_slice(s["tokens"], tok[:, None], (0, i)),
                logprobs=jax.lax.dynamic_update_slice(s["logprobs"], lp[:, None], (0, i)))

  s = jax.lax.while_loop(lambda s: (s["i"] < n) & ~jnp.all(s["done"]), body, state)
  stop = is_stop(s["tokens"]).astype(jnp.int32)
  alive = (jnp.cumsum(stop, axis=1) - stop) == 0  # no stop token before this one
  return Generation(s["tokens"], jnp.sum(alive, axis=1, dtype=jnp.int32), s["logprobs"])


def _step_model(params, cfg: ModelConfig):
  """-> (the model of a decode step, a function giving the parameters it reads inside the loop).

  On a CPU, a scanned layer's weights are a dynamic slice of the stacked (L, ...) arrays, which
  XLA's CPU backend copies before each product: a decode step then moves every weight twice (the
  slice, then the GEMV). So there the decoder's layers are split into L arrays once, before the
  loop, and the step runs them unrolled from a stack rebuilt inside the loop body: XLA folds each
  layer's slice of that concatenation back to its own array, and nothing is copied per token.
  The price: the decoder's layer weights are held twice while `decode` runs. Width-scaled
  LLaVA-7B (4 layers, f32), V = 576, batch 1, 2 cores: 36 -> 24 ms per token in self mode,
  35 -> 21 in composite, 41 -> 34 in cross (its cross blocks stay scanned). GPU and TPU backends
  fuse the slice into the GEMM, so there the scan runs as it is.
  """
  if jax.default_backend() != "cpu":
    return EEMLLM(cfg), lambda: params
  layers = params["llm"]["layers"]
  # The barrier keeps XLA from folding the restacked layers back into the stacked input.
  split = jax.lax.optimization_barrier([jax.tree.map(lambda x, i=i: x[i], layers) for i in range(cfg.llm.depth)])
  restack = lambda: dict(params, llm=dict(params["llm"], layers=jax.tree.map(lambda *xs: jnp.stack(xs), *split)))
  return EEMLLM(cfg.replace(scan_unroll=True)), restack


def decode(params, cfg: ModelConfig, logits: jax.Array, cache: Cache, next_pos: jax.Array, *,
           max_new_tokens: int, rng: jax.Array | None = None, temperature: float = 0.0, top_p: float = 1.0,
           stop_ids=(), pad_id: int = 0) -> Generation:
  """Decode loop (`lax.while_loop`, static shapes, exits once every row has stopped).

  logits (B, vocab): the prefill's next-token logits; cache: with >= max_new_tokens - 1 free
  slots from its index; next_pos (B,): position of each row's first new token. Token i is drawn
  with `fold_in(rng, i)`, so a seed reproduces a run. A row stops after emitting any of
  `stop_ids`; later tokens are `pad_id`.
  """
  temperature, top_p = float(temperature), float(top_p)
  greedy = temperature == 0.0
  if not greedy:  # the checks of sample_token, on the host values
    if rng is None:
      raise ValueError("sampling (temperature > 0) needs an explicit rng")
    if not 0.0 < top_p <= 1.0:
      raise ValueError(f"top_p must be in (0, 1], got {top_p}")
  return _decode(params, cfg, logits, cache, next_pos, rng, max_new_tokens, greedy, top_p < 1.0,
                 jnp.float32(temperature), jnp.float32(top_p), tuple(int(t) for t in stop_ids), int(pad_id))


def generate(params, cfg: ModelConfig, batch: dict[str, Any], *, max_new_tokens: int,
             rng: jax.Array | None = None, temperature: float = 0.0, top_p: float = 1.0, stop_ids=(),
             pad_id: int = 0, cache: Cache | None = None) -> Generation:
  """Prefill, then decode `max_new_tokens` tokens per row (greedy when temperature == 0).

  Without `cache`, `batch` is a batch (docs/design.md, "Batch contract") whose `text_valid` marks each row's prompt.
  With `cache` (from `prefill_prefix`, possibly `.repeat`ed), `batch` holds only the text
  after the prefix (`input_ids`, `text_positions`, `text_valid`), at positions after it.
  Works in every mode; EE-MLLM-F is a self-trained `params` with a composite `cfg`.
  A row whose prompt ends with an image (no text after it) is refused with a ValueError.
  """
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  batch_lib.validate(batch, cfg if cache is None else None, keys=MODEL_KEYS if cache is None else TEXT_KEYS)
  prefix = cache
  batch_lib.check_distinct_positions(batch)  # host values of the batch: no device read
  if prefix is None:
    batch_lib.check_prompts_end_with_text(batch)
  text = batch_lib.text_inputs(batch)
  if cache is None:
    logits, cache = prefill(params, cfg, batch, cache_size=batch_lib.prefill_slots(cfg, batch) + max_new_tokens - 1)
  else:
    size = cache.size + text["input_ids"].shape[1] + max_new_tokens - 1
    logits, cache = _extend_prompt(params, cfg, text, cache, size)
  next_pos = next_positions(text["text_positions"], text["text_valid"])
  out = decode(params, cfg, logits, cache, next_pos, max_new_tokens=max_new_tokens, rng=rng,
               temperature=temperature, top_p=top_p, stop_ids=stop_ids, pad_id=pad_id)
  if prefix is not None:
    # Reads the prefix's positions from the device, so only once the prompt and the decode loop are
    # dispatched: the device runs on from the prefill while the host waits here.
    batch_lib.check_prompts_end_with_text(batch, prefix)
  return out


def split_at_last_image(batch: dict[str, Any]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
  """Host-side: split a batch (`batch.py`) into each row's prefix up to and including its last
  image (system text and images; `prefill_prefix`'s input) and the text after it (the `batch`
  of `generate(..., cache=)`). Both keep the original positions; text is left-aligned. A row
  without an image has an empty prefix and all its text in the rest.
  """
  ids, pos, valid = (np.asarray(batch[k]) for k in TEXT_KEYS)
  image_valid, pos_v = np.asarray(batch["image_valid"]), np.asarray(batch["visual_positions"])
  valid_v = batch_lib.visual_valid(image_valid, pos_v.shape[1])
  end = np.max(np.where(valid_v, pos_v, -1), axis=1, initial=-1)[:, None]  # last image token

  def pack(keep):
    width = max(1, int(keep.sum(1).max()))
    order = np.argsort(np.where(keep, pos, np.iinfo(np.int32).max), axis=1, kind="stable")[:, :width]
    take = lambda x: np.take_along_axis(x, order, axis=1)
    kept = take(keep)
    return dict(input_ids=np.where(kept, take(ids), 0).astype(np.int32),
                text_positions=np.where(kept, take(pos), 0).astype(np.int32), text_valid=kept)

  prefix = dict(pack(valid & (pos < end)), pixel_values=batch["pixel_values"], image_valid=image_valid,
                visual_positions=pos_v)
  return prefix, pack(valid & (pos > end))


# ----------------------------------------------------------------------------- evaluation helpers


@functools.partial(jax.jit, static_argnames=("cfg", "greedy"))
def _labelled_logprobs(params, cfg, batch, cache, greedy=False):
  model = EEMLLM(cfg)
  if cache is None:
    logits = model.apply({"params": params}, *(batch[k] for k in MODEL_KEYS))
  else:
    cache = cache.pad(cache.size + batch["input_ids"].shape[1])
    logits, _ = model.apply({"params": params}, *(batch[k] for k in TEXT_KEYS), cache, method="extend")
  labels = batch["labels"]
  scored = labels != batch_lib.IGNORE_INDEX
  logp = jnp.take_along_axis(jax.nn.log_softmax(logits.astype(jnp.float32)), jnp.where(scored, labels, 0)[..., None],
                             axis=-1)[..., 0]
  out = jnp.sum(jnp.where(scored, logp, 0.0), axis=1), jnp.sum(scored, axis=1, dtype=jnp.int32)
  if greedy:  # every labelled token is the argmax of its logits (lmms-eval's is_greedy)
    out += (jnp.all(~scored | (jnp.argmax(logits, axis=-1) == labels), axis=1),)
  return out


def labelled_logprobs(params, cfg: ModelConfig, batch: dict[str, Any], *,
                      cache: Cache | None = None, greedy: bool = False) -> tuple[jax.Array, ...]:
  """Teacher-forced log-likelihood of each row's labelled tokens: (B,) sum over t of
  log p(labels[t] | tokens <= t) where labels[t] != IGNORE_INDEX, and (B,) their count; with
  `greedy`, also (B,) bool: every labelled token is its position's argmax (greedy decoding's).

  Without `cache`, `batch` is a batch (`batch.py`) with labels. With `cache` (a prefix from
  `prefill_prefix`, rows matched by `Cache.take_rows` / `.repeat`), `batch` holds the text after the
  prefix and its labels: one forward over that text scores a continuation (e.g. each option of
  a multiple-choice question) against the shared image prefix without recomputing it.
  """
  keys = (MODEL_KEYS if cache is None else TEXT_KEYS) + ("labels",)
  batch_lib.validate(batch, cfg if cache is None else None, keys=keys)
  return _labelled_logprobs(params, cfg, {k: batch[k] for k in keys}, cache, greedy)
