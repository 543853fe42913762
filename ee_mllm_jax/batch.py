"""The batch and cache contracts: one home for the keys, the ignore index, builders and checks.

A batch is a plain dict of arrays (so `model.apply({"params": p}, **batch)`, Grain, `jax.tree`
and `jax.device_put` all take it as is). Letters (docs/design.md, "Letters"): B rows, I image slots
per row, P tokens per image, Y/X image height/width, C channels, T text tokens, S cache slots,
L layers, K kv heads, H head dim.

    pixel_values     (B, I, Y, X, C) float   normalised; absent images are zeros (C = 3)
    image_valid      (B, I) bool
    input_ids        (B, T) int              text tokens only, left-aligned, pad id after
    text_positions   (B, T) int              position in the interleaved sequence (pad: 0)
    text_valid       (B, T) bool
    visual_positions (B, I*P) int            image i at [i*P:(i+1)*P] (absent: 0)
    labels           (B, T) int              training: target of logits[b, t], else IGNORE_INDEX

Each token carries its position in the interleaved sequence; RoPE and the attention mask only
compare positions, so the memory order of the two streams never matters.

The cache (`Cache`) holds every layer's keys/values by slot, with each slot's position and
validity, and the next write slot; generation fills it with [visual; prompt] and appends text.
See docs/design.md, "Batch contract" and "Cache contract".
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

IGNORE_INDEX = -100  # labels: no loss at this token

# key -> (dimension names, dtype kind: "f" float, "i" integer, "b" bool, default dtype)
FIELDS: dict[str, tuple[tuple[str, ...], str, Any]] = {
    "pixel_values": (("B", "I", "Y", "X", "C"), "f", np.float32),
    "image_valid": (("B", "I"), "b", np.bool_),
    "input_ids": (("B", "T"), "i", np.int32),
    "text_positions": (("B", "T"), "i", np.int32),
    "text_valid": (("B", "T"), "b", np.bool_),
    "visual_positions": (("B", "IP"), "i", np.int32),
    "labels": (("B", "T"), "i", np.int32),
}
MODEL_KEYS = ("pixel_values", "image_valid", "input_ids", "text_positions", "text_valid", "visual_positions")
TEXT_KEYS = ("input_ids", "text_positions", "text_valid")
TRAIN_KEYS = MODEL_KEYS + ("labels",)

Batch = dict[str, Any]  # the layout above; numpy on the host, jax.Array on devices


class BatchError(ValueError):
  """A batch that breaks the contract; the message names the key."""


def model_inputs(batch: Mapping[str, Any]) -> Batch:
  """The keys `EEMLLM.__call__` / `prefill` take (drops labels and anything else)."""
  return {k: batch[k] for k in MODEL_KEYS}


def text_inputs(batch: Mapping[str, Any]) -> Batch:
  """The keys of a text-only continuation (`EEMLLM.extend`, `generate(..., cache=)`)."""
  return {k: batch[k] for k in TEXT_KEYS}


# ----------------------------------------------------------------------------- builders


def empty(batch_size: int, text_len: int, *, max_images: int, tokens_per_image: int, image_size: int,
          pad_id: int = 0) -> Batch:
  """All-padding host batch: every mask False, labels IGNORE_INDEX (a collator fills rows)."""
  b, t, i, p, s = batch_size, text_len, max_images, tokens_per_image, image_size
  return dict(pixel_values=np.zeros((b, i, s, s, 3), np.float32), image_valid=np.zeros((b, i), bool),
              input_ids=np.full((b, t), pad_id, np.int32), text_positions=np.zeros((b, t), np.int32),
              text_valid=np.zeros((b, t), bool), visual_positions=np.zeros((b, i * p), np.int32),
              labels=np.full((b, t), IGNORE_INDEX, np.int32))


def text_bucket(buckets: Sequence[int], length: int) -> int | None:
  """The first of the increasing `buckets` that holds `length` text tokens (None: none does).
  Text widths come from a few buckets, so jit compiles a few programs, not one per length."""
  return next((b for b in buckets if b >= length), None)


def fill_row(batch: Batch, row: int, *, text_positions, image_starts: Sequence[int], input_ids=None,
             labels=None, pixel_values=None):
  """Writes one example into row `row` of a host batch from `empty`, in place: its text (positions,
  and ids and labels when given) left-aligned and valid, and its images in the first slots, image
  i's P tokens at the consecutive positions from image_starts[i] (pixels when given, one per image)."""
  p = batch["visual_positions"].shape[1] // max(batch["image_valid"].shape[1], 1)
  n, k = len(text_positions), len(image_starts)
  if pixel_values is not None and len(pixel_values) != k:
    raise ValueError(f"{len(pixel_values)} images for {k} image positions")
  batch["text_positions"][row, :n] = text_positions
  batch["text_valid"][row, :n] = True
  if input_ids is not None:
    batch["input_ids"][row, :n] = input_ids
  if labels is not None:
    batch["labels"][row, :n] = labels
  batch["image_valid"][row, :k] = True
  for i, start in enumerate(image_starts):
    batch["visual_positions"][row, i * p:(i + 1) * p] = np.arange(start, start + p)
  if pixel_values is not None:
    batch["pixel_values"][row, :k] = pixel_values


