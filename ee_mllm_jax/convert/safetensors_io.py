"""Safetensors files read tensor by tensor and written shard by shard; nothing ever unpickles.

The format is an 8-byte little-endian header length, a JSON header {name: {dtype, shape,
data_offsets: [begin, end]}, "__metadata__": {...}} and the raw bytes (offsets relative to
the end of the header). Reading it here (instead of through `safetensors.numpy`) keeps two
things in hand: bfloat16, which `safetensors.numpy` cannot return, comes back as an
`ml_dtypes.bfloat16` array, and each tensor is read straight into one buffer of its own
(no memory map whose touched pages add to the resident set while a whole shard is read).

A checkpoint directory is either one `model.safetensors`, or shards listed by
`model.safetensors.index.json` ({"weight_map": {name: file}}), or (older layouts) any set of
`*.safetensors` files.
"""

from __future__ import annotations

import glob
import json
import os
import struct
from typing import Callable, Iterator, Mapping, Sequence

import ml_dtypes
import numpy as np

from ee_mllm_jax import storage

DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16, "I64": np.int64,
          "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
_NAMES = {np.dtype(v): k for k, v in DTYPES.items()}
INDEX_FILE = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


class PickleCheckpointError(ValueError):
  """A directory whose weights exist only in pickle-based formats."""


def read_header(path: str) -> tuple[dict, int]:
  """({name: {dtype, shape, data_offsets}}, byte offset of the data) of one .safetensors file."""
  with open(path, "rb") as f:
    raw = f.read(8)
    if len(raw) != 8:
      raise ValueError(f"{path} is not a safetensors file (shorter than its header length)")
    (n,) = struct.unpack("<Q", raw)
    if n > 100_000_000:
      raise ValueError(f"{path} is not a safetensors file (header length {n})")
    header = json.loads(f.read(n))
  header.pop("__metadata__", None)
  return header, 8 + n


def checkpoint_files(path: str) -> list[str]:
  """The .safetensors files of a checkpoint (a directory or one file). A directory with only
  pickled weights is refused: loading them runs arbitrary code."""
  if not os.path.isdir(path):
    if not os.path.exists(path):
      raise FileNotFoundError(f"{path} does not exist")
    if not path.endswith(".safetensors"):
      raise PickleCheckpointError(_pickle_message(path)) if path.endswith(PICKLE_SUFFIXES) else ValueError(
          f"{path} is not a .safetensors file")
    return [path]
  index = os.path.join(path, INDEX_FILE)
  if os.path.exists(index) and os.path.exists(os.path.join(path, "model.safetensors")):
    raise ValueError(f"{path} holds both model.safetensors and {INDEX_FILE}: two exports mixed in one directory "
                     "(transformers reads one, we would read the other); remove the stale one or export again "
                     "with --overwrite")
  if os.path.exists(index):
    with open(index) as f:
      files = sorted(set(json.load(f)["weight_map"].values()))
    root = os.path.realpath(path)
    outside = [name for name in files if not isinstance(name, str) or os.path.commonpath(
        [os.path.realpath(os.path.join(root, name)), root]) != root]
    if outside:
      raise ValueError(f"{index} names shards outside {path}: {outside[:3]} (a shard is a file in the checkpoint's "
                       "directory)")
    missing = [name for name in files if not os.path.exists(os.path.join(path, name))]
    if missing:
      raise FileNotFoundError(f"{index} lists shards that are not there: {missing[:3]}")
    return [os.path.join(path, name) for name in files]
  files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
  if files:
    return files
  pickled = sorted(f for f in os.listdir(path) if f.endswith(PICKLE_SUFFIXES))
  if pickled:
    raise PickleCheckpointError(_pickle_message(os.path.join(path, pickled[0])))
  raise FileNotFoundError(f"no .safetensors weights in {path}")


def _pickle_message(example: str) -> str:
  return (f"{example}: only pickled weights (*.bin / *.pt / *.pth) found, and these are never loaded here: "
          "unpickling executes arbitrary code from the file. Convert once, on a machine where you trust the "
          "file: load it with transformers (`Model.from_pretrained(dir)`) and write "
          "`model.save_pretrained(out_dir, safe_serialization=True)`, then point here at out_dir.")


