"""The interaction mode: how visual tokens meet the decoder. One typed value, `ModelConfig.mode`.

    Self()                                  LLaVA: every token is a query, visual tokens pass the FFN.
    Composite(visual_ffn=False, from_layer=0)
                                            EE-MLLM: text tokens are the only queries; visual tokens are
                                            updated by the aligner o_proj(v_proj(norm(x_v))) and pass
                                            the FFN only with `visual_ffn`. Layers [0, from_layer) run
                                            self attention (a layer schedule).
    Cross(every=4, media="previous", ...)   Flamingo: visual tokens stay out of the decoder; a gated
                                            cross-attention block before layers every-1, 2*every-1,
                                            ..., L-1 (OpenFlamingo's placement).

EE-MLLM-F is not a mode of its own: it is `Composite(visual_ffn=True)` running weights trained in
`Self()`. Which mode the weights were trained in is recorded apart (`ModelConfig.trained_mode`), so
every tool can name both. Everything a tool asks about a mode is answered here: validation, the
layer schedule, which layers run the visual FFN, which fields change the parameters, the flat flag
names (`attention`, `visual_ffn`, `composite_from_layer`, `cross_*`, `resampler_*`) that configs,
CLIs and HF records use, the HF record, and the display name. Pure Python: the PyTorch port and the
HF config code import it without JAX.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar, Literal

# A decoder layer's kind: does it run visual queries ("self") or the aligner ("composite")?
LayerKind = Literal["self", "composite"]
CROSS_MEDIA = ("previous", "all")
CROSS_FFN_ACTIVATIONS = ("gelu", "gelu_tanh")
CROSS_MEDIA_WIDTHS = ("llm", "vision")


def _flag(name: str, default, *, params: bool = False, doc: str = ""):
  """A mode field: `name` is its flat flag (configs, CLIs, HF records); `params` whether it changes
  the parameter tree."""
  return dataclasses.field(default=default, metadata=dict(flag=name, params=params, doc=doc))


@dataclasses.dataclass(frozen=True)
class Mode:
  """Base of the three modes. Subclasses set `name` (the `attention` flag) and `paper`."""

  name: ClassVar[str]
  paper: ClassVar[str]
  # Training-free visual-token reduction (docs/design.md, "Token reduction"), fields of every mode
  # (cross refuses them); no parameter changes.
  fastv_layer: int = _flag("fastv_layer", 0, doc="FastV: rank visual tokens after layer K-1, prune from layer K (0: off)")
  fastv_ratio: float = _flag("fastv_ratio", 0.5, doc="FastV: the share R of visual tokens dropped at layer K")
  visionzip_dominant: int = _flag("visionzip_dominant", 0, doc="VisionZip: tokens kept per image by the tower's "
                                  "attention (with visionzip_contextual 0: off)")
  visionzip_contextual: int = _flag("visionzip_contextual", 0, doc="VisionZip: merged tokens per image")

  fastv = property(lambda self: self.fastv_layer > 0)  # FastV on
  visionzip = property(lambda self: self.visionzip_dominant + self.visionzip_contextual > 0)  # VisionZip on

  def fastv_kept(self, visual_len: int) -> int:
    """Visual tokens a row keeps from layer K: ceil((1 - R) V), at least 1 (V without FastV)."""
    if not self.fastv:
      return visual_len
    return max(1, math.ceil(round(visual_len * (1 - self.fastv_ratio), 6)))

  def tokens_per_image(self, patches: int) -> int:
    """Visual tokens per image the projector and the decoder see: VisionZip's dominant +
    contextual (at most P), else the tower's P."""
    if self.visionzip and self.visionzip_dominant + self.visionzip_contextual > patches:
      raise ValueError(f"visionzip_dominant + visionzip_contextual must be <= the tower's {patches} tokens per image")
    return self.visionzip_dominant + self.visionzip_contextual if self.visionzip else patches

  def reduction_name(self) -> str:
    """" + VisionZip 4+2 + FastV K=2 R=50%", or "" without a reduction."""
    out = f" + VisionZip {self.visionzip_dominant}+{self.visionzip_contextual}" if self.visionzip else ""
    return out + (f" + FastV K={self.fastv_layer} R={self.fastv_ratio:.0%}" if self.fastv else "")

  def _validate_reduction(self, depth: int) -> None:
    for f in ("fastv_layer", "visionzip_dominant", "visionzip_contextual"):
      v = getattr(self, f)
      if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ValueError(f"{f} must be an int >= 0, got {v!r}")
    r = self.fastv_ratio
    if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 <= r < 1:
      raise ValueError(f"fastv_ratio must be a number in [0, 1), got {r!r}")
    if self.fastv_layer >= depth:
      raise ValueError(f"fastv_layer must be in [1, {depth - 1}] (0: off), got {self.fastv_layer}")
    if (self.fastv or self.visionzip) and not self.visual_in_decoder:
      raise ValueError(f"FastV and VisionZip run in self and composite mode, not {self.name}")
    if self.visionzip and not self.visionzip_dominant:
      raise ValueError("visionzip_dominant must be >= 1 when VisionZip is on (visionzip_contextual > 0)")

  # ------------------------------------------------------------------ what the model asks
  def schedule(self, depth: int) -> tuple[tuple[LayerKind, int], ...]:
    """The decoder's layers as runs of one kind, in order, no empty run (cross: its decoder layers
    are self-attention layers over text only)."""
    return (("self", depth),)

  def visual_ffn_in(self, kind: LayerKind) -> bool:
    """Whether visual tokens pass the FFN in a layer of `kind` (self layers always; no visual
    stream in cross mode)."""
    return kind == "self"

  @property
  def runs_visual_ffn(self) -> bool:
    """Whether visual tokens pass the FFN of the layers that run this mode's own attention."""
    return self.visual_ffn_in(self.schedule(1)[-1][0])

  @property
  def visual_in_decoder(self) -> bool:
    """Whether visual tokens are in the decoder's stream (self, composite), or keys/values of
    separate blocks (cross)."""
    return True

  def self_layers(self, depth: int) -> int:
    """How many decoder layers run visual queries (V x V scores, visual FFN)."""
    return sum(count for kind, count in self.schedule(depth) if kind == "self") if self.visual_in_decoder else 0

  def validate(self, depth: int) -> None:
    """ValueError naming the field when this mode cannot run a decoder of `depth` layers."""
    self._validate_reduction(depth)

  # ------------------------------------------------------------------ fields and records
  @classmethod
  def fields(cls) -> tuple[dataclasses.Field, ...]:
    return dataclasses.fields(cls)

  def params_key(self) -> tuple:
    """What of this mode shapes the parameter tree: equal keys, interchangeable parameters."""
    return (self.visual_in_decoder,) + tuple(
        (f.metadata["flag"], getattr(self, f.name)) for f in self.fields() if f.metadata["params"])

  def flags(self) -> dict[str, Any]:
    """The flat form: {"attention": name, flag: value, ...} of this mode's own fields (a reduction
    field only where it is not its default, so records without a reduction read as before)."""
    return {"attention": self.name, **{f.metadata["flag"]: getattr(self, f.name) for f in self.fields()
                                       if f.name not in REDUCTION_FIELDS or getattr(self, f.name) != f.default}}

  def implied(self) -> dict[str, Any]:
    """Flags of other modes whose value this mode implies (a config may state them)."""
    return {"visual_ffn": self.runs_visual_ffn, "composite_from_layer": 0}

  def to_hf(self) -> dict[str, Any]:
    """The record in an exported config.json: the three flags every reader knows, plus this
    mode's own fields."""
    return {**self.implied(), **self.flags()}

  def describe(self, depth: int) -> str:
    return f"{self.name} ({self.paper})"


