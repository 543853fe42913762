"""lmms-eval's entry point for this package (the `lmms` extra): lmms-eval 0.7 reads the
`lmms_eval.models` entry-point group (pyproject.toml) when it starts and calls `manifest()`, which
names the model class without importing it: the class (and eval.py's runner) loads only when
`--model ee_mllm` is asked for; what every lmms-eval start pays is `import ee_mllm_jax` (jax).

    pip install -e ".[lmms]"
    lmms-eval --model ee_mllm --model_args checkpoint=runs/demo --tasks ... --batch_size 16

The class: `ee_mllm_jax.evaluation.lmms_model.EEMLLM`.
"""

MODEL_ID = "ee_mllm"
CLASS_PATH = "ee_mllm_jax.evaluation.lmms_model.EEMLLM"


def manifest():
  from lmms_eval.models.registry_v2 import ModelManifest  # pylint: disable=g-import-not-at-top
  return ModelManifest(model_id=MODEL_ID, simple_class_path=CLASS_PATH)
