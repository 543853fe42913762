"""`train(config)`: the trainer, one flat function in readable sections.

    data -> model + optimizer -> mesh -> eval_shape(init) -> shardings -> jit(init)
         -> resume / load pretrained -> compiled steps -> loop (log, validate, checkpoint)
         -> final checkpoint, validation, plot, summary

The config is an `ml_collections.ConfigDict` (see `configs/demo.py` for every field).
Every process runs this function; each reads its own shard of the data, and only process 0
logs, writes metrics and plots. SIGTERM / SIGINT finish the current step, write a
checkpoint and return; a restarted run resumes from the latest checkpoint in
`checkpoint.dir` by itself and continues exactly where it stopped.
"""

from __future__ import annotations

import collections
import json
import math
import os
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from ee_mllm_jax import data as data_lib
from ee_mllm_jax import sharding
from ee_mllm_jax.config import ModelConfig
from ee_mllm_jax.models import EEMLLM
from ee_mllm_jax.train import checkpoint as ckpt_lib
from ee_mllm_jax.train.state import OptimConfig, create_sharded_state, make_init_fn, make_optimizer, split_params
from ee_mllm_jax.train.step import make_eval_step, make_train_step

MODEL_OVERRIDES = ("attention", "visual_ffn", "projector", "dtype", "param_dtype", "remat", "scan_unroll")
# Dense bf16 peak per device, for MFU; matched against `device.device_kind`.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12,
              "L40S": 362e12, "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12,
              "TPU v5p": 459e12, "TPU v6": 918e12}


def model_config(config) -> ModelConfig:
  """The preset, with top-level overrides and optional `llm` / `vision` field overrides."""
  m = config.model
  cfg = ModelConfig.preset(m.preset, **{k: m[k] for k in MODEL_OVERRIDES if k in m})
  for part in ("llm", "vision"):
    changes = {k: v for k, v in dict(m.get(part) or {}).items() if v is not None}
    if changes:
      cfg = cfg.replace(**{part: getattr(cfg, part).replace(**changes)})
  return cfg


def data_config(config, model_cfg: ModelConfig) -> data_lib.DataConfig:
  """DataConfig from `config.data`; a synthetic dataset is generated on first use."""
  fields = dict(config.data)
  if config.get("synthetic") and config.synthetic.get("dir"):
    synth = dict(config.synthetic)
    root = synth.pop("dir")
    if "mix" in synth and synth["mix"] is not None:
      synth["mix"] = dict(synth["mix"])
    if jax.process_index() == 0 or not os.path.exists(os.path.join(root, "manifest.json")):
      ds = data_lib.ensure_dataset(root, **synth)  # atomic rename: concurrent processes are safe
    else:
      ds = data_lib.SyntheticDataset(root)
    fields.update(train_file=ds.train_file, val_file=ds.val_file, tokenizer_file=ds.tokenizer_file)
  if "buckets" in fields:
    fields["buckets"] = tuple(fields["buckets"])
  return data_lib.DataConfig.for_model(model_cfg, **fields)


def optim_config(config, total_steps: int) -> OptimConfig:
  o = dict(config.optim)
  ratio = o.pop("warmup_ratio", 0.0)
  o.setdefault("warmup_steps", int(math.ceil(ratio * total_steps)))
  return OptimConfig(total_steps=total_steps, **o)


def total_steps(config, data_cfg) -> int:
  if config.steps > 0:
    return int(config.steps)
  with open(data_cfg.train_file) as f:  # LLaVA JSON list or JSONL
    n = len(json.load(f)) if not data_cfg.train_file.endswith(".jsonl") else sum(1 for l in f if l.strip())
  return int(math.ceil(config.num_epochs * n / data_cfg.global_batch_size / config.accum_steps))


