"""Decode and end-to-end generation speed: self (LLaVA) vs composite (EE-MLLM) vs cross (Flamingo),
JAX beside transformers' `generate`, in one process.

Each row of a batch is V visual tokens (images first, already projected: the vision tower + projector
are skipped, since they cost the same in every mode and `prefill.py` times them) then a T-token
prompt, and greedy decoding of `--new-tokens` N tokens. JAX runs the package's generation path
without the tower: the decoder's own `prefill` (`LLM.prefill`, what `generate.prefill` calls after the
tower; cross mode: the resampler and the blocks' media keys/values first, as `EEMLLM.prefill`) into a
cache of V + T + N - 1 slots (cross: T + N - 1, the media keys/values ride along), then
`ee_mllm_jax.generate.decode`, the `lax.while_loop` that `generate` runs, unchanged.

  TTFT      prefill + the first token (its argmax), ms
  ms/token  one decode step of the whole batch: decode time / (N - 1)
  tokens/s  batch * (N - 1) / decode time

transformers: `LlamaForCausalLM.generate(inputs_embeds=[x_v; embed(prompt)], do_sample=False)` (sdpa)
on the same weights (the JAX parameters written through the package's HF export,
`convert.export.planned_tensors`, into the torch model), N tokens (min_new_tokens=N); TTFT and decode
time from one call, stamped by a streamer as each token is handed over (`time_torch`). The PyTorch
composite port (`ee_mllm_jax.torch.EEMLLMForConditionalGeneration`, EE-MLLM) runs its own `generate`
(LLaVA's) on the same weights, from image placeholder ids with x_v handed over as the projected image
features (`mm_encoder_outputs`: its tower is never run); its prefill is `composite_decoder`, its
decode steps transformers' decoder over the cache. Greedy tokens of each torch row are compared with
the JAX row of the same mode ("tokens agree"). Compare modes within a framework: across frameworks
the CPU kernels differ (XLA's float32 GEMM is ~2.2x torch's, ENVIRONMENT.md; torch's batch-1 step
is the faster one here).

  python benchmarks/decode.py                  # width-scaled LLaVA-7B shape, V 576 2304, batch 1 8 32
  python benchmarks/decode.py --visual 576 --batch 1 8 --new-tokens 16 --repeats 3 --threads 2  # ~3-5 min, 2 cores
  python benchmarks/decode.py --preset llava-1.5-7b --dtype bfloat16 --skip-torch   # on a GPU

The default sweep is for a GPU or a many-core host: on 2 CPU cores one batch-32, V=2304 prefill takes
minutes, and every row runs its prefill and decode 2 + repeats times; use the second line there.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

import ee_mllm_jax as eem
from common import median_ms, scaled_llava
from ee_mllm_jax.generate import decode as decode_loop  # the package attribute `generate` is the function
from ee_mllm_jax import params as params_lib
from ee_mllm_jax.params import overlay

MODES = ("self", "composite", "cross")


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--preset", default=None, help="full-size preset (e.g. llava-1.5-7b); default: width-scaled")
  p.add_argument("--width", type=int, default=1024, help="scaled LLM width (LLaVA-7B: 4096)")
  p.add_argument("--layers", type=int, default=4, help="scaled LLM depth (LLaVA-7B: 32)")
  p.add_argument("--visual", type=int, nargs="+", default=[576, 2304], help="visual token counts V")
  p.add_argument("--text", type=int, default=32, help="prompt tokens T")
  p.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32], help="batch sizes")
  p.add_argument("--new-tokens", type=int, default=32, help="tokens generated per row, N (>= 2)")
  p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
  p.add_argument("--dtype", default="float32")
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
  p.add_argument("--skip-torch", action="store_true", help="time JAX only")
  p.add_argument("--cross-every", type=int, default=4, help="cross mode: a block before every k-th layer")
  p.add_argument("--resampler-latents", type=int, default=64, help="cross mode: latents per image (0: off)")
  p.add_argument("--resampler-depth", type=int, default=6)
  args = p.parse_args(argv)
  if args.new_tokens < 2:
    p.error("--new-tokens must be >= 2 (one prefill token, then decode steps)")
  return args


def mode_configs(args) -> dict[str, eem.ModelConfig]:
  cfg = eem.ModelConfig.preset(args.preset) if args.preset else scaled_llava(args.width, args.layers)
  cfg = cfg.replace(attention="self", visual_ffn=True, dtype=args.dtype, param_dtype=args.dtype)
  cross = cfg.replace(attention="cross", visual_ffn=False, cross_every=min(args.cross_every, cfg.llm.depth),
                      resampler_latents=args.resampler_latents, resampler_depth=args.resampler_depth)
  return {"self": cfg, "composite": cfg.replace(attention="composite", visual_ffn=False), "cross": cross}


def jax_prefill(cfg: eem.ModelConfig, cache_size: int):
  """jit(params, x_v, ids, pos_v, pos_t, valid_v, valid_t) -> (first token, logits, cache): the
  decoder's prefill over projected visual tokens (cross mode: media through the resampler)."""
  def decoder(m, x_v, ids, pos_v, pos_t, valid_v, valid_t):
    if not m.cfg.mode.visual_in_decoder:
      n_img = -(-x_v.shape[1] // m.cfg.tokens_per_image)
      x_v, pos_v, valid_v = m.media(x_v, valid_v[:, ::m.cfg.tokens_per_image][:, :n_img], pos_v)
    return m.llm.prefill(x_v, ids, pos_v, pos_t, valid_v, valid_t, cache_size)

  def run(params, *inputs):
    logits, cache = eem.EEMLLM(cfg).apply({"params": params}, *inputs, method=decoder)
    return jnp.argmax(logits, axis=-1).astype(jnp.int32), logits, cache
  return jax.jit(run)


def random_params(cfg: eem.ModelConfig, seed: int) -> dict:
  """Random parameters of the model's shapes (`params.abstract_params`): norm scales 1, biases 0,
  everything else N(0, 0.02), drawn by numpy leaf by leaf. Not `EEMLLM.init`, which compiles the
  whole model (tower included: ~20 s on 2 cores); the values do not change the speed, and both
  frameworks read the same ones."""
  rng = np.random.default_rng(seed)
  out = {}
  for path, leaf in sorted(params_lib.flatten(params_lib.abstract_params(cfg)).items()):
    name = path.rsplit("/", 1)[-1]
    if name in ("scale", "bias"):
      value = np.full(leaf.shape, float(name == "scale"), np.float32)
    else:
      value = 0.02 * rng.standard_normal(leaf.shape, np.float32)
    out[path] = jnp.asarray(value, leaf.dtype)
  return params_lib.unflatten(out)


def init_params(modes: dict[str, eem.ModelConfig]) -> dict[str, dict]:
  """One random parameter set for self and composite; cross adds its blocks and resampler."""
  params = random_params(modes["self"], 0)
  out = {"self": params, "composite": params}
  if "cross" in modes:
    out["cross"] = overlay(random_params(modes["cross"], 1), params)[0]
  return out


def time_jax(cfg, params, inputs, *, new_tokens: int, repeats: int):
  """-> (TTFT ms, decode ms for N - 1 steps, tokens (B, N), MB a decode step reads at least: the
  decoder's weights but the embedding table, and the whole cache, which every step attends over)."""
  v, t = inputs[0].shape[1], inputs[1].shape[1]
  size = (t if not cfg.mode.visual_in_decoder else v + t) + new_tokens - 1
  prefill = jax_prefill(cfg, size)
  ttft = median_ms(prefill, params, *inputs, repeats=repeats)
  _, logits, cache = jax.block_until_ready(prefill(params, *inputs))
  next_pos = jnp.asarray(inputs[3][:, -1] + 1)
  run = lambda: decode_loop(params, cfg, logits, cache, next_pos, max_new_tokens=new_tokens).tokens
  decode = median_ms(run, repeats=repeats)
  weights = sum(x.nbytes for path, x in params_lib.flatten(params["llm"]).items() if not path.startswith("embed_"))
  kv = sum(x.nbytes for x in (cache.k, cache.v, cache.cross_k, cache.cross_v) if x is not None)
  return ttft, decode, np.asarray(run()), (weights + kv) / 1e6


# ----------------------------------------------------------------------------- transformers


def torch_model(cfg: eem.ModelConfig, params):
  """transformers' LlamaForCausalLM holding the JAX LLM's weights, through the package's HF export."""
  import torch  # pylint: disable=g-import-not-at-top
  from ee_mllm_jax.convert.export import planned_tensors  # pylint: disable=g-import-not-at-top
  from common import torch_llm  # pylint: disable=g-import-not-at-top

  model = torch_llm(cfg.replace(dtype="float32", param_dtype="float32"))
  root = "language_model."  # the LLM's root in a LLaVA checkpoint (convert.names.LLAVA_ROOTS)
  state = {name[len(root):]: torch.from_numpy(np.array(produce(), np.float32))
           for name, _, _, produce in planned_tensors(cfg, params) if name.startswith(root)}
  model.load_state_dict(state, strict=True)
  return model.to(getattr(torch, cfg.dtype))


def torch_composite_model(cfg: eem.ModelConfig, stock):
  """The PyTorch port (`ee_mllm_jax.torch.EEMLLMForConditionalGeneration`) in composite mode (EE-MLLM,
  no visual FFN) holding `stock`'s LLM weights. Its tower and projector are never run (`generate`
  receives projected features as `mm_encoder_outputs`), so they are a minimal random CLIP."""
  import transformers  # pylint: disable=g-import-not-at-top
  from ee_mllm_jax.torch import EEMLLMForConditionalGeneration  # pylint: disable=g-import-not-at-top

  tower = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=1, image_size=28, patch_size=14)
  config = transformers.LlavaConfig(vision_config=tower, text_config=stock.config.to_dict(),
                                    image_token_id=image_token_id(cfg))
  model = EEMLLMForConditionalGeneration(config, attention="composite", visual_ffn=False).eval()
  model.model.language_model.load_state_dict(stock.model.state_dict(), strict=True)
  model.lm_head.load_state_dict(stock.lm_head.state_dict(), strict=True)
  return model.to(stock.lm_head.weight.dtype)


