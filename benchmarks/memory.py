"""Device memory of one training step, compiled ahead of time: nothing is allocated, so the 7B
presets can be measured on a CPU, for one device or per device of a mesh.

    python benchmarks/memory.py                                    # LLaVA-1.5-7B stage 1, remat none vs full
    python benchmarks/memory.py --config configs/llava15_7b_stage2.py --remat full
    python benchmarks/memory.py --no_licm                          # closer to what a GPU compiles
    python benchmarks/memory.py --mesh 1 fsdp=8 --remat full --attention_impl xla    # per device, FSDP over 8
    python benchmarks/memory.py --prefill_visual 2880,11520        # prefill, xla vs chunked attention

The memory table (one row per recipe x mesh; per-device peak at LLaVA's published batch and the
largest per-device batch that fits each budget; `auto` is the attention train.py runs, which on
a CPU is the "blocked" kernel at these lengths, on a GPU cuDNN's fused one):

    python benchmarks/memory.py --no_licm --remat full --attention_impl auto --text_len 2048 \
      --config configs/llava15_7b_stage1.py:self configs/llava15_7b_stage1.py:composite \
      --mesh 1 fsdp=8 --batch 32 --fit 24,40,80 --markdown          # stage 2: its configs, --batch 16

The model, the trainable parameters and the optimizer come from the experiment config (the same
translation train.py uses), and so does the step: `create_sharded_state`, `make_train_step` and
`batch_sharding` on a `sharding.make_mesh` mesh, jitted as train.py jits it. `--batch` is rows PER
DEVICE: the global batch is `--batch` x the data-parallel size (data x fsdp), each row
`--text_len` text tokens and one image (LLaVA-1.5 stage 1: 256 rows over 8 GPUs = 32 per device;
LCS-558K captions fit the 128-token bucket). A mesh of N > 1 devices is simulated on the CPU (the
script re-executes itself with `--xla_force_host_platform_device_count=N`).

XLA's `memory_analysis()` of an SPMD executable is per device: the arguments (this device's shards
of the train state and the batch), the outputs (the new state, which aliases the donated one) and
the temporaries (activations kept for the backward pass, gradients, workspace). The argument bytes
are split into parameters, optimizer state and batch, computed from each leaf's shape, dtype and
sharding (`shard_shape`); they add up to XLA's figure. Peak = arguments + outputs - aliased + temp.
Budgets (`--fit`) and every figure are GiB (2^30 bytes): what the cards sold as 24/40/80 GB hold
(an A100-80GB has 81920 MiB). The CUDA context and the allocator's fragmentation take some of it,
and JAX preallocates 75% of the card unless XLA_PYTHON_CLIENT_MEM_FRACTION says more.

Two CPU artefacts inflate the figures: XLA/CPU runs bf16 matmuls in float32, and it hoists
float32 copies of every stacked layer weight out of the layer loop (while-loop-invariant code
motion, ~26 GB at 7B). `--no_licm` disables that pass (the flag must be set before jax starts,
so the script re-executes itself), which a GPU compile roughly matches.

`--prefill_visual V1,V2,...` measures instead the LLM prefill (V visual tokens, already
projected, then `--text_len` prompt tokens; logits at the last token and the KV cache) of the
config's preset in `--dtype`, for each attention implementation in `--attention_impl` and both
modes (self: LLaVA; composite: EE-MLLM, no visual FFN). The KV cache is the output.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LICM_FLAG = "--xla_disable_hlo_passes=while-loop-invariant-code-motion"
DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"
MESH_AXES = ("data", "fsdp", "tensor")  # ee_mllm_jax.sharding.MESH_AXES (checked in step_memory)
GIB = 2 ** 30


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", nargs="+", default=["configs/llava15_7b_stage1.py"],
                 help="experiment config(s)[:arg], e.g. configs/llava15_7b_stage2.py:self")
  p.add_argument("--mesh", nargs="+", default=["1"],
                 help="mesh(es): 1 (one device), fsdp=8, data=2,fsdp=4, ... (axes data, fsdp, tensor)")
  p.add_argument("--remat", default="none,full", help="remat policies to compare")
  p.add_argument("--batch", type=int, default=32, help="rows per device (global batch = this x data x fsdp)")
  p.add_argument("--text_len", type=int, default=128)
  p.add_argument("--fit", default="", help="comma-separated budgets in GiB: the largest per-device batch that fits each")
  p.add_argument("--markdown", action="store_true", help="print the rows as a markdown table at the end")
  p.add_argument("--no_licm", action="store_true", help="disable while-loop-invariant code motion")
  p.add_argument("--prefill_visual", default="", help="comma-separated V: measure prefill instead of a train step")
  p.add_argument("--attention_impl", default="xla,blocked,chunked", help="attention implementations to compare")
  p.add_argument("--dtype", default="bfloat16", help="compute and parameter dtype (prefill table)")
  return p.parse_args(argv)


def parse_mesh(text: str) -> dict[str, int]:
  """'1' (one device), 'fsdp=8', 'data=2,fsdp=4' -> {data, fsdp, tensor: size}, unnamed axes 1."""
  sizes = dict.fromkeys(MESH_AXES, 1)
  if text.strip() in ("", "1"):
    return sizes
  for part in text.split(","):
    name, _, size = (s.strip() for s in part.partition("="))
    if name not in sizes or not size.isdigit() or int(size) < 1:
      raise ValueError(f"mesh {text!r}: expected axis=size pairs over {MESH_AXES}, e.g. fsdp=8")
    sizes[name] = int(size)
  return sizes


def mesh_name(sizes: dict[str, int]) -> str:
  return ",".join(f"{a}={n}" for a, n in sizes.items() if n > 1) or "1"


def xla_flags(flags: str, devices: int, no_licm: bool) -> str:
  """`flags` with the flags this run needs before jax starts: `devices` simulated CPU devices
  (when more than one and not already that many or more) and, with `no_licm`, LICM disabled."""
  if no_licm and LICM_FLAG not in flags:
    flags = f"{flags} {LICM_FLAG}"
  have = re.search(DEVICE_COUNT_FLAG + r"=(\d+)", flags)
  if devices > 1 and (not have or int(have.group(1)) < devices):
    flags = re.sub(DEVICE_COUNT_FLAG + r"=\d+", "", flags) + f" {DEVICE_COUNT_FLAG}={devices}"
  return " ".join(flags.split())


def load_config(spec: str):
  """An experiment config from 'path[:arg]', as `train.py --config=path[:arg]` reads it."""
  from ml_collections.config_flags import config_flags  # pylint: disable=g-import-not-at-top
  if ROOT not in sys.path:
    sys.path.insert(0, ROOT)  # configs/ import configs.*
  return config_flags.ConfigFileFlagParser(name="config").parse(spec)


def shard_bytes(tree, shardings, only_sharded: bool = False) -> int:
  """Bytes one device holds of `tree` (ShapeDtypeStructs) under `shardings` (one per leaf, or one
  for all): each leaf's `shard_shape` times its item size; `only_sharded`: of the leaves that are
  not fully replicated."""
  import jax  # pylint: disable=g-import-not-at-top
  leaves = jax.tree.leaves(tree)
  shs = [shardings] * len(leaves) if isinstance(shardings, jax.sharding.Sharding) else jax.tree.leaves(shardings)
  assert len(shs) == len(leaves), (len(shs), len(leaves))
  return sum(math.prod(s.shard_shape(x.shape)) * x.dtype.itemsize for x, s in zip(leaves, shs)
             if not (only_sharded and s.is_fully_replicated))


def step_memory(config, mesh_shape: dict[str, int], batch: int, text_len: int, *, remat: str | None = None,
                attention_impl: str | None = None) -> dict:
  """Per-device memory of train.py's step for `config` (an experiment ConfigDict), compiled ahead
  of time on a `mesh_shape` mesh ({axis: size}, others 1) of the first devices, `batch` rows per
  device of `text_len` text tokens and one image. `remat` / `attention_impl` override the config's.

  Returns bytes per device: XLA's `arguments`, `outputs`, `aliased`, `temp` and `peak` (arguments +
  outputs - aliased + temp), and the arguments' parts computed from shapes, dtypes and shardings:
  `params` (of which `params_sharded`: leaves split over the mesh), `opt_state`, `batch_bytes`
  and `other` (step counter, RNG key); with the mesh, batch sizes, trainable parameter count and
  the compile time in seconds.
  """
  import jax  # pylint: disable=g-import-not-at-top

  from ee_mllm_jax import batch as batch_lib  # pylint: disable=g-import-not-at-top
  from ee_mllm_jax import experiment, sharding  # pylint: disable=g-import-not-at-top
  from ee_mllm_jax.models import EEMLLM  # pylint: disable=g-import-not-at-top
  from ee_mllm_jax.train.state import create_sharded_state, make_init_fn, make_optimizer, split_params  # pylint: disable=g-import-not-at-top
  from ee_mllm_jax.train.step import make_train_step  # pylint: disable=g-import-not-at-top

  assert tuple(sharding.MESH_AXES) == MESH_AXES, sharding.MESH_AXES
  sizes = {**dict.fromkeys(MESH_AXES, 1), **mesh_shape}
  n = math.prod(sizes.values())
  if jax.device_count() < n:
    raise ValueError(f"mesh {sizes} needs {n} devices, have {jax.device_count()}: set XLA_FLAGS="
                     f"{DEVICE_COUNT_FLAG}={n} before jax starts (the script does)")
  mesh = sharding.make_mesh(sizes, devices=jax.devices()[:n])
  cfg = experiment.model_config(config)
  cfg = cfg.replace(remat=remat) if remat else cfg
  cfg = cfg.with_attention_impl(attention_impl) if attention_impl else cfg
  optim = experiment.optim_config(config, total_steps=1000)
  with jax.set_mesh(mesh):
    model = EEMLLM(cfg)
    tx, schedule = make_optimizer(optim)
    _, shardings, state = create_sharded_state(make_init_fn(model, tx, optim.trainable), mesh)
    rows = batch * sharding.data_parallel_size(mesh)
    batch_sh = sharding.batch_sharding(mesh, (rows,))
    step = jax.jit(make_train_step(model, tx, schedule, optim.trainable, config.get("accum_steps", 1)),
                   in_shardings=(shardings, batch_sh), out_shardings=(shardings, None), donate_argnums=0)
    inputs = batch_lib.abstract(cfg, batch_size=rows, text_len=text_len, labels=True)
    t0 = time.perf_counter()
    m = step.lower(state, inputs).compile().memory_analysis()
    compile_s = time.perf_counter() - t0
  rest = [k for k in state if k not in ("params", "opt_state")]  # step counter, RNG key
  out = dict(mesh=mesh_name(sizes), devices=n, batch=batch, global_batch=rows, text_len=text_len,
             remat=cfg.remat, attention_impl=attention_impl or "", compile_s=compile_s,
             trainable=sum(x.size for x in jax.tree.leaves(split_params(state["params"], optim.trainable)[0])),
             params=shard_bytes(state["params"], shardings["params"]),
             params_sharded=shard_bytes(state["params"], shardings["params"], only_sharded=True),
             opt_state=shard_bytes(state["opt_state"], shardings["opt_state"]),
             batch_bytes=shard_bytes(inputs, batch_sh), other=shard_bytes([state[k] for k in rest], [shardings[k] for k in rest]),
             arguments=m.argument_size_in_bytes, outputs=m.output_size_in_bytes, aliased=m.alias_size_in_bytes,
             temp=m.temp_size_in_bytes)
  out["peak"] = out["arguments"] + out["outputs"] - out["aliased"] + out["temp"]
  return out


def largest_batch(peak_at, budget: float, start: int, limit: int = 4096) -> int:
  """The largest batch b with `peak_at(b) <= budget` (0: not even 1; `limit` when that fits too),
  peaks taken to grow with b. From `start`, doubling (halving when it does not fit) until a batch
  that fits and one that does not bracket the answer, then bisection. A step's memory is close to
  affine in the batch, so once two batches are known the next probe is where the straight line
  through them meets the budget (two probes find it when it is affine; before the bracket, at most
  8x up and at least halving down), with a midpoint probe after two such probes that did not
  halve the bracket."""
  seen = {}

  def fits(b):
    seen[b] = peak_at(b)
    return seen[b] <= budget

  def crossing(b1, b2):  # the batch at which the line through two probes reaches the budget
    p1, p2 = seen[b1], seen[b2]
    return b1 + (budget - p1) * (b2 - b1) / (p2 - p1) if p2 > p1 else math.inf

  lo, hi = 0, None  # the largest batch known to fit (0: none), the smallest known not to (None: none)
  b, how, slow = start, "start", 0
  while True:
    width = hi - lo if hi else 0
    lo, hi = (b, hi) if fits(b) else (lo, b)
    if how == "interpolate":
      slow = slow + 1 if 2 * (hi - lo) > width else 0
    if hi is not None and hi - lo <= 1 or hi is None and lo >= limit:
      return lo
    if hi is None:  # all fit so far: double, or extrapolate from the two largest
      x = crossing(*sorted(seen)[-2:]) if len(seen) > 1 else 2 * lo - 1  # (probes x + 1)
      b, how = int(min(max(x + 1, lo + 1), 8 * lo, limit)), "extrapolate"
    elif lo == 0:  # none fits so far: halve, or less where the two smallest extrapolate lower
      x = crossing(*sorted(seen)[:2]) if len(seen) > 1 else math.inf
      b, how = int(max(min(x, hi // 2), 1)), "halve"
    elif slow >= 2:
      b, how, slow = (lo + hi) // 2, "midpoint", 0
    else:
      b, how = int(min(max(crossing(lo, hi), lo + 1), hi - 1)), "interpolate"


def gib(n: float) -> str:
  return f"{n / GIB:8.2f}"


HEADER = (f"{'recipe':>18} {'mode':>9} {'mesh':>12} {'attention':>9} {'remat':>5} {'batch':>5} | {'params':>8} "
          f"{'optim':>8} {'batch':>8} | {'arguments':>9} {'outputs':>8} {'aliased':>8} {'temp':>8} | {'peak GiB':>8} "
          f"| compile s")


def row_line(r: dict) -> str:
  return (f"{r['recipe']:>18} {r['mode']:>9} {r['mesh']:>12} {r['attention_impl']:>9} {r['remat']:>5} {r['batch']:>5} | "
          f"{gib(r['params'])} {gib(r['opt_state'])} {gib(r['batch_bytes'])} | {gib(r['arguments'])} "
          f"{gib(r['outputs'])} {gib(r['aliased'])} {gib(r['temp'])} | {gib(r['peak'])} | {r['compile_s']:7.1f}")


def markdown(rows: list[dict], budgets: list[float]) -> str:
  cols = ["recipe", "mode", "mesh", "per-device batch", "text_len", "remat", "params", "optimizer", "arguments", "temp",
          "peak"] + [f"largest batch, {b:g} GiB" for b in budgets]
  lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
  for r in rows:
    cells = [r["recipe"], r["mode"], r["mesh"], str(r["batch"]), str(r["text_len"]), r["remat"]]
    cells += [f"{r[k] / GIB:.1f}" for k in ("params", "opt_state", "arguments", "temp", "peak")]
    cells += [str(r["fits"][b]) for b in budgets]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def main(argv=None):
  argv = sys.argv[1:] if argv is None else list(argv)
  args = parse_args(argv)
  meshes = [parse_mesh(m) for m in args.mesh]
  flags = xla_flags(os.environ.get("XLA_FLAGS", ""), max(math.prod(m.values()) for m in meshes), args.no_licm)
  if flags != os.environ.get("XLA_FLAGS", ""):  # XLA reads its flags once, when jax starts
    sys.exit(subprocess.call([sys.executable, os.path.abspath(__file__)] + argv,
                             env=dict(os.environ, XLA_FLAGS=flags)))
  if args.prefill_visual:
    from ee_mllm_jax import experiment  # pylint: disable=g-import-not-at-top
    return prefill_table(args, experiment.model_config(load_config(args.config[0])))
  budgets = [float(b) for b in args.fit.split(",") if b]
  rows = []
  print(f"per device, GiB; batch = rows per device, each 1 image + {args.text_len} text tokens; "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
  for spec in args.config:
    config = load_config(spec)
    recipe = os.path.splitext(os.path.basename(spec.split(":")[0]))[0]
    print(f"{spec}: {config.model.preset}, compute {config.model.dtype}, params {config.model.param_dtype}, "
          f"trainable {config.optim.trainable!r}")
    print(HEADER, flush=True)
    for sizes in meshes:
      for impl in args.attention_impl.split(","):
        for remat in args.remat.split(","):
          probes = {}

          def peak_at(b, config=config, sizes=sizes, impl=impl, remat=remat, probes=probes):
            if b not in probes:
              probes[b] = step_memory(config, sizes, b, args.text_len, remat=remat, attention_impl=impl)
              probes[b].update(recipe=recipe, mode=config.model.attention)
              if b != args.batch:
                print(f"  probe {row_line(probes[b])}", flush=True)
            return probes[b]["peak"]

          peak_at(args.batch)
          r = probes[args.batch]
          print(row_line(r), flush=True)
          r["fits"] = {b: largest_batch(peak_at, b * GIB, args.batch) for b in budgets}
          if budgets:
            print("  largest per-device batch within " + ", ".join(f"{b:g} GiB: {n}" for b, n in r["fits"].items())
                  + f" ({len(probes)} compiles)", flush=True)
          rows.append(r)
    print(f"({rows[-1]['trainable'] / 1e6:.1f}M trainable parameters; peak = arguments + outputs - aliased + temp; "
          f"arguments = params + optim + batch + step/RNG)")
  if args.markdown:
    print(markdown(rows, budgets))
  return rows


def prefill_table(args, base):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  from ee_mllm_jax.models import EEMLLM  # pylint: disable=g-import-not-at-top
  from ee_mllm_jax.params import abstract_params  # pylint: disable=g-import-not-at-top

  base = base.replace(attention="self", visual_ffn=True, dtype=args.dtype, param_dtype=args.dtype)
  params = abstract_params(base)
  c, b, t = base.llm, args.batch, args.text_len
  print(f"prefill, {args.config[0]} preset {base.llm.width}-wide x {c.depth} layers, {args.dtype}; batch {b}, "
        f"T = {t}; XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
  print(f"{'attention':>9} {'mode':>9} {'V':>6} | {'arguments':>9} {'outputs':>9} {'temp':>9} | {'peak GiB':>9}")
  for v in (int(x) for x in args.prefill_visual.split(",")):
    inputs = (jax.ShapeDtypeStruct((b, v, c.width), jnp.dtype(args.dtype)), jax.ShapeDtypeStruct((b, t), jnp.int32),
              jax.ShapeDtypeStruct((b, v), jnp.int32), jax.ShapeDtypeStruct((b, t), jnp.int32),
              jax.ShapeDtypeStruct((b, v), bool), jax.ShapeDtypeStruct((b, t), bool))
    for impl in args.attention_impl.split(","):
      for mode, cfg in (("self", base), ("composite", base.replace(attention="composite", visual_ffn=False))):
        model = EEMLLM(cfg.with_attention_impl(impl))
        fn = jax.jit(lambda p, *a, model=model: model.apply({"params": p}, *a, method=lambda m, *a: m.llm.prefill(*a)))
        m = fn.lower(params, *inputs).compile().memory_analysis()
        peak = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
        print(f"{impl:>9} {mode:>9} {v:>6} | {gib(m.argument_size_in_bytes)} {gib(m.output_size_in_bytes)} "
              f"{gib(m.temp_size_in_bytes)} | {gib(peak)}", flush=True)


if __name__ == "__main__":
  main()