@dataclasses.dataclass(frozen=True)
class Self(Mode):
  name: ClassVar[str] = "self"
  paper: ClassVar[str] = "LLaVA"


@dataclasses.dataclass(frozen=True)
class Composite(Mode):
  name: ClassVar[str] = "composite"
  paper: ClassVar[str] = "EE-MLLM"
  visual_ffn: bool = _flag("visual_ffn", False, doc="visual tokens pass the FFN of the composite layers")
  from_layer: int = _flag("composite_from_layer", 0, doc="layers [0, n) run self attention (0: none)")

  def schedule(self, depth):
    n = self.from_layer
    return tuple((kind, count) for kind, count in (("self", n), ("composite", depth - n)) if count)

  def visual_ffn_in(self, kind):
    return kind == "self" or self.visual_ffn

  @property
  def runs_visual_ffn(self):
    return self.visual_ffn

  def validate(self, depth):
    self._validate_reduction(depth)
    if not isinstance(self.visual_ffn, bool):
      raise ValueError(f"visual_ffn must be true or false, got {self.visual_ffn!r}")
    n = self.from_layer
    if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= depth:
      raise ValueError(f"composite_from_layer must be an int in [0, {depth}] (the decoder's layers), got {n!r}")

  def implied(self):
    return {}

  def describe(self, depth):
    name = "composite, visual FFN" if self.visual_ffn else f"composite ({self.paper})"
    n = self.self_layers(depth)
    if n:
      name += f", from layer {n} ({'layer 0' if n == 1 else f'layers 0-{n - 1}'} self)"
    return name


