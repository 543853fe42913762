"""The PyTorch composite model (`ee_mllm_jax.torch`) equals the JAX model, and really skips visual queries.

Two families (CLIP + LLaMA with feature layer -2; SigLIP + Qwen2 with GQA 4:1 and qkv bias), random
tiny checkpoints saved with `save_pretrained`. Inputs come from LLaVA's processor and real PNGs: one
left-padded batch with a system prompt before the image and a question after it, an image first,
and a row without an image. The layer schedule (composite_from_layer) runs on a DEPTH-layer decoder
of each family, deep enough that n=1 and n=DEPTH-1 are different functions.
"""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402

from ee_mllm_jax.convert import load_hf_llava  # noqa: E402
from ee_mllm_jax.generate import generate  # noqa: E402
from ee_mllm_jax.torch import EEMLLMForConditionalGeneration  # noqa: E402
from models import forward  # noqa: E402
from test_vs_hf import IMAGE_TOKEN, tiny_hf_llava  # noqa: E402

FAMILIES = ("clip-llama", "siglip-qwen2")
# A system prompt before the image, a question after it; an image first; a row without an image.
PROMPTS = ("w3 w7 w1 <image> w4 w5 w6 w8 w9 w10", "<image> w11 w12 w13 w14", "w1 w2 w3 w4 w5 w6 w7")
IMAGE_SIZES = ((40, 48), (37, 30))  # (height, width) of the PNGs of the first two prompts
NEW_TOKENS = 6
DEPTH = 4  # the scheduled families' decoder (at 2 layers, n=1 = depth-1 reads the same text logits as n=depth)


def tiny_processor(config) -> transformers.LlavaProcessor:
  """LLaVA's processor for a tiny checkpoint: a word-level tokenizer ("w<i>" -> i, "<image>" -> the
  image token, left padding) and the tower's own image processor."""
  from tokenizers import Tokenizer, models, pre_tokenizers  # pylint: disable=g-import-not-at-top
  words = Tokenizer(models.WordLevel({f"w{i}": i for i in range(1, 200)} | {"<pad>": 0, "<image>": IMAGE_TOKEN},
                                     unk_token="<pad>"))
  words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=words, pad_token="<pad>", padding_side="left",
                                                   additional_special_tokens=["<image>"])
  v = config.vision_config
  if v.model_type == "clip_vision_model":  # square resize + centre crop; the CLS token is dropped ("default")
    images, cls = transformers.CLIPImageProcessorPil(size={"shortest_edge": v.image_size},
                                                     crop_size={"height": v.image_size, "width": v.image_size}), 1
  else:
    images, cls = transformers.SiglipImageProcessorPil(size={"height": v.image_size, "width": v.image_size}), 0
  return transformers.LlavaProcessor(images, tokenizer, patch_size=v.patch_size, num_additional_image_tokens=cls,
                                     vision_feature_select_strategy=config.vision_feature_select_strategy)


