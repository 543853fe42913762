"""The paper's comparative claims as one rerunnable experiment: data efficiency of the three modes,
EE-MLLM-F along the layer schedule, the training-free frontier (EE-MLLM-F, FastV, VisionZip) and
the speed table. Writes docs/results.md with its plots.

    python benchmarks/data_efficiency.py                 # the default: 3 seeds, their cells in 3 worker
                                                         # processes; 87 min on 2 CPU cores
    python benchmarks/data_efficiency.py --scale tiny    # the test suite's minutes-long version
    python benchmarks/data_efficiency.py --scale large --preset llava-1.5-7b   # on a GPU: 4x the data, a
                                                    # bigger model, and the full-size 7B speed rows

What it does, in order (every step is cached under --work; a rerun skips what is done):

1. **Data.** One synthetic visual-QA set (`ee_mllm_jax.data.synthetic`, one tokenizer; an eighth
   each of colour, shape, count and position questions, MMBench- and SEED-style lettered
   multiple choice in LLaVA-1.5's layout, signs to read and forms to look up) whose train records
   are split in two disjoint pools: the experiment pool, of which the training sets are nested
   prefixes (--sizes), and the pretraining pool.
2. **Pretrained parts**, the same for every mode and seed:
   * the LLM: a decoder trained from scratch, as a causal LM, on the text of the pretraining
     pool's conversations with the images removed (it learns the template, the words and the
     answer prior, and cannot know what any image shows) and on one text-only multiple-choice
     exercise per record whose hint gives the answer (`letter_exercises`: how to point at an
     option, which any Vicuna knows), on text-only batches (no image slot); then a letter stage
     on the exercises alone (the pointer forms late), scored on held-out exercises;
   * the vision tower: trained from scratch on labelled synthetic images drawn as the dataset
     draws them (object scenes, and a third signs and forms; no question): linear read-outs of
     each visual token's colour, shape, character and word and of each image's counts, thrown away
     after (the stand-in for CLIP's pretraining; no decoder, so no mode is favoured).
   Saved together as one Orbax parameter tree, the start of every stage 1.
3. **Alignment**, per mode (LLaVA self, EE-MLLM composite, Flamingo cross), training-set size and
   seed (a seed changes the connector's init and the data order), with the same two-stage recipe
   and the same steps per sample (`train.py`'s trainer): stage 1 trains the connector (the
   projector; Flamingo: projector, cross blocks, resampler), stage 2 also the LLM. The tower stays
   frozen, as in LLaVA. The seeds' cells (steps 3 to 5) run in worker processes side by side
   (`--workers`, `workers.py`).
4. **Scores** with eval.py's readers, runner and metrics on the synthetic benchmark files
   (TextVQA, DocVQA, MMBench with CircularEval, SEED-Bench by option likelihood) and on the val set's open
   questions (colour, shape, count, position) as a TextVQA-format file, kept per question (or
   CircularEval group) for the intervals; each LLaVA model also on the open questions with blank
   images (does it use the image?).
5. **EE-MLLM-F**: each LLaVA-mode model evaluated in composite mode with and without the visual
   FFN, and, for the largest size, along the layer schedule (`composite_from_layer` = 0..depth);
   the largest LLaVA models also with FastV, VisionZip and their combinations (`frontier.py`).
6. **Speed**: prefill time and analytic FLOPs of the three modes at 336 / 448 / 672 px (V = 576 /
   1024 / 2304) at the width-scaled LLaVA-1.5-7B shape (benchmarks/common.py), and with
   --preset at that preset's real shape (a GPU run); and the frontier's settings at the width-scaled
   shape (`reduction_prefill.py`).
7. **docs/results.md**, `results.json` and the PNG plots, with the command, machine and wall time:
   which benchmarks are informative, means with 95% intervals over seeds and questions, paired
   differences, and a verdict on each of the paper's claims (`evidence.py`).

This file is the procedure. Beside it: `data_efficiency_settings.py` (what is compared, and each
scale), `experiment_data.py` (step 1), `tower_pretraining.py` (step 2's tower), `frontier.py` (step 5's
reductions and their report section), `speed_table.py` (step 6) and `results_report.py` with
`results_template.md` (step 7, drawn from results.json alone).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import math
import os
import platform
import shlex
import sys
import time

import jax
import ml_collections
import numpy as np

import ee_mllm_jax as eem
import results_report
from experiment_data import dataset, ds_seconds, write_json
import frontier
import speed_table
import tower_pretraining
import workers
from data_efficiency_settings import (BENCHMARKS, EXTRA_METRICS, INFORMATIVE_SDS, MARGIN, MODE_LABELS, MODES,
                                      OPEN_TYPES, SCALES, STAGE1, STAGE2, Scale)
from ee_mllm_jax import data as data_lib
from ee_mllm_jax import experiment
from ee_mllm_jax import flops as flops_lib
from ee_mllm_jax import loading
from ee_mllm_jax import params as params_lib
from ee_mllm_jax import sharding
from ee_mllm_jax.evaluation import benchmarks
from ee_mllm_jax.evaluation import model as model_lib
from ee_mllm_jax.evaluation import prompts as prompts_lib
from ee_mllm_jax.evaluation import runner as runner_lib
from ee_mllm_jax.train import loop as loop_lib
from ee_mllm_jax.train.state import split_params

# The demo config's recipe is every run's starting point (benchmarks/ runs as a script: configs/
# is read by path, not imported).
DEMO_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "demo.py")

def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--scale", default="default", choices=sorted(SCALES))
  p.add_argument("--sizes", default=None, help="training-set sizes, e.g. 1000,4000,16000 (default: the scale's)")
  p.add_argument("--seeds", default=None, help="seeds of every (mode, size) cell, e.g. 0,1,2 (default: the scale's)")
  p.add_argument("--stage1_epochs", type=float, default=None)
  p.add_argument("--stage2_epochs", type=float, default=None)
  p.add_argument("--work", default=None, help="cache of data, runs and evals (default: runs/data_efficiency_SCALE)")
  p.add_argument("--out", default="docs", help="where results.md, results.json and the plots go")
  p.add_argument("--preset", default=None, help="also time the speed table at this preset's shape in bfloat16 "
                                                "(e.g. llava-1.5-7b, on a GPU)")
  p.add_argument("--speed_repeats", type=int, default=3)
  p.add_argument("--skip_speed", action="store_true", help="leave the speed table out")
  p.add_argument("--note", default="", help="a sentence for the report (e.g. what else ran on the machine)")
  p.add_argument("--workers", type=int, default=None,
                 help="processes that train and score the seeds' cells side by side (default: the scale's)")
  p.add_argument("--cells_only", action="store_true", help="train and score the cells, then stop (what each "
                                                           "worker of --workers runs)")
  return p.parse_args(argv)


# ------------------------------------------------------------------------------------ models


def model_config(scale: Scale, mode: str, tokenizer_size: int) -> eem.ModelConfig:
  base = eem.ModelConfig.preset("demo")
  vision = base.vision.replace(image_size=scale.image_size, patch_size=scale.patch_size, feature_layer=-1,
                               **scale.vision)
  llm = base.llm.replace(vocab_size=tokenizer_size, **scale.llm)
  extra = dict(resampler_latents=scale.resampler_latents) if mode == "flamingo" else {}
  return base.replace(vision=vision, llm=llm, mode=MODES[mode], **extra)


def run_config(cfg: eem.ModelConfig, *, workdir: str, train_file: str, ds, steps: int, lr: float, trainable: str,
               batch: int, seed: int, buckets: tuple[int, ...], init_from: str = "", max_images: int = 1,
               val_file: str = "") -> ml_collections.ConfigDict:
  """A train.py config for one training run of `cfg` (the demo config's recipe otherwise);
  `max_images=0`: text-only batches (no image slot: the tower never runs); `val_file`: its val loss
  and teacher-forced answer accuracy at the end."""
  c = experiment.load_config_file(DEMO_CONFIG)
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
                global_batch_size=batch, seed=seed, buckets=tuple(buckets), max_images=max_images)
  c.steps = steps
  c.optim.learning_rate = lr
  c.optim.trainable = trainable
  c.checkpoint.update(every_steps=10 ** 9, keep=1, async_save=False)
  c.init_from.update(path=init_from, kind="orbax")
  c.eval_every = steps if val_file else -1
  c.data.val_file = val_file
  c.eval_blank_images = False
  c.progress_bar = False
  c.log_every = 100
  return c


def train_once(config) -> str:
  """Runs `config` unless its final checkpoint exists; -> the run dir."""
  done = os.path.join(config.workdir, "done.json")
  if not os.path.exists(done):
    t0 = time.perf_counter()
    summary = loop_lib.train(config)
    if summary["step"] < config.steps:  # stopped by a signal: checkpointed, not done; a rerun resumes it
      raise SystemExit(f"{config.workdir}: stopped at step {summary['step']} of {config.steps}; rerun to resume")
    write_json(done, dict(seconds=time.perf_counter() - t0, step=summary["step"], train_loss=summary["train_loss"],
                           **{k: summary[k] for k in ("val_loss", "val_accuracy") if k in summary}))
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
  text = dict(ds=ds, lr=scale.pretrain_lr, trainable=r"llm/", batch=scale.batch, seed=0, buckets=scale.buckets,
              max_images=0)
  llm_run = train_once(run_config(cfg, workdir=os.path.join(work, "pretrain_llm"), train_file=files["pretrain_text"],
                                  steps=steps, **text))
  # Then the letter skill a Vicuna has (point at the option that says something): exercises alone,
  # scored on held-out ones (the val set's questions); it forms late (a pointer circuit), so it
  # gets its own steps.
  letters_run = llm_run if not scale.letter_steps else train_once(run_config(
      cfg, workdir=os.path.join(work, "pretrain_letters"), train_file=files["letters"], val_file=files["letters_val"],
      steps=scale.letter_steps, init_from=llm_run, **text))
  _, llm_params = loading.load_model(letters_run)
  tower_params, tower_info = tower_pretraining.pretrain_tower(
      cfg.vision, images=scale.tower_images, steps=scale.tower_steps, batch=scale.batch * 2, lr=scale.pretrain_lr,
      seed=0)
  ocp.PyTreeCheckpointer().save(os.path.abspath(out), {"vision": tower_params, "llm": llm_params["llm"]}, force=True)
  info = {"llm": _done(llm_run) | {"records": n, "steps": steps, "what": "the text of the pretraining pool's "
                                   "conversations, images removed, and as many letter exercises (a causal LM "
                                   "over the chat template, text-only batches)"},
          "tower": tower_info}
  if scale.letter_steps:
    letters = _done(letters_run)
    info["llm"]["letters"] = dict(steps=scale.letter_steps, seconds=letters["seconds"],
                                  held_out_accuracy=letters["val_accuracy"])
  write_json(info_path, info)
  return out, info


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


def evaluate(run: dict, ds, files, work: str, scale: Scale, variant: str = "", blank: bool = False, **mode) -> dict:
  """eval.py's scores of one model (in `mode`'s overrides, e.g. EE-MLLM-F) on every benchmark, and
  each benchmark's per-unit scores (the resampling units of the intervals); `blank`: the open
  questions alone, each on a blank image."""
  name = f"{run['mode']}_{run['size']}_seed{run['seed']}" + (f"_{variant}" if variant else "") + ("_blank" * blank)
  out_path = os.path.join(work, "evals", name + ".json")
  if os.path.exists(out_path):
    with open(out_path) as f:
      return with_extra_metrics(json.load(f), work)
  model = model_lib.from_checkpoint(run["checkpoint"], **mode)  # eval.py's road, its mode overrides
  # The synthetic training questions carry no "answer in a word" line: the prompt leaves it out.
  settings = runner_lib.EvalSettings(batch_size=scale.eval_batch, max_new_tokens=6, progress_bar=False,
                                     style=prompts_lib.PromptStyle(short_answer=""))
  runner = runner_lib.Runner(model, settings, sharding.make_mesh(dict(data=-1, fsdp=1, tensor=1)))
  scores, units, t0 = {}, {}, time.perf_counter()
  for table_name, benchmark, metric in BENCHMARKS[:1] if blank else BENCHMARKS:
    bench = benchmarks.get(benchmark)
    path = files["open_blank_val" if blank else "open_val"] if table_name == "open" else ds.benchmarks[benchmark]
    questions = bench.expand(bench.read(path, ds.root))  # MMBench: with its circular rotations
    if not questions:
      continue
    out_dir = os.path.join(work, "evals", name, table_name)
    summary = runner_lib.evaluate(runner, bench, questions, out_dir)
    scores[table_name] = summary["metrics"][metric or bench.metric]
    done = [r for r in runner_lib.read_predictions(os.path.join(out_dir, runner_lib.PREDICTIONS)) if "skipped" not in r]
    units[table_name] = bench.unit_scores(done, metric)
  result = dict(name=name, model_mode=model.mode, scores=scores, units=units, mean=float(np.mean(list(scores.values()))),
                seconds=time.perf_counter() - t0, cfg=model.cfg.to_dict())
  os.makedirs(os.path.dirname(out_path), exist_ok=True)
  write_json(out_path, result)
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


def train_flops(cfg: eem.ModelConfig, steps: tuple[int, int], batch: int, text_len: int) -> float:
  """Analytic training FLOPs of a two-stage run: stage 1 runs the frozen tower forward, the
  connector 3x and the frozen LLM forward and backward to its inputs (2x); stage 2 also computes the
  LLM's weight gradients (3x). Flamingo's cross blocks and resampler count as connector."""
  f = flops_lib.forward_flops(cfg, batch=batch, num_images=1, text_len=text_len)
  connector = f["projector"] + f.get("resampler", 0.0)
  stage1 = f["vision"] + 3 * connector + 2 * (f["total"] - f["vision"] - connector)
  stage2 = f["vision"] + 3 * (f["total"] - f["vision"])
  return steps[0] * stage1 + steps[1] * stage2


def typical_text_len(ds) -> int:
  """The median tokenized length of the val questions' prompts (template and answer included)."""
  tok = data_lib.load_tokenizer(ds.tokenizer_file)
  with open(ds.val_file) as f:
    val = json.load(f)
  return int(np.median([len(tok.encode(r["question"] + " " + r["answer"]).ids) for r in val])) + 12  # + template


