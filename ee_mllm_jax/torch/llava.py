"""`EEMLLMForConditionalGeneration`: transformers' LLaVA with EE-MLLM's attention modes.

The mode lives in the config as `config.ee_mllm`, the record `ee_mllm_jax.mode.to_hf_record` writes
(what `ee_mllm_jax.convert`'s export writes to `config.json`: the mode that runs, and under "trained"
the one the weights were trained in; absent = stock LLaVA, self attention), so `save_pretrained`
records it and `from_pretrained` restores it. Constructor (and so `from_pretrained`) keywords switch
it as `ee_mllm_jax.mode.parse` reads flags: `attention="composite"` on a stock LLaVA directory is
EE-MLLM-F (visual FFN kept, since those weights were trained with it); `composite_from_layer=n`
keeps decoder layers [0, n) self attention; `fastv_layer` / `fastv_ratio` / `visionzip_dominant` /
`visionzip_contextual` set the token reductions (`reduction.py`).

An export that runs anything but self attention on self-trained weights has `model_type`
"ee_mllm": stock transformers warns on it (`LlavaForConditionalGeneration`) or refuses it
(`AutoConfig`); importing this module registers "ee_mllm" with the Auto classes, so
`AutoModelForImageTextToText.from_pretrained(DIR)` then builds this class.

A forward whose tokens include image placeholders runs, in composite mode or under FastV, the
port's decoder (`composite.composite_decoder`), and so does every step over a cache that a FastV
prefill pruned (its layers >= K mask the dropped slots); every other forward (self mode, and every
decode step of `generate()`, whose new tokens are text) is transformers' own decoder: a decode step
is ordinary attention of the new text token over the cache, which holds every prompt token's
keys/values. VisionZip replaces `get_image_features`.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForImageTextToText, LlavaConfig, LlavaForConditionalGeneration, LlavaModel
from transformers.conversion_mapping import get_checkpoint_conversion_mapping, register_checkpoint_conversion_mapping
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.llava.modeling_llava import LlavaModelOutputWithPast, LlavaPreTrainedModel
from transformers.utils.deprecation import deprecate_kwarg

from ee_mllm_jax import mode as mode_lib
from ee_mllm_jax.torch import reduction
from ee_mllm_jax.torch.composite import composite_decoder


class EEMLLMConfig(LlavaConfig):
  """LlavaConfig under `model_type` "ee_mllm" (an export that stock LLaVA would run as another
  model); it writes "llava" back for a plain self-trained LLaVA (`mode.hf_model_type`)."""

  model_type = "ee_mllm"

  def to_dict(self):
    d = super().to_dict()
    d["model_type"] = mode_lib.hf_model_type(*modes_of(self))
    return d


def modes_of(config: LlavaConfig) -> tuple[mode_lib.Mode, mode_lib.Mode]:
  """(mode that runs, mode the weights were trained in) recorded in a LLaVA config, checked; the
  PyTorch port runs self and composite."""
  mode, trained = mode_lib.from_hf_record({"ee_mllm": getattr(config, "ee_mllm", None)},
                                          config.text_config.num_hidden_layers)
  if not mode.visual_in_decoder:
    raise ValueError(f"the PyTorch port runs self and composite attention, not {mode.describe(1)}")
  return mode, trained


def mode_of(config: LlavaConfig) -> mode_lib.Mode:
  """The mode that runs (`modes_of`)."""
  return modes_of(config)[0]


# Keywords a composite forward may receive and has no use for (the output is always a dataclass;
# falsy output_* flags ask for nothing).
_IGNORED_KWARGS = ("return_dict", "output_attentions", "output_hidden_states")


class EEMLLMModel(LlavaModel):
  """LlavaModel whose language model runs composite attention (or FastV) when the mode says so and
  the input holds image tokens, and whose image features are VisionZip's under that setting."""

  @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
  def forward(self, input_ids=None, pixel_values=None, attention_mask=None, position_ids=None, cache=None,
              inputs_embeds=None, vision_feature_layer=None, vision_feature_select_strategy=None, image_sizes=None,
              mm_encoder_outputs=None, use_cache=None, **kwargs):
    mode = mode_of(self.config)
    pruned = reduction.is_marked(cache)  # a FastV prefill's cache: its decode steps mask the dropped slots
    is_visual = None
    if isinstance(mode, mode_lib.Composite) or mode.fastv or pruned:
      if input_ids is None:
        raise ValueError(f"{'composite attention' if isinstance(mode, mode_lib.Composite) else 'FastV'} finds the "
                         "visual tokens by their image token id: pass input_ids")
      is_visual = input_ids == self.config.image_token_id
    if is_visual is None or not (pruned or bool(is_visual.any())):
      return super().forward(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask,
                             position_ids=position_ids, cache=cache, inputs_embeds=inputs_embeds,
                             vision_feature_layer=vision_feature_layer,
                             vision_feature_select_strategy=vision_feature_select_strategy, image_sizes=image_sizes,
                             mm_encoder_outputs=mm_encoder_outputs, use_cache=use_cache, **kwargs)
    if kwargs.get("output_attentions") or kwargs.get("output_hidden_states"):
      raise NotImplementedError("composite attention does not return per-layer attentions or hidden states")
    unused = sorted(k for k, value in kwargs.items() if value is not None and k not in _IGNORED_KWARGS)
    if unused:
      raise TypeError(f"composite attention does not take {unused}")
    if inputs_embeds is not None:
      raise ValueError("pass input_ids or inputs_embeds, not both")
    inputs_embeds = self.get_input_embeddings()(input_ids)
    image = (mm_encoder_outputs or {}).get("image")
    if bool(is_visual.any()):  # else a decode step of a FastV cache: text only
      if pixel_values is None and image is None:
        raise ValueError("the input holds image tokens but neither pixel_values nor mm_encoder_outputs")
      if image is None:
        image = self.get_image_features(pixel_values=pixel_values, vision_feature_layer=vision_feature_layer,
                                        vision_feature_select_strategy=vision_feature_select_strategy,
                                        image_sizes=image_sizes, return_dict=True)
      features = torch.cat(image.pooler_output, dim=0).to(inputs_embeds.device, inputs_embeds.dtype)
      placeholders = self.get_placeholder_mask(input_ids, inputs_embeds=inputs_embeds, image_features=features)
      inputs_embeds = inputs_embeds.masked_scatter(placeholders, features)
    out = composite_decoder(self.language_model, inputs_embeds, is_visual, attention_mask=attention_mask,
                            position_ids=position_ids, cache=cache, use_cache=use_cache,
                            mode=mode)
    return LlavaModelOutputWithPast(last_hidden_state=out.last_hidden_state, cache=out.cache, image_outputs=image)

  def get_image_features(self, pixel_values, vision_feature_layer=None, vision_feature_select_strategy=None,
                         image_sizes=None, **kwargs):
    """LLaVA's image features, or under VisionZip its d + c tokens per image (`reduction.visionzip_features`)."""
    mode = mode_of(self.config)
    if not mode.visionzip:
      return super().get_image_features(pixel_values, vision_feature_layer=vision_feature_layer,
                                        vision_feature_select_strategy=vision_feature_select_strategy,
                                        image_sizes=image_sizes, **kwargs)
    if image_sizes is not None:
      raise NotImplementedError("VisionZip runs on whole images (no image_sizes)")
    layer = self.config.vision_feature_layer if vision_feature_layer is None else vision_feature_layer
    strategy = vision_feature_select_strategy or self.config.vision_feature_select_strategy
    features = reduction.visionzip_features(self, pixel_values, mode, layer, strategy)
    return BaseModelOutputWithPooling(pooler_output=list(features))

  def get_placeholder_mask(self, input_ids, inputs_embeds, image_features):
    mode = mode_of(self.config)
    if mode.visionzip and input_ids is not None:  # name the count a VisionZip prompt needs
      per_image = mode.visionzip_dominant + mode.visionzip_contextual
      n = int((input_ids == self.config.image_token_id).sum())
      if n != image_features.shape[0]:
        raise ValueError(f"VisionZip feeds {per_image} tokens per image: the prompt must hold {per_image} image tokens "
                         f"per image ({image_features.shape[0]} for {image_features.shape[0] // per_image} images), "
                         f"not {n} (LLaVA's processor writes the tower's count)")
    return super().get_placeholder_mask(input_ids, inputs_embeds=inputs_embeds, image_features=image_features)


