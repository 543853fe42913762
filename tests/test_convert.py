"""Checkpoints in and out: HF LLMs and towers import to transformers' own outputs, a pair
assembles, trains and exports to a directory transformers loads and answers the same with.

Two families, each a random tiny model built with transformers and `save_pretrained`:
CLIP (the two-tower CLIPModel, feature layer -2) + LLaMA, and SigLIP + Qwen2 (GQA, qkv bias).
"""

import functools
import json
import os
import re

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_dtypes  # noqa: E402

import ee_mllm_jax as eem  # noqa: E402
from conftest import TINY_DATA, tiny_config  # noqa: E402
from ee_mllm_jax import batch as batch_lib  # noqa: E402
from ee_mllm_jax import convert  # noqa: E402
from ee_mllm_jax import params as params_lib  # noqa: E402
from ee_mllm_jax.config import LLMConfig, ModelConfig  # noqa: E402
from ee_mllm_jax.convert import export as export_lib  # noqa: E402
from ee_mllm_jax.convert import hf_config  # noqa: E402
from ee_mllm_jax.mode import Self  # noqa: E402
from ee_mllm_jax.models.llm import LLM  # noqa: E402
from ee_mllm_jax.models.vision import VisionTower  # noqa: E402
from models import forward  # noqa: E402

VOCAB = TINY_DATA["vocab_size"]  # the synthetic tokenizer's, so the pair trains on it


def _perturbed(model):
  """LayerNorm/RMSNorm init to 1/0 and biases to 0: perturb so that a misplaced one shows."""
  torch.manual_seed(1)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name or "embedding" in name or name.endswith("bias"):
        p.add_(0.1 * torch.randn_like(p))
  return model.eval()


def hf_llm(family, **rope):
  """LLaMA at the synthetic set's vocabulary (it is trained below); Qwen2 as test_vs_hf's LLaVA
  has it, so that the two share compiled forwards."""
  torch.manual_seed(0)
  if family == "llama":
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5,
                                   **rope)
    return _perturbed(transformers.LlamaForCausalLM(cfg))
  cfg = transformers.Qwen2Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=1, rope_theta=1e6, rms_norm_eps=1e-6)
  return _perturbed(transformers.Qwen2ForCausalLM(cfg))


def hf_tower(family):
  torch.manual_seed(0)
  if family == "clip":  # the two-tower model, as openai/clip-vit-large-patch14-336 ships
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2, image_size=32,
                  patch_size=8)
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=100,
                bos_token_id=0, eos_token_id=1)
    return _perturbed(transformers.CLIPModel(transformers.CLIPConfig(vision_config=vision, text_config=text)))
  cfg = transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, image_size=30, patch_size=7)
  return _perturbed(transformers.SiglipVisionModel(cfg))


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
  """{name: (torch model, saved directory)} for both towers and both LLMs."""
  root = tmp_path_factory.mktemp("hf")
  out = {}
  for name, build in (("clip", hf_tower), ("siglip", hf_tower), ("llama", hf_llm), ("qwen2", hf_llm)):
    model = build(name)
    model.save_pretrained(root / name)
    out[name] = (model, str(root / name))
  return out


def rel_err(got, want):
  return float(np.max(np.abs(np.asarray(got, np.float64) - want)) / np.max(np.abs(want)))



@functools.cache
def _llm_logits(cfg: LLMConfig):
  """Text-only logits of the JAX LLM (no visual stream)."""
  def run(params, ids):
    b, t = ids.shape
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    x_v, pos_v, valid_v = jnp.zeros((b, 0, cfg.width)), jnp.zeros((b, 0), jnp.int32), jnp.zeros((b, 0), bool)
    return LLM(cfg, Self()).apply({"params": params}, x_v, ids, pos_v, pos, valid_v, jnp.ones((b, t), bool))[0]
  return jax.jit(run)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_llm_logits_equal_transformers(hf_dirs, family):
  model, path = hf_dirs[family]
  cfg, params = convert.load_hf_llm(path)
  assert cfg.qkv_bias == (family == "qwen2") and cfg.num_kv_heads == (1 if family == "qwen2" else 2)
  ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 12))
  with torch.no_grad():
    want = model(input_ids=torch.tensor(ids)).logits.numpy()
  assert rel_err(_llm_logits(cfg)(params, jnp.asarray(ids, jnp.int32)), want) < 1e-4


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_tower_features_equal_transformers(hf_dirs, family, caplog):
  model, path = hf_dirs[family]
  layer = -2 if family == "clip" else -1
  with caplog.at_level("WARNING"):
    cfg, params = convert.load_hf_vision(path, feature_layer=layer)
  if family == "clip":  # the text half of the two-tower CLIPModel is reported, not silently dropped
    assert "left out" in caplog.text and "text_model" in caplog.text and "logit_scale" in caplog.text
  pixels = np.random.default_rng(0).standard_normal((2, 3, cfg.image_size, cfg.image_size)).astype(np.float32)
  with torch.no_grad():
    tower = model.vision_model if family == "clip" else model
    hidden = tower(pixel_values=torch.tensor(pixels), output_hidden_states=True).hidden_states[layer].numpy()
  want = hidden[:, 1:] if family == "clip" else hidden  # LLaVA's "default" selection drops CLS
  got = jax.jit(VisionTower(cfg).apply)({"params": params}, pixels.transpose(0, 2, 3, 1))
  assert got.shape == want.shape and rel_err(got, want) < 1e-4


