"""Analytic forward FLOPs per mode and component (a multiply-add counts 2).

The counts are of what the implementation executes: attention scores are computed over the
full (masked) query x key rectangle, every image slot of a fixed-shape batch goes through
the tower, and in composite mode there are no visual queries, no V x V scores, and the
aligner costs K*H*D per visual token (o_proj folded over the G query heads of a kv head).
Of the elementwise work only the softmax is counted, as its own component (`softmax`: scale,
mask, max, subtract, sum, divide = 6 per score, what XLA's cost analysis charges; the exp is
a transcendental), since at small head dims it is a tenth of the attention; norms,
activations and RoPE are left out, as is usual for MFU.

Cross mode (Flamingo): the decoder runs over text only (T queries, T keys); each of the
L / cross_every gated blocks projects T queries and the I*M media keys/values (M = resampler
latents or P per image), scores T x I*M (also with "previous" masking: every image is scored,
the latest visible one kept) and runs its FFN (width cross_ffn_mult x D) on the text; the
resampler runs per image, R latents attending to P + R keys. The cross modules' attention has its
own shape (`cross_heads` x `cross_head_dim`, by default the LLM's) and reads media of width E (the
LLM's after the projector, or the tower's with `cross_media_width="vision"`, then no projector).

FastV and VisionZip (models/reduction.py): the layers from K run on V' = ceil((1 - R) V) visual
tokens, and layer K-1's scores are computed once more for the ranking (`fastv_ranking`); VisionZip
adds the tower's last-layer scores and the merge (`visionzip`), and the projector and the decoder
see d + c tokens per image.

Letters: V visual tokens, T text tokens, S = V + T keys, D width, N/K query/kv heads,
H head dim, F MLP width, P patches per image, I images, M media tokens per image, R latents.

For MFU, `PEAK_FLOPS` is the dense bf16 peak of the accelerators we know (`peak_per_device`).
"""

from __future__ import annotations

from ee_mllm_jax.config import ModelConfig, VisionConfig
from ee_mllm_jax.models.reduction import segments


def vision_flops(cfg: VisionConfig, *, images: int) -> float:
  """Tower forward for `images` images, running only the layers the feature layer needs."""
  p, d = cfg.num_patches, cfg.width
  tokens = p + (1 if cfg.class_token else 0)
  patch_embed = 2 * p * cfg.patch_size ** 2 * 3 * d
  per_layer = (2 * tokens * 4 * d * d  # q, k, v, out projections
               + 2 * 2 * tokens * tokens * d  # scores and weighted values
               + SOFTMAX_FLOPS_PER_SCORE * tokens * tokens * cfg.num_heads
               + 2 * tokens * 2 * d * cfg.mlp_dim)  # fc1, fc2
  return images * (patch_embed + cfg.num_layers_run * per_layer)


def projector_flops(cfg: ModelConfig, *, images: int) -> float:
  """0 without a projector (cross mode with media at the vision width)."""
  if not cfg.has_projector:
    return 0.0
  d_in, d = cfg.vision.width, cfg.llm.width
  per_token = 2 * d_in * d + (2 * d * d if cfg.projector == "mlp2x_gelu" else 0)
  return images * cfg.tokens_per_image * per_token


SOFTMAX_FLOPS_PER_SCORE = 6


def visionzip_flops(cfg: ModelConfig, *, images: int) -> float:
  """VisionZip's extra work per image: the last tower layer's scores once more for the ranking,
  then the contextual merge (key similarities to the c centres, the sums of their features)."""
  vc, d, c = cfg.vision, cfg.mode.visionzip_dominant, cfg.mode.visionzip_contextual
  tokens, others = vc.num_patches + (1 if vc.class_token else 0), vc.num_patches - d - c
  ranking = (2 * vc.head_dim + SOFTMAX_FLOPS_PER_SCORE) * tokens * tokens * vc.num_heads
  return images * (ranking + (2 * others * c * (vc.head_dim + vc.width) if c else 0))


def _layer_flops(c, *, queries: int, keys: int, ffn_tokens: int, aligner_tokens: int) -> tuple[float, float]:
  d, f, n, k, h = c.width, c.mlp_dim, c.num_heads, c.num_kv_heads, c.head_dim
  linear = (2 * queries * d * n * h  # q_proj
            + 2 * keys * d * 2 * k * h  # k_proj, v_proj over every key
            + 2 * queries * n * h * d  # o_proj on attention outputs
            + 2 * aligner_tokens * k * h * d  # aligner (composite)
            + 2 * ffn_tokens * 3 * d * f)  # gate, up, down
  return linear, 2 * 2 * queries * keys * n * h  # scores and weighted values


def cross_block_flops(cfg: ModelConfig, *, queries: int, media: int) -> tuple[float, float, float]:
  """One gated cross-attention block: text `queries` against `media` keys/values ->
  (linear incl. FFN, attention, softmax). Queries at the LLM width D, keys/values from the media
  width E, N x H cross heads (`ModelConfig.cross_attention_shape`)."""
  c = cfg.llm
  heads, head_dim = cfg.cross_attention_shape
  d, e, nh = c.width, cfg.media_width, heads * head_dim
  linear = (2 * queries * d * nh * 2  # q_proj, o_proj
            + 2 * media * e * nh * 2  # k_proj, v_proj over the media
            + 2 * queries * 2 * d * cfg.mode.ffn_mult * d)  # FFN up, down
  attention = 2 * 2 * queries * media * nh
  return linear, attention, SOFTMAX_FLOPS_PER_SCORE * queries * media * heads