def processor_inputs(config, directory, prompts=PROMPTS):
  """The processor's output for `prompts` and random PNGs written to and read from `directory`."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  images = []
  for i, (h, w) in enumerate(IMAGE_SIZES[:sum("<image>" in p for p in prompts)]):
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(directory / f"{i}.png")
    images.append(Image.open(directory / f"{i}.png").convert("RGB"))
  return dict(tiny_processor(config)(images=images, text=list(prompts), return_tensors="pt", padding=True))


def _family(name, tmp_path_factory, text_layers=2):
  """(name, stock LLaVA, its directory, processor inputs)."""
  hf = tiny_hf_llava(name, text_layers)
  hf.generation_config.eos_token_id = None  # generate exactly NEW_TOKENS in both frameworks
  path = tmp_path_factory.mktemp(f"{name}-{text_layers}")
  hf.save_pretrained(path)
  return name, hf, path, processor_inputs(hf.config, path)


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory):
  return _family(request.param, tmp_path_factory)


# The layer schedule is family-independent code (the families' differences, GQA and qkv bias, are
# compared above in every mode): the second family's schedule runs in the full suite only.
DEEP_FAMILIES = (FAMILIES[0], pytest.param(FAMILIES[1], marks=pytest.mark.slow))


@pytest.fixture(scope="module", params=DEEP_FAMILIES)
def deep_family(request, tmp_path_factory):
  """A family with a DEPTH-layer decoder, for the layer schedule."""
  return _family(request.param, tmp_path_factory, DEPTH)


def tokens_per_image(config):
  v = config.vision_config
  return (v.image_size // v.patch_size) ** 2


def jax_batch(inputs, p):
  """The same prompts as a two-stream batch (ee_mllm_jax.batch): positions as transformers'
  generate() derives them (cumsum of the attention mask), text left-aligned, one image slot."""
  ids, mask = inputs["input_ids"].numpy(), inputs["attention_mask"].numpy().astype(bool)
  pixels = inputs["pixel_values"].numpy().transpose(0, 2, 3, 1)
  b = ids.shape[0]
  pos = np.cumsum(mask, 1) - 1
  text = mask & (ids != IMAGE_TOKEN)
  t = int(text.sum(1).max())
  out = dict(pixel_values=np.zeros((b, 1) + pixels.shape[1:], np.float32), image_valid=np.zeros((b, 1), bool),
             input_ids=np.zeros((b, t), np.int32), text_positions=np.zeros((b, t), np.int32),
             text_valid=np.zeros((b, t), bool), visual_positions=np.zeros((b, p), np.int32))
  image = 0
  for row in range(b):
    n = int(text[row].sum())
    out["input_ids"][row, :n], out["text_positions"][row, :n] = ids[row, text[row]], pos[row, text[row]]
    out["text_valid"][row, :n] = True
    visual = ids[row] == IMAGE_TOKEN
    if visual.any():
      out["visual_positions"][row], out["image_valid"][row] = pos[row, visual], True
      out["pixel_values"][row, 0], image = pixels[image], image + 1
  return out, text


def assert_equals_jax(family, **mode):
  """The torch model in `mode` and the JAX model loaded with it give the same text logits and the
  same cached greedy tokens; returns the torch logits."""
  name, _, path, inputs = family
  model = EEMLLMForConditionalGeneration.from_pretrained(path, attention="composite", **mode).eval()
  assert model.mode.to_hf() == {"attention": "composite", "composite_from_layer": 0, **mode}
  cfg, params = load_hf_llava(str(path), attention="composite", **mode)
  batch, text = jax_batch(inputs, cfg.tokens_per_image)
  with torch.no_grad():
    want = model(**inputs).logits.numpy()
    tokens = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)[:, inputs["input_ids"].shape[1]:]
  got = np.asarray(forward(cfg, params, batch))
  for row in range(want.shape[0]):
    n = int(text[row].sum())
    err = np.max(np.abs(got[row, :n] - want[row, text[row]])) / np.max(np.abs(want[row, text[row]]))
    assert err < 1e-4, f"{name} {mode} row {row}: max relative error {err:.2e}"
  jax_tokens = np.asarray(generate(params, cfg, batch, max_new_tokens=NEW_TOKENS).tokens)
  np.testing.assert_array_equal(tokens.numpy(), jax_tokens)
  return want


@pytest.mark.parametrize("visual_ffn", [True, False], ids=["EE-MLLM-F", "EE-MLLM"])
def test_composite_equals_jax_in_logits_and_cached_greedy_tokens(family, visual_ffn):
  assert_equals_jax(family, visual_ffn=visual_ffn)


@pytest.mark.slow
@pytest.mark.parametrize("visual_ffn", [True, False], ids=["EE-MLLM-F", "EE-MLLM"])
@pytest.mark.parametrize("n", [1, DEPTH - 1])
def test_layer_schedule_equals_jax_in_logits_and_cached_greedy_tokens(deep_family, n, visual_ffn):
  """Layers [0, n) self attention, [n, DEPTH) composite, in both frameworks. Guard: the same
  weights with every layer composite answer differently after the image."""
  scheduled = assert_equals_jax(deep_family, visual_ffn=visual_ffn, composite_from_layer=n)
  _, _, path, inputs = deep_family
  model = EEMLLMForConditionalGeneration.from_pretrained(path, attention="composite", visual_ffn=visual_ffn).eval()
  with torch.no_grad():
    unscheduled = model(**inputs).logits.numpy()
  assert np.max(np.abs(scheduled[0, -6:] - unscheduled[0, -6:])) > 1e-3


def test_schedule_over_every_layer_equals_stock_llava(deep_family):
  """composite_from_layer=depth runs the composite decoder with self attention in every layer: stock
  LLaVA's logits on every real token (visual ones too) and its greedy tokens."""
  _, hf, path, inputs = deep_family
  model = EEMLLMForConditionalGeneration.from_pretrained(path, attention="composite", composite_from_layer=DEPTH)
  valid = inputs["attention_mask"].bool()
  with torch.no_grad():
    got, want = model.eval()(**inputs).logits, hf(**inputs).logits
    torch.testing.assert_close(got[valid], want[valid], rtol=1e-5, atol=1e-5)
    generated = [m.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False) for m in (model, hf)]
  np.testing.assert_array_equal(*generated)
  # guard: the last two layers composite change the text logits (the last one alone would not: its
  # visual update is read by no one)
  with torch.no_grad():
    one_composite = model.set_mode(composite_from_layer=DEPTH - 2)(**inputs).logits
  assert torch.max(torch.abs(one_composite[0, -6:] - want[0, -6:])) > 1e-3