def from_plans(cfg, plans: Sequence[Sequence[int | str]], *, max_images: int | None = None,
               pad_columns: int = 0, seed: int = 0) -> Batch:
  """A host batch from per-row interleaving plans, with random pixels and token ids.

  A plan is a list of segments: an int n = n text tokens, "img" = the row's next image; the
  segments take consecutive positions from 0. Rows are padded to the longest text stream
  (+ `pad_columns` all-padding columns) and to `max_images` slots (default: the most any row
  has, at least 1). Labels are IGNORE_INDEX. `cfg` is a ModelConfig.
  """
  rng = np.random.default_rng(seed)
  p = cfg.tokens_per_image
  n_text = [sum(seg for seg in plan if seg != "img") for plan in plans]
  n_img = [sum(seg == "img" for seg in plan) for plan in plans]
  max_images = max(n_img + [1]) if max_images is None else max_images
  if max(n_img) > max_images:
    raise ValueError(f"a plan has {max(n_img)} images, more than max_images={max_images}")
  batch = empty(len(plans), max(n_text) + pad_columns, max_images=max_images, tokens_per_image=p,
                image_size=cfg.vision.image_size)
  batch["pixel_values"] = rng.standard_normal(batch["pixel_values"].shape).astype(np.float32)
  batch["input_ids"] = rng.integers(0, cfg.llm.vocab_size, batch["input_ids"].shape).astype(np.int32)
  for row, plan in enumerate(plans):
    pos, text_positions, image_starts = 0, [], []
    for seg in plan:
      if seg == "img":
        image_starts.append(pos)
        pos += p
      else:
        text_positions.extend(range(pos, pos + seg))
        pos += seg
    fill_row(batch, row, text_positions=text_positions, image_starts=image_starts)
  return batch


def example(cfg, *, batch_size: int = 1, text_len: int = 8, max_images: int = 1) -> Batch:
  """A small valid batch: images first, then text. All `init` needs (parameter shapes do not
  depend on B, T or the number of image slots)."""
  return from_plans(cfg, [["img"] * max_images + [text_len]] * batch_size, max_images=max_images)


def abstract(cfg, *, batch_size: int, text_len: int, max_images: int = 1, labels: bool = False,
             pixel_dtype=np.float32) -> dict[str, jax.ShapeDtypeStruct]:
  """ShapeDtypeStructs of a batch: for `jax.eval_shape` and ahead-of-time `.lower()`."""
  sizes = dict(B=batch_size, I=max_images, Y=cfg.vision.image_size, X=cfg.vision.image_size, C=3, T=text_len,
               IP=max_images * cfg.tokens_per_image)
  keys = TRAIN_KEYS if labels else MODEL_KEYS
  return {k: jax.ShapeDtypeStruct(tuple(sizes[d] for d in FIELDS[k][0]),
                                  pixel_dtype if k == "pixel_values" else FIELDS[k][2]) for k in keys}