@dataclasses.dataclass(frozen=True)
class Cross(Mode):
  """Flamingo's gated cross-attention blocks (and optional perceiver resampler) over a text-only
  decoder. Fields (flat flags in brackets):

  * `every` [cross_every]: a block before the last layer of every group of `every` layers
    (layers every-1, 2*every-1, ..., L-1, OpenFlamingo's placement).
  * `media` [cross_media]: the images a text token sees, "previous" (the latest one, Flamingo) or
    "all" (every earlier one).
  * `ffn_mult` [cross_ffn_mult]: the blocks' FFN width, x the LLM width (the resampler's FFN is 4x
    its width, as OpenFlamingo's).
  * `resampler_latents` / `resampler_depth` [resampler_*]: a perceiver resampler with that many
    latents per image and layers (0 latents: none; the blocks read every visual token).
  * `ffn_activation` [cross_ffn_activation]: the GELU of the cross modules' FFNs (the blocks' and
    the resampler's): "gelu" exact (erf), as OpenFlamingo's nn.GELU() in both; "gelu_tanh" the
    tanh approximation. Changes no parameter.
  * `heads` / `head_dim` [cross_heads / cross_head_dim]: the attention shape of the blocks and the
    resampler (0: the LLM's num_heads / head_dim); OpenFlamingo uses 8 heads of 64.
  * `media_width` [cross_media_width]: what the media are. "llm": the projected visual tokens, at
    the LLM's width (the projector trains with the blocks). "vision": the tower's features, before
    any projector, at the tower's width, as OpenFlamingo feeds its perceiver and the blocks' keys
    and values; the model then has no projector (no `projector/` parameters).
  """

  name: ClassVar[str] = "cross"
  paper: ClassVar[str] = "Flamingo"
  every: int = _flag("cross_every", 4, params=True, doc="a gated block before decoder layers k-1, 2k-1, ..., L-1")
  media: str = _flag("cross_media", "previous", doc="images a token sees: 'previous' (Flamingo) or 'all'")
  ffn_mult: int = _flag("cross_ffn_mult", 4, params=True, doc="the blocks' FFN width, x the LLM width")
  resampler_latents: int = _flag("resampler_latents", 0, params=True, doc="latents per image (0: no resampler)")
  resampler_depth: int = _flag("resampler_depth", 6, params=True, doc="perceiver resampler layers")
  ffn_activation: str = _flag("cross_ffn_activation", "gelu",
                              doc="GELU of the blocks' and resampler's FFNs: 'gelu' (erf, OpenFlamingo) or 'gelu_tanh'")
  heads: int = _flag("cross_heads", 0, params=True, doc="attention heads of the blocks and resampler (0: the LLM's)")
  head_dim: int = _flag("cross_head_dim", 0, params=True, doc="their head dim (0: the LLM's)")
  media_width: str = _flag("cross_media_width", "llm", params=True,
                           doc="media: 'llm' projected tokens, or 'vision' tower features (no projector)")

  def attention_shape(self, num_heads: int, head_dim: int) -> tuple[int, int]:
    """(heads, head dim) of the cross modules, given the LLM's."""
    return self.heads or num_heads, self.head_dim or head_dim

  @property
  def visual_in_decoder(self):
    return False

  def visual_ffn_in(self, kind):
    return False

  def blocks(self, depth: int) -> int:
    return depth // self.every

  def validate(self, depth):
    self._validate_reduction(depth)
    for f in ("every", "ffn_mult", "resampler_latents", "resampler_depth", "heads", "head_dim"):
      v = getattr(self, f)
      if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError(f"{self.fields_by_name()[f].metadata['flag']} must be an int, got {v!r}")
    if self.every < 1:
      raise ValueError(f"cross_every must be a positive int, got {self.every!r}")
    if depth % self.every:
      raise ValueError(f"llm.depth {depth} is not a multiple of cross_every {self.every}: cross mode places a "
                       "cross-attention block before the last layer of every group of cross_every layers")
    if self.media not in CROSS_MEDIA:
      raise ValueError(f"cross_media must be one of {CROSS_MEDIA}, got {self.media!r}")
    if self.ffn_mult < 1:
      raise ValueError(f"cross_ffn_mult must be >= 1, got {self.ffn_mult}")
    if self.resampler_latents < 0 or (self.resampler_latents and self.resampler_depth < 1):
      raise ValueError(f"resampler_latents must be >= 0 (0: no resampler) and resampler_depth >= 1, got "
                       f"{self.resampler_latents} / {self.resampler_depth}")
    if self.ffn_activation not in CROSS_FFN_ACTIVATIONS:
      raise ValueError(f"cross_ffn_activation must be one of {CROSS_FFN_ACTIVATIONS}, got {self.ffn_activation!r}")
    for f in ("heads", "head_dim"):
      if getattr(self, f) < 0:
        raise ValueError(f"cross_{f} must be >= 0 (0: the LLM's), got {getattr(self, f)}")
    if self.media_width not in CROSS_MEDIA_WIDTHS:
      raise ValueError(f"cross_media_width must be one of {CROSS_MEDIA_WIDTHS}, got {self.media_width!r}")

  @classmethod
  def fields_by_name(cls):
    return {f.name: f for f in cls.fields()}

  def describe(self, depth):
    extra = f", {self.resampler_latents} resampler latents" if self.resampler_latents else ""
    if self.heads or self.head_dim:
      extra += f", {self.heads or 'LLM'} heads of {self.head_dim or 'LLM'}"
    if self.media_width == "vision":
      extra += ", media at the vision width"
    return f"cross ({self.paper}): a block every {self.every} layers{extra}"


