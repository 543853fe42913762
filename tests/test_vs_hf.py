"""Self mode equals transformers' LLaVA logits on random tiny checkpoints read from safetensors.

Two families: CLIP tower + LLaMA decoder (feature layer -2: the last tower layer is skipped),
and SigLIP tower + Qwen2 decoder (GQA, qkv bias, rope theta 1e6) as LLaVA-OneVision pairs them.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402

import ee_mllm_jax as eem  # noqa: E402
from ee_mllm_jax.convert import load_hf_llava  # noqa: E402

IMAGE_TOKEN = 250


def tiny_hf_llava(family, text_layers=2):
  """A random tiny LLaVA of `family` (its decoder `text_layers` deep), norms and biases perturbed."""
  if family == "clip-llama":
    vision = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                           num_attention_heads=2, image_size=32, patch_size=8)
    text = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                                    num_hidden_layers=text_layers, num_attention_heads=4, num_key_value_heads=2,
                                    head_dim=16, rms_norm_eps=1e-5)
    extra = dict(vision_feature_layer=-2, vision_feature_select_strategy="default")
  else:
    vision = transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=2, image_size=30, patch_size=7)
    text = transformers.Qwen2Config(vocab_size=256, hidden_size=64, intermediate_size=128,
                                    num_hidden_layers=text_layers, num_attention_heads=4, num_key_value_heads=1,
                                    rope_theta=1e6, rms_norm_eps=1e-6)
    extra = dict(vision_feature_layer=-1, vision_feature_select_strategy="full")
  cfg = transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN,
                                 projector_hidden_act="gelu", **extra)
  torch.manual_seed(0)
  model = transformers.LlavaForConditionalGeneration(cfg).eval()
  with torch.no_grad():  # LayerNorm/RMSNorm init to 1/0: perturb so that a misplaced norm shows
    for name, p in model.named_parameters():
      if "norm" in name or "embedding" in name or name.endswith("bias"):
        p.add_(0.1 * torch.randn_like(p))
  return model


@pytest.mark.parametrize("family", ["clip-llama", "siglip-qwen2"])
def test_self_mode_equals_transformers_llava(tmp_path, family):
  hf = tiny_hf_llava(family)
  hf.save_pretrained(tmp_path)
  cfg, params = load_hf_llava(str(tmp_path))
  p = cfg.tokens_per_image
  rng = np.random.default_rng(0)
  n_before, n_after, b = 3, 6, 2  # a system prompt before the image, the question after it
  ids = rng.integers(0, 200, (b, n_before + n_after))
  pixels = rng.standard_normal((b, 3, cfg.vision.image_size, cfg.vision.image_size)).astype(np.float32)
  seq = np.concatenate([ids[:, :n_before], np.full((b, p), IMAGE_TOKEN), ids[:, n_before:]], 1)
  with torch.no_grad():
    want = hf(input_ids=torch.tensor(seq), pixel_values=torch.tensor(pixels)).logits.numpy()
  want = np.concatenate([want[:, :n_before], want[:, n_before + p:]], 1)  # text positions

  batch = dict(pixel_values=pixels.transpose(0, 2, 3, 1)[:, None], image_valid=np.ones((b, 1), bool),
               input_ids=ids.astype(np.int32),
               text_positions=np.broadcast_to(np.r_[0:n_before, n_before + p:n_before + p + n_after], (b, 9)).astype(np.int32),
               text_valid=np.ones((b, 9), bool),
               visual_positions=np.broadcast_to(np.arange(n_before, n_before + p), (b, p)).astype(np.int32))
  got = np.asarray(jax.jit(eem.EEMLLM(cfg).apply)({"params": params}, **batch))
  err = np.max(np.abs(got - want)) / np.max(np.abs(want))
  assert err < 1e-4, f"max relative error {err:.2e}"
  # the same weights run in composite mode (EE-MLLM-F) compute something else
  composite = np.asarray(eem.EEMLLM(cfg.replace(attention="composite")).apply({"params": params}, **batch))
  assert np.max(np.abs(composite[:, n_before:] - want[:, n_before:])) > 1e-4


def test_a_checkpoint_without_a_projector_loads_the_rest(tmp_path):
  """Stage 1 starts from pretrained towers and a fresh projector: missing tensors are either an
  error naming them, or (missing="skip") left to `params.overlay`, which reports them."""
  import json  # pylint: disable=g-import-not-at-top

  from ee_mllm_jax.convert import config_from_hf, params_from_hf, read_safetensors
  from ee_mllm_jax.params import overlay
  from models import init_params

  tiny_hf_llava("clip-llama").save_pretrained(tmp_path)
  with open(tmp_path / "config.json") as f:
    cfg = config_from_hf(json.load(f))
  tensors = {k: v for k, v in read_safetensors(str(tmp_path)).items() if "multi_modal_projector" not in k}
  with pytest.raises(KeyError, match="multi_modal_projector.linear_1.weight"):
    params_from_hf(tensors, cfg)
  params, report = overlay(init_params(cfg), params_from_hf(tensors, cfg, missing="skip"))
  assert {p.split("/")[0] for p in report.initialised} == {"projector"}
  assert {p.split("/")[0] for p in report.loaded} == {"vision", "llm"} and not report.unused
  _, full = load_hf_llava(str(tmp_path))
  np.testing.assert_array_equal(params["llm"]["embed_tokens"]["embedding"], full["llm"]["embed_tokens"]["embedding"])
