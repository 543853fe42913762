"""Checkpoint import and export at ~1B parameters: time, and peak host RSS against the bytes on disk.

    python benchmarks/convert.py [--width 2048 --depth 16] [--dir /tmp/convert_bench]

Writes a random LlamaForCausalLM-layout checkpoint (config.json + sharded safetensors, as
transformers lays it out) once per dtype, float32 and bfloat16, with numpy (building it in
torch would need the whole model in memory). Each import then runs in a fresh subprocess
(`load_hf_llm`, kept in the checkpoint's dtype, each parameter placed on the device as it is
built) and reports ru_maxrss, the resident set before loading (Python + jax), and the ratio
of the growth to the bytes on disk (goal <= ~1.3x). Export time is `export_hf` of the loaded
LLM behind a small CLIP tower, written sharded.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import ml_dtypes
import numpy as np

from ee_mllm_jax.config import LLMConfig, ModelConfig
from ee_mllm_jax.mode import Self
from ee_mllm_jax.convert import hf_config, names, safetensors_io

SHARD_BYTES = 1 << 30


def write_random_llm(path: str, llm: LLMConfig, dtype) -> int:
  """A random LlamaForCausalLM checkpoint at `path`; returns the bytes of its tensors."""
  os.makedirs(path, exist_ok=True)
  rng = np.random.default_rng(0)
  planned = []
  for _, (name, hook) in names.llm_map(llm).items():
    shape = _hf_shape(llm, name)
    for i in range(llm.depth) if "{i}" in name else [None]:
      planned.append((name.format(i=i) if i is not None else name, shape, np.dtype(dtype),
                      lambda shape=shape: (0.02 * rng.standard_normal(shape, np.float32)).astype(dtype)))
  safetensors_io.write_checkpoint(path, planned, max_shard_bytes=SHARD_BYTES)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(hf_config.llm_config_to_hf(llm), f)
  return sum(int(np.prod(s)) * np.dtype(d).itemsize for _, s, d, _ in planned)


def _hf_shape(c: LLMConfig, name: str) -> tuple[int, ...]:
  q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
  leaf = name.split("model.layers.{i}.")[-1]
  return {"model.embed_tokens.weight": (c.vocab_size, c.width), "lm_head.weight": (c.vocab_size, c.width),
          "model.norm.weight": (c.width,), "input_layernorm.weight": (c.width,),
          "post_attention_layernorm.weight": (c.width,), "self_attn.q_proj.weight": (q, c.width),
          "self_attn.k_proj.weight": (kv, c.width), "self_attn.v_proj.weight": (kv, c.width),
          "self_attn.o_proj.weight": (c.width, q), "mlp.gate_proj.weight": (c.mlp_dim, c.width),
          "mlp.up_proj.weight": (c.mlp_dim, c.width), "mlp.down_proj.weight": (c.width, c.mlp_dim)}[leaf]


def load_child(path: str, dtype: str, export_dir: str):
  """Runs in the fresh subprocess: import (timed, RSS), then export (timed)."""
  import resource  # pylint: disable=g-import-not-at-top

  import jax  # pylint: disable=g-import-not-at-top

  from ee_mllm_jax.convert import hf  # pylint: disable=g-import-not-at-top
  from ee_mllm_jax.convert.export import export_hf  # pylint: disable=g-import-not-at-top

  jax.device_put(np.zeros(1)).block_until_ready()  # backend up before the baseline
  with open("/proc/self/statm") as f:  # resident pages now (ru_maxrss would include import-time transients)
    before = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
  kept = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float32
  t0 = time.perf_counter()
  llm, params = hf.load_hf_llm(path, dtype=kept, place=lambda _, v: jax.device_put(v))
  jax.block_until_ready(params)
  load_s = time.perf_counter() - t0
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  n = sum(x.size for x in jax.tree.leaves(params))
  result = dict(load_s=load_s, peak_rss=peak, baseline_rss=before, params=n)
  if export_dir:
    import tokenizers  # pylint: disable=g-import-not-at-top
    from ee_mllm_jax import params as params_lib  # pylint: disable=g-import-not-at-top
    tower = ModelConfig.preset("tiny").vision.replace(feature_layer=-2)
    cfg = ModelConfig(vision=tower, llm=llm, mode=Self(), param_dtype=dtype)
    abstract = params_lib.abstract_params(cfg)  # shapes only; the tower and projector are zeros
    rest = {k: jax.tree.map(lambda s: np.zeros(s.shape, kept), abstract[k]) for k in ("vision", "projector")}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({"<unk>": 0, "<s>": 1, "</s>": 2, "<image>": 3},
                                                           unk_token="<unk>"))
    t0 = time.perf_counter()
    export_hf(cfg, {**rest, "llm": params}, export_dir, tokenizer_json=tok.to_str(), template="vicuna_v1", max_shard_bytes=SHARD_BYTES)
    result["export_s"] = time.perf_counter() - t0
  print("RESULT " + json.dumps(result))


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--width", type=int, default=2048)
  parser.add_argument("--depth", type=int, default=16)
  parser.add_argument("--dir", default="/tmp/convert_bench")
  parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    return load_child(*args.child)
  llm = LLMConfig(vocab_size=32000, width=args.width, depth=args.depth, num_heads=args.width // 128,
                  num_kv_heads=args.width // 128, head_dim=128, mlp_dim=round(args.width * 11008 / 4096))
  print(f"LLaMA layout, width {llm.width}, depth {llm.depth}, vocab {llm.vocab_size}; shards of "
        f"{SHARD_BYTES >> 20} MiB")
  print(f"{'dtype':>9} {'params':>8} {'on disk':>9} {'write s':>8} {'load s':>7} {'peak RSS':>9} "
        f"{'base RSS':>9} {'(peak-base)/disk':>17} {'peak/disk':>9} {'export s':>9}")
  for dtype in ("float32", "bfloat16"):
    path = os.path.join(args.dir, dtype)
    t0 = time.perf_counter()
    disk = write_random_llm(path, llm, ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float32)
    write_s = time.perf_counter() - t0
    out = subprocess.run([sys.executable, __file__, "--child", path, dtype, path + "_export"], check=True,
                         capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    r = json.loads(next(line for line in out.stdout.splitlines() if line.startswith("RESULT "))[7:])
    gib = 1 << 30
    print(f"{dtype:>9} {r['params'] / 1e9:7.2f}B {disk / gib:8.2f}G {write_s:8.1f} {r['load_s']:7.1f} "
          f"{r['peak_rss'] / gib:8.2f}G {r['baseline_rss'] / gib:8.2f}G "
          f"{(r['peak_rss'] - r['baseline_rss']) / disk:17.2f} {r['peak_rss'] / disk:9.2f} {r['export_s']:9.1f}")


if __name__ == "__main__":
  main()