def test_self_mode_equals_stock_llava(family):
  _, hf, path, inputs = family
  ours = EEMLLMForConditionalGeneration.from_pretrained(path).eval()
  assert ours.mode.to_hf() == {"attention": "self", "visual_ffn": True, "composite_from_layer": 0}  # no ee_mllm key: stock
  with torch.no_grad():
    np.testing.assert_array_equal(ours(**inputs).logits.numpy(), hf(**inputs).logits.numpy())
    generated = [m.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False) for m in (ours, hf)]
    np.testing.assert_array_equal(*generated)
    # guard: the same weights in composite mode answer differently after the image
    composite = ours.set_mode(attention="composite")(**inputs).logits.numpy()
  assert np.max(np.abs(composite[0, -6:] - hf(**inputs).logits.detach().numpy()[0, -6:])) > 1e-3


def test_composite_runs_the_same_under_eager_and_sdpa_attention(family):
  """The text-query mask is built for the implementation: an additive float mask (eager), a boolean one (sdpa)."""
  _, _, path, inputs = family
  logits = {}
  for impl in ("eager", "sdpa"):
    model = EEMLLMForConditionalGeneration.from_pretrained(path, attention="composite", attn_implementation=impl)
    assert model.config.text_config._attn_implementation == impl
    with torch.no_grad():
      logits[impl] = model.eval()(**inputs).logits
  valid = inputs["attention_mask"].bool()
  torch.testing.assert_close(logits["eager"][valid], logits["sdpa"][valid], rtol=1e-5, atol=1e-5)


def _rows_seen(model, inputs, modules, **generate_kw):
  """{module name: [rows of its input per call]} over one forward (or generate) of `model`."""
  seen, hooks = {}, []
  for name, module in modules.items():
    hooks.append(module.register_forward_hook(
        lambda m, args, out, name=name: seen.setdefault(name, []).append(args[0].shape[:-1].numel())))
  try:
    with torch.no_grad():
      model.generate(**inputs, **generate_kw) if generate_kw else model(**inputs)
  finally:
    for h in hooks:
      h.remove()
  return seen


@pytest.mark.parametrize("visual_ffn", [True, False], ids=["EE-MLLM-F", "EE-MLLM"])
def test_composite_computes_no_visual_query_and_no_visual_ffn(family, visual_ffn, tmp_path):
  """Hooks on layer 0's projections count the rows they compute: q_proj (hence the score matrix)
  sees text rows only, k_proj/v_proj every row; the FFN sees visual rows only with visual_ffn.
  Guard: the same hooks see every row in stock LLaVA."""
  _, hf, path, _ = family
  model = EEMLLMForConditionalGeneration.from_pretrained(path, attention="composite", visual_ffn=visual_ffn).eval()
  inputs = processor_inputs(hf.config, tmp_path, PROMPTS[:2])  # every row holds an image
  b, length = inputs["input_ids"].shape
  n_text = length - tokens_per_image(hf.config)

  def layer0(m):
    layer = m.model.language_model.layers[0]
    return dict(q=layer.self_attn.q_proj, k=layer.self_attn.k_proj, v=layer.self_attn.v_proj, ffn=layer.mlp)

  seen = _rows_seen(model, inputs, layer0(model))
  assert seen["q"] == [b * n_text] and seen["k"] == seen["v"] == [b * length]
  assert seen["ffn"] == ([b * n_text, b * (length - n_text)] if visual_ffn else [b * n_text])
  stock = _rows_seen(hf, inputs, layer0(hf))
  assert stock["q"] == stock["ffn"] == [b * length]  # guard: the hooks do see visual rows when computed
  # generate(): the prefill writes all tokens to the cache; each decode step computes one query per row
  seen = _rows_seen(model, inputs, layer0(model), max_new_tokens=3, do_sample=False)
  assert seen["q"] == [b * n_text, b, b] and seen["k"] == [b * length, b, b]