def pad_text(batch: Batch, length: int) -> Batch:
  """The text stream padded to `length` columns (pads are invalid, labels ignored)."""
  t = batch["input_ids"].shape[1]
  if t > length:
    raise ValueError(f"cannot pad a text stream of {t} tokens to {length}")
  if t == length:
    return batch
  fill = {"input_ids": 0, "text_positions": 0, "text_valid": False, "labels": IGNORE_INDEX}
  return {k: np.pad(v, ((0, 0), (0, length - t)), constant_values=fill[k]) if k in fill else v
          for k, v in batch.items()}


# ----------------------------------------------------------------------------- checks


def validate(batch: Mapping[str, Any], cfg=None, *, keys: Sequence[str] = MODEL_KEYS) -> dict[str, int]:
  """Checks that `batch` has `keys` with the contract's ranks, dtype kinds and agreeing sizes
  (and, given a ModelConfig, its image size and tokens per image). Works on numpy arrays,
  jax arrays, tracers and ShapeDtypeStructs: only shapes and dtypes are read. Returns the sizes
  {"B", "I", "T", ...}; raises BatchError naming the key."""
  sizes: dict[str, int] = {}
  seen: dict[str, str] = {}
  if cfg is not None:
    sizes.update(Y=cfg.vision.image_size, X=cfg.vision.image_size, C=3)
    seen.update(Y="the model's image_size", X="the model's image_size", C="RGB")
  for key in keys:
    if key not in batch:
      raise BatchError(f"batch has no {key!r} (keys: {sorted(batch)}); expected {'/'.join(keys)}")
    dims, kind, _ = FIELDS[key]
    x = batch[key]
    shape, dtype = tuple(np.shape(x)) if not hasattr(x, "shape") else tuple(x.shape), np.dtype(x.dtype)
    if len(shape) != len(dims):
      raise BatchError(f"batch[{key!r}] has shape {shape}; expected rank {len(dims)} ({', '.join(dims)})")
    ok = {"f": np.issubdtype(dtype, np.floating) or dtype == jnp.bfloat16,
          "i": np.issubdtype(dtype, np.integer), "b": dtype == np.bool_}[kind]
    if not ok:
      want = {"f": "a float", "i": "an integer", "b": "a bool"}[kind]
      raise BatchError(f"batch[{key!r}] has dtype {dtype}; expected {want} dtype")
    for dim, n in zip(dims, shape):
      if dim in sizes and sizes[dim] != n:
        raise BatchError(f"batch[{key!r}] has shape {shape}: its {dim} = {n} disagrees with {sizes[dim]} "
                         f"from {seen[dim]}")
      sizes.setdefault(dim, n)
      seen.setdefault(dim, f"batch[{key!r}]")
  if "IP" in sizes and "I" in sizes:
    p = cfg.tokens_per_image if cfg is not None else None
    if p is not None and sizes["IP"] != sizes["I"] * p:
      raise BatchError(f"batch['visual_positions'] has {sizes['IP']} columns; expected image slots "
                       f"{sizes['I']} x {p} tokens per image = {sizes['I'] * p}")
    if p is None and sizes["I"] and sizes["IP"] % sizes["I"]:
      raise BatchError(f"batch['visual_positions'] has {sizes['IP']} columns, not a multiple of the "
                       f"{sizes['I']} image slots")
  if sizes.get("I") == 0 and cfg is not None and not cfg.mode.visual_in_decoder:
    raise BatchError("a batch without image slots (I = 0) runs in self and composite mode; cross mode's blocks "
                     "need at least one slot (an invalid one: image_valid False)")
  return sizes


def _concrete(*xs) -> bool:
  return not any(isinstance(x, jax.core.Tracer) for x in xs)


