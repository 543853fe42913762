"""Parameter trees: abstract shapes, and partial initialisation (load what exists, init the rest).

Paths are "/"-joined keys of the nested parameter dict ("llm/layers/mlp/up_proj/kernel").
Pretrained parts rarely cover a whole model: a fresh projector over pretrained towers (the
LLaVA stage-1 start), new cross-attention blocks over a pretrained LLM. `overlay` puts the
parameters a source has over a fresh init and `InitReport` says which were loaded, which
were initialised, and which the source had that the model does not use:

    fresh = model.init(rng, **batch_lib.example(cfg))["params"]
    params, report = overlay(nn.meta.unbox(fresh), partial)
    logging.info("%s", report)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from ee_mllm_jax import batch as batch_lib

Params = dict[str, Any]


def flatten(tree: Mapping[str, Any]) -> dict[str, Any]:
  """Nested dict -> {"a/b/c": leaf}."""
  return {"/".join(k): v for k, v in traverse_util.flatten_dict(dict(tree)).items()}


def unflatten(flat: Mapping[str, Any]) -> Params:
  return traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()})


def abstract_params(cfg, *, boxed: bool = False) -> Params:
  """ShapeDtypeStructs of the model's parameters (nothing allocated); `boxed` keeps the
  nn.LogicallyPartitioned boxes that carry the logical axis names."""
  from ee_mllm_jax.models import EEMLLM  # pylint: disable=g-import-not-at-top

  example = batch_lib.example(cfg)
  tree = jax.eval_shape(lambda: EEMLLM(cfg).init(jax.random.key(0), **example)["params"])
  return tree if boxed else nn.meta.unbox(tree)


@dataclasses.dataclass(frozen=True)
class InitReport:
  """Which parameters came from the source, which were freshly initialised, which source
  entries the model has no place for."""

  loaded: tuple[str, ...]
  initialised: tuple[str, ...]
  unused: tuple[str, ...]

  @classmethod
  def of(cls, model_params: Mapping[str, Any], partial: Mapping[str, Any] | None) -> "InitReport":
    """Compares paths and shapes (arrays or ShapeDtypeStructs); a leaf whose shape differs
    from the model's is an error naming it (a source for another model)."""
    want, have = flatten(model_params), flatten(partial or {})
    mismatched = [f"{k}: source {tuple(have[k].shape)}, model {tuple(want[k].shape)}"
                  for k in want if k in have and tuple(have[k].shape) != tuple(want[k].shape)]
    if mismatched:
      more = f" (+{len(mismatched) - 5} more)" if len(mismatched) > 5 else ""
      raise ValueError("source parameters do not fit the model: " + "; ".join(mismatched[:5]) + more)
    return cls(loaded=tuple(k for k in want if k in have), initialised=tuple(k for k in want if k not in have),
               unused=tuple(k for k in have if k not in want))

  def __str__(self):
    def listing(paths):
      groups = sorted({"/".join(p.split("/")[:2]) for p in paths})
      return ", ".join(groups) if groups else "none"
    return (f"{len(self.loaded)} parameters loaded ({listing(self.loaded)}), {len(self.initialised)} initialised "
            f"({listing(self.initialised)})" + (f", {len(self.unused)} source entries unused "
                                                 f"({listing(self.unused)})" if self.unused else ""))


def overlay(fresh: Params, partial: Params | None, *, strict: bool = False) -> tuple[Params, InitReport]:
  """`fresh` with every leaf that `partial` has replaced by it (cast to the fresh leaf's dtype).

  Inside `jax.jit` the replaced fresh leaves are dead code, so XLA neither computes nor keeps
  them: `jit(lambda p: overlay(init(), p)[0], out_shardings=...)` builds the model from a
  partial source at the memory of one copy. `strict` makes unused source entries an error.
  """
  report = InitReport.of(fresh, partial)
  if strict and report.unused:
    raise ValueError(f"the model has no parameter(s) {list(report.unused[:5])} that the source provides")
  have = flatten(partial or {})
  flat = {k: (jnp.asarray(have[k]).astype(v.dtype) if k in have else v) for k, v in flatten(fresh).items()}
  return unflatten(flat), report
