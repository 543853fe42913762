"""Model configuration: small frozen dataclasses, one per module (named presets: `ee_mllm_jax.presets`).

Each module receives only its own config (`VisionConfig` for the tower, `LLMConfig` for the
decoder); `ModelConfig` ties them together with the interaction mode (`ee_mllm_jax.mode`: `Self()`
LLaVA, `Composite(visual_ffn, from_layer)` EE-MLLM, `Cross(every, ...)` Flamingo), the one typed
value every tool asks about mode questions, and `trained_mode`, the mode the weights were trained
in when it differs (EE-MLLM-F: `Composite(visual_ffn=True)` on `Self()`-trained weights).

Fields marked `runtime` change neither the parameters nor what they mean (dtypes, remat,
attention implementations): a checkpoint resumes with any value of them.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from typing import Literal

from ee_mllm_jax import mode as mode_lib
from ee_mllm_jax.mode import Composite, Mode

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)

# How attention is computed (`ee_mllm_jax.models.kernels.attend`); the same function in every
# case: "xla" dense einsum (the reference), "blocked" dense by query blocks with causal block
# skipping, "chunked" online softmax over key blocks (memory linear in the keys, any backend),
# "cudnn" fused GPU kernel, "auto" (the default) the best for each call's shapes on this backend.
AttentionImpl = Literal["xla", "chunked", "blocked", "cudnn", "auto"]
ATTENTION_IMPLS: tuple[str, ...] = typing.get_args(AttentionImpl)
PROJECTORS = ("linear", "mlp2x_gelu")
REMAT_POLICIES = ("none", "full", "dots")


def runtime(default):
  """A field that changes neither the parameters nor their meaning (free to differ on resume)."""
  return dataclasses.field(default=default, metadata=dict(runtime=True))


class _Replaceable:
  def replace(self, **changes):
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict:
    """Plain JSON-able dict (nested configs as dicts, tuples as lists); `from_dict` inverts it."""
    return json.loads(json.dumps(dataclasses.asdict(self)))

  @classmethod
  def from_dict(cls, d: dict):
    """The config a `to_dict` dict describes; unknown fields are an error naming them, missing
    ones take the defaults."""
    d = cls._upgrade(dict(d))
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(fields))
    if unknown:
      raise ValueError(f"{cls.__name__} has no field(s) {unknown}; known: {sorted(fields)}")
    kwargs = {}
    hints = typing.get_type_hints(cls)
    for name, value in d.items():
      default = getattr(cls, name, None)
      if name in ("mode", "trained_mode") and value is not None:
        value = mode_lib.from_record(value)
      elif isinstance(default, _Replaceable):
        value = type(default).from_dict(value)
      elif isinstance(value, dict):  # an optional nested config (default None): its type from the annotation
        nested = [t for t in typing.get_args(hints[name]) if isinstance(t, type) and issubclass(t, _Replaceable)]
        if not nested:
          raise ValueError(f"{cls.__name__}.{name} is not a nested config, got {value!r}")
        value = nested[0].from_dict(value)
      elif isinstance(default, tuple):
        value = tuple(value)
      kwargs[name] = value
    return cls(**kwargs)

  @classmethod
  def _upgrade(cls, d: dict) -> dict:
    """`d` in this class's fields, before they are read (the identity by default)."""
    return d

  def diff(self, other) -> dict[str, tuple]:
    """{"llm.depth": (mine, other's), ...} for every field that differs (nested paths)."""
    a, b = _flat(self.to_dict()), _flat(other.to_dict())
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def _flat(d: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[prefix + k] = v
  return out


def _check_attention(cfg):
  name = type(cfg).__name__
  if cfg.attention_impl not in ATTENTION_IMPLS:
    raise ValueError(f"{name}.attention_impl must be one of {ATTENTION_IMPLS}, got {cfg.attention_impl!r}")
  if not (isinstance(cfg.attention_block, int) and cfg.attention_block > 0):
    raise ValueError(f"{name}.attention_block must be a positive int, got {cfg.attention_block!r}")


@dataclasses.dataclass(frozen=True)
class VisionConfig(_Replaceable):
  """A ViT tower with HF's CLIP or SigLIP math.

  clip:   patch conv without bias, class token, pre-layernorm, quick-GELU MLP.
  siglip: patch conv with bias, no class token, no pre-layernorm, tanh-GELU MLP.
  `feature_layer` indexes HF's `hidden_states` tuple (0 = embeddings, -1 = last layer),
  as LLaVA's `vision_feature_layer` does; only the layers it needs are run. The class
  token (CLIP) is dropped from the features ("patch" selection).
  """

  kind: Literal["clip", "siglip"] = "clip"
  image_size: int = 336
  patch_size: int = 14
  width: int = 1024
  depth: int = 24
  num_heads: int = 16
  mlp_dim: int = 4096
  layer_norm_eps: float = 1e-5
  feature_layer: int = -2
  image_mean: tuple[float, float, float] = CLIP_MEAN
  image_std: tuple[float, float, float] = CLIP_STD
  attention_impl: AttentionImpl = runtime("auto")
  attention_block: int = runtime(512)  # queries per block of "blocked", keys per block of "chunked"

  def __post_init__(self):
    _check_attention(self)
    if self.kind not in ("clip", "siglip"):
      raise ValueError(f"VisionConfig.kind must be 'clip' or 'siglip', got {self.kind!r}")
    if self.width % self.num_heads:
      raise ValueError(f"vision width {self.width} is not divisible by num_heads {self.num_heads}")
    if not 1 <= self.num_layers_run <= self.depth:
      raise ValueError(f"feature_layer {self.feature_layer} selects no layer of a depth-{self.depth} tower")

  @property
  def grid(self) -> int:
    """Patches per side; like HF's strided conv, a remainder of pixels is ignored (384/14 -> 27)."""
    return self.image_size // self.patch_size

  @property
  def num_patches(self) -> int:
    """Visual tokens per image (P)."""
    return self.grid * self.grid

  @property
  def class_token(self) -> bool:
    return self.kind == "clip"

  @property
  def head_dim(self) -> int:
    return self.width // self.num_heads

  @property
  def num_layers_run(self) -> int:
    """How many encoder layers the selected feature needs (hidden_states[k] follows layer k)."""
    return self.feature_layer if self.feature_layer >= 0 else self.depth + 1 + self.feature_layer


ROPE_SCALINGS = ("linear", "llama3")


@dataclasses.dataclass(frozen=True)
class RopeScaling(_Replaceable):
  """RoPE frequency scaling for contexts longer than pretraining (HF's `rope_scaling`).

  linear: every inverse frequency divided by `factor` (position interpolation).
  llama3: Llama 3.1's: wavelengths above original_max_position_embeddings / low_freq_factor
          divided by `factor`, below original / high_freq_factor kept, smoothly blended between.
  """

  kind: Literal["linear", "llama3"] = "linear"
  factor: float = 1.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: int = 8192

  def __post_init__(self):
    if self.kind not in ROPE_SCALINGS:
      raise ValueError(f"RoPE scaling {self.kind!r} is not supported (supported: {ROPE_SCALINGS})")
    if self.kind == "llama3" and not self.high_freq_factor > self.low_freq_factor:
      raise ValueError(f"llama3 RoPE scaling needs high_freq_factor > low_freq_factor, got {self}")


@dataclasses.dataclass(frozen=True)
class LoRA(_Replaceable):
  """Low-rank adapters on the decoder's projections (Hu et al. 2021, as PEFT computes them):
  `y = x W + (alpha / rank) * dropout(x) A B`, A (in, rank), B (rank, out), B = 0 at init (so
  the model starts as the base). `targets` is a regex matched (`re.match`) against the projection's
  parameter path without the leaf ("llm/layers/self_attn/q_proj"); LLaVA's LoRA recipe adapts
  every decoder projection but lm_head. The adapters live beside the kernel (`lora_a`, `lora_b`),
  so composite mode's aligner, which reuses v_proj/o_proj, reads the adapted weights too.
  Dropout applies where the call passes a "dropout" rng (the train step), not in eval or decoding."""

  rank: int = 8
  alpha: float = 16.0
  dropout: float = 0.0
  targets: str = r"llm/(layers|cross)/"

  def __post_init__(self):
    if not (isinstance(self.rank, int) and self.rank > 0):
      raise ValueError(f"LoRA.rank must be a positive int, got {self.rank!r}")
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f"LoRA.dropout must be in [0, 1), got {self.dropout!r}")

  @property
  def scale(self) -> float:
    return self.alpha / self.rank


