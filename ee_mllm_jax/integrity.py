"""Byte-level checksums of what a checkpoint holds, so that damage cannot pass silently.

Every array leaf of the train state gets the CRC-32 (`zlib.crc32`, the one checksum the
standard library computes at ~2 GB/s on one core; CRC-32C would need a new dependency) of its
whole value as C-ordered host bytes, with its dtype and shape. CRC-32 detects every single-bit
error and every burst up to 32 bits, so one flipped bit anywhere in the values is always found
(a sum of |x| at a relative tolerance misses flips in low mantissa bits).

The checksum is of the logical array, not of a device's shard: a leaf sharded over several
devices is read whole (one leaf at a time; across processes by an all-gather), so the value does
not depend on the mesh and a checkpoint restored onto another mesh is checked the same way.

The data-iterator state (the Grain iterator's JSON, one per process) gets the CRC-32 of its
canonical JSON (sorted keys), one per process.
"""

from __future__ import annotations

import json
import zlib
from typing import Any

import jax
import numpy as np

ALGORITHM = "crc32"
VERSION = 2


def host_array(x) -> np.ndarray:
  """The whole value of `x` on this host (an all-gather for arrays split over processes)."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


def crc32_of(value: np.ndarray) -> int:
  a = np.ascontiguousarray(value)
  return zlib.crc32(a.reshape(-1).view(np.uint8)) if a.size else zlib.crc32(b"")


def leaf_checksums(tree) -> dict[str, list]:
  """{leaf path: [crc32, dtype, shape]} of every leaf of `tree` (a collective across processes:
  every process calls it, on the same tree)."""
  out = {}
  for path, x in jax.tree_util.tree_leaves_with_path(tree):
    a = host_array(x)
    out[jax.tree_util.keystr(path)] = [crc32_of(a), str(a.dtype), list(a.shape)]
  return out


def json_checksum(state: Any) -> int:
  """CRC-32 of the canonical JSON (sorted keys, no spaces) of a JSON-able state."""
  return zlib.crc32(json.dumps(state, sort_keys=True, separators=(",", ":")).encode())


def per_process(value: int) -> list[int]:
  """`value` of every process, in process order (an all-gather of one int)."""
  if jax.process_count() == 1:
    return [int(value)]
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  as_int32 = np.asarray([value], np.uint32).view(np.int32)  # 32 bits that survive jax's default int32
  gathered = np.asarray(multihost_utils.process_allgather(as_int32), np.int32).reshape(-1)
  return [int(v) for v in gathered.view(np.uint32)]


def record(state, data_state: Any | None) -> dict[str, Any]:
  """The "integrity" item of a checkpoint of `state` (and of the iterator state `data_state`)."""
  item = {"version": VERSION, "algorithm": ALGORITHM, "leaves": leaf_checksums(state)}
  if data_state is not None:
    item["data"] = per_process(json_checksum(data_state))
  return item


def verify_leaves(tree, saved: dict[str, list], where: str, *, prefix: str = ""):
  """Raises ValueError naming the first leaf of `tree` whose bytes differ from `saved` (a leaf
  restored in another dtype than it was saved in cannot be compared and is skipped; a leaf the
  record lacks is an error). `prefix` is prepended to `tree`'s leaf paths (e.g. "['params']")."""
  for path, x in jax.tree_util.tree_leaves_with_path(tree):
    key = prefix + jax.tree_util.keystr(path)
    want = saved.get(key)
    if want is None:
      raise ValueError(f"{where}: {key} has no checksum in the checkpoint's integrity record")
    a = host_array(x)
    if str(a.dtype) != want[1]:
      continue
    if list(a.shape) != list(want[2]) or crc32_of(a) != want[0]:
      raise ValueError(f"{where}: {key} does not match its checksum (crc32 {crc32_of(a):#010x}, saved "
                       f"{want[0]:#010x}): the files are damaged")


def verify_data(data_state: Any, saved: list[int] | None, where: str):
  """Raises ValueError, in every process alike, when any process's restored iterator state
  differs from what was saved (a collective across processes)."""
  if saved is None or len(saved) != jax.process_count():
    return  # none recorded, or written by another number of processes (Grain handles that itself)
  got = per_process(json_checksum(data_state))
  bad = [i for i, (a, b) in enumerate(zip(got, saved)) if a != b]
  if bad:
    raise ValueError(f"{where}: the data iterator state of process {bad[0]} does not match its checksum "
                     f"(crc32 {got[bad[0]]:#010x}, saved {saved[bad[0]]:#010x}): the data item is damaged or "
                     "was edited")