@pytest.mark.parametrize("kind", ["linear", "llama3"])
def test_rope_scaling_equals_transformers_past_the_original_context(tmp_path, kind):
  scaling = dict(rope_type=kind, rope_theta=10000.0, factor=4.0)
  if kind == "llama3":
    scaling.update(low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=16)
  model = hf_llm("llama", rope_parameters=scaling, max_position_embeddings=64)
  model.save_pretrained(tmp_path)
  cfg, params = convert.load_hf_llm(str(tmp_path))
  assert cfg.rope_scaling is not None and cfg.rope_scaling.kind == kind
  ids = np.random.default_rng(0).integers(0, VOCAB, (1, 48))  # positions well past 16
  with torch.no_grad():
    want = model(input_ids=torch.tensor(ids)).logits.numpy()
  assert rel_err(_llm_logits(cfg)(params, jnp.asarray(ids, jnp.int32)), want) < 1e-4
  unscaled = _llm_logits(cfg.replace(rope_scaling=None))(params, jnp.asarray(ids, jnp.int32))
  assert rel_err(unscaled, want) > 1e-3  # guard: ignoring the scaling is caught


@pytest.mark.parametrize("kind", ["dynamic", "yarn", "longrope", "something_new"])
def test_other_rope_scalings_are_refused_by_name(kind):
  with pytest.raises(ValueError, match=f"RoPE scaling type '{kind}' is not supported"):
    hf_config.llm_config_from_hf({"model_type": "llama", "rope_scaling": {"type": kind, "factor": 2.0}})


LLAVA_7B = {  # the public llava-1.5-7b-hf config.json, as published (transformers 4.36)
    "architectures": ["LlavaForConditionalGeneration"], "ignore_index": -100, "image_token_index": 32000,
    "model_type": "llava", "pad_token_id": 32001, "projector_hidden_act": "gelu",
    "text_config": {"_name_or_path": "lmsys/vicuna-7b-v1.5", "architectures": ["LlamaForCausalLM"],
                    "max_position_embeddings": 4096, "model_type": "llama", "rms_norm_eps": 1e-05,
                    "torch_dtype": "float16", "vocab_size": 32064},
    "tie_word_embeddings": False, "torch_dtype": "float16", "transformers_version": "4.36.0.dev0",
    "vision_config": {"hidden_size": 1024, "image_size": 336, "intermediate_size": 4096,
                      "model_type": "clip_vision_model", "num_attention_heads": 16, "num_hidden_layers": 24,
                      "patch_size": 14, "projection_dim": 768, "vocab_size": 32000},
    "vision_feature_layer": -2, "vision_feature_select_strategy": "default", "vocab_size": 32064}


def test_published_partial_llava_configs_import_to_the_full_models():
  base = ModelConfig.preset("llava-1.5-7b")
  assert convert.config_from_hf(LLAVA_7B) == base.replace(llm=base.llm.replace(vocab_size=32064))
  big = json.loads(json.dumps(LLAVA_7B))
  big["text_config"].update(hidden_size=5120, intermediate_size=13824, num_attention_heads=40, num_hidden_layers=40)
  want = base.llm.replace(vocab_size=32064, width=5120, mlp_dim=13824, num_heads=40, num_kv_heads=40, depth=40)
  assert convert.config_from_hf(big) == base.replace(llm=want)


@pytest.fixture(scope="module")
def tiny_llava_dir(tmp_path_factory):
  """A random tiny SigLIP + Qwen2 LLaVA saved by transformers (complete config.json)."""
  from test_vs_hf import tiny_hf_llava  # pylint: disable=g-import-not-at-top
  model = tiny_hf_llava("siglip-qwen2")
  path = tmp_path_factory.mktemp("llava")
  model.save_pretrained(path)
  return model, str(path)