@dataclasses.dataclass(frozen=True)
class LLMConfig(_Replaceable):
  """A LLaMA / Qwen2 decoder: RMSNorm, rotate-half RoPE, GQA, SwiGLU."""

  vocab_size: int = 32000
  width: int = 4096
  depth: int = 32
  num_heads: int = 32
  num_kv_heads: int = 32
  head_dim: int = 128
  mlp_dim: int = 11008
  rope_theta: float = 10000.0
  rope_scaling: RopeScaling | None = None
  rms_norm_eps: float = 1e-5
  qkv_bias: bool = False
  tie_embeddings: bool = False
  lora: LoRA | None = None  # adapters on the decoder's projections (none: the plain model)
  attention_impl: AttentionImpl = runtime("auto")
  attention_block: int = runtime(512)  # queries per block of "blocked", keys per block of "chunked"

  def __post_init__(self):
    _check_attention(self)
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
    if self.head_dim % 2:
      raise ValueError(f"head_dim {self.head_dim} must be even for RoPE")


@dataclasses.dataclass(frozen=True)
class ModelConfig(_Replaceable):
  vision: VisionConfig = VisionConfig()
  llm: LLMConfig = LLMConfig()
  projector: Literal["linear", "mlp2x_gelu"] = "mlp2x_gelu"
  mode: Mode = Composite()  # how visual tokens meet the decoder (ee_mllm_jax.mode)
  # The mode the weights were trained in, where it is not `mode` (None: the same). Set by
  # `run_as`; names what runs ("EE-MLLM-F: ... on self-trained weights") and travels to exports.
  trained_mode: Mode | None = None
  dtype: str = runtime("float32")  # compute dtype
  param_dtype: str = runtime("float32")
  remat: Literal["none", "full", "dots"] = runtime("none")
  # Unrolling of the scanned layers; `True` unrolls fully (XLA's cost analysis counts a
  # loop body once, so the FLOP check compiles unrolled).
  scan_unroll: int | bool = runtime(1)

  def __post_init__(self):
    for name in ("mode", "trained_mode"):
      value = getattr(self, name)
      if not (isinstance(value, Mode) or (value is None and name == "trained_mode")):
        raise ValueError(f"ModelConfig.{name} must be an ee_mllm_jax.mode.Mode (Self(), Composite(...), "
                         f"Cross(...)), got {value!r}; flat flags go through replace(attention=..., ...)")
    self.mode.validate(self.llm.depth)
    self.mode.tokens_per_image(self.vision.num_patches)  # VisionZip's counts fit the tower's P
    if self.trained_mode is not None:
      self.trained_mode.validate(self.llm.depth)
    if self.projector not in PROJECTORS:
      raise ValueError(f"projector must be one of {PROJECTORS}, got {self.projector!r}")
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"remat must be one of {REMAT_POLICIES}, got {self.remat!r}")

  def replace(self, **changes) -> "ModelConfig":
    """dataclasses.replace, also taking the mode's flat flags (`attention="composite"`,
    `visual_ffn=...`, `composite_from_layer=...`, `cross_every=...`; `mode_lib.parse` reads them
    against the current mode: `attention="composite"` on a self config keeps the visual FFN)."""
    flags = {k: changes.pop(k) for k in list(changes) if k in mode_lib.FLAGS}
    if flags:
      changes["mode"] = mode_lib.parse(flags, base=changes.get("mode", self.mode))
    return dataclasses.replace(self, **changes)

  def run_as(self, **flags) -> "ModelConfig":
    """These weights run in the mode `flags` ask (read against the mode that runs now), the training
    mode recorded:
    `run_as(attention="composite")` on a self-trained config is EE-MLLM-F (visual FFN kept unless
    `visual_ffn=False`). Cross weights run only as cross."""
    trained = self.weights_mode
    mode = mode_lib.parse(flags, base=self.mode)
    mode_lib.check_runs(trained, mode)
    return dataclasses.replace(self, mode=mode, trained_mode=None if mode == trained else trained)

  @property
  def weights_mode(self) -> Mode:
    """The mode the weights were trained in."""
    return self.trained_mode or self.mode

  @property
  def mode_name(self) -> str:
    """What runs, in words, naming the training mode where it differs."""
    return mode_lib.describe(self.mode, self.llm.depth, self.trained_mode)

  @classmethod
  def runtime_fields(cls) -> tuple[str, ...]:
    """Dotted names of every `runtime` field (nested configs included)."""
    out = []
    for f in dataclasses.fields(cls):
      if f.metadata.get("runtime"):
        out.append(f.name)
      elif isinstance(f.default, _Replaceable):
        out += [f"{f.name}.{g.name}" for g in dataclasses.fields(f.default) if g.metadata.get("runtime")]
    return tuple(out)

  @classmethod
  def _upgrade(cls, d):
    # Flat mode flags at the top level (attention, visual_ffn, ...) are the mode: recorded runs hold them.
    flat = {k: d.pop(k) for k in list(d) if k in mode_lib.FLAGS}
    if flat and "mode" not in d:
      d["mode"] = flat
    return d

  def to_dict(self) -> dict:
    d = super().to_dict()
    d["mode"] = self.mode.flags()
    d["trained_mode"] = self.trained_mode.flags() if self.trained_mode is not None else None
    return d

  def with_attention_impl(self, impl: str, block: int | None = None) -> "ModelConfig":
    """The same model with `attention_impl` (and `attention_block`) set in the tower and the LLM."""
    kw = dict(attention_impl=impl, **({} if block is None else dict(attention_block=block)))
    return self.replace(vision=self.vision.replace(**kw), llm=self.llm.replace(**kw))

  @property
  def attention(self) -> str:
    """The mode's name ("self", "composite", "cross"): the `attention` flag."""
    return self.mode.name

  @property
  def tokens_per_image(self) -> int:
    """Visual tokens per image in the sequence (P; VisionZip's dominant + contextual: `Mode.tokens_per_image`)."""
    return self.mode.tokens_per_image(self.vision.num_patches)

  @property
  def layer_schedule(self) -> tuple[tuple[str, int], ...]:
    """The decoder's layers as runs of one kind: ((kind, count), ...) (`Mode.schedule`)."""
    return self.mode.schedule(self.llm.depth)

  @property
  def self_layers(self) -> int:
    """How many decoder layers run self attention over the visual tokens (V x V scores, visual FFN)."""
    return self.mode.self_layers(self.llm.depth)

  @property
  def cross_blocks(self) -> int:
    """Cross mode: the number of gated cross-attention blocks (one per group of cross_every layers)."""
    return self.mode.blocks(self.llm.depth) if isinstance(self.mode, mode_lib.Cross) else 0

  @property
  def has_projector(self) -> bool:
    """Whether the model has a projector: every mode but cross with media at the vision width."""
    return not (isinstance(self.mode, mode_lib.Cross) and self.mode.media_width == "vision")

  @property
  def media_width(self) -> int:
    """The width of the visual tokens the decoder (or, in cross mode, its blocks) reads: the
    LLM's after the projector, the tower's without one."""
    return self.llm.width if self.has_projector else self.vision.width

  @property
  def cross_attention_shape(self) -> tuple[int, int]:
    """Cross mode: (heads, head dim) of the blocks and the resampler."""
    return self.mode.attention_shape(self.llm.num_heads, self.llm.head_dim)

  @property
  def media_tokens_per_image(self) -> int:
    """Cross mode: the keys/values per image the blocks read (resampler latents, or P)."""
    return getattr(self.mode, "resampler_latents", 0) or self.tokens_per_image

  @classmethod
  def preset(cls, name: str, **overrides) -> "ModelConfig":
    from ee_mllm_jax.presets import PRESETS  # pylint: disable=g-import-not-at-top
    try:
      cfg = PRESETS[name]
    except KeyError:
      raise ValueError(f"unknown preset {name!r}; known: {sorted(PRESETS)}") from None
    return cfg.replace(**overrides) if overrides else cfg