def example_batch(model_cfg: ModelConfig, max_images: int) -> dict[str, np.ndarray]:
  """One tiny row of the batch layout: all `init` needs (parameter shapes don't depend on B, T)."""
  s, p = model_cfg.vision.image_size, model_cfg.tokens_per_image
  return dict(pixel_values=np.zeros((1, max_images, s, s, 3), np.float32),
              image_valid=np.ones((1, max_images), bool), input_ids=np.zeros((1, 8), np.int32),
              text_positions=np.arange(8, dtype=np.int32)[None] + max_images * p,
              text_valid=np.ones((1, 8), bool),
              visual_positions=np.arange(max_images * p, dtype=np.int32)[None])


def pad_text(batch: dict[str, np.ndarray], length: int) -> dict[str, np.ndarray]:
  """Pads the text stream to `length` (multi-process runs: every process the same shape)."""
  t = batch["input_ids"].shape[1]
  if t == length:
    return batch
  fill = {"input_ids": 0, "text_positions": 0, "text_valid": False, "labels": -100}
  return {k: np.pad(v, ((0, 0), (0, length - t)), constant_values=fill[k]) if k in fill else v
          for k, v in batch.items()}


def answer_prior(train_file: str, val_file: str) -> float | None:
  """Val accuracy of always giving, per question type, the most frequent train answer."""
  train, _ = data_lib.load_records(train_file)
  val, _ = data_lib.load_records(val_file)
  counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
  for record in train:
    answers = [t["value"].strip() for t in record.get("conversations", []) if t.get("from") in ("gpt", "assistant")]
    for kind, answer in zip(record.get("question_types", []), answers):
      counts[kind][answer] += 1
  scored = [r for r in val if "answer" in r and "question_type" in r]
  if not scored or not counts:
    return None
  best = {kind: c.most_common(1)[0][0] for kind, c in counts.items()}
  return sum(best.get(r["question_type"]) == r["answer"] for r in scored) / len(scored)


def peak_flops(config) -> float | None:
  if config.get("peak_flops_per_device", 0) > 0:
    return config.peak_flops_per_device * jax.device_count()
  kind = jax.devices()[0].device_kind
  for name, flops in PEAK_FLOPS.items():
    if name.lower() in kind.lower():
      return flops * jax.device_count()
  return None


def step_flops(model_cfg: ModelConfig, batch: int, num_images: int, text_len: int) -> float | None:
  """Training FLOPs of one step: 3x the analytic forward (`ee_mllm_jax.flops`)."""
  try:
    from ee_mllm_jax import flops  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  return 3 * flops.forward_flops(model_cfg, batch=batch, num_images=num_images, text_len=text_len)["total"]


class _Stop:
  """Set by SIGTERM / SIGINT; the loop checkpoints and returns at the next step boundary."""

  def __init__(self):
    self.requested = False
    self._previous = {}

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      try:
        self._previous[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread
        pass
    return self

  def _handle(self, signum, frame):
    del frame
    if self.requested and signum == signal.SIGINT:
      raise KeyboardInterrupt  # a second Ctrl-C: give up on the checkpoint
    logging.warning("Received signal %d: checkpointing and stopping after this step.", signum)
    self.requested = True

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)

  def anywhere(self) -> bool:
    """Did any process get a signal? (All processes must stop at the same step.)"""
    if jax.process_count() == 1:
      return self.requested
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    return bool(np.any(multihost_utils.process_allgather(np.asarray(self.requested))))