MODES: dict[str, type[Mode]] = {m.name: m for m in (Self, Composite, Cross)}
NAMES: tuple[str, ...] = tuple(MODES)
# Every flat flag: "attention" and each mode's fields, in order (configs and CLIs offer all of them).
FLAGS: tuple[str, ...] = ("attention",) + tuple(dict.fromkeys(f.metadata["flag"] for m in MODES.values()
                                                               for f in m.fields()))
REDUCTION_FIELDS = tuple(f.name for f in dataclasses.fields(Mode))  # carried over when the mode switches


def parse(flags: dict[str, Any], base: Mode | None = None) -> Mode:
  """The mode that flat `flags` ({"attention": ..., "visual_ffn": ..., ...}; None values are unset)
  describe, starting from `base` (default: `Composite()`). The one reader of flat flags.

  * `attention` unset keeps base's mode, with the given fields changed.
  * Switching mode keeps what the weights were trained with: composite on a base that runs the
    visual FFN (self) keeps it (EE-MLLM-F) unless `visual_ffn` says otherwise.
  * A flag of another mode may be stated only with the value this mode implies (`visual_ffn=True`
    with self); otherwise it is a ValueError naming it (it would be silently ignored).
  """
  base = base if base is not None else Composite()
  flags = {k: v for k, v in flags.items() if v is not None}
  unknown = sorted(set(flags) - set(FLAGS))
  if unknown:
    raise ValueError(f"unknown mode flag(s) {unknown}; known: {list(FLAGS)}")
  name = flags.pop("attention", base.name)
  if name not in MODES:
    raise ValueError(f"attention must be one of {NAMES}, got {name!r}")
  cls = MODES[name]
  if isinstance(base, cls):
    values = {f.name: getattr(base, f.name) for f in cls.fields()}
  else:
    values = {f.name: getattr(base, f.name) if f.name in REDUCTION_FIELDS else f.default for f in cls.fields()}
    if cls is Composite:
      values["visual_ffn"] = base.runs_visual_ffn
  own = {f.metadata["flag"]: f.name for f in cls.fields()}
  for flag, value in flags.items():
    if flag in own:
      values[own[flag]] = value
  mode = cls(**values)
  implied = mode.implied()
  for flag, value in flags.items():
    if flag not in own and (flag not in implied or implied[flag] != value):
      why = f"implies {flag}={implied[flag]!r}" if flag in implied else f"has no {flag}"
      raise ValueError(f"{flag}={value!r} does not apply to attention={name!r}: {name} mode {why}")
  return mode