def test_a_partial_config_imports_the_same_model_as_the_complete_one(tiny_llava_dir, tmp_path):
  model, path = tiny_llava_dir
  def diff(config):  # only what differs from transformers' class defaults, as 4.3x wrote config.json
    default = type(config)().to_dict()
    return {k: v for k, v in config.to_dict().items() if k == "model_type" or default.get(k) != v}
  partial = {**diff(model.config), "text_config": diff(model.config.text_config),
             "vision_config": diff(model.config.vision_config)}
  assert "num_key_value_heads" in partial["text_config"] and "rms_norm_eps" not in partial["text_config"]
  for name in os.listdir(path):
    if name.endswith(".safetensors"):
      os.symlink(os.path.join(path, name), tmp_path / name)
  with open(tmp_path / "config.json", "w") as f:
    json.dump(partial, f)
  full_cfg, params = convert.load_hf_llava(path)
  cfg, same = convert.load_hf_llava(str(tmp_path))
  assert cfg == full_cfg
  batch = batch_lib.from_plans(cfg, [[3, "img", 5]])
  np.testing.assert_array_equal(forward(cfg, same, batch), forward(full_cfg, params, batch))


def test_pickle_only_directory_is_refused_without_unpickling(tmp_path):
  with open(tmp_path / "config.json", "w") as f:
    json.dump(LLAVA_7B, f)
  (tmp_path / "pytorch_model.bin").write_bytes(b"not even a pickle: it must never be opened")
  with pytest.raises(convert.PickleCheckpointError, match=r"unpickling executes arbitrary code.*"
                     r"safe_serialization=True"):
    convert.load_hf_llava(str(tmp_path))


def test_shard_names_in_the_index_stay_inside_the_checkpoint_directory(tmp_path):
  from ee_mllm_jax.convert import safetensors_io  # pylint: disable=g-import-not-at-top
  hf = tmp_path / "hf"
  hf.mkdir()
  (tmp_path / "elsewhere.safetensors").write_bytes(b"")  # exists, outside the directory
  (hf / "inside.safetensors").write_bytes(b"")
  for name in ("../elsewhere.safetensors", str(tmp_path / "elsewhere.safetensors")):
    with open(hf / safetensors_io.INDEX_FILE, "w") as f:
      json.dump({"weight_map": {"a": "inside.safetensors", "b": name}}, f)
    with pytest.raises(ValueError, match=r"names shards outside .*" + re.escape(repr(name))):
      safetensors_io.checkpoint_files(str(hf))
  (hf / "link.safetensors").symlink_to(tmp_path / "elsewhere.safetensors")
  with open(hf / safetensors_io.INDEX_FILE, "w") as f:
    json.dump({"weight_map": {"a": "inside.safetensors", "b": "link.safetensors"}}, f)
  with pytest.raises(ValueError, match="names shards outside"):
    safetensors_io.checkpoint_files(str(hf))
  with open(hf / safetensors_io.INDEX_FILE, "w") as f:
    json.dump({"weight_map": {"a": "inside.safetensors"}}, f)
  assert safetensors_io.checkpoint_files(str(hf)) == [str(hf / "inside.safetensors")]


def test_export_reads_the_name_map_backwards_sharded_and_in_bf16(tiny_llava_dir, tmp_path):
  """Export -> re-import is the identity, through a sharded index, in float32 and bfloat16;
  the mode an export records comes back (overrides win)."""
  _, path = tiny_llava_dir
  cfg, params = convert.load_hf_llava(path)
  tok = _tokenizer()
  for dtype in (np.float32, ml_dtypes.bfloat16):
    out = str(tmp_path / np.dtype(dtype).name)
    composite = cfg.replace(attention="composite", visual_ffn=False)
    export_lib.export_hf(composite, params, out, tokenizer_json=tok, template="chatml", dtype=dtype,
                         max_shard_bytes=40_000)
    index = json.load(open(os.path.join(out, "model.safetensors.index.json")))
    assert len(set(index["weight_map"].values())) > 2
    record = json.load(open(os.path.join(out, "config.json")))["ee_mllm"]
    assert {k: record[k] for k in ("attention", "visual_ffn", "composite_from_layer")} == {
        "attention": "composite", "visual_ffn": False, "composite_from_layer": 0}
    back_cfg, back = convert.load_hf_llava(out, dtype=dtype)
    assert back_cfg == composite
    for k, v in params_lib.flatten(params).items():
      got = params_lib.flatten(back)[k]
      assert got.dtype == np.dtype(dtype), k
      np.testing.assert_array_equal(got, np.asarray(v).astype(dtype), err_msg=k)
  assert convert.load_hf_llava(out, attention="self", visual_ffn=True)[0].attention == "self"