def machine() -> str:
  dev = jax.devices()[0]
  cpu = platform.processor() or platform.machine()
  return (f"{dev.device_kind} ({jax.default_backend()}), {os.cpu_count()} CPU cores ({cpu}), "
          f"jax {jax.__version__}, Python {platform.python_version()}")


@contextlib.contextmanager
def timed(minutes: dict[str, float], phase: str):
  """Adds the wall minutes of the `with` body to `minutes[phase]`."""
  t0 = time.perf_counter()
  try:
    yield
  finally:
    minutes[phase] = minutes.get(phase, 0.0) + (time.perf_counter() - t0) / 60


def scale_from_args(args) -> Scale:
  scale = SCALES[args.scale]
  for field, cast in (("sizes", int), ("seeds", int)):
    if getattr(args, field):
      scale = dataclasses.replace(scale, **{field: tuple(cast(s) for s in getattr(args, field).split(","))})
  for field in ("stage1_epochs", "stage2_epochs"):
    if getattr(args, field) is not None:
      scale = dataclasses.replace(scale, **{field: getattr(args, field)})
  return scale


@dataclasses.dataclass
class Study:
  """What every alignment run and score of one invocation shares."""

  scale: Scale
  work: str
  ds: data_lib.SyntheticDataset
  files: dict[str, str]
  parts: str
  vocab: int
  text_len: int
  minutes: dict[str, float]

  def trained(self, mode: str, n: int, seed: int) -> dict:
    with timed(self.minutes, "align"):
      return align(self.scale, mode, n, seed, self.ds, self.files, self.parts, self.work, self.vocab)

  def scored(self, run: dict, variant: str = "", blank: bool = False, **mode) -> dict:
    with timed(self.minutes, "eval"):
      e = evaluate(run, self.ds, self.files, self.work, self.scale, variant, blank, **mode)
    pct = results_report.pct
    print(f"{e['name']}: mean {pct(e['mean'])} " + " ".join(f"{k} {pct(v)}" for k, v in e["scores"].items()),
          flush=True)
    cfg = eem.ModelConfig.from_dict(e["cfg"])
    return dict(e, mode=run["mode"], size=run["size"], seed=run["seed"], trainable=run["trainable"],
                train_seconds=run["seconds"], flops=prefill_flops(cfg, self.text_len),
                train_flops=train_flops(model_config(self.scale, run["mode"], self.vocab), run["steps"],
                                        self.scale.batch, self.text_len))


