"""FastV and VisionZip in the PyTorch port (`ee_mllm_jax.torch`) equal the JAX model's.

The tiny CLIP + LLaMA family of test_torch_composite.py, with a DEPTH-layer decoder, saved with
`save_pretrained`; inputs from LLaVA's processor and real PNGs (a left-padded batch: a system
prompt before the image, an image first, a row without an image). Each setting loads with the
keywords (`from_pretrained(DIR, fastv_layer=2, ...)`) and must give the JAX model's text logits
(1e-4 relative, the interop tolerance) and its cached greedy tokens; guards show that the setting
changes the logits by far more than that, so a port that skipped the pruning fails.
"""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from ee_mllm_jax.convert import hf_config, load_hf_llava  # noqa: E402
from ee_mllm_jax.generate import generate  # noqa: E402
from ee_mllm_jax.torch import EEMLLMForConditionalGeneration  # noqa: E402
from ee_mllm_jax.torch import reduction  # noqa: E402
from models import forward  # noqa: E402
from test_torch_composite import (DEPTH, FAMILIES, IMAGE_TOKEN, NEW_TOKENS, PROMPTS, _family, _rows_seen,  # noqa: E402
                                  jax_batch, processor_inputs, tiny_processor, tokens_per_image)

TOLERANCE = 1e-4
FASTV = dict(fastv_layer=2, fastv_ratio=0.5)
# (mode keywords) of each FastV setting: LLaVA, EE-MLLM-F, and a layer schedule that ranks in a
# self layer (0) and prunes its later self layer (1) and the composite layers (2, 3).
FASTV_SETTINGS = {"self": dict(attention="self", **FASTV), "ee-mllm-f": dict(attention="composite", **FASTV),
                  "schedule": dict(attention="composite", composite_from_layer=2, fastv_layer=1, fastv_ratio=0.5)}
VISIONZIP = dict(visionzip_dominant=5, visionzip_contextual=3)  # of the tower's 16 patches


@pytest.fixture(scope="module")
def family(tmp_path_factory):
  return _family(FAMILIES[0], tmp_path_factory, DEPTH)


def _load(path, **mode):
  return EEMLLMForConditionalGeneration.from_pretrained(path, **mode).eval()


def _logits(model, inputs):
  with torch.no_grad():
    return model(**inputs).logits.numpy()


def visionzip_inputs(config, inputs, per_image):
  """The same prompts with `per_image` image tokens per image (VisionZip's d + c, not the tower's
  P that the processor writes), left-padded, and the processor's pixels."""
  prompts = [p.replace("<image>", " ".join(["<image>"] * per_image)) for p in PROMPTS]
  tokens = tiny_processor(config).tokenizer(prompts, return_tensors="pt", padding=True)
  return dict(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"],
              pixel_values=inputs["pixel_values"])


def relative_error(got, want, text):
  """Max over rows of the relative error of text logits: got (B, T, vocab) in the JAX layout, want
  (B, Z, vocab) in the sequence layout, text (B, Z) the text tokens."""
  errors = []
  for row in range(want.shape[0]):
    w = want[row, text[row]]
    errors.append(np.max(np.abs(got[row, :int(text[row].sum())] - w)) / np.max(np.abs(w)))
  return max(errors)


def assert_equals_jax(path, inputs, **mode):
  """The torch model loaded with `mode` and the JAX model loaded with it give the same text logits
  and the same cached greedy tokens; -> the torch logits."""
  model = _load(path, **mode)
  assert model.mode.reduction_name() and model.mode_name.endswith(model.mode.reduction_name())
  cfg, params = load_hf_llava(str(path), **mode)
  batch, text = jax_batch(inputs, cfg.tokens_per_image)
  want = _logits(model, inputs)
  with torch.no_grad():
    tokens = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)[:, inputs["input_ids"].shape[1]:]
  err = relative_error(np.asarray(forward(cfg, params, batch)), want, text)
  assert err < TOLERANCE, f"{mode}: max relative error {err:.2e}"
  jax_tokens = generate(params, cfg, batch, max_new_tokens=NEW_TOKENS).tokens
  np.testing.assert_array_equal(tokens.numpy(), np.asarray(jax_tokens))
  return want


def assert_changes_logits(got, plain, text):
  """Guard: the reduction moves the text logits by far more than the tolerance (rows with an image)."""
  rows = [0, 1]
  err = max(np.max(np.abs(got[r, text[r]] - plain[r, text[r]])) / np.max(np.abs(plain[r, text[r]])) for r in rows)
  assert err > 10 * TOLERANCE, err


