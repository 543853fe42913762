"""Loss, the training step (with gradient accumulation), and the evaluation step.

Letters: B global batch, A accumulation steps, T text tokens.

The loss is the mean cross entropy over every labelled token of the whole global batch
(`labels != IGNORE_INDEX`; labels are already shifted, labels[b, t] is the target of logits[b, t]).
With accumulation the A micro-batches' summed losses and gradients are added up and divided
once by the batch's token count, so an accumulated step computes the same update as one
big step. A batch without any labelled token, or with a non-finite loss or gradient, is not
applied (metrics `applied`, `finite`); `params_finite` checks the trained parameters.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from ee_mllm_jax.batch import IGNORE_INDEX, model_inputs
from ee_mllm_jax.sharding import LOGICAL_AXIS_RULES
from ee_mllm_jax.train.state import merge_params, split_params


def masked_cross_entropy(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(B, T, vocab) float logits, (B, T) labels -> (summed CE over labelled tokens, their count)."""
  mask = labels != IGNORE_INDEX
  ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), jnp.where(mask, labels, 0))
  return jnp.sum(ce * mask), jnp.sum(mask).astype(jnp.float32)


def _microbatches(batch: dict[str, jax.Array], accum: int) -> dict[str, jax.Array]:
  """(B, ...) -> (A, B/A, ...), micro-batch a = rows a, a+A, a+2A, ...

  Strided rather than contiguous so that each device's rows stay on that device."""
  def split(x):
    if x.shape[0] % accum:
      raise ValueError(f"batch of {x.shape[0]} rows does not split into {accum} micro-batches")
    return x.reshape((x.shape[0] // accum, accum) + x.shape[1:]).swapaxes(0, 1)
  return jax.tree.map(split, batch)


def make_gradient_fn(model: nn.Module, trainable: str, accum_steps: int = 1,
                     rules=LOGICAL_AXIS_RULES) -> Callable:
  """(params, batch, rng) -> (gradients of the mean loss over the trainable parameters,
  summed loss, labelled-token count). With `accum_steps` > 1 the batch is split into that
  many micro-batches whose summed losses and gradients are added up, then divided once."""

  def summed_loss(train_params, frozen_params, batch, rng):
    params = merge_params(train_params, frozen_params)
    with nn.logical_axis_rules(rules):
      logits = model.apply({"params": params}, **model_inputs(batch), rngs={"dropout": rng})
    return masked_cross_entropy(logits, batch["labels"])

  grad_fn = jax.value_and_grad(summed_loss, has_aux=True)

  def gradients(params, batch, rng):
    train_params, frozen_params = split_params(params, trainable)
    if accum_steps == 1:
      (loss_sum, tokens), grads = grad_fn(train_params, frozen_params, batch, rng)
    else:
      def accumulate(carry, micro):
        g_sum, l_sum, n_sum, i = carry
        (l, n), g = grad_fn(train_params, frozen_params, micro, jax.random.fold_in(rng, i))
        return (jax.tree.map(jnp.add, g_sum, g), l_sum + l, n_sum + n, i + 1), None
      zeros = jax.tree.map(jnp.zeros_like, train_params)
      (grads, loss_sum, tokens, _), _ = jax.lax.scan(
          accumulate, (zeros, jnp.zeros(()), jnp.zeros(()), jnp.zeros((), jnp.int32)),
          _microbatches(batch, accum_steps))
    denom = jnp.maximum(tokens, 1.0)
    return jax.tree.map(lambda g: (g / denom).astype(g.dtype), grads), loss_sum, tokens

  return gradients


def make_train_step(model: nn.Module, optimizer: optax.GradientTransformation, schedule: optax.Schedule,
                    trainable: str, accum_steps: int = 1, rules=LOGICAL_AXIS_RULES) -> Callable:
  """(state, batch) -> (new state, metrics); to be jitted with the state donated."""
  gradients = make_gradient_fn(model, trainable, accum_steps, rules)

  def step(state: dict[str, Any], batch: dict[str, jax.Array]):
    train_params, frozen_params = split_params(state["params"], trainable)
    rng = jax.random.fold_in(state["rng"], state["step"])
    grads, loss_sum, tokens = gradients(state["params"], batch, rng)
    denom = jnp.maximum(tokens, 1.0)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = optimizer.update(grads, state["opt_state"], train_params)
    new_params = optax.apply_updates(train_params, updates)
    # An update is applied only when it can be trusted: a non-finite loss or gradient, or a
    # batch without a labelled token (AdamW would still move the weights), leaves the
    # parameters and optimizer state as they were, so the state never turns non-finite.
    finite = jnp.isfinite(loss_sum) & jnp.isfinite(grad_norm)
    apply = finite & (tokens > 0)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(apply, n, o), new, old)
    train_params, opt_state = keep(new_params, train_params), keep(opt_state, state["opt_state"])
    new_state = dict(state, step=state["step"] + 1, params=merge_params(train_params, frozen_params),
                     opt_state=opt_state)
    params_finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(p)) for p in jax.tree.leaves(train_params)]))
    metrics = {"loss": loss_sum / denom, "tokens": tokens, "grad_norm": grad_norm,
               "learning_rate": schedule(state["step"]), "finite": finite, "applied": apply,
               "params_finite": params_finite}
    return new_state, metrics

  return step


def eval_metrics(logits: jax.Array, labels: jax.Array) -> dict[str, jax.Array]:
  """Summed loss and token count, and teacher-forced exact match per row: a row with
  labels is correct when the argmax at every labelled position is the label (for a
  one-word answer: the answer's tokens and the end-of-turn token)."""
  loss_sum, tokens = masked_cross_entropy(logits, labels)
  mask = labels != IGNORE_INDEX
  hit = (jnp.argmax(logits, axis=-1) == labels) | ~mask
  answered = jnp.any(mask, axis=-1)
  return {"loss_sum": loss_sum, "tokens": tokens, "correct": jnp.sum(jnp.all(hit, axis=-1) & answered),
          "rows": jnp.sum(answered)}


def make_eval_step(model: nn.Module, rules=LOGICAL_AXIS_RULES) -> Callable:
  """(params, batch) -> summed metrics (see `eval_metrics`)."""

  def step(params, batch):
    with nn.logical_axis_rules(rules):
      logits = model.apply({"params": params}, **model_inputs(batch))
    return eval_metrics(logits, batch["labels"])

  return step
