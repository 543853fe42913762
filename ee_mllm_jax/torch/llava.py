"""`EEMLLMForConditionalGeneration`: transformers' LLaVA with EE-MLLM's attention modes.

The mode lives in the config as `config.ee_mllm = {"attention": "self" | "composite", "visual_ffn": bool,
"composite_from_layer": int}` (what `ee_mllm_jax.convert`'s export writes to `config.json`; absent =
stock LLaVA: self attention, visual FFN on; no composite_from_layer = 0), so `save_pretrained` records
it and `from_pretrained` restores it. Constructor (and so `from_pretrained`) keywords override it:
`attention="composite"` on a stock LLaVA directory is EE-MLLM-F (visual FFN kept, since those weights
were trained with it); `composite_from_layer=n` keeps decoder layers [0, n) self attention.

A forward whose tokens include image placeholders runs, in composite mode, the composite decoder
(`composite.composite_decoder`); every other forward (self mode, and every decode step of
`generate()`, whose new tokens are text) is transformers' own decoder: a decode step is ordinary
attention of the new text token over the cache, which holds every prompt token's keys/values.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaModel
from transformers.conversion_mapping import get_checkpoint_conversion_mapping, register_checkpoint_conversion_mapping
from transformers.models.llava.modeling_llava import LlavaModelOutputWithPast, LlavaPreTrainedModel
from transformers.utils.deprecation import deprecate_kwarg

from ee_mllm_jax.torch.composite import composite_decoder

ATTENTION_MODES = ("self", "composite")
MODE_KEYS = ("attention", "visual_ffn", "composite_from_layer")


def check_mode(mode: dict, depth: int | None = None) -> dict:
  """`mode` ({"attention", "visual_ffn"[, "composite_from_layer"]}, the last 0 when absent) if it is
  one the model runs, else a ValueError saying why. `depth`: the decoder's layers, composite_from_layer's bound."""
  mode = {"composite_from_layer": 0, **mode}
  if set(mode) != set(MODE_KEYS):
    raise ValueError(f"an ee_mllm mode has the keys {', '.join(MODE_KEYS)}, got {sorted(mode)}")
  if mode["attention"] not in ATTENTION_MODES:
    raise ValueError(f"ee_mllm attention must be one of {ATTENTION_MODES}, got {mode['attention']!r}")
  if not isinstance(mode["visual_ffn"], bool):
    raise ValueError(f"ee_mllm visual_ffn must be true or false, got {mode['visual_ffn']!r}")
  if mode["attention"] == "self" and not mode["visual_ffn"]:
    raise ValueError("self attention always runs the FFN on visual tokens (visual_ffn=False needs 'composite')")
  n = mode["composite_from_layer"]
  if isinstance(n, bool) or not isinstance(n, int) or n < 0 or (depth is not None and n > depth):
    raise ValueError(f"ee_mllm composite_from_layer must be an int in [0, {'depth' if depth is None else depth}], "
                     f"got {n!r}")
  if mode["attention"] == "self" and n:
    raise ValueError(f"self attention runs every layer as self attention (composite_from_layer={n} needs "
                     "'composite')")
  return mode


def mode_of(config: LlavaConfig) -> dict:
  """The mode recorded in a LLaVA config's `ee_mllm` (stock LLaVA when absent), checked."""
  return check_mode({"attention": "self", "visual_ffn": True, **(getattr(config, "ee_mllm", None) or {})},
                    config.text_config.num_hidden_layers)


# Keywords a composite forward may receive and has no use for (the output is always a dataclass;
# falsy output_* flags ask for nothing).
_IGNORED_KWARGS = ("return_dict", "output_attentions", "output_hidden_states")