def image_token_id(cfg) -> int:
  """The composite port's image placeholder: the last id, which no prompt holds (`inputs_for`)."""
  return cfg.llm.vocab_size - 1


def time_torch(model, x_v, ids, *, new_tokens: int, repeats: int, composite: bool = False):
  """-> (TTFT ms, decode ms for N - 1 steps, tokens (B, N)) of transformers' greedy `generate`: stock
  from inputs_embeds [x_v; embed(ids)]; the composite port from image placeholders + ids, with x_v as
  the image features (`mm_encoder_outputs`, used by the prefill only). Both times come from one call:
  a streamer stamps each new token as `generate` hands it over (after `.cpu()`, so the step is done),
  TTFT = start to the first token, decode = first token to the end; medians after one warmup call.
  (Timing max_new_tokens=1 apart and subtracting it from a whole run left the difference of two noisy
  medians: at batch 1 it put the same decoder's steps at 13 and 26 ms.)"""
  import torch  # pylint: disable=g-import-not-at-top
  from transformers.generation.streamers import BaseStreamer  # pylint: disable=g-import-not-at-top
  from transformers.modeling_outputs import BaseModelOutputWithPooling  # pylint: disable=g-import-not-at-top

  class Clock(BaseStreamer):
    def __init__(self):
      self.times = []

    def put(self, value):
      self.times.append(time.perf_counter())

    def end(self):
      pass

  dtype = model.lm_head.weight.dtype
  features = torch.from_numpy(np.array(x_v, np.float32)).to(dtype)
  ids = torch.from_numpy(np.asarray(ids, np.int64))
  b, v = features.shape[:2]
  n = new_tokens
  with torch.inference_mode():
    if composite:
      placeholders = torch.full((b, v), model.config.image_token_id, dtype=torch.long)
      prompt = dict(input_ids=torch.cat([placeholders, ids], dim=1))
    else:
      prompt = dict(inputs_embeds=torch.cat([features, model.get_input_embeddings()(ids)], dim=1))
    mask = torch.ones((b, v + ids.shape[1]), dtype=torch.long)

    def run():
      extra = dict(mm_encoder_outputs={"image": BaseModelOutputWithPooling(pooler_output=[features])}) \
          if composite else {}
      clock = Clock()
      t0 = time.perf_counter()
      out = model.generate(**prompt, **extra, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, pad_token_id=0, eos_token_id=None, streamer=clock)
      t1 = time.perf_counter()
      first = clock.times[-n]  # the prompt may be put first; the last n puts are the new tokens
      return out[:, -n:].numpy(), (first - t0) * 1e3, (t1 - first) * 1e3

    run()
    runs = [run() for _ in range(repeats)]
  return float(np.median([r[1] for r in runs])), float(np.median([r[2] for r in runs])), runs[-1][0], None