def test_a_layer_schedule_exports_and_comes_back_and_older_exports_load_unscheduled(tiny_llava_dir, tmp_path):
  """composite_from_layer travels in config.json's "ee_mllm" (overrides win); an export written
  before the key existed loads as every layer composite; a bad value is refused by name."""
  _, path = tiny_llava_dir
  cfg, params = convert.load_hf_llava(path)
  assert cfg.llm.depth == 2 and cfg.self_layers == 2  # stock LLaVA: self attention throughout
  scheduled = cfg.replace(attention="composite", visual_ffn=False, composite_from_layer=1)
  out = str(tmp_path / "scheduled")
  export_lib.export_hf(scheduled, params, out, tokenizer_json=_tokenizer(), template="chatml")
  with open(os.path.join(out, "config.json")) as f:
    hf = json.load(f)
  assert {k: hf["ee_mllm"][k] for k in ("attention", "visual_ffn", "composite_from_layer")} == {
      "attention": "composite", "visual_ffn": False, "composite_from_layer": 1}
  back_cfg, back = convert.load_hf_llava(out)
  assert back_cfg == scheduled and back_cfg.layer_schedule == (("self", 1), ("composite", 1))
  batch = batch_lib.from_plans(cfg, [[3, "img", 5]])
  logits = np.asarray(forward(back_cfg, back, batch))
  np.testing.assert_array_equal(logits, np.asarray(forward(scheduled, params, batch)))
  assert convert.load_hf_llava(out, composite_from_layer=2)[0].layer_schedule == (("self", 2),)
  assert convert.load_hf_llava(out, composite_from_layer=0)[0].layer_schedule == (("composite", 2),)
  # a self model records the flags its mode implies; a schedule on it is refused, not ignored
  assert hf_config.config_to_hf(cfg, image_token_index=1)["ee_mllm"] == {
      "attention": "self", "visual_ffn": True, "composite_from_layer": 0,
      "trained": {"attention": "self", "visual_ffn": True, "composite_from_layer": 0}}
  with pytest.raises(ValueError, match="composite_from_layer=2 does not apply to attention='self'"):
    cfg.replace(composite_from_layer=2)

  def with_mode(mode):
    with open(os.path.join(out, "config.json"), "w") as f:
      json.dump({**hf, "ee_mllm": mode}, f)
    return convert.load_hf_llava(out)[0]
  older = with_mode({"attention": "composite", "visual_ffn": False})  # as exports wrote it before the schedule
  assert older == scheduled.replace(composite_from_layer=0) and older.layer_schedule == (("composite", 2),)
  for bad in (3, -1, "1", True, 1.0):
    with pytest.raises(ValueError, match=r'composite_from_layer must be an int in \[0, 2\]'):
      with_mode({"attention": "composite", "visual_ffn": False, "composite_from_layer": bad})


def _tokenizer() -> str:
  """A small byte-level BPE with the synthetic set's special tokens (incl. <image>)."""
  import tokenizers  # pylint: disable=g-import-not-at-top

  from ee_mllm_jax.data import synthetic  # pylint: disable=g-import-not-at-top
  tok = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  trainer = tokenizers.trainers.BpeTrainer(vocab_size=240, special_tokens=synthetic.SPECIAL_TOKENS,
                                           show_progress=False,
                                           initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(["what colour is the square? user assistant system"] * 4, trainer=trainer)
  return tok.to_str()


@pytest.fixture(scope="module")
def trained_export(hf_dirs, tiny_dataset, tmp_path_factory):
  """CLIP + LLaMA assembled by `init_from.kind="hf_parts"`, trained 2 steps in self mode on
  the synthetic set, exported with `python -m ee_mllm_jax.convert.export`."""
  from ee_mllm_jax.train import loop  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path_factory.mktemp("run"))
  config = tiny_config(tiny_dataset, workdir, 2, **{
      "model.attention": "self", "model.vision.depth": 3, "model.vision.feature_layer": -2,  # as the README's LLaVA
      "init_from.kind": "hf_parts", "init_from.vision_path": hf_dirs["clip"][1],
      "init_from.llm_path": hf_dirs["llama"][1]})
  loop.train(config)
  out = str(tmp_path_factory.mktemp("export"))
  export_lib.main(["--checkpoint", workdir, "--out", out])
  return workdir, out


