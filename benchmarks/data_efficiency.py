"""The paper's comparative claims as one rerunnable experiment: data efficiency of the three modes,
EE-MLLM-F along the layer schedule, and the speed table. Writes docs/results.md with its plots.

    python benchmarks/data_efficiency.py                 # the default: about an hour on 2 CPU cores
    python benchmarks/data_efficiency.py --scale tiny    # the test suite's minutes-long version
    python benchmarks/data_efficiency.py --scale large --preset llava-1.5-7b   # on a GPU: 4x the data, a
                                                    # bigger model, and the full-size 7B speed rows

What it does, in order (every step is cached under --work; a rerun skips what is done):

1. **Data.** One synthetic visual-QA set (`ee_mllm_jax.data.synthetic`, one tokenizer) whose
   train records are split in two disjoint pools: the experiment pool, of which the training
   sets are nested prefixes (--sizes), and the pretraining pool.
2. **Pretrained parts**, the same for every mode:
   * the LLM: a decoder trained from scratch, as a causal LM, on the text of the pretraining
     pool's conversations with the images removed (it learns the template, the words and the
     answer prior, and cannot know what any image shows);
   * the vision tower: trained from scratch on labelled synthetic scenes drawn as the dataset
     draws its objects (`synthetic.labelled_scene`; no question, no text): linear read-outs of
     each visual token's colour and shape and of each image's counts, thrown away after (the
     stand-in for CLIP's pretraining; no decoder, so no mode is favoured).
   Saved together as one Orbax parameter tree, the start of every stage 1.
3. **Alignment**, per mode (LLaVA self, EE-MLLM composite, Flamingo cross) and training-set size,
   with the same two-stage recipe and the same steps per sample (`train.py`'s trainer):
   stage 1 trains the connector (the projector; Flamingo: projector, cross blocks, resampler),
   stage 2 also the LLM. The tower stays frozen, as in LLaVA.
4. **Scores** with eval.py's readers, runner and metrics on the synthetic benchmark files
   (TextVQA, DocVQA, MMBench with CircularEval, SEED-Bench) and on the val set's open
   questions (colour, shape, count, position) as a TextVQA-format file.
5. **EE-MLLM-F**: each LLaVA-mode model evaluated in composite mode with and without the visual
   FFN, and, for the largest size, along the layer schedule (`composite_from_layer` = 0..depth).
6. **Speed**: prefill time and analytic FLOPs of the three modes at 336 / 448 / 672 px (V = 576 /
   1024 / 2304) at the width-scaled LLaVA-1.5-7B shape (benchmarks/common.py), and with
   --preset at that preset's real shape (a GPU run).
7. **docs/results.md**, `results.json` and the PNG plots, with the command, machine and wall time.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import platform
import shlex
import sys
import time

import flax.linen as nn
import jax
import ml_collections
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchmarks/common.py
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # configs/, the repo

import ee_mllm_jax as eem  # noqa: E402
from common import images_then_text, median_ms, scaled_llava  # noqa: E402
from configs import demo  # noqa: E402
from ee_mllm_jax import batch as batch_lib  # noqa: E402
from ee_mllm_jax import data as data_lib  # noqa: E402
from ee_mllm_jax import flops as flops_lib  # noqa: E402
from ee_mllm_jax import loading  # noqa: E402
from ee_mllm_jax import params as params_lib  # noqa: E402
from ee_mllm_jax import sharding  # noqa: E402
from ee_mllm_jax.evaluation import circular, readers  # noqa: E402
from ee_mllm_jax.evaluation import model as model_lib  # noqa: E402
from ee_mllm_jax.evaluation import prompts as prompts_lib  # noqa: E402
from ee_mllm_jax.evaluation import runner as runner_lib  # noqa: E402
from ee_mllm_jax.generate import prefill, sample_token  # noqa: E402
from ee_mllm_jax.mode import Composite, Cross, Self  # noqa: E402
from ee_mllm_jax.train import loop as loop_lib  # noqa: E402
from ee_mllm_jax.train.state import split_params  # noqa: E402

# The three modes, as ModelConfig switches of one model. Flamingo: a gated cross-attention block
# before every second layer and a perceiver resampler (its ratio of latents to visual tokens, 1/4,
# is Flamingo-7B's 64 of 256).
MODES = {"llava": Self(), "ee-mllm": Composite(visual_ffn=False), "flamingo": Cross(every=2, resampler_depth=2)}
MODE_LABELS = {key: f"{m.paper} ({m.name})" for key, m in MODES.items()}  # "LLaVA (self)", ...
# Stage 1 trains the connector, stage 2 also the LLM (regexes over parameter paths, re.match).
STAGE1 = {"llava": r"projector/", "ee-mllm": r"projector/", "flamingo": r"(projector|resampler|llm/cross)/"}
STAGE2 = r"(projector|resampler|llm)/"
# The training mix: the four open types, and the benchmark types (MMBench / SEED / TextVQA / DocVQA).
MIX = {"color": 1.0, "shape": 1.0, "count": 1.0, "position": 1.0, "choice_attribute": 1.0, "choice_spatial": 1.0,
       "text": 0.5, "doc": 0.5}
OPEN_TYPES = ("color", "shape", "count", "position")
# (name in tables, eval.py benchmark, file under the dataset, headline metric)
BENCHMARKS = (("open", "textvqa", "open_val.json", "accuracy"),
              ("MMBench", "mmbench", "benchmarks/mmbench_dev.tsv", "circular_accuracy"),
              ("SEED", "seedbench", "benchmarks/seed_bench.json", "accuracy"),
              ("TextVQA", "textvqa", "benchmarks/textvqa_val.json", "accuracy"),
              ("DocVQA", "docvqa", "benchmarks/docvqa_val.json", "anls"))
# Second readings shown beside the headline ones (not in the mean): per-row MMBench accuracy (a
# guesser's CircularEval is ~0 at any size) and SEED ranked by the options' likelihood.
EXTRA_METRICS = (("MMBench rows", "MMBench", "row_accuracy"), ("SEED lik.", "SEED", "likelihood_accuracy"))


@dataclasses.dataclass(frozen=True)
class Scale:
  """Everything that sets the experiment's size."""

  sizes: tuple[int, ...]  # training-set sizes (nested prefixes of the experiment pool)
  pretrain: int  # pretraining-pool records
  val: int
  image_size: int
  patch_size: int
  vision: dict  # VisionConfig fields
  llm: dict  # LLMConfig fields (vocab_size: the tokenizer's)
  resampler_latents: int
  vocab: int  # synthetic tokenizer size
  batch: int
  buckets: tuple[int, ...]  # text-length buckets (each one more compile per run)
  stage1_epochs: float
  stage2_epochs: float
  stage1_lr: float
  stage2_lr: float
  pretrain_epochs: float
  pretrain_lr: float
  tower_images: int
  tower_steps: int
  seeds: tuple[int, ...]  # seeds of every mode at `spread_size` (the first is the main run's)
  spread_size: int
  eval_batch: int
  speed_width: int
  speed_layers: int
  speed_image_sizes: tuple[int, ...]
  speed_text: int