def _text(inputs):
  return (inputs["attention_mask"].bool() & (inputs["input_ids"] != IMAGE_TOKEN)).numpy()


@pytest.mark.parametrize("setting", list(FASTV_SETTINGS))
def test_fastv_equals_jax_in_logits_and_cached_greedy_tokens(family, setting):
  _, _, path, inputs = family
  mode = FASTV_SETTINGS[setting]
  got = assert_equals_jax(path, inputs, **mode)
  unpruned = _logits(_load(path, **{k: v for k, v in mode.items() if not k.startswith("fastv")}), inputs)
  assert_changes_logits(got, unpruned, _text(inputs))


@pytest.mark.parametrize("setting", ["self", "ee-mllm-f"])
def test_ratio_zero_equals_no_pruning(family, setting):
  """R = 0 keeps every visual token: the logits (every real token, image ones too) and greedy tokens
  of the model without FastV (self: stock LLaVA's own decoder)."""
  _, hf, path, inputs = family
  attention = FASTV_SETTINGS[setting]["attention"]
  plain = hf if setting == "self" else _load(path, attention=attention)
  model = _load(path, attention=attention, fastv_layer=2, fastv_ratio=0.0)
  valid = inputs["attention_mask"].bool()
  with torch.no_grad():
    torch.testing.assert_close(model(**inputs).logits[valid], plain(**inputs).logits[valid], rtol=1e-5, atol=1e-5)
    generated = [m.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False) for m in (model, plain)]
  np.testing.assert_array_equal(*generated)


@pytest.mark.parametrize("visionzip_family", [FAMILIES[0], pytest.param(FAMILIES[1], marks=pytest.mark.slow)])
def test_visionzip_equals_jax_in_logits_and_cached_greedy_tokens(visionzip_family, family, tmp_path_factory):
  """VisionZip on a CLIP tower (CLS attention) and, in the full suite, a SigLIP one (mean attention)."""
  _, hf, path, inputs = family if visionzip_family == FAMILIES[0] else _family(visionzip_family, tmp_path_factory, 2)
  per_image = VISIONZIP["visionzip_dominant"] + VISIONZIP["visionzip_contextual"]
  inputs = visionzip_inputs(hf.config, inputs, per_image)
  assert_equals_jax(path, inputs, attention="self", **VISIONZIP)
  # guard: the merged tokens are not the first d + c patch features (a port that skipped the
  # selection and merge but fed as many tokens would give these)
  with torch.no_grad():
    patches = _load(path).model.get_image_features(inputs["pixel_values"], return_dict=True).pooler_output
    zipped = torch.cat(_load(path, **VISIONZIP).model.get_image_features(inputs["pixel_values"]).pooler_output)
  first = torch.cat([p[:per_image] for p in patches])
  assert zipped.shape == first.shape and torch.max(torch.abs(zipped - first)) > 1e-2


def test_visionzip_with_fastv_in_composite_mode_equals_jax(family):
  _, hf, path, inputs = family
  inputs = visionzip_inputs(hf.config, inputs, 8)
  got = assert_equals_jax(path, inputs, attention="composite", **VISIONZIP, **FASTV)
  assert_changes_logits(got, _logits(_load(path, attention="composite", **VISIONZIP), inputs), _text(inputs))


@pytest.mark.parametrize("setting", list(FASTV_SETTINGS))
def test_layers_from_k_compute_the_kept_rows_only(family, setting, tmp_path):
  """Hooks on every layer's projections: layers >= K compute keys for V' + T rows (not Z) and
  queries for V' + T (self) or T (composite) rows; the FFN runs on V' visual rows. Decode steps
  compute one row per layer."""
  _, hf, path, _ = family
  mode = FASTV_SETTINGS[setting]
  model = _load(path, **mode)
  inputs = processor_inputs(hf.config, tmp_path, PROMPTS[:2])  # every row holds an image
  b, length = inputs["input_ids"].shape
  v = tokens_per_image(hf.config)
  kept, n_text, k = model.mode.fastv_kept(v), length - v, mode["fastv_layer"]
  layers = model.model.language_model.layers
  modules = {f"{kind}{i}": getattr(layer.self_attn, f"{kind}_proj") for i, layer in enumerate(layers)
             for kind in "qk"} | {f"ffn{i}": layer.mlp for i, layer in enumerate(layers)}
  seen = _rows_seen(model, inputs, modules)
  self_layers = DEPTH if mode["attention"] == "self" else mode.get("composite_from_layer", 0)
  for i in range(DEPTH):
    visual = v if i < k else kept
    assert seen[f"k{i}"] == [b * (length if i < k else kept + n_text)], i
    assert seen[f"q{i}"] == [b * (visual + n_text if i < self_layers else n_text)], i
    assert seen[f"ffn{i}"] == [b * n_text, b * visual], i  # every setting here runs the visual FFN
  seen = _rows_seen(model, inputs, modules, max_new_tokens=3, do_sample=False)
  assert all(seen[f"q{i}"][1:] == [b, b] for i in range(DEPTH))


