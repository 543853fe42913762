"""Import HF checkpoints (safetensors only): a whole LLaVA, an LLM, a vision tower, or a pair.

* `load_hf_llava(dir)`: a `LlavaForConditionalGeneration` directory -> (ModelConfig, params).
* `load_hf_llm(dir)`: `LlamaForCausalLM` / `Qwen2ForCausalLM` -> (LLMConfig, llm params).
* `load_hf_vision(dir)`: `CLIPVisionModel` / `SiglipVisionModel`, or the vision half of a
  `CLIPModel` / `SiglipModel` -> (VisionConfig, vision params).
* `assemble(vision_dir, llm_dir)`: both, with a freshly initialised projector (LLaVA's stage 1
  start) -> (ModelConfig, params).

All read the one name map of `convert.names`, tensor by tensor (`safetensors_io.TensorReader`):
each stacked (L, ...) parameter is built in the kept dtype and handed to `place` (e.g. onto
its sharding) before the next one is read, so the host holds the result plus one parameter.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Callable, Mapping

import numpy as np

from ee_mllm_jax.config import LLMConfig, ModelConfig, VisionConfig
from ee_mllm_jax.mode import Self
from ee_mllm_jax.convert import hf_config, names
from ee_mllm_jax.convert.safetensors_io import TensorReader

logger = logging.getLogger(__name__)
Tensors = Mapping[str, np.ndarray]
# (our flat path, host array) -> the leaf to keep (default: the numpy array itself).
Place = Callable[[str, np.ndarray], Any]

# Tensors that a tower-only checkpoint may hold and LLaVA never uses: reported, not mapped.
TOWER_EXTRAS = ("text_model.", "logit_scale", "logit_bias", "visual_projection.", "text_projection.", "head.")
LLAVA_EXTRAS = ("vision_tower.head.",)  # a SigLIP pooling head kept inside a LLaVA checkpoint


class _Renamed(Mapping[str, np.ndarray]):
  """A lazy view of `tensors` under canonical names."""

  def __init__(self, tensors: Tensors, aliases: dict[str, str]):
    self._tensors = tensors
    self._names = {names.canonical_name(n, aliases): n for n in tensors}

  def __getitem__(self, name):
    return self._tensors[self._names[name]]

  def __iter__(self):
    return iter(self._names)

  def __len__(self):
    return len(self._names)


def _set(tree: dict, path: str, value):
  *parents, leaf = path.split("/")
  for p in parents:
    tree = tree.setdefault(p, {})
  tree[leaf] = value


def convert_tensors(tensors: Tensors, table: names.NameMap, depth: Mapping[str, int], dtype=np.float32, *,
                    missing: str = "raise", extras: tuple[str, ...] = (), place: Place | None = None,
                    source: str = "checkpoint") -> tuple[dict, list[str]]:
  """Our nested params from HF tensors through `table` (full paths -> (name, hook)).

  Returns (params, ignored): `ignored` lists the tensors starting with one of `extras`, which
  the model has no place for (a CLIP text tower, a pooling head); any other unmapped tensor is
  an error. `missing="skip"` leaves out parameters whose tensors are absent (for `overlay`)."""
  if missing not in ("raise", "skip"):
    raise ValueError(f"missing must be 'raise' or 'skip', got {missing!r}")
  dtype = np.dtype(dtype)
  params: dict = {}
  used = set()
  for path, (name, hook) in table.items():
    stacked = "{i}" in name
    layer_names = [name.format(i=i) for i in range(depth[path.split("/")[0]])] if stacked else [name]
    absent = [n for n in layer_names if n not in tensors]
    if absent and missing == "raise":
      raise KeyError(f"{source} has no tensor {absent[0]!r} (needed for {path})")
    if absent:
      continue
    if stacked:
      value = None
      for i, n in enumerate(layer_names):
        layer = hook.to_ours(tensors[n])
        if value is None:  # one buffer in the kept dtype; each layer is cast into it
          value = np.empty((len(layer_names),) + layer.shape, dtype)
        value[i] = layer
    else:
      value = np.asarray(hook.to_ours(tensors[layer_names[0]])).astype(dtype, copy=False)
    used.update(layer_names)
    _set(params, path, place(path, value) if place else value)
    del value
  unmapped = sorted(set(tensors) - used)
  ignored = [n for n in unmapped if n.startswith(extras)]
  unknown = [n for n in unmapped if not n.startswith(extras)]
  if unknown:
    raise ValueError(f"{source}: tensors not mapped to any parameter: {unknown[:5]}"
                     f"{f' (+{len(unknown) - 5} more)' if len(unknown) > 5 else ''}")
  return params, ignored


def _report_ignored(source: str, ignored: list[str]):
  """One warning naming the groups of tensors left out ("text_model", "head", "vision_tower.head", ...)."""
  if ignored:
    groups = sorted({".".join(n.split(".")[:2 if n.startswith("vision_tower.") else 1])
                     for n in ignored})
    logger.warning("%s: %d tensors the model does not use were left out: %s", source, len(ignored),
                   ", ".join(groups))


def params_from_hf(tensors: Tensors, cfg: ModelConfig, dtype=np.float32, *, missing: str = "raise",
                   place: Place | None = None) -> dict:
  """A whole HF LLaVA's tensors (any key-prefix variant) -> our nested params.

  `missing="skip"`: parameters without their tensors are left out, and the result is the part
  the checkpoint covers (to be completed by `params.overlay`, e.g. a fresh projector)."""
  table = names.name_map(cfg)
  params, ignored = convert_tensors(_Renamed(tensors, names.LLAVA_ALIASES), table,
                                    {"vision": cfg.vision.depth, "llm": cfg.llm.depth}, dtype, missing=missing,
                                    extras=LLAVA_EXTRAS, place=place)
  _report_ignored("LLaVA checkpoint", ignored)
  return params


def read_config(path: str) -> dict:
  file = os.path.join(path if os.path.isdir(path) else os.path.dirname(path), "config.json")
  if not os.path.exists(file):
    raise FileNotFoundError(f"{file} does not exist (an HF checkpoint directory holds config.json)")
  with open(file) as f:
    return json.load(f)


def load_hf_llava(path: str, *, dtype=np.float32, place: Place | None = None, **overrides) -> tuple[ModelConfig, dict]:
  """A saved HF LLaVA directory (config.json + *.safetensors) -> (ModelConfig, params).

  The mode is the one config.json records under "ee_mllm" (an export of ours), else LLaVA's
  (self attention, visual FFN); pass `attention="composite"` for EE-MLLM-F (overrides win), and
  `composite_from_layer=n` to keep layers [0, n) self attention.
  """
  cfg = hf_config.config_from_hf(read_config(path), **overrides)
  return cfg, params_from_hf(TensorReader(path), cfg, dtype, place=place)


def _component(path: str, component: str, cfg: ModelConfig, dtype, place: Place | None, aliases, extras) -> dict:
  depth = {"vision": cfg.vision.depth, "llm": cfg.llm.depth}
  place_full = (lambda p, v: place(f"{component}/{p}", v)) if place else None
  table = names.component_map(cfg, component)
  params, ignored = convert_tensors(_Renamed(TensorReader(path), aliases), table, {"layers": depth[component]},
                                    dtype, extras=extras, place=place_full, source=path)
  _report_ignored(path, ignored)
  return params


def load_hf_llm(path: str, *, dtype=np.float32, place: Place | None = None, **overrides) -> tuple[LLMConfig, dict]:
  """A LlamaForCausalLM / Qwen2ForCausalLM directory -> (LLMConfig, the params of llm/).
  `place(path, array)` receives full paths ("llm/...")."""
  llm = hf_config.llm_config_from_hf(read_config(path))
  llm = llm.replace(**overrides) if overrides else llm
  return llm, _component(path, "llm", ModelConfig(llm=llm), dtype, place, {}, ())


def load_hf_vision(path: str, *, feature_layer: int = -2, dtype=np.float32, place: Place | None = None,
                   **overrides) -> tuple[VisionConfig, dict]:
  """A CLIPVisionModel / SiglipVisionModel directory, or a two-tower CLIPModel / SiglipModel
  (its text half, logit scale and projections are reported and left out) -> (VisionConfig,
  the params of vision/). `feature_layer` is LLaVA's vision_feature_layer (-2 for LLaVA-1.5)."""
  vision = hf_config.vision_config_from_hf(read_config(path), feature_layer).replace(**overrides)
  extras = TOWER_EXTRAS if vision.kind == "siglip" else TOWER_EXTRAS[:-1]
  return vision, _component(path, "vision", ModelConfig(vision=vision), dtype, place, names.TOWER_ALIASES, extras)


