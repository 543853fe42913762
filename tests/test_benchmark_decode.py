"""benchmarks/decode.py at a tiny shape: a row per (mode, V, batch, framework) with positive, finite
times, and JAX's greedy tokens (prefill + the package's decode loop) equal transformers' `generate` on
the same weights (written into the torch models through the package's HF export): stock LLaMA in self
mode, the PyTorch composite port in composite mode."""

import math
import os
import sys

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import decode  # noqa: E402  pylint: disable=g-import-not-at-top

VISUAL, BATCH, NEW = (16,), (1, 2), 3


def test_decode_benchmark_rows_and_greedy_tokens_equal_transformers(capsys):
  argv = ["--width", "256", "--layers", "2", "--visual", *map(str, VISUAL), "--text", "8", "--batch",
          *map(str, BATCH), "--new-tokens", str(NEW), "--repeats", "1", "--cross-every", "2",
          "--resampler-latents", "4", "--resampler-depth", "1", "--threads", "1"]
  out = decode.main(argv)
  rows = {(r["mode"], r["framework"], r["V"], r["batch"]): r for r in out["rows"]}
  want = {(m, "jax", v, b) for m in decode.MODES for v in VISUAL for b in BATCH}
  want |= {(m, "torch", v, b) for m in ("self", "composite") for v in VISUAL for b in BATCH}
  assert set(rows) == want and len(out["rows"]) == len(want)
  for key, r in rows.items():
    for field in ("ttft_ms", "ms_per_token", "tokens_per_s"):
      assert math.isfinite(r[field]) and r[field] > 0, (key, field, r[field])
    # tokens/s is the batch's tokens over the decode time that ms/token divides
    assert r["tokens_per_s"] == pytest.approx(r["batch"] * 1e3 / r["ms_per_token"])
  for v in VISUAL:
    for b in BATCH:  # the same weights and the same V + T + N - 1 cache slots: a decode step reads the same bytes
      assert rows["composite", "jax", v, b]["read_mb"] == rows["self", "jax", v, b]["read_mb"] > 0
  for m in ("self", "composite"):
    for v in VISUAL:
      for b in BATCH:
        jax_tokens, torch_tokens = out["tokens"][m, "jax", v, b], out["tokens"][m, "torch", v, b]
        assert jax_tokens.shape == torch_tokens.shape == (b, NEW)
        np.testing.assert_array_equal(jax_tokens, torch_tokens, err_msg=f"{m} V={v} batch {b}")
        assert out["agree"][m, v, b] == (b * NEW, b * NEW)
  # guard: the two modes are different functions of the same weights and prompt
  assert not np.array_equal(out["tokens"]["self", "jax", 16, 2], out["tokens"]["composite", "jax", 16, 2])
  printed = capsys.readouterr().out
  assert "tokens agree (composite: JAX vs transformers, V=16, batch 2): yes" in printed
  assert "TTFT ms" in printed and "ms/token" in printed and "tokens/s" in printed