def resampler_flops(cfg: ModelConfig, *, images: int) -> float:
  """Perceiver resampler over `images` images (0 when off), at the media width E with the cross
  heads: R latents attend to P + R keys, FFN 4 x E."""
  r, p = getattr(cfg.mode, "resampler_latents", 0), cfg.tokens_per_image
  if not r:
    return 0.0
  heads, head_dim = cfg.cross_attention_shape
  e, nh = cfg.media_width, heads * head_dim
  per_layer = (2 * r * e * nh * 2 + 2 * (p + r) * e * nh * 2 + 2 * r * 2 * e * 4 * e
               + 2 * 2 * r * (p + r) * nh + SOFTMAX_FLOPS_PER_SCORE * r * (p + r) * heads)
  return images * cfg.mode.resampler_depth * per_layer


def llm_flops(cfg: ModelConfig, *, visual_len: int, text_len: int, batch: int = 1) -> dict[str, float]:
  """Decoder forward over V visual and T text tokens in `cfg.mode` (per layer, along
  its schedule), as the scanned stack executes it (the last layer's visual update is
  computed though nothing reads it).
  Cross mode: V = I*P visual tokens of I image slots; the cross blocks are counted here, the
  resampler in `forward_flops`."""
  c = cfg.llm
  v, t = visual_len, text_len
  if not cfg.mode.visual_in_decoder:
    lin, att = _layer_flops(c, queries=t, keys=t, ffn_tokens=t, aligner_tokens=0)
    media = v // cfg.tokens_per_image * cfg.media_tokens_per_image
    x_lin, x_att, x_soft = cross_block_flops(cfg, queries=t, media=media)
    g = cfg.cross_blocks
    out = {"llm_linear": batch * c.depth * lin, "attention": batch * c.depth * att,
           "softmax": batch * (c.depth * att * SOFTMAX_FLOPS_PER_SCORE / (4 * c.head_dim) + g * x_soft),
           "cross_linear": batch * g * x_lin, "cross_attention": batch * g * x_att,
           "lm_head": batch * 2 * t * c.width * c.vocab_size}
    out["total"] = sum(out.values())
    return out
  lin = att = rank = 0.0
  for kind, layers, scores in segments(cfg.mode, c.depth):  # self layers, then composite ones (a schedule)
    composite = kind == "composite"
    queries = t if composite else v + t
    run_lin, run_att = _layer_flops(c, queries=queries, keys=v + t,
                                    ffn_tokens=v + t if cfg.mode.visual_ffn_in(kind) else t,
                                    aligner_tokens=v if composite else 0)
    lin, att = lin + layers * run_lin, att + layers * run_att
    if scores:  # FastV: layer K-1's scores once more for the ranking; later layers on V' visual tokens
      rank = (2 * c.head_dim + SOFTMAX_FLOPS_PER_SCORE) * queries * (v + t) * c.num_heads
      v = cfg.mode.fastv_kept(v)
  out = {
      "llm_linear": batch * lin,
      "attention": batch * att,
      "softmax": batch * att * SOFTMAX_FLOPS_PER_SCORE / (4 * c.head_dim),
      "lm_head": batch * 2 * t * c.width * c.vocab_size,
  }
  if rank:
    out["fastv_ranking"] = batch * rank
  out["total"] = sum(out.values())
  return out


def forward_flops(cfg: ModelConfig, *, batch: int, num_images: int, text_len: int) -> dict[str, float]:
  """Whole-model forward for a batch of `batch` samples with `num_images` image slots each."""
  images = batch * num_images
  out = {"vision": vision_flops(cfg.vision, images=images),
         "projector": projector_flops(cfg, images=images)}
  if cfg.mode.visionzip:
    out["visionzip"] = visionzip_flops(cfg, images=images)
  if getattr(cfg.mode, "resampler_latents", 0):
    out["resampler"] = resampler_flops(cfg, images=images)
  llm = llm_flops(cfg, visual_len=num_images * cfg.tokens_per_image, text_len=text_len, batch=batch)
  out.update({k: v for k, v in llm.items() if k != "total"})
  out["total"] = sum(out.values())
  return out


def decode_step_flops(cfg: ModelConfig, *, cache_len: int, batch: int = 1, media_len: int = 0) -> float:
  """One new text token per row against `cache_len` cached keys (identical in the self and
  composite modes). Cross mode: the cache holds text only, and each block reads `media_len`
  cached media keys/values (I*M; their projections were paid once, at the prefill)."""
  c = cfg.llm
  d, f, n, k, h = c.width, c.mlp_dim, c.num_heads, c.num_kv_heads, c.head_dim
  per_layer = 2 * d * (n + 2 * k) * h + 2 * n * h * d + 2 * 3 * d * f + 2 * 2 * cache_len * n * h
  cross = 0.0
  if not cfg.mode.visual_in_decoder:
    x_lin, _, _ = cross_block_flops(cfg, queries=1, media=0)
    heads, head_dim = cfg.cross_attention_shape
    cross = cfg.cross_blocks * (x_lin + 2 * 2 * media_len * heads * head_dim)
  return batch * (c.depth * per_layer + cross + 2 * d * c.vocab_size)


def train_step_flops(cfg: ModelConfig, *, batch: int, num_images: int, text_len: int) -> float:
  """Training FLOPs of one step: 3x the forward (the backward is about twice the forward)."""
  return 3 * forward_flops(cfg, batch=batch, num_images=num_images, text_len=text_len)["total"]


# Dense bf16 peak per device, for MFU; matched against `device.device_kind`.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12,
              "L40S": 362e12, "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12,
              "TPU v5p": 459e12, "TPU v6": 918e12}


def peak_per_device(device_kind: str) -> float | None:
  """The dense bf16 peak FLOP/s of a device of this kind (`jax.Device.device_kind`), or None
  for one not in `PEAK_FLOPS` (a CPU, say)."""
  return next((peak for name, peak in PEAK_FLOPS.items() if name.lower() in device_kind.lower()), None)