def from_record(record: dict[str, Any], depth: int | None = None) -> Mode:
  """A mode from its flat record (a checkpoint's config, an HF export's "ee_mllm"), checked;
  the three common flags may be absent (older records: self mode, visual FFN, no schedule), and
  flags a mode implies are accepted as written by `to_hf`."""
  record = dict(record)
  name = record.get("attention", "self")
  if name not in MODES:
    raise ValueError(f"attention must be one of {NAMES}, got {name!r}")
  own = {f.metadata["flag"] for f in MODES[name].fields()}
  mode = parse({k: v for k, v in record.items() if k == "attention" or k in own}, base=Self())
  if depth is not None:
    mode.validate(depth)
  return mode


def check_runs(trained: Mode, mode: Mode) -> None:
  """ValueError unless weights trained in `trained` can run as `mode`: cross weights hold other
  parameters (and the others lack the cross blocks): cross runs only cross weights."""
  if mode.visual_in_decoder != trained.visual_in_decoder:
    raise ValueError(f"weights trained in {trained.name} mode cannot run as {mode.name}: cross mode keeps visual "
                     "tokens out of the decoder and has parameters the others lack")


def hf_model_type(mode: Mode, trained: Mode) -> str:
  """`model_type` of an exported config.json: "llava" only for a model stock LLaVA runs as it is
  (self attention, self-trained); any other mode is "ee_mllm", so that transformers' stock
  classes warn (LlavaConfig: "a model of type ee_mllm ...") or refuse (AutoConfig) instead of
  silently running a different model. `ee_mllm_jax.torch` registers "ee_mllm"."""
  stock = isinstance(mode, Self) and isinstance(trained, Self) and not (mode.fastv or mode.visionzip)
  return "llava" if stock else "ee_mllm"  # a reduction is not stock LLaVA either


def to_hf_record(mode: Mode, trained: Mode) -> dict[str, Any]:
  """The "ee_mllm" record of an exported config.json: the mode that runs, and under "trained" the
  one the weights were trained in."""
  return {**mode.to_hf(), "trained": trained.to_hf()}


def from_hf_record(hf: dict[str, Any], depth: int | None = None) -> tuple[Mode, Mode]:
  """(mode that runs, mode trained in) from a config.json dict. No "ee_mllm": stock LLaVA (self,
  self-trained); no "trained" (exports before it was recorded): trained as it runs."""
  record = hf.get("ee_mllm")
  if not record:
    return Self(), Self()
  if not isinstance(record, dict):
    raise ValueError(f'config.json "ee_mllm" must be a dict, got {record!r}')
  record = dict(record)
  trained = record.pop("trained", None)
  mode = from_record({k: v for k, v in record.items() if k in FLAGS}, depth)
  trained = from_record(trained, depth) if trained else mode
  check_runs(trained, mode)
  return mode, trained


def describe(mode: Mode, depth: int, trained: Mode | None = None) -> str:
  """The mode that runs, in words, naming the training mode when it differs:
  "EE-MLLM-F: composite, visual FFN, on self-trained weights"."""
  text, reduction = mode.describe(depth), mode.reduction_name()
  if trained is None or _without_reduction(trained) == _without_reduction(mode):
    return text + reduction
  text = f"{text}, on {trained.name}-trained weights"
  return (f"EE-MLLM-F: {text}" if isinstance(trained, Self) and isinstance(mode, Composite) else text) + reduction


def _without_reduction(mode: Mode) -> Mode:
  return dataclasses.replace(mode, **{f.name: f.default for f in dataclasses.fields(Mode)})
