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

import json
import os
import re
import signal
import time
from typing import Any

import jax
import numpy as np
from absl import logging

from ee_mllm_jax import batch as batch_lib
from ee_mllm_jax import data as data_lib
from ee_mllm_jax import experiment
from ee_mllm_jax import flops
from ee_mllm_jax import params as params_lib
from ee_mllm_jax import sharding
from ee_mllm_jax import storage
from ee_mllm_jax import workdir_lock
from ee_mllm_jax.config import ModelConfig
from ee_mllm_jax.models import EEMLLM
from ee_mllm_jax.train import checkpoint as ckpt_lib
from ee_mllm_jax.train import evaluators as evaluators_lib
from ee_mllm_jax.train.state import create_sharded_state, make_init_fn, make_optimizer, split_params
from ee_mllm_jax.train.step import make_eval_step, make_train_step

# Dense bf16 peak per device, for MFU; matched against `device.device_kind`.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12,
              "L40S": 362e12, "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12,
              "TPU v5p": 459e12, "TPU v6": 918e12}


def peak_flops(config) -> float | None:
  if config.get("peak_flops_per_device", 0) > 0:
    return config.peak_flops_per_device * jax.device_count()
  kind = jax.devices()[0].device_kind
  for name, peak in PEAK_FLOPS.items():
    if name.lower() in kind.lower():
      return peak * jax.device_count()
  return None


def step_flops(model_cfg: ModelConfig, batch: int, num_images: int, text_len: int) -> float:
  """Training FLOPs of one step: 3x the analytic forward (`ee_mllm_jax.flops`)."""
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
    return bool(np.any(_allgather(np.asarray(self.requested))))


def _allgather(x: np.ndarray) -> np.ndarray:
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return multihost_utils.process_allgather(x)


def global_text_length(batch: dict[str, np.ndarray]) -> int:
  """The text length every process pads its batch to: the largest of the processes' buckets
  (one all-gathered scalar), so processes stay in lock-step without all padding to the
  largest bucket of the config."""
  t = batch["input_ids"].shape[1]
  return int(np.max(_allgather(np.asarray(t, np.int32)))) if jax.process_count() > 1 else t


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
  """Trains as `config` says; returns the final metrics and where things were written. The
  workdir is locked for the run (`workdir_lock`): a second run on it is refused naming the
  holder; a full disk at any write is a `storage.DiskFullError` naming the device and file."""
  import contextlib  # pylint: disable=g-import-not-at-top
  with contextlib.ExitStack() as held:
    held.enter_context(workdir_lock.hold(config.workdir, jax.process_index()))
    ckpt_dir = config.checkpoint.get("dir")
    workdir = os.path.abspath(config.workdir)
    if ckpt_dir and os.path.commonpath([os.path.abspath(ckpt_dir), workdir]) != workdir:
      held.enter_context(workdir_lock.hold(ckpt_dir, jax.process_index()))  # checkpoints kept elsewhere
    return _train(config)