SCALES = {
    "default": Scale(
        sizes=(1000, 3000, 9000), pretrain=12000, val=800, image_size=48, patch_size=6,
        vision=dict(width=96, depth=3, num_heads=3, mlp_dim=384),
        llm=dict(width=128, depth=4, num_heads=4, num_kv_heads=2, head_dim=32, mlp_dim=352),
        resampler_latents=16, vocab=512, batch=32, buckets=(32, 64, 128),
        stage1_epochs=1.0, stage2_epochs=2.0, stage1_lr=2e-3, stage2_lr=1e-3, pretrain_epochs=2.0,
        pretrain_lr=2e-3, tower_images=12000, tower_steps=1500, seeds=(0, 1), spread_size=3000, eval_batch=64,
        speed_width=512, speed_layers=4, speed_image_sizes=(336, 448, 672), speed_text=64),
    # For a GPU (untested here: this project's machines lent none so far): a wider, deeper model at
    # 84 px (196 visual tokens) and 4x the data.
    "large": Scale(
        sizes=(4000, 16000, 64000), pretrain=48000, val=2000, image_size=84, patch_size=6,
        vision=dict(width=256, depth=6, num_heads=4, mlp_dim=1024),
        llm=dict(width=512, depth=8, num_heads=8, num_kv_heads=4, head_dim=64, mlp_dim=1408),
        resampler_latents=48, vocab=1024, batch=64, buckets=(32, 64, 128),
        stage1_epochs=1.0, stage2_epochs=2.0, stage1_lr=1e-3, stage2_lr=3e-4, pretrain_epochs=2.0,
        pretrain_lr=1e-3, tower_images=48000, tower_steps=6000, seeds=(0, 1), spread_size=16000, eval_batch=128,
        speed_width=1024, speed_layers=8, speed_image_sizes=(336, 448, 672), speed_text=64),
    "tiny": Scale(
        sizes=(64, 128, 256), pretrain=256, val=96, image_size=32, patch_size=8,
        vision=dict(width=32, depth=2, num_heads=2, mlp_dim=64),
        llm=dict(width=64, depth=2, num_heads=4, num_kv_heads=2, head_dim=16, mlp_dim=128),
        resampler_latents=4, vocab=384, batch=16, buckets=(96,),
        stage1_epochs=1.0, stage2_epochs=1.0, stage1_lr=2e-3, stage2_lr=1e-3, pretrain_epochs=1.0,
        pretrain_lr=2e-3, tower_images=256, tower_steps=30, seeds=(0, 1), spread_size=64, eval_batch=32,
        speed_width=128, speed_layers=2, speed_image_sizes=(56, 84), speed_text=16),
}


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--scale", default="default", choices=sorted(SCALES))
  p.add_argument("--sizes", default=None, help="training-set sizes, e.g. 1000,4000,16000 (default: the scale's)")
  p.add_argument("--seeds", default=None, help="seeds run at --spread_size for the run-to-run spread, e.g. 0,1")
  p.add_argument("--spread_size", type=int, default=None)
  p.add_argument("--stage1_epochs", type=float, default=None)
  p.add_argument("--stage2_epochs", type=float, default=None)
  p.add_argument("--work", default=None, help="cache of data, runs and evals (default: runs/data_efficiency_SCALE)")
  p.add_argument("--out", default="docs", help="where results.md, results.json and the plots go")
  p.add_argument("--preset", default=None, help="also time the speed table at this preset's shape in bfloat16 "
                                                "(e.g. llava-1.5-7b, on a GPU)")
  p.add_argument("--speed_repeats", type=int, default=3)
  p.add_argument("--skip_speed", action="store_true", help="leave the speed table out")
  p.add_argument("--note", default="", help="a sentence for the report (e.g. what else ran on the machine)")
  return p.parse_args(argv)


# ------------------------------------------------------------------------------------ data


def dataset(scale: Scale, work: str) -> tuple[data_lib.SyntheticDataset, dict[str, str]]:
  """The synthetic set and the files cut from it: train_N (nested), pretrain (with images),
  pretrain_text (images removed), open_val (TextVQA format)."""
  need = max(scale.sizes) + scale.pretrain
  fresh, t0 = not os.path.exists(os.path.join(work, "data", "manifest.json")), time.perf_counter()
  ds = data_lib.ensure_dataset(os.path.join(work, "data"), seed=0, num_train=need, num_val=scale.val,
                               image_size=scale.image_size, difficulty="easy", vocab_size=scale.vocab, max_turns=1,
                               mix=dict(MIX))
  if fresh:
    _write_json(ds.path("generated_in.json"), dict(seconds=time.perf_counter() - t0))
  files = {f"train_{n}": ds.path(f"splits/train_{n}.json") for n in scale.sizes}
  files.update(pretrain=ds.path("splits/pretrain.json"), pretrain_text=ds.path("splits/pretrain_text.json"),
               open_val=ds.path("open_val.json"))
  if all(os.path.exists(f) for f in files.values()):
    return ds, files
  with open(ds.train_file) as f:
    records = json.load(f)
  pool, pre = records[:max(scale.sizes)], records[max(scale.sizes):need]
  os.makedirs(ds.path("splits"), exist_ok=True)
  for n in scale.sizes:
    _write_json(files[f"train_{n}"], pool[:n])
  _write_json(files["pretrain"], pre)
  _write_json(files["pretrain_text"], [text_only(r) for r in pre])
  with open(ds.val_file) as f:
    val = json.load(f)
  _write_json(files["open_val"], {"data": [
      dict(question_id=r["id"], image_id=os.path.splitext(os.path.basename(r["image"]))[0], image_path=r["image"],
           question=r["question"], answers=[r["answer"]] * 10, question_type=r["question_type"])
      for r in val if r["question_type"] in OPEN_TYPES]})
  return ds, files