class EEMLLMForConditionalGeneration(LlavaForConditionalGeneration):
  """transformers' LLaVA (same checkpoint keys, `generate()`, processor) with the EE-MLLM modes.

  `attention` / `visual_ffn` / `composite_from_layer` and the reductions' `fastv_*` /
  `visionzip_*` switch the config's recorded mode (`set_mode`); `attention="composite"` on LLaVA
  weights keeps the visual FFN (EE-MLLM-F)."""

  config_class = EEMLLMConfig

  def __init__(self, config: LlavaConfig, attention: str | None = None, visual_ffn: bool | None = None,
               composite_from_layer: int | None = None, fastv_layer: int | None = None,
               fastv_ratio: float | None = None, visionzip_dominant: int | None = None,
               visionzip_contextual: int | None = None):
    if not isinstance(config, EEMLLMConfig):
      config = EEMLLMConfig.from_dict(config.to_dict())
    LlavaPreTrainedModel.__init__(self, config)  # LlavaForConditionalGeneration's body, with our inner model
    self.model = EEMLLMModel(config)
    self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
    self.post_init()
    self.set_mode(attention=attention, visual_ffn=visual_ffn, composite_from_layer=composite_from_layer,
                  fastv_layer=fastv_layer, fastv_ratio=fastv_ratio, visionzip_dominant=visionzip_dominant,
                  visionzip_contextual=visionzip_contextual)

  @classmethod
  def from_pretrained(cls, pretrained_model_name_or_path, *args, config=None, **kwargs):
    if config is None:  # a stock "llava" directory or our "ee_mllm" export, read without a type warning
      config_dict, _ = EEMLLMConfig.get_config_dict(pretrained_model_name_or_path,
                                                     local_files_only=kwargs.get("local_files_only", False))
      config = EEMLLMConfig.from_dict({**config_dict, "model_type": "ee_mllm"})
    return super().from_pretrained(pretrained_model_name_or_path, *args, config=config, **kwargs)

  @property
  def mode(self) -> mode_lib.Mode:
    return mode_of(self.config)

  @property
  def mode_name(self) -> str:
    """What runs, in words, naming the training mode where it differs."""
    mode, trained = modes_of(self.config)
    return mode_lib.describe(mode, self.config.text_config.num_hidden_layers, trained)

  def set_mode(self, attention: str | None = None, visual_ffn: bool | None = None,
               composite_from_layer: int | None = None, fastv_layer: int | None = None,
               fastv_ratio: float | None = None, visionzip_dominant: int | None = None,
               visionzip_contextual: int | None = None) -> "EEMLLMForConditionalGeneration":
    """Switch the mode in place (the same weights; self -> composite is EE-MLLM-F), reading the
    flags against the mode that runs now (None keeps a value; a reduction is kept across an
    attention switch). Recorded in `config.ee_mllm` with the training mode, so `save_pretrained`
    writes both."""
    mode, trained = modes_of(self.config)
    mode = mode_lib.parse(dict(attention=attention, visual_ffn=visual_ffn, composite_from_layer=composite_from_layer,
                               fastv_layer=fastv_layer, fastv_ratio=fastv_ratio, visionzip_dominant=visionzip_dominant,
                               visionzip_contextual=visionzip_contextual), base=mode)
    if not mode.visual_in_decoder:
      raise ValueError("the PyTorch port runs self and composite attention, not cross")
    mode.validate(self.config.text_config.num_hidden_layers)
    vision = self.config.vision_config
    mode.tokens_per_image((vision.image_size // vision.patch_size) ** 2)  # VisionZip's counts fit the tower
    mode_lib.check_runs(trained, mode)
    # the mode's keys replaced; the rest of the export's record (template, system prompt) kept
    # (a flag at its default, as a reduction turned off, is left out of the new record: so is the old value)
    rest = {k: v for k, v in (getattr(self.config, "ee_mllm", None) or {}).items() if k not in mode_lib.FLAGS}
    self.config.ee_mllm = {**rest, **mode_lib.to_hf_record(mode, trained)}
    return self


AutoConfig.register("ee_mllm", EEMLLMConfig, exist_ok=True)
AutoModelForImageTextToText.register(EEMLLMConfig, EEMLLMForConditionalGeneration, exist_ok=True)

# transformers renames checkpoint keys (on load, and back on save) only for its own classes; a subclass
# defined elsewhere counts as custom code, so it is given LLaVA's renamings by name: the same files load
# and save, key for key, as with LlavaForConditionalGeneration.
for _ours, _theirs in ((EEMLLMForConditionalGeneration, "llava"), (EEMLLMModel, "LlavaModel")):
  register_checkpoint_conversion_mapping(_ours.__name__, get_checkpoint_conversion_mapping(_theirs), overwrite=True)