@pytest.mark.slow
def test_assembled_trained_export_answers_the_same_in_transformers(trained_export, hf_dirs, tmp_path):
  from PIL import Image  # pylint: disable=g-import-not-at-top

  from ee_mllm_jax.data import images as images_lib  # pylint: disable=g-import-not-at-top
  from ee_mllm_jax.data import text as text_lib  # pylint: disable=g-import-not-at-top
  from ee_mllm_jax import loading  # pylint: disable=g-import-not-at-top

  workdir, out = trained_export
  cfg, params = loading.load_model(workdir)
  run = loading.read_run_config(workdir)
  hf = transformers.LlavaForConditionalGeneration.from_pretrained(out).eval()
  processor = transformers.AutoProcessor.from_pretrained(out)
  # started from the HF weights (close to them after 2 steps), and the trained ones were exported
  start = hf_dirs["llama"][0].model.embed_tokens.weight.detach().numpy()
  now = hf.model.language_model.embed_tokens.weight.detach().numpy()
  assert 0 < np.max(np.abs(now - start)) < 0.1 * np.max(np.abs(start))

  png = str(tmp_path / "image.png")
  Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(png)
  question = "What colour is the circle?"
  prompt = processor.apply_chat_template(
      [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}],
      add_generation_prompt=True)
  inputs = processor(images=Image.open(png), text=prompt, return_tensors="pt")

  # the processor's prompt is the one our pipeline trains on
  tokenizer = loading.load_tokenizer(workdir)
  template = text_lib.ChatTemplate(run["data"]["template"], system=run["data"]["system_prompt"])
  turns = text_lib.parse_conversation([{"from": "human", "value": f"<image>\n{question}"}], prompt_turn=-1)
  layout = text_lib.encode(tokenizer, template, turns, tokens_per_image=cfg.tokens_per_image, prompt=True)
  ids = inputs["input_ids"][0].numpy()
  is_image = ids == hf.config.image_token_index
  np.testing.assert_array_equal(ids[~is_image], layout.input_ids)
  assert is_image.sum() == cfg.tokens_per_image and np.argmax(is_image) == layout.image_starts[0]
  pixels = images_lib.load_pixels(png, size=cfg.vision.image_size, mean=cfg.vision.image_mean,
                                  std=cfg.vision.image_std, mode=run["data"]["image_preprocess"])
  np.testing.assert_allclose(inputs["pixel_values"][0].numpy().transpose(1, 2, 0), pixels, atol=1e-5)

  p, start = cfg.tokens_per_image, layout.image_starts[0]
  batch = dict(pixel_values=pixels[None, None], image_valid=np.ones((1, 1), bool), input_ids=layout.input_ids[None],
               text_positions=layout.positions[None], text_valid=np.ones((1, len(layout.input_ids)), bool),
               visual_positions=np.arange(start, start + p, dtype=np.int32)[None])
  with torch.no_grad():
    want = hf(**inputs).logits.numpy()[0][~is_image]
  assert rel_err(forward(cfg, params, batch)[0], want) < 1e-4

  n = 8
  with torch.no_grad():
    hf_tokens = hf.generate(**inputs, max_new_tokens=n, do_sample=False)[0, len(ids):].numpy()
  eos, pad = hf.generation_config.eos_token_id, hf.generation_config.pad_token_id
  got = eem.generate(params, cfg, batch, max_new_tokens=n, stop_ids=(eos,), pad_id=pad)
  length = int(got.lengths[0])
  np.testing.assert_array_equal(np.asarray(got.tokens[0, :length]), hf_tokens[:length])
  assert len(hf_tokens) == length  # transformers stops at the same end-of-turn token

  # EE-MLLM-F: the same weights run as composite are one model through eval.py's --checkpoint and
  # --hf roads and the PyTorch class (the visual FFN kept: the weights were trained with it), and
  # --hf prompts with the template and system prompt the run trained with, as --checkpoint does.
  from ee_mllm_jax.evaluation import model as model_lib  # pylint: disable=g-import-not-at-top
  from ee_mllm_jax.mode import Composite, Self  # pylint: disable=g-import-not-at-top
  from ee_mllm_jax.torch import EEMLLMForConditionalGeneration  # pylint: disable=g-import-not-at-top
  by_checkpoint = model_lib.from_checkpoint(workdir, attention="composite")
  by_hf = model_lib.from_hf(out, attention="composite")
  torch_f = EEMLLMForConditionalGeneration.from_pretrained(out, attention="composite").eval()
  assert by_checkpoint.cfg.mode == by_hf.cfg.mode == torch_f.mode == Composite(visual_ffn=True)
  assert torch_f.config.ee_mllm["template"] == "chatml"  # switching the mode keeps the export's prompt record
  assert by_checkpoint.cfg.trained_mode == by_hf.cfg.trained_mode == Self()
  assert by_checkpoint.mode == by_hf.mode == torch_f.mode_name == (
      "EE-MLLM-F: composite, visual FFN, on self-trained weights")
  assert (by_hf.template.name, by_hf.template.system) == (by_checkpoint.template.name, by_checkpoint.template.system)
  assert by_hf.template.name == run["data"]["template"] == "chatml"
  f_logits = np.asarray(forward(by_checkpoint.cfg, by_checkpoint.params, batch)[0])
  np.testing.assert_array_equal(f_logits, np.asarray(forward(by_hf.cfg, by_hf.params, batch)[0]))
  with torch.no_grad():
    assert rel_err(f_logits, torch_f(**inputs).logits.numpy()[0][~is_image]) < 1e-4
  assert rel_err(f_logits, want) > 1e-3  # guard: EE-MLLM-F is another function than the self model