class TensorReader(Mapping[str, np.ndarray]):
  """The tensors of a checkpoint as a lazy mapping: `reader[name]` reads that tensor alone."""

  def __init__(self, path: str):
    self.path = path
    self.files = checkpoint_files(path)
    self._where: dict[str, tuple[str, int, dict]] = {}
    for f in self.files:
      header, start = read_header(f)
      for name, info in header.items():
        if name in self._where:
          raise ValueError(f"tensor {name!r} appears in both {self._where[name][0]} and {f}")
        self._where[name] = (f, start, info)

  def __getitem__(self, name: str) -> np.ndarray:
    f, start, info = self._where[name]
    if info["dtype"] not in DTYPES:
      raise ValueError(f"{f}: tensor {name!r} has dtype {info['dtype']}, which is not supported")
    dtype = np.dtype(DTYPES[info["dtype"]])
    begin, end = info["data_offsets"]
    count = int(np.prod(info["shape"], dtype=np.int64))
    if end - begin != count * dtype.itemsize:
      raise ValueError(f"{f}: tensor {name!r} has {end - begin} bytes for shape {info['shape']} {info['dtype']}")
    with open(f, "rb") as fh:
      fh.seek(start + begin)
      return np.fromfile(fh, dtype=dtype, count=count).reshape(info["shape"])

  def __iter__(self) -> Iterator[str]:
    return iter(self._where)

  def __len__(self) -> int:
    return len(self._where)

  def nbytes(self) -> int:
    return sum(info["data_offsets"][1] - info["data_offsets"][0] for _, _, info in self._where.values())


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  """All tensors of a checkpoint (directory or file), read into memory."""
  reader = TensorReader(path)
  return {name: reader[name] for name in reader}


# ----------------------------------------------------------------------------- writing

# (name, shape, dtype, produce): `produce()` returns the tensor when its shard is written.
PlannedTensor = tuple[str, tuple[int, ...], np.dtype, Callable[[], np.ndarray]]


def write_file(path: str, tensors: Sequence[PlannedTensor], metadata: dict[str, str] | None = None):
  """One .safetensors file, producing and writing one tensor at a time."""
  header, offset = {}, 0
  for name, shape, dtype, _ in tensors:
    size = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    header[name] = {"dtype": _NAMES[np.dtype(dtype)], "shape": list(shape), "data_offsets": [offset, offset + size]}
    offset += size
  header["__metadata__"] = {"format": "pt", **(metadata or {})}
  raw = json.dumps(header, separators=(",", ":")).encode()
  raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
  with storage.atomic_open(path, "wb") as f:
    f.write(struct.pack("<Q", len(raw)) + raw)
    for name, shape, dtype, produce in tensors:
      value = np.ascontiguousarray(produce(), dtype=dtype)
      if value.shape != tuple(shape):
        raise ValueError(f"tensor {name!r} came out {value.shape}, planned {tuple(shape)}")
      f.write(value.tobytes())


def write_checkpoint(out_dir: str, tensors: Sequence[PlannedTensor], *, max_shard_bytes: int = 5 << 30) -> list[str]:
  """`model.safetensors`, or shards `model-0000k-of-0000n.safetensors` of at most
  `max_shard_bytes` each (a larger single tensor gets a shard of its own) plus the index,
  as transformers' `save_pretrained` lays them out. Returns the file names written."""
  shards: list[list[PlannedTensor]] = [[]]
  size = 0
  for t in tensors:
    nbytes = int(np.prod(t[1], dtype=np.int64)) * np.dtype(t[2]).itemsize
    if shards[-1] and size + nbytes > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(t)
    size += nbytes
  if len(shards) == 1:
    write_file(os.path.join(out_dir, "model.safetensors"), shards[0])
    return ["model.safetensors"]
  names = [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
  total = 0
  for name, shard in zip(names, shards):
    write_file(os.path.join(out_dir, name), shard)
    total += sum(int(np.prod(t[1], dtype=np.int64)) * np.dtype(t[2]).itemsize for t in shard)
  index = {"metadata": {"total_size": total},
           "weight_map": {t[0]: name for name, shard in zip(names, shards) for t in shard}}
  with open(os.path.join(out_dir, INDEX_FILE), "w") as f:
    json.dump(index, f, indent=2)
  return names + [INDEX_FILE]
