"""`train(config)`: the trainer, as the sequence of its phases.

    set up     data -> model + optimizer -> mesh -> abstract state + shardings -> compiled steps
               -> evaluators
    restore    the latest checkpoint, else a fresh (or pretrained) initialisation
    loop       step -> log -> checkpoint -> evaluate -> stop?
    finish     final checkpoint, validation, plot, summary

A run's state between phases is one `Run`; each phase is a function of it. The config is an
`ml_collections.ConfigDict` (see `configs/demo.py` for every field). Every process runs this
function; each reads its own shard of the data, and only process 0 logs, writes metrics and
plots. SIGTERM / SIGINT finish the current step, write a checkpoint and return; a restarted run
resumes from the latest checkpoint in `checkpoint.dir` by itself and continues exactly where it
stopped. Processes agree before each step, in one all-gather, on the batch's text length and on
whether one of them was signalled (`_agree`): the one exchange between processes per step, made
after the batch was read, so that reading it overlaps the previous step on the devices.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import time
from typing import Any, Callable

import jax
import numpy as np

from ee_mllm_jax import batch as batch_lib
from ee_mllm_jax import data as data_lib
from ee_mllm_jax import experiment
from ee_mllm_jax import flops
from ee_mllm_jax import loading
from ee_mllm_jax import params as params_lib
from ee_mllm_jax import sharding
from ee_mllm_jax import signals
from ee_mllm_jax import storage
from ee_mllm_jax import workdir_lock
from ee_mllm_jax.models import EEMLLM
from ee_mllm_jax.train import checkpoint as ckpt_lib
from ee_mllm_jax.train import evaluators as evaluators_lib
from ee_mllm_jax.train import plots
from ee_mllm_jax.train import progress
from ee_mllm_jax.train.state import create_sharded_state, make_init_fn, make_optimizer, split_params
from ee_mllm_jax.train.step import make_eval_step, make_train_step

logger = logging.getLogger(__name__)


class NonFiniteError(RuntimeError):
  """Training produced a non-finite loss, gradient or parameter; the run stops (non-zero exit)
  without saving it, so the checkpoints on disk stay finite."""


# What a user can cause and fix: train.py reports these in one line and exits with status 1.
USER_ERRORS = (experiment.ConfigError, loading.ConfigMismatchError, NonFiniteError, FileNotFoundError,
               data_lib.BadRecordError, batch_lib.BatchError, workdir_lock.WorkdirLockedError,
               storage.DiskFullError, loading.DamagedCheckpointError)


@dataclasses.dataclass
class Run:
  """One training run: what the set-up built, and the state that the phases carry on."""
  config: Any
  exp: experiment.Experiment  # model, data, steps, records
  mesh: jax.sharding.Mesh
  ckpt_dir: str
  train_iter: data_lib.DataIterator
  checkpointer: ckpt_lib.Checkpointer
  init: Callable  # partial params or None -> the sharded train state
  abstract_state: dict[str, Any]
  trainable: str  # the regex of the trained parameters (OptimConfig.trainable)
  train_step: Callable  # (state, batch) -> (state, device metrics)
  evaluators: list[evaluators_lib.Evaluator]
  peak_flops: float | None  # of all devices, for the MFU
  # the run's progress
  state: dict[str, Any] | None = None  # the train state, sharded over `mesh`
  start: int = 0  # the step it started (or resumed) from
  step: int = 0
  metrics: progress.MetricsFile | None = None
  ids_file: Any = None  # record ids of every step's batch (config.log_record_ids)
  bar: Any = None
  # (step, device metrics, T, bad records skipped so far by this process's data pipeline)
  pending: list[tuple[int, Any, int, int]] = dataclasses.field(default_factory=list)
  history: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # logged step records
  evals: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # evaluation records
  skipped_updates: dict[str, int] = dataclasses.field(
      default_factory=lambda: {"non-finite loss or gradient": 0, "no labelled token": 0})
  interval: progress.Interval = dataclasses.field(default_factory=progress.Interval)
  stop_agreed: bool = False  # a process was signalled, as this step's all-gather says (`_agree`)
  stopped_early: bool = False

  @property
  def is_main(self) -> bool:
    return jax.process_index() == 0

  @property
  def total_steps(self) -> int:
    return self.exp.total_steps

  @property
  def workdir(self) -> str:
    return os.path.abspath(self.config.workdir)


def train(config) -> dict[str, Any]:
  """Trains as `config` says; returns the final metrics and where things were written. The
  workdir is locked for the run (`workdir_lock`): a second run on it is refused naming the
  holder; a full disk at any write is a `storage.DiskFullError` naming the device and file."""
  with contextlib.ExitStack() as scope:
    _lock_workdirs(config, scope)
    run = _set_up(config, scope)
    _restore_or_init(run)
    _open_logs(run, scope)
    with signals.StopOnSignal(message="Received signal %d: checkpointing and stopping after this step.") as stop:
      try:
        while run.step < run.total_steps:
          _step(run, stop)
          if run.step % config.log_every == 0 or run.step == run.total_steps:
            _log(run)
          run.bar.update(1)
          _checkpoint(run)
          if config.eval_every > 0 and run.step % config.eval_every == 0 and run.step < run.total_steps:
            _evaluate(run)
          if _stop_requested(run, stop):
            run.stopped_early = run.step < run.total_steps
            break
      except BaseException:
        run.checkpointer.close()  # waits for a save in flight, so its threads don't die noisily
        raise
    return _finish(run)


def _lock_workdirs(config, scope: contextlib.ExitStack):
  scope.enter_context(workdir_lock.hold(config.workdir, jax.process_index()))
  ckpt_dir = config.checkpoint.get("dir")
  workdir = os.path.abspath(config.workdir)
  if ckpt_dir and os.path.commonpath([os.path.abspath(ckpt_dir), workdir]) != workdir:
    scope.enter_context(workdir_lock.hold(ckpt_dir, jax.process_index()))  # checkpoints kept elsewhere


# ------------------------------------------------------------------ set up

def _set_up(config, scope: contextlib.ExitStack) -> Run:
  """Data, model, optimizer, mesh (the run's mesh for the `scope`), abstract sharded state,
  checkpointer, compiled steps and evaluators: everything but the state itself."""
  workdir = os.path.abspath(config.workdir)
  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() != 0:  # only process 0 logs below warnings
    package_logger = logging.getLogger("ee_mllm_jax")
    scope.callback(package_logger.setLevel, package_logger.level)
    package_logger.setLevel(logging.WARNING)
  on_nonfinite = config.get("on_nonfinite", "stop")
  if on_nonfinite not in ("stop", "skip"):
    raise experiment.ConfigError(f"on_nonfinite must be 'stop' or 'skip', got {on_nonfinite!r}")
  exp = experiment.resolve(config)  # train records read once, here
  train_iter = data_lib.make_train_iterator(exp.data, with_meta=config.get("log_record_ids", False),
                                            records=exp.train_records)
  model = EEMLLM(exp.model)
  optim_cfg = experiment.optim_config(config, exp.total_steps)
  optimizer, schedule = make_optimizer(optim_cfg)

  mesh = sharding.make_mesh(dict(config.mesh))
  scope.enter_context(jax.set_mesh(mesh))
  data_parallel = sharding.data_parallel_size(mesh)
  if exp.data.global_batch_size % data_parallel:
    logger.warning("global_batch_size %d does not divide over the %d data-parallel devices: every batch is "
                   "replicated instead of split (slower, same result)", exp.data.global_batch_size, data_parallel)
  init, state_shardings, abstract_state = create_sharded_state(
      make_init_fn(model, optimizer, optim_cfg.trainable, seed=config.seed), mesh)
  ckpt_dir = os.path.abspath(config.checkpoint.dir or os.path.join(workdir, "checkpoints"))
  checkpointer = ckpt_lib.Checkpointer(ckpt_dir, keep=config.checkpoint.keep,
                                       every_steps=config.checkpoint.every_steps,
                                       async_save=config.checkpoint.async_save, run_config=exp.run_config())

  batch_sh = sharding.batch_sharding(mesh, (exp.data.global_batch_size,))
  train_step = jax.jit(make_train_step(model, optimizer, schedule, optim_cfg.trainable, config.accum_steps),
                       in_shardings=(state_shardings, batch_sh), out_shardings=(state_shardings, None),
                       donate_argnums=0)
  eval_step = jax.jit(make_eval_step(model), in_shardings=(state_shardings["params"], None))
  evaluators: list[evaluators_lib.Evaluator] = []
  if exp.data.val_file and config.eval_every >= 0:
    eval_cfg = exp.data.replace(global_batch_size=config.eval_batch_size, shuffle=False, worker_count=0)
    evaluators.append(evaluators_lib.Validation(
        eval_cfg, eval_step, mesh, prepare=lambda b: _pad_and_check(b, _agree(b)[0], exp.model),
        max_batches=config.eval_max_batches, blank_images=config.get("eval_blank_images", True),
        references=exp.reference_accuracies))
  return Run(config=config, exp=exp, mesh=mesh, ckpt_dir=ckpt_dir, train_iter=train_iter,
             checkpointer=checkpointer, init=init, abstract_state=abstract_state, trainable=optim_cfg.trainable,
             train_step=train_step, evaluators=evaluators, peak_flops=_peak_flops(config))


def _peak_flops(config) -> float | None:
  per_device = config.get("peak_flops_per_device", 0)
  if per_device <= 0:
    per_device = flops.peak_per_device(jax.devices()[0].device_kind)
  return per_device * jax.device_count() if per_device else None


# ------------------------------------------------------------------ restore

def _restore_or_init(run: Run):
  """The latest checkpoint that restores (the data iterator with it), else a fresh state, with
  the parameters of `init_from` where it names a pretrained source."""
  config, model_cfg = run.config, run.exp.model
  start, state = run.checkpointer.restore_latest(run.abstract_state, run.train_iter, model_config=model_cfg)
  if start is not None:
    logger.info("Resuming from %s/%d", run.ckpt_dir, start)
  else:
    partial = None
    if loading.init_from_given(config.init_from):
      partial = loading.load_pretrained(config.init_from, model_cfg, run.abstract_state["params"])
      report = params_lib.InitReport.of(run.abstract_state["params"], partial)
      logger.info("init_from %s: %s", dict(config.init_from), report)
      frozen_fresh = [p for p in report.initialised if not re.match(run.trainable, p)]
      if frozen_fresh:
        logger.warning("%d parameters are freshly initialised but frozen (not matched by trainable=%r): %s",
                       len(frozen_fresh), run.trainable, frozen_fresh[:5])
    state = run.init(partial)
  run.state = state
  run.start = run.step = int(jax.device_get(state["step"]))


def _open_logs(run: Run, scope: contextlib.ExitStack):
  """metrics.jsonl (its records after the start step dropped) and the TensorBoard events, the
  record-ids file, the bar."""
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  config = run.config
  run.metrics = progress.MetricsFile(os.path.join(run.workdir, "metrics.jsonl"), run.start, write=run.is_main,
                                     tensorboard_events=config.get("tensorboard", True))
  scope.callback(run.metrics.close)
  if config.get("log_record_ids", False):
    run.ids_file = open(os.path.join(run.workdir, f"record_ids.process{jax.process_index()}.txt"), "a")
    scope.callback(run.ids_file.close)
  run.bar = tqdm(total=run.total_steps, initial=run.start, dynamic_ncols=True, desc="train",
                 disable=not run.is_main or not config.get("progress_bar", True))
  n_params = sum(x.size for x in jax.tree.leaves(run.abstract_state["params"]))
  n_train = sum(x.size for x in jax.tree.leaves(split_params(run.abstract_state["params"], run.trainable)[0]))
  logger.info("Model %s (%s): %.1fM parameters, %.1fM trained; mesh %s; %d steps from %d; %d processes",
              config.model.preset, run.exp.model.mode_name, n_params / 1e6, n_train / 1e6, dict(run.mesh.shape),
              run.total_steps, run.start, jax.process_count())


# ------------------------------------------------------------------ step

def _agree(batch: dict[str, np.ndarray], stop: bool = False) -> tuple[int, bool]:
  """What every process must agree on before a step, in one all-gather across processes (none
  when there is one): the text length they all pad their batch to (the largest of their
  buckets, so that they stay in lock-step without all padding to the config's largest bucket)
  and whether any of them was asked to stop."""
  t = batch["input_ids"].shape[1]
  if jax.process_count() == 1:
    return t, stop
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  gathered = multihost_utils.process_allgather(np.asarray([t, stop], np.int32)).reshape(-1, 2)
  return int(gathered[:, 0].max()), bool(gathered[:, 1].any())


def _pad_and_check(batch: dict[str, np.ndarray], text_len: int, model_cfg) -> dict[str, np.ndarray]:
  batch = batch_lib.pad_text(batch, text_len)
  batch_lib.validate(batch, model_cfg, keys=batch_lib.TRAIN_KEYS)
  return batch


def _step(run: Run, stop: signals.StopOnSignal):
  """Reads the next batch, agrees on its length (and on stopping), dispatches the train step."""
  batch = next(run.train_iter)
  if run.ids_file:
    batch, meta = batch
    run.ids_file.write("".join(f"{run.step}\t{m['id']}\n" for m in meta if m))
  text_len, run.stop_agreed = _agree(batch, stop.requested)
  batch = _pad_and_check(batch, text_len, run.exp.model)
  n_tok = float(batch["text_valid"].sum() + batch["image_valid"].sum() * run.exp.model.tokens_per_image)
  run.state, metrics = run.train_step(run.state, sharding.shard_batch(batch, run.mesh))
  run.step += 1
  run.pending.append((run.step, metrics, batch["input_ids"].shape[1], run.train_iter.stats.total))
  if run.interval.t0 is None:  # the first step compiles: time from its end
    jax.block_until_ready(metrics)
    run.interval.t0 = time.perf_counter()
    _log(run)
  else:
    rows = batch["input_ids"].shape[0] * jax.process_count()
    run.interval.add(tokens=n_tok * jax.process_count(), flops=flops.train_step_flops(
        run.exp.model, batch=rows, num_images=run.exp.data.max_images, text_len=batch["input_ids"].shape[1]))


def _stop_requested(run: Run, stop: signals.StopOnSignal) -> bool:
  """Stop after this step? Alone, as soon as a signal came; with other processes, when the
  step's all-gather said one of them had one (all stop at the same step)."""
  return stop.requested if jax.process_count() == 1 else run.stop_agreed


# ------------------------------------------------------------------ log

def _log(run: Run):
  """Fetches the pending steps' metrics (this waits for them), writes them to metrics.jsonl and
  stops the run on a non-finite parameter, loss or gradient (unless on_nonfinite="skip")."""
  if not run.pending:
    return
  fetched = jax.device_get([m for _, m, *_ in run.pending])  # waits for the steps to finish
  rate = run.interval.rates(time.perf_counter(), run.peak_flops)
  for (step, _, text_len, records_skipped), m in zip(run.pending, fetched):
    error = _check_update(run, step, m)
    record = {"step": step, **{k: float(v) for k, v in m.items()}, "text_len": text_len, **rate,
              "records_skipped": records_skipped, "updates_skipped": sum(run.skipped_updates.values())}
    run.history.append(record)
    run.metrics.write(record)
    if error:
      raise error
  run.bar.set_postfix_str(progress.postfix(run.history[-1]), refresh=False)
  run.pending.clear()
  run.interval.restart()


def _check_update(run: Run, step: int, m: dict[str, Any]) -> NonFiniteError | None:
  """Counts a skipped update; returns the error that stops the run, if any (raised once logged)."""
  if not m["params_finite"]:
    return NonFiniteError(f"step {step}: the trained parameters hold non-finite values; stopping "
                          f"(nothing after step {run.start} that is non-finite was saved)")
  if not m["finite"]:
    run.skipped_updates["non-finite loss or gradient"] += 1
    message = (f"step {step}: non-finite loss {float(m['loss'])} or gradient norm {float(m['grad_norm'])}; "
               "its update was not applied")
    if run.config.get("on_nonfinite", "stop") != "skip":
      return NonFiniteError(message + " (on_nonfinite='skip' skips such steps instead of stopping)")
    logger.warning("%s (skipped: %d so far)", message, run.skipped_updates["non-finite loss or gradient"])
  elif not m["applied"]:
    run.skipped_updates["no labelled token"] += 1
    logger.warning("step %d: no labelled token in the batch (every row skipped?); no update applied", step)
  return None


# ------------------------------------------------------------------ checkpoint, evaluate

def _checkpoint(run: Run):
  """Starts an (asynchronous) save when one is due, after its steps were checked finite."""
  if run.checkpointer.due(run.step):
    _log(run)
    run.checkpointer.save(run.step, run.state, run.train_iter)


def _evaluate(run: Run) -> tuple[dict[str, Any], list[str]]:
  """Every evaluator on the current parameters -> merged metrics and one phrase each."""
  _log(run)
  result, phrases = {"step": run.step}, []
  for evaluator in run.evaluators:
    metrics = evaluator.run(run.state["params"], run.step)
    result.update(metrics)
    phrases.append(evaluator.describe(metrics))
    if run.is_main:
      run.bar.write(f"step {run.step}: {phrases[-1]}")
  if run.evaluators:
    run.evals.append(result)
    run.metrics.write(result, kind="eval")
  run.interval.restart()
  return result, phrases


# ------------------------------------------------------------------ finish

def _finish(run: Run) -> dict[str, Any]:
  """The last steps logged, the final checkpoint, the final evaluation (not after a stop), the
  loss curve and the summary (printed by process 0)."""
  try:
    _log(run)
  except NonFiniteError:
    run.checkpointer.close()
    raise
  run.bar.close()
  run.checkpointer.save(run.step, run.state, run.train_iter, force=True)
  run.checkpointer.wait()
  run.checkpointer.close()
  run.train_iter.close()
  final, phrases = ({}, []) if run.stopped_early else _evaluate(run)
  plot_path = os.path.join(run.workdir, "loss.png")
  if run.is_main and run.history:
    with storage.writing(plot_path):
      plots.loss_curve(plot_path, run.history, run.evals)
  summary = {"step": run.step, "stopped_early": run.stopped_early,
             "checkpoint": os.path.join(run.ckpt_dir, str(run.step)), "metrics": run.metrics.path,
             "plot": plot_path if run.history else None,
             "train_loss": run.history[-1]["loss"] if run.history else None, **final}
  if run.is_main:
    parts = [f"{'stopped' if run.stopped_early else 'done'} at step {run.step}/{run.total_steps}",
             f"checkpoint {summary['checkpoint']}", f"metrics {run.metrics.path}"]
    if summary["plot"]:
      parts.append(f"loss curve {plot_path}")
    parts += phrases
    skips = {**{f"records skipped: {k}": v for k, v in run.train_iter.stats.counts.items() if v},
             **{f"updates skipped: {k}": v for k, v in run.skipped_updates.items() if v}}
    summary["skipped"] = skips
    if skips:
      parts.append("; ".join(f"{k} {v}" for k, v in skips.items()))
    print(" | ".join(parts), flush=True)
  return summary