def check_prompts_end_with_text(batch: Mapping[str, Any], cache: "Cache | None" = None):
  """Generation continues from each row's last token, and only text tokens have logits: a row
  whose last valid token is an image (or, after a cached prefix, that has no text) would take
  its next token from the text *before* the image, an answer blind to it. Raises ValueError
  naming the rows. Rows with nothing valid (padding) are allowed. Skipped under tracing."""
  valid_t, pos_t = batch["text_valid"], batch["text_positions"]
  if not _concrete(valid_t, pos_t):
    return
  valid_t, pos_t = np.asarray(valid_t), np.asarray(pos_t)
  last_text = np.max(np.where(valid_t, pos_t, -1), axis=1)
  if cache is None:
    valid_v = visual_valid(np.asarray(batch["image_valid"]), np.asarray(batch["visual_positions"]).shape[1])
    last_image = np.max(np.where(valid_v, np.asarray(batch["visual_positions"]), -1), axis=1, initial=-1)
  else:
    if not _concrete(cache.valid, cache.pos):
      return
    last_image = np.max(np.where(np.asarray(cache.valid), np.asarray(cache.pos), -1), axis=1, initial=-1)
    if cache.media_pos is not None:  # cross mode: the images are not in the self-attention slots
      if not _concrete(cache.media_pos, cache.media_valid):
        return
      media = np.where(np.asarray(cache.media_valid), np.asarray(cache.media_pos), -1)
      last_image = np.maximum(last_image, np.max(media, axis=1, initial=-1))
  bad = np.flatnonzero(last_image > last_text)
  if bad.size:
    where = "after the cached prefix" if cache is not None else "after its last image"
    raise ValueError(f"rows {bad.tolist()} have no text {where}: a prompt must end with a text token "
                     "(e.g. the template's 'ASSISTANT:'), since only text tokens produce logits")


def check_distinct_positions(batch: Mapping[str, Any]):
  """Within a row, no two valid tokens (visual or text) share a position: the mask is causal by
  position, and two tokens at one position would see each other (the "blocked" kernel's causal
  block skipping relies on it too). Raises BatchError naming the rows. Skipped under tracing."""
  pos_t, valid_t = batch["text_positions"], batch["text_valid"]
  pos_v, image_valid = batch.get("visual_positions"), batch.get("image_valid")
  if not _concrete(pos_t, valid_t, pos_v, image_valid):
    return
  pos, valid = np.asarray(pos_t), np.asarray(valid_t, bool)
  if pos_v is not None and np.shape(pos_v)[1]:
    pos_v = np.asarray(pos_v)
    pos = np.concatenate([pos_v, pos], axis=1)
    valid = np.concatenate([visual_valid(np.asarray(image_valid, bool), pos_v.shape[1]), valid], axis=1)
  pad = np.iinfo(np.int64).min
  ordered = np.sort(np.where(valid, pos.astype(np.int64), pad), axis=1)
  repeats = (ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] > pad)
  bad = np.flatnonzero(np.any(repeats, axis=1))
  if bad.size:
    raise BatchError(f"rows {bad.tolist()} have two valid tokens at one position (e.g. row {bad[0]}: "
                     f"{ordered[bad[0], 1:][repeats[bad[0]]][:5].tolist()}); positions in a row must be distinct")


# ----------------------------------------------------------------------------- index helpers