def test_decode_steps_mask_the_dropped_slots(family):
  """The prefill's cache keeps every slot; layers >= K hold zeros at the dropped visual slots, which
  the cache marks, and a decode step masks them there: without the mark it reads other logits."""
  _, _, path, inputs = family
  model = _load(path, attention="composite", **FASTV)
  with torch.no_grad():
    out = model(**inputs, use_cache=True)
    cache = out.cache if hasattr(out, "cache") else out.past_key_values
    layer, kept = getattr(cache, reduction.CACHE_ATTR)
    is_visual = inputs["input_ids"] == IMAGE_TOKEN
    n_visual = is_visual.sum(1)
    assert layer == 2 and torch.equal((is_visual & kept).sum(1), torch.minimum(n_visual, torch.tensor(8)))
    assert torch.equal(kept | is_visual, torch.ones_like(kept))  # every text slot is kept
    for i in range(DEPTH):
      keys = cache.layers[i].keys  # (B, K, S, H)
      dropped = (is_visual & ~kept)[:, None, :, None].expand(keys.shape)
      assert bool((keys[dropped] == 0).all()) == (i >= layer) and keys.shape[2] == is_visual.shape[1]
    mask = inputs["attention_mask"]
    step = dict(input_ids=out.logits[:, -1].argmax(-1, keepdim=True),
                attention_mask=torch.cat([mask, torch.ones_like(mask[:, :1])], 1))
    masked = model(**step, cache=cache).logits
    for layer_cache in cache.layers:  # back to the prompt, without the mark
      layer_cache.keys, layer_cache.values = layer_cache.keys[:, :, :-1], layer_cache.values[:, :, :-1]
    delattr(cache, reduction.CACHE_ATTR)
    unmasked = model(**step, cache=cache).logits
  assert torch.max(torch.abs(masked[:2] - unmasked[:2])) > 1e-3


def test_setting_is_read_from_an_export_and_saved(family, tmp_path):
  """The JAX export's record of a reduction loads as it is; save_pretrained writes it (model_type
  "ee_mllm": stock LLaVA would run another model); keywords override it; bad values and a
  VisionZip prompt with the tower's token count are refused by name."""
  _, hf, path, inputs = family
  cfg, _ = load_hf_llava(str(path), attention="composite", **FASTV, **VISIONZIP)
  model = _load(path)
  model.config.ee_mllm = hf_config.config_to_hf(cfg, image_token_index=IMAGE_TOKEN)["ee_mllm"]
  assert model.mode == cfg.mode
  model.save_pretrained(tmp_path)
  with open(tmp_path / "config.json") as f:
    saved = json.load(f)
  assert saved["model_type"] == "ee_mllm" and saved["ee_mllm"]["fastv_layer"] == 2
  loaded = _load(tmp_path)
  assert loaded.mode == cfg.mode and loaded.mode_name.endswith("+ VisionZip 5+3 + FastV K=2 R=50%")
  assert _load(tmp_path, fastv_layer=0).mode.fastv_layer == 0 and _load(tmp_path, attention="self").mode.fastv
  for bad, match in ((dict(fastv_layer=DEPTH), "fastv_layer"), (dict(fastv_ratio=1.0), "fastv_ratio"),
                     (dict(visionzip_dominant=17), "visionzip_dominant")):
    with pytest.raises(ValueError, match=match):
      EEMLLMForConditionalGeneration(hf.config, **bad)
  with pytest.raises(ValueError, match="VisionZip feeds 8 tokens per image: the prompt must hold 8 image tokens"):
    _logits(loaded, inputs)  # the processor's 16 per image


def test_fastv_runs_the_same_under_eager_and_sdpa_attention(family):
  """The pruned layers' masks are built for the implementation too (self and composite layers)."""
  _, _, path, inputs = family
  logits = [_logits(_load(path, attn_implementation=impl, **FASTV_SETTINGS["schedule"]), inputs)
            for impl in ("eager", "sdpa")]
  valid = inputs["attention_mask"].bool().numpy() & (inputs["input_ids"] != IMAGE_TOKEN).numpy()
  np.testing.assert_allclose(logits[0][valid], logits[1][valid], rtol=1e-5, atol=1e-5)
