"""What a traced function computes, as the set of array shapes its jaxpr produces (sub-jaxprs
of scans, loops and conditionals included): tests use it to show that a shape never appears."""

import jax
import jax.extend


def shapes_in_jaxpr(jaxpr, out=None) -> set[tuple[int, ...]]:
  out = set() if out is None else out
  for eqn in jaxpr.eqns:
    for v in eqn.outvars:
      out.add(tuple(getattr(v.aval, "shape", ())))
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      shapes_in_jaxpr(sub, out)
  return out