@pytest.mark.parametrize("visual_ffn", [True, False], ids=["EE-MLLM-F", "EE-MLLM"])
def test_schedule_computes_visual_queries_before_layer_n_only(deep_family, visual_ffn, tmp_path):
  """Hooks on every layer's q_proj / mlp: layers [0, n) compute every row's query and FFN, layers
  [n, DEPTH) text queries only and visual FFN rows only with visual_ffn; k/v see every row
  everywhere. Decode steps compute one query per row in every layer."""
  _, hf, path, _ = deep_family
  n = 2
  model = EEMLLMForConditionalGeneration.from_pretrained(path, attention="composite", visual_ffn=visual_ffn,
                                                         composite_from_layer=n).eval()
  inputs = processor_inputs(hf.config, tmp_path, PROMPTS[:2])  # every row holds an image
  b, length = inputs["input_ids"].shape
  n_text = length - tokens_per_image(hf.config)
  layers = model.model.language_model.layers
  modules = {f"{kind}{i}": getattr(layer.self_attn, f"{kind}_proj") for i, layer in enumerate(layers)
             for kind in "qk"} | {f"ffn{i}": layer.mlp for i, layer in enumerate(layers)}
  seen = _rows_seen(model, inputs, modules)
  for i in range(DEPTH):
    both_streams = [b * n_text, b * (length - n_text)]  # the FFN runs on each stream apart
    assert seen[f"k{i}"] == [b * length]
    assert seen[f"q{i}"] == ([b * length] if i < n else [b * n_text]), i
    assert seen[f"ffn{i}"] == (both_streams if i < n or visual_ffn else [b * n_text]), i
  seen = _rows_seen(model, inputs, modules, max_new_tokens=3, do_sample=False)
  assert [seen[f"q{i}"] for i in range(DEPTH)] == [[b * length, b, b]] * n + [[b * n_text, b, b]] * (DEPTH - n)
  assert all(seen[f"k{i}"] == [b * length, b, b] for i in range(DEPTH))  # the cache holds every prompt token


def test_mode_is_read_from_config_and_saved(family, tmp_path):
  """A directory whose config.json records "ee_mllm" loads in that mode (no custom code); keyword
  arguments override it; save_pretrained writes the mode and the same tensors as stock LLaVA."""
  _, hf, path, _ = family
  model = EEMLLMForConditionalGeneration.from_pretrained(path, attention="composite", visual_ffn=False)
  model.save_pretrained(tmp_path)
  with open(tmp_path / "config.json") as f:
    saved = json.load(f)
  assert saved["ee_mllm"] == {"attention": "composite", "visual_ffn": False, "composite_from_layer": 0,
                              "trained": {"attention": "self", "visual_ffn": True, "composite_from_layer": 0}}
  assert saved["model_type"] == "ee_mllm"  # not a model stock LLaVA runs as it is
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top
  keys = lambda d: set(safe_open(str(d / "model.safetensors"), "pt").keys())
  assert keys(tmp_path) == keys(path)
  assert EEMLLMForConditionalGeneration.from_pretrained(tmp_path).mode.to_hf() == {
      "attention": "composite", "visual_ffn": False, "composite_from_layer": 0}
  assert EEMLLMForConditionalGeneration.from_pretrained(tmp_path, visual_ffn=True).mode.to_hf()["visual_ffn"]
  # stock transformers says the directory holds another model type (and, not knowing its key layout,
  # reports its weights as not loaded): never a silent LLaVA run of a composite model
  _stock_load_warns(tmp_path)
  with pytest.raises(ValueError, match="the PyTorch port runs self and composite attention, not cross"):
    EEMLLMForConditionalGeneration(hf.config, attention="cross")
  with pytest.raises(ValueError, match="visual_ffn=False does not apply to attention='self'"):
    EEMLLMForConditionalGeneration(hf.config, visual_ffn=False)
  # back to self on self-trained weights: a stock LLaVA directory again
  EEMLLMForConditionalGeneration.from_pretrained(tmp_path, attention="self").save_pretrained(tmp_path / "self")
  with open(tmp_path / "self" / "config.json") as f:
    assert json.load(f)["model_type"] == "llava"