def ee_mllm_f(study: Study, run: dict, base: dict, *, along_schedule: bool) -> list[dict]:
  """The LLaVA model `run` (scored `base`) in composite mode, with and without the visual FFN: from
  layer 0, or from every layer k < depth when `along_schedule`."""
  depth = study.scale.llm["depth"]
  rows = []
  for k in range(depth if along_schedule else 1):
    for ffn in (True, False):
      e = study.scored(run, f"f_from{k}_{'ffn' if ffn else 'noffn'}", attention="composite", visual_ffn=ffn,
                       composite_from_layer=k)
      e.update(variant=f"composite from layer {k}, visual FFN {'on' if ffn else 'off'}", visual_ffn=ffn, n=k,
               base=base["name"], flops_saved=1 - e["flops"] / base["flops"])
      rows.append(e)
  return rows


def alignment_and_scores(study: Study) -> dict:
  """Every mode at every size for every seed, seed by seed (so that the log shows a whole curve
  early), each scored as soon as it is trained; each LLaVA model also on blank images and as
  EE-MLLM-F (along the schedule at the largest size) and, at the largest size, in every setting of
  the training-free frontier (`frontier.settings`)."""
  scale, largest = study.scale, max(study.scale.sizes)
  main_rows, blank_rows, retention, reductions = [], [], [], []
  tokens, depth = model_config(scale, "llava", study.vocab).tokens_per_image, scale.llm["depth"]
  for seed in scale.seeds:
    for n in scale.sizes:
      for mode in MODES:
        run = study.trained(mode, n, seed)
        main_rows.append(study.scored(run))
        if mode == "llava":
          blank_rows.append(study.scored(run, blank=True))
          retention += ee_mllm_f(study, run, main_rows[-1], along_schedule=n == largest)
          if n == largest:
            reductions += frontier.rows(study, run, main_rows[-1], depth, tokens)
  return dict(main=main_rows, blank=blank_rows, retention=retention, frontier=reductions)


