"""Device memory of one training step, compiled ahead of time: nothing is allocated, so the 7B
presets can be measured on a CPU.

    python benchmarks/memory.py                                    # LLaVA-1.5-7B stage 1, remat none vs full
    python benchmarks/memory.py --config configs/llava15_7b_stage2.py --remat full
    python benchmarks/memory.py --no_licm                          # closer to what a GPU compiles
    python benchmarks/memory.py --prefill_visual 2880,11520        # prefill, xla vs chunked attention

The model, the trainable parameters and the optimizer come from the experiment config (the same
translation train.py uses); the step is compiled for one device holding `--batch` rows of
`--text_len` text tokens and one image each (LLaVA-1.5 stage 1: 256 rows over 8 GPUs = 32 per
device; LCS-558K captions fit the 128-token bucket). XLA's `memory_analysis()` reports the
arguments (the train state and the batch), the outputs (the new state, which aliases the donated
one) and the temporaries (activations kept for the backward pass, and workspace).

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
import os
import subprocess
import sys


def parse_args():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", default="configs/llava15_7b_stage1.py", help="experiment config[:arg]")
  p.add_argument("--remat", default="none,full", help="remat policies to compare")
  p.add_argument("--batch", type=int, default=32, help="rows per device")
  p.add_argument("--text_len", type=int, default=128)
  p.add_argument("--no_licm", action="store_true", help="disable while-loop-invariant code motion")
  p.add_argument("--prefill_visual", default="", help="comma-separated V: measure prefill instead of a train step")
  p.add_argument("--attention_impl", default="xla,blocked,chunked", help="attention implementations to compare")
  p.add_argument("--dtype", default="bfloat16", help="compute and parameter dtype (prefill table)")
  return p.parse_args()


def gib(n: float) -> str:
  return f"{n / 2 ** 30:8.2f}"


def main():
  args = parse_args()
  licm_flag = "--xla_disable_hlo_passes=while-loop-invariant-code-motion"
  if args.no_licm and licm_flag not in os.environ.get("XLA_FLAGS", ""):
    env = dict(os.environ, XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " " + licm_flag).strip())
    sys.exit(subprocess.call([sys.executable] + sys.argv, env=env))

  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # configs/ imports configs.*
  import jax  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top

  from ee_mllm_jax import batch as batch_lib  # pylint: disable=g-import-not-at-top
  from ee_mllm_jax import experiment, sharding  # pylint: disable=g-import-not-at-top
  from ee_mllm_jax.models import EEMLLM  # pylint: disable=g-import-not-at-top
  from ee_mllm_jax.train.state import create_sharded_state, make_init_fn, make_optimizer, split_params  # pylint: disable=g-import-not-at-top
  from ee_mllm_jax.train.step import make_train_step  # pylint: disable=g-import-not-at-top

  config_flags.DEFINE_config_file("config")
  flags.FLAGS([sys.argv[0], f"--config={args.config}"])
  config = flags.FLAGS.config
  base = experiment.model_config(config)
  if args.prefill_visual:
    return prefill_table(args, base)
  optim = experiment.optim_config(config, total_steps=1000)
  mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  jax.set_mesh(mesh)
  print(f"{args.config}: {config.model.preset}, attention {base.attention}, compute {base.dtype}, params "
        f"{base.param_dtype}, trainable {optim.trainable!r}; one device, batch {args.batch} x (1 image of "
        f"{base.tokens_per_image} tokens + {args.text_len} text tokens); XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
  print(f"{'attention':>9} {'remat':>6} | {'arguments':>9} {'outputs':>9} {'aliased':>9} {'temp':>9} | {'peak GiB':>9}")
  for impl in args.attention_impl.split(","):
    for remat in args.remat.split(","):
      cfg = base.replace(remat=remat).with_attention_impl(impl)
      model = EEMLLM(cfg)
      tx, schedule = make_optimizer(optim)
      _, shardings, abstract = create_sharded_state(make_init_fn(model, tx, optim.trainable), mesh)
      step = jax.jit(make_train_step(model, tx, schedule, optim.trainable),
                     in_shardings=(shardings, sharding.batch_sharding(mesh, (args.batch,))),
                     out_shardings=(shardings, None), donate_argnums=0)
      batch = batch_lib.abstract(cfg, batch_size=args.batch, text_len=args.text_len, labels=True)
      m = step.lower(abstract, batch).compile().memory_analysis()
      peak = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
      print(f"{impl:>9} {remat:>6} | {gib(m.argument_size_in_bytes)} {gib(m.output_size_in_bytes)} "
            f"{gib(m.alias_size_in_bytes)} {gib(m.temp_size_in_bytes)} | {gib(peak)}", flush=True)
  n_train = sum(x.size for x in jax.tree.leaves(split_params(abstract["params"], optim.trainable)[0]))
  print(f"({n_train / 1e6:.1f}M trainable parameters; peak = arguments + outputs - aliased + temp)")



def prefill_table(args, base):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  from ee_mllm_jax.models import EEMLLM  # pylint: disable=g-import-not-at-top
  from ee_mllm_jax.params import abstract_params  # pylint: disable=g-import-not-at-top

  base = base.replace(attention="self", visual_ffn=True, dtype=args.dtype, param_dtype=args.dtype)
  params = abstract_params(base)
  c, b, t = base.llm, args.batch, args.text_len
  print(f"prefill, {args.config} preset {base.llm.width}-wide x {c.depth} layers, {args.dtype}; batch {b}, "
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