def _stock_load_warns(path):
  """transformers' own LlavaForConditionalGeneration on `path`, asserting that transformers warns
  that the directory's model type is not LLaVA's."""
  from transformers.utils import logging as hf_logging  # pylint: disable=g-import-not-at-top
  records = []
  handler = type("H", (__import__("logging").Handler,), {"emit": lambda self, r: records.append(r.getMessage())})()
  logger = hf_logging.get_logger("transformers.configuration_utils")
  logger.addHandler(handler)
  try:
    model = transformers.LlavaForConditionalGeneration.from_pretrained(path)
  finally:
    logger.removeHandler(handler)
  assert any("model of type `ee_mllm` to instantiate a model of type `llava`" in r for r in records), records
  return model


def test_layer_schedule_is_read_from_config_and_saved(family, tmp_path):
  """composite_from_layer: absent (an older export) is 0; the JAX export's record loads as it is;
  save_pretrained writes it; a keyword overrides it; switching to self resets it; a bad value is
  refused by name."""
  from ee_mllm_jax.convert import hf_config  # pylint: disable=g-import-not-at-top
  _, hf, path, _ = family
  model = EEMLLMForConditionalGeneration.from_pretrained(path, attention="composite", visual_ffn=False)
  assert model.mode.to_hf()["composite_from_layer"] == 0  # the directory records no "ee_mllm"
  cfg, _ = load_hf_llava(str(path), attention="composite", visual_ffn=False, composite_from_layer=1)
  model.config.ee_mllm = hf_config.config_to_hf(cfg, image_token_index=IMAGE_TOKEN)["ee_mllm"]
  assert model.mode.to_hf() == {"attention": "composite", "visual_ffn": False, "composite_from_layer": 1}
  model.save_pretrained(tmp_path)
  with open(tmp_path / "config.json") as f:
    assert json.load(f)["ee_mllm"]["composite_from_layer"] == 1
  assert EEMLLMForConditionalGeneration.from_pretrained(tmp_path).mode.to_hf()["composite_from_layer"] == 1
  assert EEMLLMForConditionalGeneration.from_pretrained(tmp_path, composite_from_layer=2).mode.to_hf() == {
      "attention": "composite", "visual_ffn": False, "composite_from_layer": 2}
  assert model.set_mode(attention="self").mode.to_hf() == {"attention": "self", "visual_ffn": True, "composite_from_layer": 0}
  for bad in (3, -1, "1", True):
    with pytest.raises(ValueError, match=r"composite_from_layer must be an int in \[0, 2\]"):
      EEMLLMForConditionalGeneration(hf.config, attention="composite", composite_from_layer=bad)
  with pytest.raises(ValueError, match="composite_from_layer=1 does not apply to attention='self'"):
    EEMLLMForConditionalGeneration(hf.config, composite_from_layer=1)


def test_the_package_imports_torch_only_in_its_torch_subpackage():
  """`import ee_mllm_jax` (and convert, generate) in a fresh process loads neither torch nor transformers."""
  import os  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  code = ("import sys, ee_mllm_jax, ee_mllm_jax.convert, ee_mllm_jax.generate\n"
          "assert 'numpy' in sys.modules and not {'torch', 'transformers'} & set(sys.modules), sorted(sys.modules)\n")
  subprocess.run([sys.executable, "-c", code], check=True, timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"})