def priors(study: Study) -> dict[str, float]:
  """Each column's answer prior: for open questions, TextVQA and DocVQA, always giving the most
  frequent training answer of the question type (`synthetic.answer_prior`; on these values ANLS
  gives no partial credit to a wrong one); for SEED, a uniform letter guess; for MMBench's
  CircularEval, a uniform guess right in every rotation, (1/4)^4."""
  with open(study.files["train_" + str(max(study.scale.sizes))]) as f:
    train_records = json.load(f)
  with open(study.ds.val_file) as f:
    val = json.load(f)
  of = lambda kinds: data_lib.answer_prior(train_records, [r for r in val if r["question_type"] in kinds])
  return {"open": of(OPEN_TYPES), "TextVQA": of(("text",)), "DocVQA": of(("doc",)), "SEED": 0.25,
          "MMBench": 0.25 ** 4}


def setup_lines(study: Study, parts_info: dict) -> dict:
  """The report's setup facts: shapes, recipe, the answer priors."""
  scale, cfg = study.scale, model_config(study.scale, "llava", study.vocab)
  return dict(
      sizes=list(scale.sizes), val=scale.val, seeds=list(scale.seeds), schedule_size=max(scale.sizes),
      parts=parts_info, text_len=study.text_len, priors=priors(study), margin=MARGIN, informative_sds=INFORMATIVE_SDS,
      shapes=dict(vision=f"{cfg.vision.width} wide, {cfg.vision.depth} layers", tokens=cfg.tokens_per_image,
                  llm=f"{cfg.llm.width} wide, {cfg.llm.depth} layers, {cfg.llm.num_heads}/{cfg.llm.num_kv_heads} heads,"
                      f" FFN {cfg.llm.mlp_dim}, vocab {cfg.llm.vocab_size}",
                  latents=scale.resampler_latents, image_size=scale.image_size),
      recipe=dict(stage1_epochs=scale.stage1_epochs, stage2_epochs=scale.stage2_epochs, stage1_lr=scale.stage1_lr,
                  stage2_lr=scale.stage2_lr, batch=scale.batch))