def assemble(vision_dir: str, llm_dir: str, *, feature_layer: int = -2, dtype=np.float32, seed: int = 0,
             place: Place | None = None, **overrides) -> tuple[ModelConfig, dict]:
  """A vision tower and an LLM from two HF directories, with a freshly initialised projector
  -> (ModelConfig, params): LLaVA's stage-1 start. `overrides` replace ModelConfig fields
  (default: self attention with the visual FFN, LLaVA's mlp2x_gelu projector)."""
  import jax  # pylint: disable=g-import-not-at-top

  from ee_mllm_jax import params as params_lib  # pylint: disable=g-import-not-at-top

  vision, vision_params = load_hf_vision(vision_dir, feature_layer=feature_layer, dtype=dtype, place=place)
  llm, llm_params = load_hf_llm(llm_dir, dtype=dtype, place=place)
  cfg = ModelConfig(vision=vision, llm=llm, projector="mlp2x_gelu", mode=Self(),
                    param_dtype=np.dtype(dtype).name).replace(**overrides)
  projector = init_projector(cfg, jax.random.key(seed))
  if place:
    projector = {k: place(f"projector/{k}", np.asarray(v)) for k, v in params_lib.flatten(projector).items()}
    projector = params_lib.unflatten(projector)
  params = {"vision": vision_params, "projector": projector, "llm": llm_params}
  report = params_lib.InitReport.of(params_lib.abstract_params(cfg), params)
  if report.initialised or report.unused:
    raise ValueError(f"assembled parameters do not match the model: {report}")
  logger.info("assembled %s + %s: projector freshly initialised (seed %d)", vision_dir, llm_dir, seed)
  return cfg, params


def init_projector(cfg: ModelConfig, rng) -> dict:
  """The projector's own initialisation (as `EEMLLM.init` gives it), without building the rest."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import flax.linen as nn  # pylint: disable=g-import-not-at-top

  from ee_mllm_jax.models.projector import Projector  # pylint: disable=g-import-not-at-top

  x = jnp.zeros((1, 1, cfg.vision.width), cfg.param_dtype)
  module = Projector(cfg.projector, cfg.vision.width, cfg.llm.width, dtype=cfg.param_dtype, param_dtype=cfg.param_dtype)
  return nn.meta.unbox(jax.jit(module.init)(rng, x)["params"])