def test_reexport_refuses_a_non_empty_directory_and_overwrite_leaves_no_stale_weights(tiny_llava_dir, tmp_path):
  """Export single-file then sharded into one directory: refused without --overwrite; with it, the
  weight files the new export does not write are gone, so transformers and we read the same
  tensors. A directory mixed by hand (both layouts) is refused by our loader."""
  _, path = tiny_llava_dir
  cfg, params = convert.load_hf_llava(path)
  out = str(tmp_path / "out")
  export_lib.export_hf(cfg, params, out, tokenizer_json=_tokenizer())
  single = open(os.path.join(out, "model.safetensors"), "rb").read()
  with pytest.raises(export_lib.ExportError, match="is not empty; pass --overwrite"):
    export_lib.export_hf(cfg, params, out, tokenizer_json=_tokenizer(), max_shard_bytes=40_000)
  changed = {**params, "projector": jax.tree.map(lambda a: a + 1, params["projector"])}
  export_lib.export_hf(cfg, changed, out, tokenizer_json=_tokenizer(), max_shard_bytes=40_000, overwrite=True)
  files = sorted(os.listdir(out))
  assert "model.safetensors" not in files and "model.safetensors.index.json" in files
  back = convert.load_hf_llava(out)[1]
  np.testing.assert_array_equal(back["projector"]["linear_1"]["bias"], changed["projector"]["linear_1"]["bias"])
  hf = transformers.LlavaForConditionalGeneration.from_pretrained(out)
  np.testing.assert_array_equal(hf.model.multi_modal_projector.linear_1.bias.detach().numpy(),
                                np.asarray(changed["projector"]["linear_1"]["bias"]))
  with open(os.path.join(out, "model.safetensors"), "wb") as f:  # an older single-file export left beside
    f.write(single)
  with pytest.raises(ValueError, match="holds both model.safetensors and model.safetensors.index.json"):
    convert.load_hf_llava(out)
  export_lib.export_hf(cfg, params, out, tokenizer_json=_tokenizer(), overwrite=True)  # back to one file
  assert not [f for f in os.listdir(out) if f.startswith("model-") or f.endswith(".index.json")]


def test_a_composite_export_is_no_silent_llava_for_stock_transformers(tiny_llava_dir, tmp_path):
  """A composite export is `model_type` "ee_mllm": transformers' stock LLaVA class warns that it is
  another model type, its Auto classes refuse it unless ee_mllm_jax.torch registered it, and our
  class loads it as it was exported. A self export stays a plain "llava" directory."""
  from transformers.utils import logging as hf_logging  # pylint: disable=g-import-not-at-top
  _, path = tiny_llava_dir
  cfg, params = convert.load_hf_llava(path)
  out = str(tmp_path / "composite")
  export_lib.export_hf(cfg.replace(attention="composite", visual_ffn=False), params, out, tokenizer_json=_tokenizer())
  assert json.load(open(os.path.join(out, "config.json")))["model_type"] == "ee_mllm"
  records = []
  handler = type("H", (__import__("logging").Handler,), {"emit": lambda self, r: records.append(r.getMessage())})()
  logger = hf_logging.get_logger("transformers.configuration_utils")
  logger.addHandler(handler)
  try:
    transformers.LlavaForConditionalGeneration.from_pretrained(out)
  finally:
    logger.removeHandler(handler)
  assert any("model of type `ee_mllm` to instantiate a model of type `llava`" in r for r in records), records
  from ee_mllm_jax.torch import EEMLLMForConditionalGeneration  # pylint: disable=g-import-not-at-top
  ours = EEMLLMForConditionalGeneration.from_pretrained(out)
  assert ours.mode.to_hf() == {"attention": "composite", "visual_ffn": False, "composite_from_layer": 0}
  np.testing.assert_array_equal(ours.lm_head.weight.detach().numpy().T, np.asarray(params["llm"]["lm_head"]["kernel"]))
  assert isinstance(transformers.AutoModelForImageTextToText.from_pretrained(out), EEMLLMForConditionalGeneration)
  export_lib.export_hf(cfg, params, str(tmp_path / "self"), tokenizer_json=_tokenizer())
  assert json.load(open(tmp_path / "self" / "config.json"))["model_type"] == "llava"