def visual_valid(image_valid, visual_len: int):
  """(B, I) image validity -> (B, I*P) validity of each visual token (numpy or jax)."""
  i = image_valid.shape[1]
  if (i == 0 and visual_len) or (i and visual_len % i):
    raise BatchError(f"{visual_len} visual tokens do not split over {i} image slots")
  xp = jnp if isinstance(image_valid, jax.Array) else np
  return xp.repeat(image_valid, visual_len // i if i else 0, axis=1)  # i = 0: a text-only batch, (B, 0)


def prefill_slots(cfg, batch: Mapping[str, Any]) -> int:
  """Cache slots the prefill of `batch` fills: [visual; text], or text only in cross mode, whose
  images become the cross blocks' keys/values instead (`Cache.cross_k`). `cfg` is a ModelConfig."""
  text = batch["input_ids"].shape[1]
  return batch["visual_positions"].shape[1] + text if cfg.mode.visual_in_decoder else text


def last_valid_index(pos_t: jax.Array, valid_t: jax.Array) -> jax.Array:
  """(B, T) text positions/validity -> (B,) column of each row's last (highest-position) valid token."""
  return jnp.argmax(jnp.where(valid_t, pos_t, jnp.iinfo(jnp.int32).min), axis=1)


def next_positions(pos_t: jax.Array, valid_t: jax.Array) -> jax.Array:
  """(B,) position of each row's first new token: one past its last valid text token."""
  return jnp.max(jnp.where(valid_t, pos_t, -1), axis=1).astype(jnp.int32) + 1


# ----------------------------------------------------------------------------- the cache


@flax.struct.dataclass
class Cache:
  """Per-layer keys/values by slot, for generation. A pytree: jit, `jax.tree` and
  `jax.device_put` take it as is.

  k, v   (L, B, S, K, H)   every layer's keys (RoPE-rotated) and values
  pos    (B, S) int32      each slot's position in the interleaved sequence
  valid  (B, S) bool       filled and not padding
  index  () int32          next write slot (shared by all rows; pads are invalid)

  Cross mode (None in the others): the self-attention slots hold text only, and the media the
  cross blocks read are kept once, from the prefill (J blocks, I image slots, M media tokens
  per image, N heads of H: the cross modules'):
  cross_k, cross_v  (J, B, I, M, N, H)   every block's keys/values of every image
  media_pos         (B, I) int32         each image's last position (later text sees it)
  media_valid       (B, I) bool
  """

  k: jax.Array
  v: jax.Array
  pos: jax.Array
  valid: jax.Array
  index: jax.Array
  cross_k: jax.Array | None = None
  cross_v: jax.Array | None = None
  media_pos: jax.Array | None = None
  media_valid: jax.Array | None = None
  # FastV (None otherwise): validity (B, S) for layers >= `fastv_layer`, the dropped visual slots off
  late_valid: jax.Array | None = None

  @property
  def size(self) -> int:
    """Number of slots S."""
    return self.pos.shape[1]

  def pad(self, size: int) -> "Cache":
    """Grown to `size` slots; the new slots are empty (invalid) until `extend` writes them."""
    extra = size - self.size
    if extra < 0:
      raise ValueError(f"cannot shrink a cache of {self.size} slots to {size}")
    if extra == 0:
      return self
    grow = lambda x, axis: jnp.pad(x, [(0, extra if a == axis else 0) for a in range(x.ndim)])
    late = None if self.late_valid is None else grow(self.late_valid, 1)
    return self.replace(k=grow(self.k, 2), v=grow(self.v, 2), pos=grow(self.pos, 1), valid=grow(self.valid, 1),
                        late_valid=late)

  # The row axis of every per-row field (k/v and cross_k/cross_v lead with their layer/block axis).
  _ROW_AXES = {"k": 1, "v": 1, "pos": 0, "valid": 0, "cross_k": 1, "cross_v": 1, "media_pos": 0, "media_valid": 0,
               "late_valid": 0}

  def take_rows(self, rows) -> "Cache":
    """The cache whose row b is row `rows[b]` of this one ((B',) ints): prefixes shared by
    uneven numbers of prompts (one image, several questions). Every per-row field moves,
    the cross-mode media included."""
    rows = jnp.asarray(rows, jnp.int32)
    return self.replace(**{name: None if getattr(self, name) is None else jnp.take(getattr(self, name), rows, axis=axis)
                           for name, axis in self._ROW_AXES.items()})

  def repeat(self, repeats: int) -> "Cache":
    """Each row repeated `repeats` times (row b -> rows b*repeats ... b*repeats+repeats-1),
    e.g. one image prefix shared by several prompts."""
    return self.take_rows(jnp.repeat(jnp.arange(self.pos.shape[0]), repeats))

  def with_text(self, pos_t: jax.Array, valid_t: jax.Array) -> "Cache":
    """Positions/validity of T new text tokens written at slots [index, index + T) (their
    keys/values are written layer by layer by the decoder); `index` moves past them."""
    at = (0, self.index)
    return self.replace(pos=jax.lax.dynamic_update_slice(self.pos, pos_t.astype(self.pos.dtype), at),
                        valid=jax.lax.dynamic_update_slice(self.valid, valid_t, at),
                        late_valid=None if self.late_valid is None else
                        jax.lax.dynamic_update_slice(self.late_valid, valid_t, at),
                        index=self.index + pos_t.shape[1])