def text_only(record: dict) -> dict:
  """A conversation with its image removed: the text an LLM is pretrained on."""
  turns = [dict(t, value=t["value"].replace("<image>", "").strip()) for t in record["conversations"]]
  return {"id": record["id"] + "-text", "conversations": turns}


def cached(path: str, fn) -> dict:
  """{"value": fn(), "seconds": its wall time}, computed once and kept at `path` (JSON)."""
  if not os.path.exists(path):
    t0 = time.perf_counter()
    value = fn()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    _write_json(path, dict(value=value, seconds=time.perf_counter() - t0))
  with open(path) as f:
    return json.load(f)


def ds_seconds(ds) -> float | None:
  """Minutes the dataset took to generate (None when it was made by an older version of this script)."""
  path = ds.path("generated_in.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)["seconds"] / 60


def _write_json(path: str, obj):
  with open(path + ".tmp", "w") as f:
    json.dump(obj, f)
  os.replace(path + ".tmp", path)


# ------------------------------------------------------------------------------------ models


def model_config(scale: Scale, mode: str, tokenizer_size: int) -> eem.ModelConfig:
  base = eem.ModelConfig.preset("demo")
  vision = base.vision.replace(image_size=scale.image_size, patch_size=scale.patch_size, feature_layer=-1,
                               **scale.vision)
  llm = base.llm.replace(vocab_size=tokenizer_size, **scale.llm)
  extra = dict(resampler_latents=scale.resampler_latents) if mode == "flamingo" else {}
  return base.replace(vision=vision, llm=llm, mode=MODES[mode], **extra)


def run_config(cfg: eem.ModelConfig, *, workdir: str, train_file: str, ds, steps: int, lr: float, trainable: str,
               batch: int, seed: int, buckets: tuple[int, ...], init_from: str = "") -> ml_collections.ConfigDict:
  """A train.py config for one training run of `cfg` (the demo config's recipe otherwise)."""
  c = demo.get_config()
  c.workdir = workdir
  c.seed = seed
  m = c.model
  m.projector = cfg.projector
  m.update(cfg.mode.flags())  # the mode as its flat flags, read back by experiment.model_config
  m.llm = ml_collections.ConfigDict({k: v for k, v in cfg.llm.to_dict().items() if k != "rope_scaling"})
  m.vision = ml_collections.ConfigDict({k: v for k, v in cfg.vision.to_dict().items()
                                        if k not in ("image_mean", "image_std")})
  c.synthetic = ml_collections.ConfigDict(dict(dir=""))
  c.data.update(train_file=train_file, val_file="", tokenizer_file=ds.tokenizer_file, image_dir=ds.root,
                global_batch_size=batch, seed=seed, buckets=tuple(buckets))
  c.steps = steps
  c.optim.learning_rate = lr
  c.optim.trainable = trainable
  c.checkpoint.update(every_steps=10 ** 9, keep=1, async_save=False)
  c.init_from.update(path=init_from, kind="orbax")
  c.eval_every = -1
  c.progress_bar = False
  c.log_every = 100
  return c


def train_once(config) -> str:
  """Runs `config` unless its final checkpoint exists; -> the run dir."""
  done = os.path.join(config.workdir, "done.json")
  if not os.path.exists(done):
    t0 = time.perf_counter()
    summary = loop_lib.train(config)
    _write_json(done, dict(seconds=time.perf_counter() - t0, step=summary["step"],
                           train_loss=summary["train_loss"]))
  return config.workdir


def steps_for(n: int, epochs: float, batch: int) -> int:
  return max(1, math.ceil(epochs * n / batch))


def pretrained_parts(scale: Scale, ds, files, work: str, vocab: int) -> tuple[str, dict]:
  """The LLM (text only) and the tower (labelled scenes), saved as one Orbax tree."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  out = os.path.join(work, "pretrained_parts")
  info_path = os.path.join(work, "pretrained_parts.json")
  if os.path.exists(info_path):
    with open(info_path) as f:
      return out, json.load(f)
  cfg = model_config(scale, "llava", vocab)
  n = scale.pretrain
  steps = steps_for(n, scale.pretrain_epochs, scale.batch)
  llm_run = train_once(run_config(cfg, workdir=os.path.join(work, "pretrain_llm"), train_file=files["pretrain_text"],
                                  ds=ds, steps=steps, lr=scale.pretrain_lr, trainable=r"llm/", batch=scale.batch,
                                  seed=0, buckets=scale.buckets))
  _, llm_params = loading.load_model(llm_run)
  tower_params, tower_info = pretrain_tower(cfg.vision, scale, seed=0)
  ocp.PyTreeCheckpointer().save(os.path.abspath(out), {"vision": tower_params, "llm": llm_params["llm"]}, force=True)
  info = {"llm": _done(llm_run) | {"records": n, "steps": steps, "what": "the text of the pretraining pool's "
                                   "conversations, images removed (a causal LM over the chat template)"},
          "tower": tower_info}
  _write_json(info_path, info)
  return out, info


class TowerPretrainer(nn.Module):
  """The tower with linear read-outs: each visual token's colour and shape (0: background) and,
  from the mean token, how many objects of each colour and shape the image holds."""

  cfg: eem.VisionConfig
  colours: int
  shapes: int
  max_count: int

  @nn.compact
  def __call__(self, images):
    from ee_mllm_jax.models.vision import VisionTower  # pylint: disable=g-import-not-at-top
    x = VisionTower(self.cfg, name="vision")(images)  # (B, P, D): the features LLaVA reads
    pooled = x.mean(axis=1)
    counts = lambda n, name: nn.Dense(n * (self.max_count + 1), name=name)(pooled).reshape(
        x.shape[0], n, self.max_count + 1)
    return (nn.Dense(self.colours + 1, name="token_colour")(x), nn.Dense(self.shapes + 1, name="token_shape")(x),
            counts(self.colours, "colour_counts"), counts(self.shapes, "shape_counts"))


def scene_labels(placed, cfg: eem.VisionConfig, colours, shapes, max_count):
  """Per-token colour/shape (the object whose disc covers the patch centre; 0: none) and counts."""
  g, p = cfg.grid, cfg.patch_size
  centre = (np.arange(g) + 0.5) * p
  tok_c, tok_s = np.zeros((g, g), np.int32), np.zeros((g, g), np.int32)
  n_c, n_s = np.zeros(len(colours), np.int32), np.zeros(len(shapes), np.int32)
  for shape, colour, cx, cy, r in placed:
    inside = (centre[None, :] - cx) ** 2 + (centre[:, None] - cy) ** 2 <= r ** 2
    tok_c[inside], tok_s[inside] = colours.index(colour) + 1, shapes.index(shape) + 1
    n_c[colours.index(colour)] += 1
    n_s[shapes.index(shape)] += 1
  return tok_c.reshape(-1), tok_s.reshape(-1), np.minimum(n_c, max_count), np.minimum(n_s, max_count)


def pretrain_tower(cfg: eem.VisionConfig, scale: Scale, seed: int) -> tuple[dict, dict]:
  """The vision tower trained from scratch on labelled synthetic scenes (`synthetic.labelled_scene`:
  the dataset's object drawings, with no question or text): per-token colour and shape, per-image
  counts. -> its parameters and what it reached on held-out scenes."""
  import optax  # pylint: disable=g-import-not-at-top
  from ee_mllm_jax.data import images as image_lib  # pylint: disable=g-import-not-at-top
  from ee_mllm_jax.data import synthetic  # pylint: disable=g-import-not-at-top
  t0 = time.perf_counter()
  maker = synthetic.SceneMaker(scale.image_size, "easy")
  colours, shapes = maker.colours, maker.shapes
  max_count = (maker.level["grid"] + 1) ** 2
  rng = np.random.default_rng(seed)
  n_total = scale.tower_images + scale.tower_images // 10
  pixels, labels = [], []
  for _ in range(n_total):
    image, placed = synthetic.labelled_scene(rng, scale.image_size, "easy")
    pixels.append(image_lib.preprocess(image, size=cfg.image_size, mean=cfg.image_mean, std=cfg.image_std))
    labels.append(scene_labels(placed, cfg, colours, shapes, max_count))
  pixels = np.stack(pixels)
  labels = [np.stack(x) for x in zip(*labels)]
  train_x, test_x = pixels[:scale.tower_images], pixels[scale.tower_images:]
  train_y, test_y = [y[:scale.tower_images] for y in labels], [y[scale.tower_images:] for y in labels]

  model = TowerPretrainer(cfg, len(colours), len(shapes), max_count)
  params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(seed), train_x[:2])["params"])
  steps, batch = scale.tower_steps, scale.batch * 2
  opt = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, scale.pretrain_lr, steps // 20, steps), weight_decay=0.01)
  opt_state = opt.init(params)

  def losses(p, x, ys):
    outs = model.apply({"params": p}, x)
    return [optax.softmax_cross_entropy_with_integer_labels(o, y).mean() for o, y in zip(outs, ys)], outs

  @jax.jit
  def step(p, s, x, ys):
    (loss, _), g = jax.value_and_grad(lambda p: (sum(losses(p, x, ys)[0]), None), has_aux=True)(p)
    updates, s = opt.update(g, s, p)
    return optax.apply_updates(p, updates), s, loss

  order = np.random.default_rng(seed + 1)
  for i in range(steps):
    idx = order.integers(0, len(train_x), batch)
    params, opt_state, loss = step(params, opt_state, train_x[idx], [y[idx] for y in train_y])
  outs = jax.jit(lambda p, x: model.apply({"params": p}, x))(params, test_x)
  acc = [float(np.mean(np.argmax(np.asarray(o), -1) == y)) for o, y in zip(outs, test_y)]
  objects = test_y[0] > 0  # token accuracy where an object is
  obj_acc = [float(np.mean(np.argmax(np.asarray(o), -1)[objects] == y[objects])) for o, y in zip(outs[:2], test_y[:2])]
  info = dict(what=f"{scale.tower_images} labelled synthetic object scenes (`synthetic.labelled_scene`, no text): "
                   "each visual token's colour and shape, each image's count per colour and shape",
              records=scale.tower_images, steps=steps, seconds=time.perf_counter() - t0, final_loss=float(loss),
              held_out=dict(images=len(test_x), token_colour=acc[0], token_shape=acc[1],
                            object_token_colour=obj_acc[0], object_token_shape=obj_acc[1],
                            colour_counts=acc[2], shape_counts=acc[3]))
  print(f"tower pretraining: {steps} steps in {info['seconds']:.0f} s, held-out {info['held_out']}", flush=True)
  return params["vision"], info


def _done(run: str) -> dict:
  with open(os.path.join(run, "done.json")) as f:
    return json.load(f)


@functools.cache
def trainable_count(cfg: eem.ModelConfig, pattern: str) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(split_params(params_lib.abstract_params(cfg),
                                                                            pattern)[0]))


def align(scale: Scale, mode: str, n: int, seed: int, ds, files, parts: str, work: str, vocab: int) -> dict:
  """Stage 1 then stage 2 of one mode on the first n records; -> where and how long."""
  cfg = model_config(scale, mode, vocab)
  root = os.path.join(work, "runs", f"{mode}_{n}_seed{seed}")
  s1, s2 = steps_for(n, scale.stage1_epochs, scale.batch), steps_for(n, scale.stage2_epochs, scale.batch)
  common = dict(train_file=files[f"train_{n}"], ds=ds, batch=scale.batch, seed=seed, buckets=scale.buckets)
  stage1 = train_once(run_config(cfg, workdir=os.path.join(root, "stage1"), steps=s1, lr=scale.stage1_lr,
                                 trainable=STAGE1[mode], init_from=parts, **common))
  stage2 = train_once(run_config(cfg, workdir=os.path.join(root, "stage2"), steps=s2, lr=scale.stage2_lr,
                                 trainable=STAGE2, init_from=stage1, **common))
  return dict(mode=mode, size=n, seed=seed, checkpoint=stage2, steps=(s1, s2),
              seconds=_done(stage1)["seconds"] + _done(stage2)["seconds"],
              trainable=(trainable_count(cfg, STAGE1[mode]), trainable_count(cfg, STAGE2)))


# ------------------------------------------------------------------------------------ evaluation


def evaluate(run: dict, ds, files, work: str, scale: Scale, variant: str = "", **mode) -> dict:
  """eval.py's scores of one model (in `mode`'s overrides, e.g. EE-MLLM-F) on every benchmark."""
  name = f"{run['mode']}_{run['size']}_seed{run['seed']}" + (f"_{variant}" if variant else "")
  out_path = os.path.join(work, "evals", name + ".json")
  if os.path.exists(out_path):
    with open(out_path) as f:
      return with_extra_metrics(json.load(f), work)
  model = model_lib.from_checkpoint(run["checkpoint"], **mode)  # eval.py's road, its mode overrides
  # The synthetic training questions carry no "answer in a word" line: the prompt leaves it out.
  settings = runner_lib.EvalSettings(batch_size=scale.eval_batch, max_new_tokens=6, progress_bar=False,
                                     style=prompts_lib.PromptStyle(short_answer=""))
  runner = runner_lib.Runner(model, settings, sharding.make_mesh(dict(data=-1, fsdp=1, tensor=1)))
  scores, t0 = {}, time.perf_counter()
  for table_name, benchmark, file, metric in BENCHMARKS:
    path = files["open_val"] if table_name == "open" else ds.path(file)
    questions = readers.read(benchmark, path, ds.root)
    if benchmark == "mmbench":
      questions = circular.with_rotations(questions)
    if not questions:
      continue
    summary = runner_lib.evaluate(runner, benchmark, questions, os.path.join(work, "evals", name, table_name))
    scores[table_name] = summary["metrics"][metric]
  result = dict(name=name, model_mode=model.mode, scores=scores, mean=float(np.mean(list(scores.values()))),
                seconds=time.perf_counter() - t0, cfg=model.cfg.to_dict())
  os.makedirs(os.path.dirname(out_path), exist_ok=True)
  _write_json(out_path, result)
  return with_extra_metrics(result, work)


def with_extra_metrics(result: dict, work: str) -> dict:
  """`result` with the EXTRA_METRICS read from its benchmarks' metrics.json files."""
  extra = {}
  for column, table_name, metric in EXTRA_METRICS:
    path = os.path.join(work, "evals", result["name"], table_name, runner_lib.METRICS)
    if os.path.exists(path):
      with open(path) as f:
        value = json.load(f).get(metric)
      if value is not None:
        extra[column] = value
  return dict(result, extra=extra)


def prefill_flops(cfg: eem.ModelConfig, text_len: int) -> float:
  """Analytic prefill FLOPs of one sample: one image, `text_len` text tokens."""
  return flops_lib.forward_flops(cfg, batch=1, num_images=1, text_len=text_len)["total"]


def typical_text_len(ds) -> int:
  """The median tokenized length of the val questions' prompts (template and answer included)."""
  tok = data_lib.load_tokenizer(ds.tokenizer_file)
  with open(ds.val_file) as f:
    val = json.load(f)
  return int(np.median([len(tok.encode(r["question"] + " " + r["answer"]).ids) for r in val])) + 12  # + template


# ------------------------------------------------------------------------------------ speed


def speed_table(base: eem.ModelConfig, image_sizes, *, text_len: int, repeats: int, label: str) -> list[dict]:
  """Prefill (tower + projector + LLM + first token) time and analytic FLOPs of the three modes,
  one image of each size, on one random parameter set (Flamingo's extra blocks fresh)."""
  rows = []
  for size in image_sizes:
    shape = base.replace(vision=base.vision.replace(image_size=size))
    v = shape.tokens_per_image
    flamingo = dict(cross_every=4 if shape.llm.depth % 4 == 0 else shape.llm.depth, resampler_latents=64,
                    resampler_depth=6)
    cfgs = {m: shape.replace(mode=MODES[m], **(flamingo if m == "flamingo" else {})) for m in MODES}
    batch = jax.device_put(batch_lib.model_inputs(images_then_text(shape, batch=1, num_images=1, text_len=text_len)))
    params = None
    for mode, cfg in cfgs.items():
      fresh = jax.jit(eem.EEMLLM(cfg).init)(jax.random.key(0), **batch_lib.example(cfg))["params"]
      fresh = nn.meta.unbox(fresh)
      if params is None:
        params = fresh
      p = params_lib.overlay(fresh, params)[0] if mode == "flamingo" else params

      def first_token(p=p, cfg=cfg):
        logits, _ = prefill(p, cfg, batch, cache_size=batch_lib.prefill_slots(cfg, batch))
        return sample_token(logits, None)

      seconds = median_ms(first_token, repeats=repeats) / 1e3
      rows.append(dict(shape=label, image_size=size, v=v, mode=mode, seconds=seconds,
                       flops=flops_lib.forward_flops(cfg, batch=1, num_images=1, text_len=text_len)["total"]))
      print(f"speed {label} {size}px V={v} {mode}: {seconds * 1e3:.1f} ms, "
            f"{rows[-1]['flops'] / 1e9:.1f} GFLOP", flush=True)
      del fresh
    del params
  return rows


# ------------------------------------------------------------------------------------ report


def plot_data_efficiency(results, sizes, path):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  names = [b[0] for b in BENCHMARKS if any(b[0] in r["scores"] for r in results)]
  fig, axes = plt.subplots(1, len(names) + 1, figsize=(3.2 * (len(names) + 1), 3.2), sharex=True)
  for ax, name in zip(axes, names + ["mean"]):
    for mode in MODES:
      pts = [(r["size"], r["mean"] if name == "mean" else r["scores"].get(name, np.nan))
             for r in results if r["mode"] == mode and r["seed"] == 0]
      pts.sort()
      ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], "o-", label=MODE_LABELS[mode])
    ax.set_xscale("log")
    ax.set_xticks(sizes, [str(s) for s in sizes])
    ax.minorticks_off()
    ax.set_title(name, fontsize=10)
    ax.set_xlabel("training samples")
    ax.grid(alpha=0.3)
  axes[0].set_ylabel("score (%)")
  axes[-1].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_retention(points, path):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(5.5, 4))
  for ffn, marker in ((True, "o-"), (False, "s--")):
    pts = sorted((p["flops_saved"], p["kept"], p["n"]) for p in points if p["visual_ffn"] == ffn)
    ax.plot([100 * p[0] for p in pts], [100 * p[1] for p in pts], marker,
            label=f"composite layers {'with' if ffn else 'without'} visual FFN")
    for x, y, n in pts:
      ax.annotate(f"n={n}", (100 * x, 100 * y), fontsize=7, xytext=(3, 3), textcoords="offset points")
  ax.axhline(100, color="gray", lw=0.8)
  ax.set_xlabel("prefill FLOPs saved vs LLaVA (%)")
  ax.set_ylabel("mean score kept vs LLaVA (%)")
  ax.set_title("EE-MLLM-F on the LLaVA model: layers [n, L) composite", fontsize=9)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def held_out(tower: dict) -> str:
  h = tower["held_out"]
  return (f"{pct(h['object_token_colour'])}% / {pct(h['object_token_shape'])}% of object tokens' colour / shape, "
          f"{pct(h['colour_counts'])}% / {pct(h['shape_counts'])}% of per-colour / per-shape counts right")