def test_the_export_command_line_says_what_is_wrong_in_one_line(tmp_path, monkeypatch):
  from ee_mllm_jax import loading  # pylint: disable=g-import-not-at-top
  for argv, message in (([str(tmp_path / "nowhere")], "error: checkpoint {} does not exist"),
                        ([str(tmp_path)], "error: {}: {} is neither a checkpoint nor a directory of checkpoints")):
    with pytest.raises(SystemExit) as e:
      export_lib.main(["--checkpoint", *argv, "--out", str(tmp_path / "out")])
    assert e.value.code == message.format(argv[0], argv[0])
  monkeypatch.setattr(loading, "read_run_config", lambda _: {"model": {"attention": "cross", "cross_every": 1},
                                                             "tokenizer": "{}"})
  with pytest.raises(SystemExit) as e:
    export_lib.main(["--checkpoint", str(tmp_path), "--out", str(tmp_path / "out")])
  assert e.value.code.startswith("error: ") and "has no HF LLaVA equivalent" in e.value.code
  assert export_lib._dtype("bf16") == export_lib._dtype("bfloat16") and export_lib._dtype("fp32") == np.float32
  with pytest.raises(export_lib.ExportError, match="unknown dtype 'bf17'"):
    export_lib._dtype("bf17")


def test_older_rope_scaling_forms_parse():
  from ee_mllm_jax.config import RopeScaling  # pylint: disable=g-import-not-at-top
  linear = hf_config.llm_config_from_hf({"model_type": "llama", "rope_scaling": {"type": "linear", "factor": 2.0}})
  assert linear.rope_scaling == RopeScaling(kind="linear", factor=2.0)
  llama3 = hf_config.llm_config_from_hf({"model_type": "llama", "rope_theta": 5e5, "max_position_embeddings": 8192,
                                         "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                          "high_freq_factor": 4.0}})
  assert llama3.rope_theta == 5e5 and llama3.rope_scaling.original_max_position_embeddings == 8192
  cfg = ModelConfig.preset("tiny")  # a nested optional config survives the checkpoint's JSON round trip
  cfg = cfg.replace(llm=cfg.llm.replace(rope_scaling=llama3.rope_scaling))
  assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
  assert set(cfg.diff(ModelConfig.preset("tiny"))) >= {"llm.rope_scaling.kind", "llm.rope_scaling.factor"}


def test_hf_parts_refuses_a_pair_that_is_not_the_run_model(hf_dirs):
  from ml_collections import config_dict  # pylint: disable=g-import-not-at-top

  from ee_mllm_jax import loading  # pylint: disable=g-import-not-at-top
  tiny = ModelConfig.preset("tiny")
  cfg = tiny.replace(vision=tiny.vision.replace(depth=3, feature_layer=-2), llm=tiny.llm.replace(
      vocab_size=VOCAB, depth=3))
  init_from = config_dict.ConfigDict(dict(kind="hf_parts", path="", vision_path=hf_dirs["clip"][1],
                                          llm_path=hf_dirs["llama"][1]))
  with pytest.raises(loading.ConfigMismatchError, match=r"llm.depth: checkpoint 2 vs run 3"):
    loading.load_pretrained(init_from, cfg, params_lib.abstract_params(cfg))


def test_export_refuses_cross_attention_and_an_image_token_without_an_id(monkeypatch):
  import tokenizers  # pylint: disable=g-import-not-at-top

  from ee_mllm_jax import loading  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(loading, "read_run_config", lambda _: {"model": {"attention": "cross"}, "tokenizer": "{}"})
  monkeypatch.setattr(os.path, "exists", lambda p, exists=os.path.exists: p == "run" or exists(p))
  with pytest.raises(ValueError, match=r"cross \(Flamingo\).* has no HF LLaVA equivalent"):
    export_lib.export_checkpoint("run", "out")
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({"<unk>": 0, "a": 1, "b": 2}, unk_token="<unk>"))
  with_image, idx = export_lib._with_image_token(tok.to_str(), vocab_size=4)  # room for one more: added
  assert idx == 3 and tokenizers.Tokenizer.from_str(with_image).token_to_id("<image>") == 3
  with pytest.raises(ValueError, match="no '<image>' token and its 3 tokens fill the model's vocabulary of 3"):
    export_lib._with_image_token(tok.to_str(), vocab_size=3)


def test_assembled_siglip_qwen2_exports_to_transformers_with_equal_logits(hf_dirs, tmp_path):
  cfg, params = convert.assemble(hf_dirs["siglip"][1], hf_dirs["qwen2"][1], feature_layer=-1)
  vision_cfg, vision = convert.load_hf_vision(hf_dirs["siglip"][1], feature_layer=-1)
  assert cfg.vision == vision_cfg and cfg.attention == "self" and cfg.llm.qkv_bias
  np.testing.assert_array_equal(params["vision"]["layers"]["fc1"]["kernel"], vision["layers"]["fc1"]["kernel"])
  export_lib.export_hf(cfg, params, str(tmp_path), tokenizer_json=_tokenizer(), template="chatml")
  hf = transformers.LlavaForConditionalGeneration.from_pretrained(str(tmp_path)).eval()
  image_id, p = hf.config.image_token_index, cfg.tokens_per_image
  batch = batch_lib.from_plans(cfg, [[3, "img", 6]] * 2)
  ids = batch["input_ids"].copy()
  ids[ids == image_id] = 0
  batch["input_ids"] = ids
  seq = np.concatenate([ids[:, :3], np.full((2, p), image_id), ids[:, 3:]], 1)
  with torch.no_grad():
    want = hf(input_ids=torch.tensor(seq), pixel_values=torch.tensor(
        batch["pixel_values"][:, 0].transpose(0, 3, 1, 2))).logits.numpy()
  want = np.concatenate([want[:, :3], want[:, 3 + p:]], 1)
  assert rel_err(forward(cfg, params, batch), want) < 1e-4


@pytest.mark.parametrize("layout", ["transformers-4", "state-dict"])
def test_other_key_layouts_of_a_llava_import_the_same(tiny_llava_dir, tmp_path, layout):
  """4.x wrote `vision_tower.vision_model.*`; a state_dict saved by hand has `model.*` + `lm_head.*`."""
  from ee_mllm_jax.convert import safetensors_io  # pylint: disable=g-import-not-at-top
  _, path = tiny_llava_dir
  renames = {"transformers-4": {"vision_tower.": "vision_tower.vision_model."},
             "state-dict": {"vision_tower.": "model.vision_tower.", "language_model.model.": "model.language_model.",
                            "language_model.lm_head.": "lm_head.",
                            "multi_modal_projector.": "model.multi_modal_projector."}}[layout]
  reader = convert.TensorReader(path)

  def renamed(name):
    prefix = next((p for p in renames if name.startswith(p)), None)
    return renames[prefix] + name[len(prefix):] if prefix else name
  planned = [(renamed(n), reader[n].shape, reader[n].dtype, lambda n=n: reader[n]) for n in reader]
  assert any(p[0] != n for p, n in zip(planned, reader))
  safetensors_io.write_file(str(tmp_path / "model.safetensors"), planned)
  with open(tmp_path / "config.json", "w") as f:
    json.dump(convert.hf.read_config(path), f)
  _, want = convert.load_hf_llava(path)
  _, got = convert.load_hf_llava(str(tmp_path))
  for k, v in params_lib.flatten(want).items():
    np.testing.assert_array_equal(params_lib.flatten(got)[k], v, err_msg=k)


@pytest.mark.parametrize("template,system", [("vicuna_v1", None), ("vicuna_v1", "Be brief."), ("chatml", ""),
                                             ("chatml", None), ("plain", None)])
def test_exported_chat_template_renders_our_prompts(template, system):
  """Jinja as transformers runs it == `ChatTemplate.render`, for prompts and whole conversations."""
  import tokenizers  # pylint: disable=g-import-not-at-top

  from ee_mllm_jax.data import text as text_lib  # pylint: disable=g-import-not-at-top
  ours = text_lib.ChatTemplate(template, system=system)
  bos = template != "chatml"
  tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizers.Tokenizer.from_str(_tokenizer()),
                                             bos_token="<s>", chat_template=export_lib.chat_template(
                                                 template, system, bos=bos))
  turns = [(text_lib.HUMAN, "<image>\nWhat is it?"), (text_lib.ASSISTANT, "A square."),
           (text_lib.HUMAN, "And its colour?"), (text_lib.ASSISTANT, "Red.")]
  as_messages = [{"role": "user" if r == text_lib.HUMAN else "assistant", "content": t} for r, t in turns]
  as_messages[0]["content"] = [{"type": "image"}, {"type": "text", "text": "What is it?"}]
  for n, prompt in ((3, True), (4, False)):
    want = ("<s>" if bos else "") + "".join(t for t, _, _ in ours.render(turns[:n], prompt=prompt))
    got = tok.apply_chat_template(as_messages[:n], tokenize=False, add_generation_prompt=prompt)
    assert got == want