class EEMLLMModel(LlavaModel):
  """LlavaModel whose language model runs composite attention when the mode says so and the
  input holds image tokens."""

  @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
  def forward(self, input_ids=None, pixel_values=None, attention_mask=None, position_ids=None, cache=None,
              inputs_embeds=None, vision_feature_layer=None, vision_feature_select_strategy=None, image_sizes=None,
              mm_encoder_outputs=None, use_cache=None, **kwargs):
    mode = mode_of(self.config)
    is_visual = None
    if mode["attention"] == "composite":
      if input_ids is None:
        raise ValueError("composite attention finds the visual tokens by their image token id: pass input_ids")
      is_visual = input_ids == self.config.image_token_id
    if is_visual is None or not bool(is_visual.any()):
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
    if pixel_values is None and mm_encoder_outputs is None:
      raise ValueError("the input holds image tokens but neither pixel_values nor mm_encoder_outputs")
    image = (mm_encoder_outputs or {}).get("image")
    if image is None:
      image = self.get_image_features(pixel_values=pixel_values, vision_feature_layer=vision_feature_layer,
                                      vision_feature_select_strategy=vision_feature_select_strategy,
                                      image_sizes=image_sizes, return_dict=True)
    inputs_embeds = self.get_input_embeddings()(input_ids)
    features = torch.cat(image.pooler_output, dim=0).to(inputs_embeds.device, inputs_embeds.dtype)
    placeholders = self.get_placeholder_mask(input_ids, inputs_embeds=inputs_embeds, image_features=features)
    inputs_embeds = inputs_embeds.masked_scatter(placeholders, features)
    out = composite_decoder(self.language_model, inputs_embeds, is_visual, attention_mask=attention_mask,
                            position_ids=position_ids, cache=cache, use_cache=use_cache,
                            visual_ffn=mode["visual_ffn"], composite_from_layer=mode["composite_from_layer"])
    return LlavaModelOutputWithPast(last_hidden_state=out.last_hidden_state, cache=out.cache, image_outputs=image)


class EEMLLMForConditionalGeneration(LlavaForConditionalGeneration):
  """transformers' LLaVA (same checkpoint keys, `generate()`, processor) with the EE-MLLM modes.

  `attention` / `visual_ffn` / `composite_from_layer` override the config's recorded mode; `visual_ffn`
  defaults to the recorded value, else True (EE-MLLM-F on LLaVA weights)."""

  def __init__(self, config: LlavaConfig, attention: str | None = None, visual_ffn: bool | None = None,
               composite_from_layer: int | None = None):
    LlavaPreTrainedModel.__init__(self, config)  # LlavaForConditionalGeneration's body, with our inner model
    self.model = EEMLLMModel(config)
    self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
    self.post_init()
    self.set_mode(attention=attention, visual_ffn=visual_ffn, composite_from_layer=composite_from_layer)

  @property
  def mode(self) -> dict:
    return mode_of(self.config)

  def set_mode(self, attention: str | None = None, visual_ffn: bool | None = None,
               composite_from_layer: int | None = None) -> "EEMLLMForConditionalGeneration":
    """Switch the mode in place (the same weights; e.g. self -> composite is EE-MLLM-F); None keeps
    the current value (switching to self resets the others). Recorded in `config.ee_mllm`, so
    `save_pretrained` writes it."""
    mode = mode_of(self.config)
    if attention is not None:
      mode["attention"] = attention
      if attention == "self":
        mode.update(visual_ffn=True, composite_from_layer=0)
    if visual_ffn is not None:
      mode["visual_ffn"] = bool(visual_ffn)
    if composite_from_layer is not None:
      mode["composite_from_layer"] = composite_from_layer
    self.config.ee_mllm = check_mode(mode, self.config.text_config.num_hidden_layers)
    return self


# transformers renames checkpoint keys (on load, and back on save) only for its own classes; a subclass
# defined elsewhere counts as custom code, so it is given LLaVA's renamings by name: the same files load
# and save, key for key, as with LlavaForConditionalGeneration.
for _ours, _theirs in ((EEMLLMForConditionalGeneration, "llava"), (EEMLLMModel, "LlavaModel")):
  register_checkpoint_conversion_mapping(_ours.__name__, get_checkpoint_conversion_mapping(_theirs), overwrite=True)