def pct(x) -> str:
  return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"


def write_report(out: str, r: dict):
  names = [b[0] for b in BENCHMARKS if any(b[0] in e["scores"] for e in r["main"])]
  extras = [c[0] for c in EXTRA_METRICS if any(c[0] in e.get("extra", {}) for e in r["main"])]
  cells = lambda e: " | ".join([pct(e["scores"].get(n)) for n in names] + [pct(e.get("extra", {}).get(n)) for n in extras])
  columns = " | ".join(names + [f"*{n}*" for n in extras])
  lines = [f"# Results: data efficiency, EE-MLLM-F retention, speed ({r['scale']} scale)", "",
           "Regenerate (every step is cached under the work directory; delete it for a fresh run):", "",
           f"    {r['command']}", "",
           f"Machine: {r['machine']}. Compute time: {r['compute']['total']:.1f} min, the sum of every step's "
           f"measured wall time ("
           + (f"data {r['compute']['data']:.1f}, " if r["compute"].get("data") is not None else "")
           + f"pretraining {r['compute']['pretrain']:.1f}, alignment {r['compute']['align']:.1f}, "
           f"evaluation {r['compute']['eval']:.1f}, speed table {r['compute']['speed']:.1f} min; steps run one after "
           f"another in one process); this invocation took {r['wall_minutes']:.1f} min"
           + (", reusing cached steps." if r["wall_minutes"] < 0.9 * r["compute"]["total"] else ".")
           + (f" {r['note']}" if r.get("note") else ""), "",
           "## Setup", "",
           f"* Model (all modes): vision tower {r['shapes']['vision']}; LLM {r['shapes']['llm']}; "
           f"{r['shapes']['tokens']} visual tokens per image. Flamingo adds a gated cross-attention block before "
           f"every 2nd layer and a {r['shapes']['latents']}-latent, 2-layer perceiver resampler.",
           f"* Data: the synthetic visual-QA set (`ee_mllm_jax.data.synthetic`, {r['shapes']['image_size']} px, "
           f"easy), training sets of {', '.join(map(str, r['sizes']))} samples (nested), val {r['val']} questions.",
           f"* Pretrained parts (shared by every mode): the LLM on {r['parts']['llm']['what']} "
           f"({r['parts']['llm']['records']} records, {r['parts']['llm']['steps']} steps); the tower on "
           f"{r['parts']['tower']['what']} ({r['parts']['tower']['records']} records, "
           f"{r['parts']['tower']['steps']} steps; on held-out scenes {held_out(r['parts']['tower'])}).",
           f"* Recipe: stage 1 trains the connector ({r['recipe']['stage1_epochs']} epoch(s), lr "
           f"{r['recipe']['stage1_lr']}), stage 2 also the LLM ({r['recipe']['stage2_epochs']} epoch(s), lr "
           f"{r['recipe']['stage2_lr']}); batch {r['recipe']['batch']}; the tower frozen; same steps per sample "
           "for every mode.",
           "* Scores (eval.py's metrics, %): `open` = VQA accuracy on the val set's colour/shape/count/position "
           "questions; MMBench = CircularEval accuracy; SEED = accuracy of the generated letter; TextVQA = VQA "
           "accuracy; DocVQA = ANLS; `mean` = their mean. In italics, not in the mean: MMBench per-row accuracy and "
           "SEED with the options ranked by likelihood. "
           f"The answer prior (always the most frequent training answer per question type) is "
           f"{pct(r['prior'])}% on the open questions; 4-way multiple choice is 25% by chance "
           "(CircularEval 1/256 for a guesser).",
           f"* FLOPs: analytic prefill FLOPs per sample (`ee_mllm_jax.flops.forward_flops`, one image, "
           f"{r['text_len']} text tokens).", "",
           "## Mode x data size", "",
           "| mode | samples | " + columns + " | mean | trainable params (stage 1 / 2) | "
           "prefill MFLOP/sample | train s |",
           "|---|---:|" + "---:|" * (len(names) + len(extras)) + "---:|---:|---:|---:|"]
  for e in sorted(r["main"], key=lambda e: (list(MODES).index(e["mode"]), e["size"])):
    lines.append(f"| {MODE_LABELS[e['mode']]} | {e['size']} | " + cells(e) + f" | **{pct(e['mean'])}** | {e['trainable'][0]:,} / {e['trainable'][1]:,} | "
                 f"{e['flops'] / 1e6:.1f} | {e['train_seconds']:.0f} |")
  lines += ["", "![accuracy vs data size](data_efficiency.png)", "",
            f"### Run-to-run spread ({r['spread_size']} samples, seeds {', '.join(map(str, r['seeds']))})", "",
            "Seed changes the projector/cross-block init and the data order. Mean score per seed, and the "
            "spread (max - min):", "", "| mode | " + " | ".join(f"seed {s}" for s in r["seeds"]) + " | spread |",
            "|---|" + "---:|" * (len(r["seeds"]) + 1)]
  for mode in MODES:
    by_seed = {e["seed"]: e["mean"] for e in r["main"] + r["spread"] if e["mode"] == mode
               and e["size"] == r["spread_size"]}
    vals = [by_seed.get(s) for s in r["seeds"]]
    spread = max(vals) - min(vals) if all(v is not None for v in vals) else None
    lines.append(f"| {MODE_LABELS[mode]} | " + " | ".join(pct(v) for v in vals) + f" | {pct(spread)} |")
  lines += ["", "## EE-MLLM-F: the LLaVA models run in composite mode without training", "",
            "Mean score (and its share of the LLaVA model's), prefill FLOPs saved vs LLaVA:", "",
            "| samples | variant | " + columns + " | mean | kept | FLOPs saved |",
            "|---:|---|" + "---:|" * (len(names) + len(extras)) + "---:|---:|---:|"]
  for e in r["retention"]:
    lines.append(f"| {e['size']} | {e['variant']} | " + cells(e) + f" | {pct(e['mean'])} | {pct(e['kept'])} | "
                 f"{pct(e['flops_saved'])} |")
  lines += ["", f"Along the layer schedule ({r['schedule_size']} samples; layers [0, n) self, [n, L) composite; "
            "n = L is LLaVA itself):", "", "![EE-MLLM-F retention](ee_mllm_f_retention.png)", ""]
  if r["speed"]:
    lines += ["## Speed: prefill at 336 / 448 / 672 px", "",
              "Time to first token (tower + projector + LLM prefill + first token, median of "
              f"{r['speed_repeats']}) and analytic FLOPs, one image and {r['speed_text']} prompt tokens, one random "
              "parameter set per shape. Flamingo: a cross block every 4 layers, 64-latent 6-layer resampler "
              "(configs/flamingo_7b.py).", "",
              "| shape | px | V | mode | prefill ms | GFLOP | time vs LLaVA | FLOPs vs LLaVA |",
              "|---|---:|---:|---|---:|---:|---:|---:|"]
    for e in r["speed"]:
      ref = next(x for x in r["speed"] if x["shape"] == e["shape"] and x["v"] == e["v"] and x["mode"] == "llava")
      lines.append(f"| {e['shape']} | {e['image_size']} | {e['v']} | {MODE_LABELS[e['mode']]} | "
                   f"{e['seconds'] * 1e3:.1f} | {e['flops'] / 1e9:.1f} | {e['seconds'] / ref['seconds']:.2f} | "
                   f"{e['flops'] / ref['flops']:.2f} |")
    if not r["gpu_rows"]:
      lines += ["", "The full-size LLaVA-1.5-7B bf16 rows need a GPU: rerun with `--preset llava-1.5-7b` there "
                "(this machine has none)."]
  lines.append("")
  with open(os.path.join(out, "results.md"), "w") as f:
    f.write("\n".join(lines))