def _plot(path: str, history: list[dict], evals: list[dict]):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(7, 4))
  steps = [h["step"] for h in history]
  losses = [h["loss"] for h in history]
  ax.plot(steps, losses, color="tab:blue", alpha=0.35, lw=1, label="train loss")
  if len(losses) >= 10:
    k = max(len(losses) // 20, 2)
    smooth = np.convolve(losses, np.ones(k) / k, mode="valid")
    ax.plot(steps[k - 1:], smooth, color="tab:blue", lw=2, label=f"train loss ({k}-step mean)")
  if evals:
    ax.plot([e["step"] for e in evals], [e["val_loss"] for e in evals], "o-", color="tab:orange", label="val loss")
  ax.set_xlabel("step")
  ax.set_ylabel("loss")
  ax.grid(alpha=0.3)
  if evals and evals[-1].get("val_accuracy") is not None:
    acc = ax.twinx()
    acc.plot([e["step"] for e in evals], [100 * e["val_accuracy"] for e in evals], "s--", color="tab:green",
             label="val answer accuracy (%)")
    acc.set_ylabel("val answer accuracy (%)")
    acc.set_ylim(0, 100)
    acc.legend(loc="center right")
  ax.legend(loc="upper right")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def train(config) -> dict[str, Any]:
  """Trains as `config` says; returns the final metrics and where things were written."""
  # ------------------------------------------------------------------ processes, workdir
  is_main = jax.process_index() == 0
  workdir = os.path.abspath(config.workdir)
  ckpt_dir = os.path.abspath(config.checkpoint.dir or os.path.join(workdir, "checkpoints"))
  os.makedirs(workdir, exist_ok=True)
  if not is_main:
    logging.set_verbosity(logging.WARNING)

  # ------------------------------------------------------------------ data
  model_cfg = model_config(config)
  data_cfg = data_config(config, model_cfg)
  n_steps = total_steps(config, data_cfg)
  multiprocess = jax.process_count() > 1
  log_ids = config.get("log_record_ids", False)
  train_iter = data_lib.make_train_iterator(data_cfg, with_meta=log_ids)
  eval_cfg = data_cfg.replace(global_batch_size=config.eval_batch_size, shuffle=False, worker_count=0)
  prior = answer_prior(data_cfg.train_file, data_cfg.val_file) if data_cfg.val_file else None

  # ------------------------------------------------------------------ model, optimizer
  model = EEMLLM(model_cfg)
  optim_cfg = optim_config(config, n_steps)
  optimizer, schedule = make_optimizer(optim_cfg)

  # ------------------------------------------------------------------ mesh, sharded state
  mesh = sharding.make_mesh(dict(config.mesh))
  jax.set_mesh(mesh)
  init, state_shardings, abstract_state = create_sharded_state(
      make_init_fn(model, optimizer, optim_cfg.trainable, example_batch(model_cfg, data_cfg.max_images),
                   seed=config.seed), mesh)
  n_params = sum(x.size for x in jax.tree.leaves(abstract_state["params"]))
  n_train = sum(x.size for x in jax.tree.leaves(split_params(abstract_state["params"], optim_cfg.trainable)[0]))

  # ------------------------------------------------------------------ resume / load
  checkpointer = ckpt_lib.Checkpointer(ckpt_dir, keep=config.checkpoint.keep,
                                       every_steps=config.checkpoint.every_steps,
                                       async_save=config.checkpoint.async_save)
  start = checkpointer.latest_step()
  if start is not None:
    logging.info("Resuming from %s/%d", ckpt_dir, start)
    state = checkpointer.restore(start, abstract_state, train_iter)
  else:
    state = init()
    if config.init_from.path:
      state["params"] = load_pretrained(config.init_from, model_cfg, abstract_state["params"])
  start = int(jax.device_get(state["step"]))

  # ------------------------------------------------------------------ compiled steps
  batch_sh = sharding.batch_sharding(mesh, (data_cfg.global_batch_size,))
  train_step = jax.jit(make_train_step(model, optimizer, schedule, optim_cfg.trainable, config.accum_steps),
                       in_shardings=(state_shardings, batch_sh), out_shardings=(state_shardings, None),
                       donate_argnums=0)
  eval_step = jax.jit(make_eval_step(model), in_shardings=(state_shardings["params"], None))

  def host_batch(batch):
    return pad_text(batch, data_cfg.buckets[-1]) if multiprocess else batch

  def validate(params, blank: bool = False) -> dict[str, float]:
    it = data_lib.make_eval_iterator(eval_cfg)
    totals = collections.Counter()
    for i, batch in enumerate(it):
      if 0 <= config.eval_max_batches <= i:
        break
      batch = host_batch(batch)
      if blank:  # the normalised mean colour: a constant image with nothing in it
        batch["pixel_values"] = np.zeros_like(batch["pixel_values"])
      totals.update({k: float(v) for k, v in jax.device_get(eval_step(params, sharding.shard_batch(batch, mesh))).items()})
    it.close()
    return {"loss": totals["loss_sum"] / max(totals["tokens"], 1.0),
            "accuracy": totals["correct"] / max(totals["rows"], 1.0)}

  # ------------------------------------------------------------------ loop
  metrics_path = os.path.join(workdir, "metrics.jsonl")
  metrics_file = open(metrics_path, "a") if is_main else None
  ids_file = open(os.path.join(workdir, f"record_ids.process{jax.process_index()}.txt"), "a") if log_ids else None

  def write(record):
    if metrics_file:
      metrics_file.write(json.dumps(record) + "\n")
      metrics_file.flush()

  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  bar = tqdm(total=n_steps, initial=start, disable=not is_main or not config.get("progress_bar", True),
             dynamic_ncols=True, desc="train")
  peak = peak_flops(config)
  history, evals, pending = [], [], []
  interval = dict(t0=None, flops=0.0, tokens=0.0, steps=0)
  logging.info("Model %s (%s): %.1fM parameters, %.1fM trained; mesh %s; %d steps from %d; %d processes",
               config.model.preset, model_cfg.attention, n_params / 1e6, n_train / 1e6, dict(mesh.shape),
               n_steps, start, jax.process_count())

  def flush_logs():
    """Fetches pending step metrics (this syncs) and logs them."""
    if not pending:
      return
    fetched = jax.device_get([m for _, m in pending])  # waits for the steps to finish
    now = time.perf_counter()
    rate = {}
    if interval["t0"] is not None and interval["steps"]:
      dt = now - interval["t0"]
      rate["tokens_per_s"] = interval["tokens"] / dt
      rate["step_time_s"] = dt / interval["steps"]
      if interval["flops"]:
        rate["flops_per_s"] = interval["flops"] / dt
        if peak:
          rate["mfu"] = rate["flops_per_s"] / peak
    for (step, _), m in zip(pending, fetched):
      record = {"step": step, **{k: float(v) for k, v in m.items()}, **rate}
      history.append(record)
      write(record)
    last = history[-1]
    bar.set_postfix_str(
        f"loss={last['loss']:.3f} lr={last['learning_rate']:.2e} gnorm={last['grad_norm']:.2f}"
        + (f" tok/s={last['tokens_per_s']:.0f}" if "tokens_per_s" in last else "")
        + (f" mfu={100 * last['mfu']:.1f}%" if "mfu" in last
           else f" {last['flops_per_s'] / 1e9:.0f}GFLOP/s" if "flops_per_s" in last else ""), refresh=False)
    pending.clear()
    interval.update(t0=time.perf_counter(), flops=0.0, tokens=0.0, steps=0)

  def run_eval(step):
    flush_logs()
    result = {"step": step}
    if data_cfg.val_file:
      v = validate(state["params"])
      result.update(val_loss=v["loss"], val_accuracy=v["accuracy"])
      if config.get("eval_blank_images", True):
        result["val_accuracy_blank_images"] = validate(state["params"], blank=True)["accuracy"]
      result["answer_prior_accuracy"] = prior
      evals.append(result)
      write(result)
      if is_main:
        bar.write(f"step {step}: val loss {result['val_loss']:.4f}, answer accuracy "
                  f"{100 * result['val_accuracy']:.1f}%"
                  + (f" (blank images {100 * result['val_accuracy_blank_images']:.1f}%)"
                     if "val_accuracy_blank_images" in result else "")
                  + (f", answer prior {100 * prior:.1f}%" if prior is not None else ""))
    interval.update(t0=time.perf_counter(), flops=0.0, tokens=0.0, steps=0)
    return result

  step = start
  stopped_early = False
  with _Stop() as stop:
    try:
      while step < n_steps:
        batch = next(train_iter)
        if log_ids:
          batch, meta = batch
          ids_file.write("".join(f"{step}\t{m['id']}\n" for m in meta if m))
        batch = host_batch(batch)
        n_tok = float(batch["text_valid"].sum() + batch["image_valid"].sum() * model_cfg.tokens_per_image)
        global_batch = sharding.shard_batch(batch, mesh)
        state, metrics = train_step(state, global_batch)
        step += 1
        pending.append((step, metrics))
        if interval["t0"] is None:  # the first step compiles: time from its end
          jax.block_until_ready(metrics)
          interval["t0"] = time.perf_counter()
          flush_logs()
        else:
          interval["steps"] += 1
          interval["tokens"] += n_tok * jax.process_count()
          interval["flops"] += step_flops(model_cfg, batch["input_ids"].shape[0] * jax.process_count(),
                                          data_cfg.max_images, batch["input_ids"].shape[1]) or 0.0
        if step % config.log_every == 0 or step == n_steps:
          flush_logs()
        bar.update(1)
        checkpointer.save(step, state, train_iter)
        if config.eval_every > 0 and step % config.eval_every == 0 and step < n_steps:
          run_eval(step)
        if stop.anywhere():
          stopped_early = step < n_steps
          break
    except BaseException:
      checkpointer.close()  # waits for a save in flight, so its threads don't die noisily
      raise

  # ------------------------------------------------------------------ final
  flush_logs()
  bar.close()
  checkpointer.save(step, state, train_iter, force=True)
  checkpointer.wait()
  checkpointer.close()
  train_iter.close()
  if ids_file:
    ids_file.close()
  final = {} if stopped_early or config.eval_every < 0 else run_eval(step)
  plot_path = os.path.join(workdir, "loss.png")
  if is_main and history:
    _plot(plot_path, history, evals)
  if metrics_file:
    metrics_file.close()
  summary = {"step": step, "stopped_early": stopped_early, "checkpoint": os.path.join(ckpt_dir, str(step)),
             "metrics": metrics_path, "plot": plot_path if history else None,
             "train_loss": history[-1]["loss"] if history else None, **final}
  if is_main:
    parts = [f"{'stopped' if stopped_early else 'done'} at step {step}/{n_steps}",
             f"checkpoint {summary['checkpoint']}", f"metrics {metrics_path}"]
    if summary["plot"]:
      parts.append(f"loss curve {plot_path}")
    if "val_accuracy" in final:
      parts.append(f"val accuracy {100 * final['val_accuracy']:.1f}%"
                   + (f" vs answer prior {100 * prior:.1f}%" if prior is not None else "")
                   + (f" and blank images {100 * final['val_accuracy_blank_images']:.1f}%"
                      if "val_accuracy_blank_images" in final else ""))
    print(" | ".join(parts), flush=True)
  return summary


def load_pretrained(init_from, model_cfg: ModelConfig, abstract_params):
  """Parameters to start from: an Orbax checkpoint, or HF LLaVA safetensors via `convert.hf`."""
  if init_from.kind == "orbax":
    return ckpt_lib.load_params(init_from.path, abstract_params)
  if init_from.kind == "hf":  # a saved HF LLaVA directory (or .safetensors file)
    from ee_mllm_jax.convert import hf  # pylint: disable=g-import-not-at-top
    params = hf.params_from_hf(hf.read_safetensors(init_from.path), model_cfg)
    return jax.tree.map(lambda x, a: jax.device_put(jnp.asarray(x, a.dtype), a.sharding), params, abstract_params)
  raise ValueError(f"init_from.kind must be 'orbax' or 'hf', got {init_from.kind!r}")
