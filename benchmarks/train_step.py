"""Training-step time of EE-MLLM (composite) vs LLaVA (self) at the same shapes, in one process.

    python benchmarks/train_step.py                                   # demo preset, CPU
    python benchmarks/train_step.py --preset=llava-1.5-7b --llm_depth=8 --batch=8 \
        --text_len=512 --dtype=bfloat16 --param_dtype=bfloat16 --remat=full   # GPU, 7B shapes

Prints, per mode, the measured step time, the tokens per second (visual + text, and text
alone), the analytic training FLOPs (3x the forward of `ee_mllm_jax.flops`; with
`--trainable=projector/`, stage 1, the frozen tower forward only, the frozen LLM forward plus
the backward to its inputs, 2x), the achieved FLOP/s and, on a device with a known peak, the MFU; then
the measured self/composite time ratio beside the analytic FLOP ratio. `--llm_depth` /
`--vision_depth` keep a preset's layer shapes with fewer layers (a 7B-wide model whose
full depth plus AdamW state would not fit one GPU).
"""

import time

import jax
import numpy as np
from absl import app, flags

import ee_mllm_jax as eem
from common import images_then_text
from ee_mllm_jax import flops, sharding
from ee_mllm_jax.train.state import OptimConfig, create_sharded_state, make_init_fn, make_optimizer
from ee_mllm_jax.train.step import make_train_step

flags.DEFINE_string("preset", "demo", "ModelConfig preset.")
flags.DEFINE_integer("batch", 16, "Global batch size.")
flags.DEFINE_integer("text_len", 32, "Text tokens per row (T).")
flags.DEFINE_integer("num_images", 1, "Images per row.")
flags.DEFINE_integer("steps", 5, "Timed steps per mode (after two warm-up steps).")
flags.DEFINE_string("dtype", "float32", "Compute dtype.")
flags.DEFINE_string("param_dtype", "float32", "Parameter dtype.")
flags.DEFINE_enum("remat", "none", ["none", "full", "dots"], "Remat policy.")
flags.DEFINE_integer("llm_depth", 0, "Override the LLM depth (0: the preset's).")
flags.DEFINE_integer("vision_depth", 0, "Override the vision depth (0: the preset's).")
flags.DEFINE_string("trainable", ".*", "Trainable-parameter regex.")
flags.DEFINE_string("mesh", "1,-1,1", "data,fsdp,tensor")
FLAGS = flags.FLAGS


def make_batch(cfg, b, t, n_img):
  batch = images_then_text(cfg, batch=b, num_images=n_img, text_len=t)
  batch["labels"] = np.random.default_rng(1).integers(0, cfg.llm.vocab_size, (b, t)).astype(np.int32)
  return batch


def step_flops(cfg, b, t, n_img):
  """Analytic FLOPs of one step: 3x the forward (any other --trainable counts so too); when only the
  projector trains (stage 1) nothing computes the frozen weights' gradients: the tower runs forward
  only, the LLM forward and the backward to its inputs (2x), the projector 3x."""
  fwd = flops.forward_flops(cfg, batch=b, num_images=n_img, text_len=t)
  if FLAGS.trainable != "projector/":
    return 3 * fwd["total"]
  return fwd["vision"] + 3 * fwd["projector"] + 2 * (fwd["total"] - fwd["vision"] - fwd["projector"])


def time_mode(cfg, mesh, batch):
  model = eem.EEMLLM(cfg)
  tx, schedule = make_optimizer(OptimConfig(learning_rate=1e-5, total_steps=100, trainable=FLAGS.trainable))
  init, shardings, _ = create_sharded_state(make_init_fn(model, tx, FLAGS.trainable), mesh)
  step = jax.jit(make_train_step(model, tx, schedule, FLAGS.trainable),
                 in_shardings=(shardings, sharding.batch_sharding(mesh, (FLAGS.batch,))),
                 out_shardings=(shardings, None), donate_argnums=0)
  state = init()
  placed = sharding.shard_batch(batch, mesh)
  t0 = time.perf_counter()
  # Two warm-up steps: with bfloat16 parameters the first step's gradients come out in float32
  # (divided by the f32 token count), so the AdamW moments change dtype and the second compiles again.
  for _ in range(2):
    state, m = step(state, placed)
  jax.block_until_ready((state, m))
  compile_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  for _ in range(FLAGS.steps):
    state, m = step(state, placed)
  jax.block_until_ready((state, m))
  return (time.perf_counter() - t0) / FLAGS.steps, compile_s


def main(argv):
  del argv
  base = eem.ModelConfig.preset(FLAGS.preset, dtype=FLAGS.dtype, param_dtype=FLAGS.param_dtype, remat=FLAGS.remat)
  if FLAGS.llm_depth:
    base = base.replace(llm=base.llm.replace(depth=FLAGS.llm_depth))
  if FLAGS.vision_depth:
    base = base.replace(vision=base.vision.replace(depth=FLAGS.vision_depth,
                                                   feature_layer=min(base.vision.feature_layer, -1)))
  mesh = sharding.make_mesh([int(x) for x in FLAGS.mesh.split(",")])
  jax.set_mesh(mesh)
  batch = make_batch(base, FLAGS.batch, FLAGS.text_len, FLAGS.num_images)
  kind = jax.devices()[0].device_kind
  peak = flops.peak_per_device(kind)
  peak = peak * jax.device_count() if peak else None
  print(f"{FLAGS.preset} (llm depth {base.llm.depth}, vision depth {base.vision.depth}), batch {FLAGS.batch}, "
        f"{FLAGS.num_images}x{base.tokens_per_image} visual + {FLAGS.text_len} text tokens, {FLAGS.dtype} compute, "
        f"remat {FLAGS.remat}, {jax.device_count()} x {kind}, mesh {dict(mesh.shape)}, "
        f"params {FLAGS.param_dtype}, trainable {FLAGS.trainable!r}")
  text_tokens = FLAGS.batch * FLAGS.text_len
  tokens = text_tokens + FLAGS.batch * FLAGS.num_images * base.tokens_per_image
  results = {}
  for mode, visual_ffn in (("composite", False), ("self", True)):
    cfg = base.replace(attention=mode, visual_ffn=visual_ffn)
    step_s, compile_s = time_mode(cfg, mesh, batch)
    train_flops = step_flops(cfg, FLAGS.batch, FLAGS.text_len, FLAGS.num_images)
    results[mode] = (step_s, train_flops)
    print(f"  {mode:9s}: {1e3 * step_s:9.1f} ms/step  (compile {compile_s:5.1f} s)  "
          f"{tokens / step_s:9.0f} tokens/s ({text_tokens / step_s:.0f} text)  "
          f"{train_flops / 1e12:8.3f} TFLOP/step  {train_flops / step_s / 1e12:8.3f} TFLOP/s"
          + (f"  MFU {100 * train_flops / step_s / peak:5.1f}% (of {peak / 1e12:.0f} TFLOP/s bf16 peak)" if peak else ""))
  (tc, fc), (ts, fs) = results["composite"], results["self"]
  print(f"  self / composite: measured time {ts / tc:.2f}x, analytic FLOPs {fs / fc:.2f}x")


if __name__ == "__main__":
  app.run(main)