def shown_args(argv: list[str]) -> list[str]:
  """The command's arguments without --note (a remark about this run, not a setting)."""
  out, skip = [], False
  for a in argv:
    if skip:
      skip = False
    elif a == "--note":
      skip = True
    elif not a.startswith("--note="):
      out.append(a)
  return out


def machine() -> str:
  dev = jax.devices()[0]
  cpu = platform.processor() or platform.machine()
  return (f"{dev.device_kind} ({jax.default_backend()}), {os.cpu_count()} CPU cores ({cpu}), "
          f"jax {jax.__version__}, Python {platform.python_version()}")


def main(argv=None):
  args = parse_args(argv)
  t_start = time.perf_counter()
  scale = SCALES[args.scale]
  if args.sizes:
    scale = dataclasses.replace(scale, sizes=tuple(int(s) for s in args.sizes.split(",")))
  if args.seeds:
    scale = dataclasses.replace(scale, seeds=tuple(int(s) for s in args.seeds.split(",")))
  for field in ("spread_size", "stage1_epochs", "stage2_epochs"):
    if getattr(args, field) is not None:
      scale = dataclasses.replace(scale, **{field: getattr(args, field)})
  if scale.spread_size not in scale.sizes:
    raise SystemExit(f"--spread_size {scale.spread_size} must be one of the sizes {scale.sizes}")
  work = os.path.abspath(args.work or f"runs/data_efficiency_{args.scale}")
  os.makedirs(args.out, exist_ok=True)
  # Every training run of a mode and stage compiles the same step: the persistent cache compiles it once.
  jax.config.update("jax_compilation_cache_dir", os.path.join(work, "xla_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  timing = {}

  t = time.perf_counter()
  ds, files = dataset(scale, work)
  vocab = data_lib.load_tokenizer(ds.tokenizer_file).get_vocab_size(with_added_tokens=True)
  vocab = -(-vocab // 64) * 64
  timing["data"] = (time.perf_counter() - t) / 60

  t = time.perf_counter()
  parts, parts_info = pretrained_parts(scale, ds, files, work, vocab)
  timing["pretrain"] = (time.perf_counter() - t) / 60

  text_len = typical_text_len(ds)
  depth = scale.llm["depth"]
  timing.update(align=0.0, eval=0.0)

  def trained(mode, n, seed):
    t = time.perf_counter()
    run = align(scale, mode, n, seed, ds, files, parts, work, vocab)
    timing["align"] += (time.perf_counter() - t) / 60
    return run

  def scored(run, variant="", **mode):
    t = time.perf_counter()
    e = evaluate(run, ds, files, work, scale, variant, **mode)
    timing["eval"] += (time.perf_counter() - t) / 60
    cfg = eem.ModelConfig.from_dict(e["cfg"])
    print(f"{e['name']}: mean {pct(e['mean'])} " + " ".join(f"{k} {pct(v)}" for k, v in e["scores"].items()),
          flush=True)
    return dict(e, mode=run["mode"], size=run["size"], seed=run["seed"], trainable=run["trainable"],
                train_seconds=run["seconds"], flops=prefill_flops(cfg, text_len))

  # Each model is scored as soon as it is trained (the log shows the curve as it grows).
  main_rows, spread_rows, retention, schedule = [], [], [], []
  for n in scale.sizes:
    for mode in MODES:
      run = trained(mode, n, scale.seeds[0])
      main_rows.append(scored(run))
      if mode != "llava":
        continue
      base = main_rows[-1]
      variants = [(True, 0), (False, 0)]
      if n == max(scale.sizes):  # EE-MLLM-F along the layer schedule (n = depth is the LLaVA model itself)
        variants = [(ffn, k) for k in range(depth) for ffn in (True, False)]
      for ffn, k in variants:
        e = scored(run, f"f_from{k}_{'ffn' if ffn else 'noffn'}", attention="composite", visual_ffn=ffn,
                   composite_from_layer=k)
        e.update(variant=f"composite from layer {k}, visual FFN {'on' if ffn else 'off'}", visual_ffn=ffn, n=k,
                 kept=e["mean"] / base["mean"] if base["mean"] else float("nan"),
                 flops_saved=1 - e["flops"] / base["flops"])
        retention.append(e)
      if n == max(scale.sizes):
        schedule = [e for e in retention if e["size"] == n]
        schedule += [dict(base, n=depth, visual_ffn=ffn, kept=1.0, flops_saved=0.0) for ffn in (True, False)]
  for seed in scale.seeds[1:]:
    for mode in MODES:
      spread_rows.append(scored(trained(mode, scale.spread_size, seed)))

  t = time.perf_counter()
  speed, speed_seconds = [], 0.0
  if not args.skip_speed:
    shape = scaled_llava(scale.speed_width, scale.speed_layers, 4096)
    tables = [(f"scaled LLaVA-1.5-7B (width {scale.speed_width}, {scale.speed_layers} layers), f32", shape,
               scale.speed_image_sizes, scale.speed_text)]
    if args.preset:
      tables.append((f"{args.preset}, bf16", eem.ModelConfig.preset(args.preset, dtype="bfloat16",
                                                                    param_dtype="bfloat16"), (336, 448, 672), 64))
    for label, cfg, sizes, text in tables:
      table = cached(os.path.join(work, "speed", f"{jax.default_backend()}_{label}.json"),
                     lambda: speed_table(cfg, sizes, text_len=text, repeats=args.speed_repeats, label=label))
      speed += table["value"]
      speed_seconds += table["seconds"]
  timing["speed"] = (time.perf_counter() - t) / 60
  unique = lambda rows: {e["name"]: e for e in rows}.values()
  compute = dict(data=ds_seconds(ds), pretrain=(parts_info["llm"]["seconds"] + parts_info["tower"]["seconds"]) / 60,
                 align=sum(e["train_seconds"] for e in main_rows + spread_rows) / 60,
                 eval=sum(e["seconds"] for e in unique(main_rows + spread_rows + retention)) / 60,
                 speed=speed_seconds / 60)
  compute["total"] = sum(v for v in compute.values() if v is not None)

  plot_data_efficiency(main_rows, scale.sizes, os.path.join(args.out, "data_efficiency.png"))
  if schedule:
    plot_retention(schedule, os.path.join(args.out, "ee_mllm_f_retention.png"))
  cfg = model_config(scale, "llava", vocab)
  with open(files["train_" + str(max(scale.sizes))]) as f:
    train_records = json.load(f)
  with open(ds.val_file) as f:
    val_records = [r for r in json.load(f) if r["question_type"] in OPEN_TYPES]
  report = dict(
      scale=args.scale, command=" ".join(["python", "benchmarks/data_efficiency.py"] + [
          shlex.quote(a) for a in shown_args(argv or sys.argv[1:])]),
      machine=machine(), wall_minutes=(time.perf_counter() - t_start) / 60, timing=timing, compute=compute,
      note=args.note, sizes=list(scale.sizes),
      val=scale.val, seeds=list(scale.seeds), spread_size=scale.spread_size, schedule_size=max(scale.sizes),
      shapes=dict(vision=f"{cfg.vision.width} wide, {cfg.vision.depth} layers", tokens=cfg.tokens_per_image,
                  llm=f"{cfg.llm.width} wide, {cfg.llm.depth} layers, {cfg.llm.num_heads}/{cfg.llm.num_kv_heads} heads,"
                      f" FFN {cfg.llm.mlp_dim}, vocab {cfg.llm.vocab_size}",
                  latents=scale.resampler_latents, image_size=scale.image_size),
      parts=parts_info, recipe=dict(stage1_epochs=scale.stage1_epochs, stage2_epochs=scale.stage2_epochs,
                                    stage1_lr=scale.stage1_lr, stage2_lr=scale.stage2_lr, batch=scale.batch),
      prior=data_lib.answer_prior(train_records, val_records), text_len=text_len, main=main_rows,
      spread=spread_rows, retention=retention, schedule=schedule, speed=speed, speed_repeats=args.speed_repeats,
      speed_text=scale.speed_text, gpu_rows=bool(args.preset))
  report["wall_minutes"] = (time.perf_counter() - t_start) / 60
  with open(os.path.join(args.out, "results.json"), "w") as f:
    json.dump(report, f, indent=1, default=str)
  write_report(args.out, report)
  print(f"wrote {os.path.join(args.out, 'results.md')} ({report['wall_minutes']:.1f} min)")


if __name__ == "__main__":
  main()