def _train(config) -> dict[str, Any]:
  # ------------------------------------------------------------------ processes, workdir
  is_main = jax.process_index() == 0
  workdir = os.path.abspath(config.workdir)
  ckpt_dir = os.path.abspath(config.checkpoint.dir or os.path.join(workdir, "checkpoints"))
  os.makedirs(workdir, exist_ok=True)
  if not is_main:
    logging.set_verbosity(logging.WARNING)

  # ------------------------------------------------------------------ config, data
  on_nonfinite = config.get("on_nonfinite", "stop")
  if on_nonfinite not in ("stop", "skip"):
    raise experiment.ConfigError(f"on_nonfinite must be 'stop' or 'skip', got {on_nonfinite!r}")
  exp = experiment.resolve(config)  # train records read once, here
  model_cfg, data_cfg, n_steps = exp.model, exp.data, exp.total_steps
  log_ids = config.get("log_record_ids", False)
  train_iter = data_lib.make_train_iterator(data_cfg, with_meta=log_ids, records=exp.train_records)

  # ------------------------------------------------------------------ model, optimizer
  model = EEMLLM(model_cfg)
  optim_cfg = experiment.optim_config(config, n_steps)
  optimizer, schedule = make_optimizer(optim_cfg)

  # ------------------------------------------------------------------ mesh, sharded state
  mesh = sharding.make_mesh(dict(config.mesh))
  jax.set_mesh(mesh)
  data_parallel = sharding.data_parallel_size(mesh)
  if data_cfg.global_batch_size % data_parallel:
    logging.warning("global_batch_size %d does not divide over the %d data-parallel devices: every batch is "
                    "replicated instead of split (slower, same result)", data_cfg.global_batch_size, data_parallel)
  init, state_shardings, abstract_state = create_sharded_state(
      make_init_fn(model, optimizer, optim_cfg.trainable, seed=config.seed), mesh)
  n_params = sum(x.size for x in jax.tree.leaves(abstract_state["params"]))
  n_train = sum(x.size for x in jax.tree.leaves(split_params(abstract_state["params"], optim_cfg.trainable)[0]))

  # ------------------------------------------------------------------ resume / load
  checkpointer = ckpt_lib.Checkpointer(ckpt_dir, keep=config.checkpoint.keep,
                                       every_steps=config.checkpoint.every_steps,
                                       async_save=config.checkpoint.async_save, run_config=exp.run_config())
  start, state = checkpointer.restore_latest(abstract_state, train_iter, model_config=model_cfg)
  if start is not None:
    logging.info("Resuming from %s/%d", ckpt_dir, start)
  else:
    partial = None
    if init_from_given(config.init_from):
      partial = load_pretrained(config.init_from, model_cfg, abstract_state["params"])
      report = params_lib.InitReport.of(abstract_state["params"], partial)
      logging.info("init_from %s: %s", dict(config.init_from), report)
      frozen_fresh = [p for p in report.initialised if not re.match(optim_cfg.trainable, p)]
      if frozen_fresh:
        logging.warning("%d parameters are freshly initialised but frozen (not matched by trainable=%r): %s",
                        len(frozen_fresh), optim_cfg.trainable, frozen_fresh[:5])
    state = init(partial)
  start = int(jax.device_get(state["step"]))

  # ------------------------------------------------------------------ compiled steps, evaluators
  batch_sh = sharding.batch_sharding(mesh, (data_cfg.global_batch_size,))
  train_step = jax.jit(make_train_step(model, optimizer, schedule, optim_cfg.trainable, config.accum_steps),
                       in_shardings=(state_shardings, batch_sh), out_shardings=(state_shardings, None),
                       donate_argnums=0)
  eval_step = jax.jit(make_eval_step(model), in_shardings=(state_shardings["params"], None))

  def host_batch(batch):
    batch = batch_lib.pad_text(batch, global_text_length(batch))
    batch_lib.validate(batch, model_cfg, keys=batch_lib.TRAIN_KEYS)
    return batch

  evaluators: list[evaluators_lib.Evaluator] = []
  if data_cfg.val_file and config.eval_every >= 0:
    eval_cfg = data_cfg.replace(global_batch_size=config.eval_batch_size, shuffle=False, worker_count=0)
    evaluators.append(evaluators_lib.Validation(
        eval_cfg, eval_step, mesh, prepare=host_batch, max_batches=config.eval_max_batches,
        blank_images=config.get("eval_blank_images", True), references=exp.reference_accuracies))

  # ------------------------------------------------------------------ loop
  metrics_path = os.path.join(workdir, "metrics.jsonl")
  if is_main:
    truncate_metrics(metrics_path, start)  # a resumed run rewrites the steps after its checkpoint
  metrics_file = open(metrics_path, "a") if is_main else None
  ids_file = open(os.path.join(workdir, f"record_ids.process{jax.process_index()}.txt"), "a") if log_ids else None

  def write(record):
    if metrics_file:
      with storage.writing(metrics_path):
        metrics_file.write(json.dumps(record) + "\n")
        metrics_file.flush()

  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  bar = tqdm(total=n_steps, initial=start, disable=not is_main or not config.get("progress_bar", True),
             dynamic_ncols=True, desc="train")
  peak = peak_flops(config)
  history, evals, pending = [], [], []
  skipped_updates = {"non-finite loss or gradient": 0, "no labelled token": 0}
  interval = dict(t0=None, flops=0.0, tokens=0.0, steps=0)
  logging.info("Model %s (%s): %.1fM parameters, %.1fM trained; mesh %s; %d steps from %d; %d processes",
               config.model.preset, model_cfg.mode_name, n_params / 1e6, n_train / 1e6, dict(mesh.shape),
               n_steps, start, jax.process_count())

  def flush_logs():
    """Fetches pending step metrics (this syncs) and logs them."""
    if not pending:
      return
    fetched = jax.device_get([m for _, m, _ in pending])  # waits for the steps to finish
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
    for (step, _, text_len), m in zip(pending, fetched):
      record = {"step": step, **{k: float(v) for k, v in m.items()}, "text_len": text_len, **rate}
      history.append(record)
      write(record)
      if not m["params_finite"]:
        raise NonFiniteError(f"step {step}: the trained parameters hold non-finite values; stopping "
                             f"(nothing after step {start} that is non-finite was saved)")
      if not m["finite"]:
        skipped_updates["non-finite loss or gradient"] += 1
        message = (f"step {step}: non-finite loss {float(m['loss'])} or gradient norm {float(m['grad_norm'])}; "
                   "its update was not applied")
        if on_nonfinite != "skip":
          raise NonFiniteError(message + " (on_nonfinite='skip' skips such steps instead of stopping)")
        logging.warning("%s (skipped: %d so far)", message, skipped_updates["non-finite loss or gradient"])
      elif not m["applied"]:
        skipped_updates["no labelled token"] += 1
        logging.warning("step %d: no labelled token in the batch (every row skipped?); no update applied", step)
    last = history[-1]
    bar.set_postfix_str(
        f"loss={last['loss']:.3f} lr={last['learning_rate']:.2e} gnorm={last['grad_norm']:.2f}"
        + (f" tok/s={last['tokens_per_s']:.0f}" if "tokens_per_s" in last else "")
        + (f" mfu={100 * last['mfu']:.1f}%" if "mfu" in last
           else f" {last['flops_per_s'] / 1e9:.0f}GFLOP/s" if "flops_per_s" in last else ""), refresh=False)
    pending.clear()
    interval.update(t0=time.perf_counter(), flops=0.0, tokens=0.0, steps=0)

  def run_eval(step) -> tuple[dict[str, Any], list[str]]:
    """Every evaluator on the current parameters -> merged metrics and one phrase each."""
    flush_logs()
    result, phrases = {"step": step}, []
    for evaluator in evaluators:
      metrics = evaluator.run(state["params"], step)
      result.update(metrics)
      phrases.append(evaluator.describe(metrics))
      if is_main:
        bar.write(f"step {step}: {phrases[-1]}")
    if evaluators:
      evals.append(result)
      write(result)
    interval.update(t0=time.perf_counter(), flops=0.0, tokens=0.0, steps=0)
    return result, phrases

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
        pending.append((step, metrics, batch["input_ids"].shape[1]))
        if interval["t0"] is None:  # the first step compiles: time from its end
          jax.block_until_ready(metrics)
          interval["t0"] = time.perf_counter()
          flush_logs()
        else:
          interval["steps"] += 1
          interval["tokens"] += n_tok * jax.process_count()
          interval["flops"] += step_flops(model_cfg, batch["input_ids"].shape[0] * jax.process_count(),
                                          data_cfg.max_images, batch["input_ids"].shape[1])
        if step % config.log_every == 0 or step == n_steps:
          flush_logs()
        bar.update(1)
        if checkpointer.due(step):
          flush_logs()  # a checkpoint is written only after its steps were checked finite
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
  try:
    flush_logs()
  except NonFiniteError:
    checkpointer.close()
    raise
  bar.close()
  checkpointer.save(step, state, train_iter, force=True)
  checkpointer.wait()
  checkpointer.close()
  train_iter.close()
  if ids_file:
    ids_file.close()
  final, phrases = ({}, []) if stopped_early else run_eval(step)
  plot_path = os.path.join(workdir, "loss.png")
  if is_main and history:
    with storage.writing(plot_path):
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
    parts += phrases
    skips = {**{f"records skipped: {k}": v for k, v in train_iter.stats.counts.items() if v},
             **{f"updates skipped: {k}": v for k, v in skipped_updates.items() if v}}
    summary["skipped"] = skips
    if skips:
      parts.append("; ".join(f"{k} {v}" for k, v in skips.items()))
    print(" | ".join(parts), flush=True)
  return summary