def compute_minutes(ds, parts_info: dict, rows: dict, speed_seconds: float) -> dict:
  """Every step's own measured wall time, cached steps included (minutes)."""
  unique = {e["name"]: e for e in rows["main"] + rows["blank"] + rows["retention"] + rows["frontier"]}.values()
  llm = parts_info["llm"]
  pretrain = llm["seconds"] + llm.get("letters", {}).get("seconds", 0.0) + parts_info["tower"]["seconds"]
  compute = dict(data=ds_seconds(ds), pretrain=pretrain / 60,
                 align=sum(e["train_seconds"] for e in rows["main"]) / 60,
                 eval=sum(e["seconds"] for e in unique) / 60, speed=speed_seconds / 60)
  compute["total"] = sum(v for v in compute.values() if v is not None)
  return compute


def main(argv=None):
  args = parse_args(argv)
  t_start, minutes = time.perf_counter(), {}
  scale = scale_from_args(args)
  work = os.path.abspath(args.work or f"runs/data_efficiency_{args.scale}")
  os.makedirs(args.out, exist_ok=True)
  # Every training run of a mode and stage compiles the same step: the persistent cache compiles it once.
  jax.config.update("jax_compilation_cache_dir", os.path.join(work, "xla_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)

  with timed(minutes, "data"):
    ds, files = dataset(scale, work)
    vocab = -(-data_lib.load_tokenizer(ds.tokenizer_file).get_vocab_size(with_added_tokens=True) // 64) * 64
  with timed(minutes, "pretrain"):
    parts, parts_info = pretrained_parts(scale, ds, files, work, vocab)
  minutes.update(align=0.0, eval=0.0)
  study = Study(scale, work, ds, files, parts, vocab, typical_text_len(ds), minutes)
  if args.cells_only:
    alignment_and_scores(study)
    return
  n_workers = len(workers.seed_groups(scale.seeds, args.workers or scale.workers))
  with timed(minutes, "workers"):
    workers.run_cells(os.path.abspath(__file__), argv or sys.argv[1:], scale.seeds, n_workers, work)
  rows = alignment_and_scores(study)
  with timed(minutes, "speed"):
    speed, speed_seconds = speed_table.rows(args, scale, work, MODES)
    reduction_speed, reduction_seconds = speed_table.reduction_rows(args, scale, work)

  shown = workers.shown_args(argv or sys.argv[1:])
  command = ["python", "benchmarks/data_efficiency.py"] + [shlex.quote(a) for a in shown]
  report = dict(
      scale=args.scale, command=" ".join(command), machine=machine(), timing=minutes, workers=n_workers,
      compute=compute_minutes(ds, parts_info, rows, speed_seconds + reduction_seconds), note=args.note,
      **setup_lines(study, parts_info), frontier_7b=frontier.at_7b(scale.llm["depth"]), frontier_speed=reduction_speed,
      **rows, speed=speed, speed_repeats=args.speed_repeats, speed_text=scale.speed_text, gpu_rows=bool(args.preset),
      modes=MODE_LABELS, columns=[b[0] for b in BENCHMARKS], extra_columns=[c[0] for c in EXTRA_METRICS])
  report["wall_minutes"] = (time.perf_counter() - t_start) / 60
  with open(os.path.join(args.out, "results.json"), "w") as f:
    json.dump(report, f, indent=1, default=str)
  results_report.write_all(args.out, report)  # results.md and the plots
  print(f"wrote {os.path.join(args.out, 'results.md')} ({report['wall_minutes']:.1f} min)")


if __name__ == "__main__":
  main()
