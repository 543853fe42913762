"""Regenerates tests/data/openflamingo_cross.npz: OpenFlamingo 2.0.1's own GatedCrossAttentionBlock
and PerceiverResampler (open_flamingo/src/helpers.py), run in float64 on random weights in the
layout of our `llm/cross/` and `resampler/` parameters, in OpenFlamingo's shape (heads and head dim
of their own, media at a width other than the text's, exact GELU). The test
(tests/test_cross.py::test_cross_modules_equal_openflamingos_on_mapped_weights) runs ours on the
stored weights and inputs and compares with the stored outputs; it needs neither torch nor
open_flamingo.

    pip download --no-deps open-flamingo==2.0.1 -d /tmp/of && (cd /tmp/of && python -m zipfile -e *.whl src)
    pip install --target /tmp/of_pkgs einops einops-exts          # torch==2.13.0 from the project's venv
    PYTHONPATH=/tmp/of/src/open_flamingo/src:/tmp/of_pkgs python tests/tools/openflamingo_cross.py

(helpers.py is imported alone: the package's __init__ pulls open_clip and transformers.)
"""

import os

import numpy as np
import torch
from helpers import GatedCrossAttentionBlock, PerceiverResampler  # open_flamingo/src/helpers.py

OUT = os.path.join(os.path.dirname(__file__), "..", "data", "openflamingo_cross.npz")
D, E, HEADS, HEAD_DIM, FF_MULT = 24, 16, 2, 8, 4  # text width, media width, cross heads, head dim
LATENTS, DEPTH, P, T = 3, 2, 5, 7  # resampler latents and layers, tokens per image, text tokens
NH = HEADS * HEAD_DIM


def main():
  rng = np.random.default_rng(0)
  w = lambda *shape: rng.normal(0.0, 0.3, shape)
  norm = lambda prefix, d: {f"{prefix}/scale": 1 + w(d), f"{prefix}/bias": w(d)}
  # ours: llm/cross/* of one block (unstacked), resampler/* with layers stacked (DEPTH, ...)
  block = {"q_proj/kernel": w(D, HEADS, HEAD_DIM), "k_proj/kernel": w(E, HEADS, HEAD_DIM),
           "v_proj/kernel": w(E, HEADS, HEAD_DIM), "o_proj/kernel": w(HEADS, HEAD_DIM, D),
           "ffn/up_proj/kernel": w(D, FF_MULT * D), "ffn/down_proj/kernel": w(FF_MULT * D, D),
           "attn_gate": np.array(0.7), "ff_gate": np.array(-0.4), **norm("norm", D), **norm("ffn/norm", D)}
  layer = lambda: {"q_proj/kernel": w(E, HEADS, HEAD_DIM), "k_proj/kernel": w(E, HEADS, HEAD_DIM),
                   "v_proj/kernel": w(E, HEADS, HEAD_DIM), "o_proj/kernel": w(HEADS, HEAD_DIM, E),
                   "ffn/up_proj/kernel": w(E, 4 * E), "ffn/down_proj/kernel": w(4 * E, E),
                   **norm("media_norm", E), **norm("latent_norm", E), **norm("ffn/norm", E)}
  layers = [layer() for _ in range(DEPTH)]
  resampler = {"latents": w(LATENTS, E), **norm("norm", E),
               **{f"layers/{k}": np.stack([l[k] for l in layers]) for k in layers[0]}}

  t = lambda a: torch.tensor(np.asarray(a), dtype=torch.float64)
  linear = lambda kernel, n_in: t(np.asarray(kernel).reshape(n_in, -1).T)  # ours (in, ...) -> torch (out, in)

  of_resampler = PerceiverResampler(dim=E, depth=DEPTH, dim_head=HEAD_DIM, heads=HEADS, num_latents=LATENTS).double()
  sd = {"latents": t(resampler["latents"]), "norm.weight": t(resampler["norm/scale"]),
        "norm.bias": t(resampler["norm/bias"])}
  for i, l in enumerate(layers):
    a, f = f"layers.{i}.0.", f"layers.{i}.1."
    sd.update({a + "norm_media.weight": t(l["media_norm/scale"]), a + "norm_media.bias": t(l["media_norm/bias"]),
               a + "norm_latents.weight": t(l["latent_norm/scale"]), a + "norm_latents.bias": t(l["latent_norm/bias"]),
               a + "to_q.weight": linear(l["q_proj/kernel"], E),
               a + "to_kv.weight": torch.cat([linear(l["k_proj/kernel"], E), linear(l["v_proj/kernel"], E)], 0),
               a + "to_out.weight": linear(l["o_proj/kernel"], NH),
               f + "0.weight": t(l["ffn/norm/scale"]), f + "0.bias": t(l["ffn/norm/bias"]),
               f + "1.weight": linear(l["ffn/up_proj/kernel"], E), f + "3.weight": linear(l["ffn/down_proj/kernel"], 4 * E)})
  of_resampler.load_state_dict(sd, strict=True)

  of_block = GatedCrossAttentionBlock(dim=D, dim_visual=E, dim_head=HEAD_DIM, heads=HEADS, ff_mult=FF_MULT,
                                      only_attend_immediate_media=True).double()
  of_block.load_state_dict({
      "attn.norm.weight": t(block["norm/scale"]), "attn.norm.bias": t(block["norm/bias"]),
      "attn.to_q.weight": linear(block["q_proj/kernel"], D),
      "attn.to_kv.weight": torch.cat([linear(block["k_proj/kernel"], E), linear(block["v_proj/kernel"], E)], 0),
      "attn.to_out.weight": linear(block["o_proj/kernel"], NH),
      "attn_gate": t([block["attn_gate"]]), "ff_gate": t([block["ff_gate"]]),
      "ff.0.weight": t(block["ffn/norm/scale"]), "ff.0.bias": t(block["ffn/norm/bias"]),
      "ff.1.weight": linear(block["ffn/up_proj/kernel"], D), "ff.3.weight": linear(block["ffn/down_proj/kernel"], FF_MULT * D),
  }, strict=True)

  # one row, two images; <image> at text 0 and 3: tokens 0-2 see image 1, tokens 3-6 image 2 ("previous")
  features = rng.normal(0.0, 1.0, (1, 2, P, E))  # the tower's features of each image (width E)
  text = rng.normal(0.0, 1.0, (1, T, D))
  media_locations = torch.zeros((1, T), dtype=torch.bool)
  media_locations[0, [0, 3]] = True
  with torch.no_grad():
    latents = of_resampler(t(features)[:, :, None])  # (b, T_img, F=1, v, E) -> (b, T_img, R, E)
    out = of_block(t(text), latents, media_locations=media_locations)
  np.savez(OUT, features=features, text=text, latents=latents.numpy(), out=out.numpy(),
           **{f"block/{k}": v for k, v in block.items()}, **{f"resampler/{k}": v for k, v in resampler.items()})
  print(f"wrote {OUT}: latents {tuple(latents.shape)}, block output {tuple(out.shape)}")


if __name__ == "__main__":
  main()