class NonFiniteError(RuntimeError):
  """Training produced a non-finite loss, gradient or parameter; the run stops (non-zero exit)
  without saving it, so the checkpoints on disk stay finite."""


# What a user can cause and fix: train.py reports these in one line and exits with status 1.
USER_ERRORS = (experiment.ConfigError, ckpt_lib.ConfigMismatchError, NonFiniteError, FileNotFoundError,
               data_lib.BadRecordError, batch_lib.BatchError, workdir_lock.WorkdirLockedError,
               storage.DiskFullError, ckpt_lib.DamagedCheckpointError)


def truncate_metrics(path: str, step: int | None):
  """Drops the records after `step` (those of steps a resumed run is about to redo)."""
  if not os.path.exists(path):
    return
  with open(path) as f:
    lines = f.readlines()
  complete = complete_lines(path, lines)
  keep = [line for line in complete if line.strip() and json.loads(line).get("step", 0) <= (step or 0)]
  if len(keep) != len(lines) or (lines and not lines[-1].endswith("\n")):
    with storage.writing(path + ".tmp"):
      with open(path + ".tmp", "w") as f:
        f.writelines(line if line.endswith("\n") else line + "\n" for line in keep)
    os.replace(path + ".tmp", path)
    logging.info("%s: dropped %d records after step %d", path, len(lines) - len(keep), step or 0)