# ----------------------------------------------------------------------------- main


def inputs_for(cfg, *, batch: int, v: int, t: int, seed: int = 0):
  """Projected visual tokens at positions [0, V), then a random T-token prompt (as prefill.py)."""
  rng = np.random.default_rng(seed)
  c = cfg.llm
  x_v = jnp.asarray(rng.standard_normal((batch, v, c.width)), jnp.dtype(cfg.dtype))
  ids = rng.integers(0, image_token_id(cfg), (batch, t)).astype(np.int32)  # not the port's placeholder
  pos_v = np.broadcast_to(np.arange(v, dtype=np.int32), (batch, v))
  pos_t = np.broadcast_to(np.arange(v, v + t, dtype=np.int32), (batch, t))
  return x_v, ids, pos_v, pos_t, np.ones((batch, v), bool), np.ones((batch, t), bool)


def run(args) -> dict:
  """-> {"rows": [dict(mode, framework, V, batch, ttft_ms, ms_per_token, tokens_per_s)],
  "agree": {(mode, V, batch): (agreeing tokens, B * N)}, "tokens": {(mode, framework, V, batch): (B, N)}}."""
  modes = {m: c for m, c in mode_configs(args).items() if m in args.modes}
  cfg = next(iter(modes.values()))
  c = cfg.llm
  print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}; LLM width {c.width}, depth {c.depth}, "
        f"heads {c.num_heads}/{c.num_kv_heads}, mlp {c.mlp_dim}; T {args.text}, N {args.new_tokens}; "
        f"dtype {args.dtype}; median of {args.repeats}")
  params = init_params(modes | {"self": mode_configs(args)["self"]})
  torch_models = {}  # mode -> model: stock LLaMA (self), the PyTorch port (composite); both on the same weights
  if not args.skip_torch and modes.keys() & {"self", "composite"}:
    import torch  # pylint: disable=g-import-not-at-top
    if args.threads:
      torch.set_num_threads(args.threads)
    stock = torch_model(mode_configs(args)["self"], params["self"])
    torch_models = {"self": stock, "composite": torch_composite_model(cfg, stock)}
    torch_models = {m: model for m, model in torch_models.items() if m in modes}
    print(f"torch {torch.__version__} ({torch.get_num_threads()} threads)")
  steps = args.new_tokens - 1
  out = {"rows": [], "agree": {}, "tokens": {}}
  for v in args.visual:
    for b in args.batch:
      inputs = inputs_for(cfg, batch=b, v=v, t=args.text)
      # torch first: in one run, torch's first row after XLA's measured 4x slower (TTFT) than in a fresh process
      timed = {(m, "torch"): (lambda m=m, model=model: time_torch(
          model, inputs[0], inputs[1], new_tokens=args.new_tokens, repeats=args.repeats, composite=m == "composite"))
               for m, model in torch_models.items()}
      timed |= {(m, "jax"): (lambda m=m: time_jax(modes[m], params[m], inputs, new_tokens=args.new_tokens,
                                                   repeats=args.repeats)) for m in modes}
      for (mode, framework), fn in timed.items():
        t0 = time.perf_counter()
        ttft, decode, tokens, read_mb = fn()
        out["tokens"][mode, framework, v, b] = tokens
        row = dict(mode=mode, framework=framework, V=v, batch=b, ttft_ms=ttft, ms_per_token=decode / steps,
                   tokens_per_s=b * steps / decode * 1e3, read_mb=read_mb)
        out["rows"].append(row)
        print(f"  ... {mode} {framework} V={v} B={b} done in {time.perf_counter() - t0:.0f} s", flush=True)
      for m in torch_models:
        same = out["tokens"][m, "jax", v, b] == out["tokens"][m, "torch", v, b]
        out["agree"][m, v, b] = (int(np.sum(np.cumprod(same, axis=1))), same.size)  # per row: the leading run
  return out


