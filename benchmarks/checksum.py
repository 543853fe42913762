"""What the checkpoint checksums cost: seconds per GB, at save and at restore.

    python benchmarks/checksum.py [--gb 0.5 --leaves 16 --devices 1]

Builds a train-state-like tree of float32 arrays (`--leaves` of them, `--gb` in all, on
`--devices` devices with the leading axis sharded when more than one), then times

* save:    `integrity.record(state)` (device -> host copy of every leaf + CRC-32), what
           `Checkpointer.save` adds before Orbax starts its own (asynchronous) write;
* restore: `integrity.verify_leaves(state, record)`, what `Checkpointer.restore` and
           `load_model` add after Orbax has read the arrays;
* crc32:   `zlib.crc32` alone on host bytes (the floor);

and, for scale, Orbax's own synchronous save and restore of the same tree to a temporary
directory. Each timing is the best of `--repeats`.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import zlib


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--gb", type=float, default=0.5)
  parser.add_argument("--leaves", type=int, default=16)
  parser.add_argument("--devices", type=int, default=1)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--no-orbax", action="store_true", help="skip the Orbax save/restore timings")
  args = parser.parse_args()
  if args.devices > 1:
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  from ee_mllm_jax import integrity  # pylint: disable=g-import-not-at-top

  n = int(args.gb * 1e9 / 4 / args.leaves) // 1024 * 1024
  mesh = jax.make_mesh((len(jax.devices()),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  rng = np.random.default_rng(0)
  state = {f"leaf{i:02d}": jax.device_put(rng.standard_normal((1024, n // 1024), np.float32), sharding)
           for i in range(args.leaves)}
  jax.block_until_ready(state)
  gb = sum(x.nbytes for x in jax.tree.leaves(state)) / 1e9

  def best(fn):
    times = []
    for _ in range(args.repeats):
      t = time.perf_counter()
      fn()
      times.append(time.perf_counter() - t)
    return min(times)

  record = integrity.record(state, None)
  host = [np.asarray(x) for x in jax.tree.leaves(state)]
  rows = {
      "save (record: device_get + crc32)": best(lambda: integrity.record(state, None)),
      "restore (verify_leaves)": best(lambda: integrity.verify_leaves(state, record["leaves"], "bench")),
      "crc32 alone on host bytes": best(lambda: [zlib.crc32(h.reshape(-1).view(np.uint8)) for h in host]),
  }
  if not args.no_orbax:
    with tempfile.TemporaryDirectory() as tmp:
      count = iter(range(10**6))
      checkpointer = ocp.StandardCheckpointer()

      def save():
        path = os.path.join(tmp, str(next(count)))
        checkpointer.save(path, state)
        checkpointer.wait_until_finished()
        return path

      last = save()
      rows["orbax save (for scale)"] = best(save)
      abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
      rows["orbax restore (for scale)"] = best(lambda: jax.block_until_ready(checkpointer.restore(last, abstract)))
      checkpointer.close()
  print(f"{gb:.2f} GB in {args.leaves} float32 leaves on {len(jax.devices())} device(s); best of {args.repeats}")
  for name, seconds in rows.items():
    print(f"  {name:<36} {seconds:7.3f} s   {seconds / gb:6.3f} s/GB")


if __name__ == "__main__":
  main()