def complete_lines(path: str, lines: list[str]) -> list[str]:
  """`lines` without a torn last line (a kill or a full disk in the middle of a write): one
  that does not parse as JSON is dropped with a warning; a damaged line before the last is an
  error naming it (that is not what an interrupted append leaves)."""
  for i, line in enumerate(lines):
    if not line.strip():
      continue
    try:
      json.loads(line)
    except ValueError:
      if i == len(lines) - 1:
        logging.warning("%s: dropping a torn last line (%d characters)", path, len(line))
        return lines[:-1]
      raise ValueError(f"{path}: line {i + 1} is not JSON; it is not a torn last line, so it is left "
                       "for you to inspect") from None
  return lines


def load_pretrained(init_from, model_cfg: ModelConfig, abstract_params) -> dict[str, Any]:
  """The parameters a pretrained source has for this model, placed on their shardings (a
  subset where it covers part of the model: the rest is initialised, see `params.overlay`).
  Sources (`init_from.kind`):

  * "orbax": an Orbax checkpoint (its recorded model config must match);
  * "hf": a saved HF LLaVA directory (or .safetensors file), via `convert.hf`;
  * "hf_parts": an HF vision tower (`vision_path`) and an HF LLM (`llm_path`), LLaVA's
    stage-1 start: the projector is left to the fresh init. Their configs must describe the
    run's model (a difference is a ConfigMismatchError naming the fields).

  HF tensors are read one by one and each parameter goes onto its sharding, in the run's
  param dtype, before the next is read."""
  from ee_mllm_jax.convert import hf, hf_config  # pylint: disable=g-import-not-at-top

  if init_from.kind not in ("orbax", "hf", "hf_parts"):
    raise ValueError(f"init_from.kind must be 'orbax', 'hf' or 'hf_parts', got {init_from.kind!r}")
  for key in ("vision_path", "llm_path") if init_from.kind == "hf_parts" else ("path",):
    if not os.path.exists(init_from[key]):
      raise FileNotFoundError(f"init_from.{key} {init_from[key]!r} does not exist")
  if init_from.kind == "orbax":
    saved = ckpt_lib.read_run_config(init_from.path)
    if saved is not None:
      ckpt_lib.check_model_config(ModelConfig.from_dict(saved["model"]), model_cfg, f"init_from {init_from.path}")
    return ckpt_lib.load_params(init_from.path, abstract_params)
  want = params_lib.flatten(abstract_params)
  dtype = want_dtype(abstract_params)

  def place(path, value):
    if path not in want:
      raise ValueError(f"the HF checkpoint has {path}, which the model {model_cfg} has not")
    if tuple(value.shape) != tuple(want[path].shape):
      raise ValueError(f"{path}: source {tuple(value.shape)}, model {tuple(want[path].shape)}")
    return jax.device_put(np.asarray(value, want[path].dtype), want[path].sharding)

  if init_from.kind == "hf":
    if os.path.isdir(init_from.path):  # its config.json must describe the run's model
      ckpt_lib.check_model_config(hf_config.config_from_hf(hf.read_config(init_from.path)), model_cfg,
                                  f"init_from {init_from.path}")
    return hf.params_from_hf(hf.TensorReader(init_from.path), model_cfg, dtype, missing="skip", place=place)
  # hf_parts: the configs are checked before any tensor is read
  vision = hf_config.vision_config_from_hf(hf.read_config(init_from.vision_path), model_cfg.vision.feature_layer)
  llm = hf_config.llm_config_from_hf(hf.read_config(init_from.llm_path))
  ckpt_lib.check_model_config(model_cfg.replace(vision=vision, llm=llm), model_cfg,
                              f"init_from {init_from.vision_path} + {init_from.llm_path}")
  _, vision_params = hf.load_hf_vision(init_from.vision_path, feature_layer=vision.feature_layer, dtype=dtype,
                                       place=place)
  _, llm_params = hf.load_hf_llm(init_from.llm_path, dtype=dtype, place=place)
  return {"vision": vision_params, "llm": llm_params}


def want_dtype(abstract_params) -> np.dtype:
  """The dtype HF tensors are kept in: the model's parameter dtype."""
  return np.dtype(jax.tree.leaves(abstract_params)[0].dtype)


def init_from_given(init_from) -> bool:
  return bool(init_from.get("path") or (init_from.get("kind") == "hf_parts" and init_from.get("llm_path")))