def report(out, args):
  print(f"\n{'mode':>9} {'framework':>9} {'V':>6} {'batch':>5} {'TTFT ms':>10} {'ms/token':>9} {'tokens/s':>9}")
  for r in out["rows"]:
    print(f"{r['mode']:>9} {r['framework']:>9} {r['V']:>6} {r['batch']:>5} {r['ttft_ms']:>10.1f} "
          f"{r['ms_per_token']:>9.2f} {r['tokens_per_s']:>9.1f}")
  for (m, v, b), (n, total) in out["agree"].items():
    print(f"tokens agree ({m}: JAX vs transformers, V={v}, batch {b}): {'yes' if n == total else 'no'} "
          f"({n} of {total} tokens before the first difference in each row)")
  by = {(r["mode"], r["framework"], r["V"], r["batch"]): r for r in out["rows"]}
  print("\nDecode step and TTFT relative to self mode (same framework, V, batch):")
  print(f"{'framework':>9} {'V':>6} {'batch':>5} {'mode':>9} {'step ratio':>10} {'TTFT ratio':>10} "
        f"{'MB/step':>8} {'MB ratio':>8}")
  steps = {}
  for (mode, fw, v, b), r in by.items():
    base = by.get(("self", fw, v, b))
    if mode != "self" and base:
      steps.setdefault((fw, mode), []).append(r["ms_per_token"] / base["ms_per_token"])
      mb, base_mb = by[mode, "jax", v, b]["read_mb"], by["self", "jax", v, b]["read_mb"]
      print(f"{fw:>9} {v:>6} {b:>5} {mode:>9} {steps[fw, mode][-1]:>10.2f} {r['ttft_ms'] / base['ttft_ms']:>10.2f} "
            f"{mb:>8.0f} {mb / base_mb:>8.2f}")
  for (fw, mode), ratios in steps.items():
    print(f"{fw} {mode}/self decode step: median {np.median(ratios):.2f} over {len(ratios)} (V, batch)"
          f" (range {min(ratios):.2f}-{max(ratios):.2f})")
  print("""
What a decode step costs. Self and composite modes cache every visual and text token's keys/values
in the prefill, and a decode step is the same computation in both: one text query per row through
every layer against V + T + t cached keys (t: tokens so far), the FFN and the LM head on that one
token (the PyTorch port's steps are transformers' own decoder). So their step ratio should be ~1
(MB ratio 1.00: the same weights and cache are read); composite differs in the prefill only (no
visual queries, no V x V scores, no visual FFN: a smaller TTFT, more so at large V). Cross mode's
self-attention cache holds text only (T + t slots); its gated blocks read their media keys/values
(I images x M latents) from the cache and add their own attention and FFN weights, so a step reads
less once the batch's V-long caches outweigh those weights (MB ratio < 1): its decode does not grow
with V, while self/composite steps grow with B x (V + T) through the cache reads.
""")


def main(argv=None):
  args = parse_args(argv)
  out = run(args)
  report(out, args)
  return out


if __name__ == "__main__":
  main()
