"""Evaluate a model on a benchmark (TextVQA, DocVQA, MMBench, SEED-Bench, ChartQA: `--benchmark`),
answer every question of a question file (`--predict`, no metric), or ask it about one image.

    python eval.py --checkpoint RUN_DIR[/checkpoints/STEP] --benchmark mmbench --data MMBench_DEV_EN.tsv \
        [--image-root DIR] [--out DIR] [--config.attention=composite --config.visual_ffn=true ...]
    python eval.py --hf LLAVA_DIR --benchmark textvqa --data TextVQA_0.5.1_val.json --image-root textvqa/
    python eval.py --checkpoint RUN_DIR --predict questions.jsonl --image-root images/ --out answers/ \
        [--config.max_new_tokens=128 --config.temperature=0.2 --config.top_p=0.9 --config.seed=0]
    python eval.py --checkpoint RUN_DIR --image cat.png --question "What colour is the cat?"

Writes OUT/run.json (what the run is: benchmark, data file and its sha256, model and mode, prompt
settings, and sampling settings when sampled), OUT/predictions.jsonl (resumable: a re-run with the
same run.json skips what it holds; another run is refused naming the field that differs, or with
--overwrite starts afresh) and OUT/metrics.json (a question file's: only counts),
and prints a summary that names the mode that ran (`--config.attention=composite` on a
self-trained checkpoint is EE-MLLM-F; `--config.composite_from_layer=N` with it keeps layers
[0, N) self attention, a layer schedule).
"""

import sys

from absl import app, flags
import ml_collections
from ml_collections import config_flags


def default_config() -> ml_collections.ConfigDict:
  from ee_mllm_jax import mode as mode_lib  # pylint: disable=g-import-not-at-top
  from ee_mllm_jax.evaluation import prompts  # pylint: disable=g-import-not-at-top
  unset = lambda kind: ml_collections.FieldReference(None, field_type=kind)
  # Every mode flag, None: as trained. attention="composite" on a self checkpoint is EE-MLLM-F (the
  # visual FFN kept unless visual_ffn=false); composite_from_layer=n keeps layers [0, n) self.
  mode = {f.metadata["flag"]: unset(type(f.default)) for m in mode_lib.MODES.values() for f in m.fields()}
  return ml_collections.ConfigDict(dict(
      attention=unset(str), **mode,
      preset=unset(str),  # when set, the checkpoint must be this architecture
      template=unset(str),  # None: the checkpoint's (HF: the exported one, else vicuna_v1)
      system_prompt=unset(str),  # None: the checkpoint's (HF: the exported one, else the template's default)
      dtype=unset(str),
      batch_size=16, images_per_batch=0, max_new_tokens=16, reuse_prefix=True, likelihood=True,
      on_bad_image="raise",  # or "skip"
      short_answer_prompt=prompts.SHORT_ANSWER,
      ocr_tokens=True, progress_bar=True, limit=0,
      temperature=0.0, top_p=1.0, seed=0,  # 0: greedy; > 0: sampled (nucleus when top_p < 1), reproducible per seed
      mmbench_rotations=True,  # MMBench rows without rotations get them (CircularEval on any TSV)
      mesh=ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))))


def benchmark_names() -> list[str]:
  from ee_mllm_jax.evaluation import benchmarks  # pylint: disable=g-import-not-at-top
  return list(benchmarks.names())


config_flags.DEFINE_config_dict("config", default_config(), "Evaluation settings.", lock_config=True)
flags.DEFINE_string("checkpoint", None, "A train.py run dir, its checkpoints/ dir, or one step.")
flags.DEFINE_string("hf", None, "A local HF LLaVA directory (config.json, *.safetensors, tokenizer.json).")
flags.DEFINE_enum("benchmark", None, benchmark_names(), "Benchmark (`ee_mllm_jax.evaluation.benchmarks`).")
flags.DEFINE_string("data", None, "The benchmark file.")
flags.DEFINE_string("predict", None, "A question file to answer, no metric: a LLaVA-format JSON list (id, image, "
                    "conversations: the first human turn) or JSON Lines (question_id or id, image or images, text "
                    "or question). See ee_mllm_jax/evaluation/questions.py.")
flags.DEFINE_string("image-root", None, "Image paths are relative to it (default: the benchmark or question "
                    "file's dir).")
flags.DEFINE_string("out", None, "Output directory (default: eval_out/<benchmark>, eval_out/predict).")
flags.DEFINE_string("image", None, "Ask about one image (with --question).")
flags.DEFINE_string("question", None, "The question about --image.")
flags.DEFINE_bool("overwrite", False, "Start afresh when --out holds the predictions of another run (another "
                  "benchmark, data file, model, mode or prompt; see OUT/run.json) instead of refusing.")
flags.DEFINE_bool("library_logs", False, "Show INFO logs of libraries (orbax, grain, jax), not only ours.")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  if not FLAGS.library_logs:
    from ee_mllm_jax import logs  # pylint: disable=g-import-not-at-top
    logs.quiet_libraries(__file__)
  from ee_mllm_jax.evaluation import cli  # pylint: disable=g-import-not-at-top
  try:
    text, complete = cli.run(FLAGS.config, checkpoint=FLAGS.checkpoint, hf=FLAGS.hf, benchmark=FLAGS.benchmark,
                             data=FLAGS.data, image_root=FLAGS["image-root"].value, out=FLAGS.out, image=FLAGS.image,
                             question=FLAGS.question, overwrite=FLAGS.overwrite, predict=FLAGS.predict)
  except cli.USER_ERRORS as e:  # bad flags, files, images or checkpoints: one line, exit 1
    sys.exit(f"error: {e}")
  print(text, flush=True)
  if not complete:  # stopped by SIGTERM: predictions.jsonl is whole, a re-run resumes
    sys.exit(143)


if __name__ == "__main__":
  app.run(main)
