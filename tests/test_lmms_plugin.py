"""lmms-eval's `ee_mllm` model (`ee_mllm_jax.evaluation.lmms_model`), run through lmms-eval's own
CLI, offline, on two local tasks over the synthetic set's benchmark files, against eval.py on the
same questions and the same checkpoint (test_eval.py's, as train.py writes one):

* generation: the TextVQA file, scored by lmms-eval's own TextVQA `process_results`: the same
  answer to every question and the same accuracy as eval.py's;
* log-likelihood: the SEED-Bench file as an lmms-eval `multiple_choice` task (the question
  without its options, each option a continuation): the same option scores and the same accuracy
  as eval.py's likelihood ranking (`likelihood_accuracy`).

Needs the `lmms` extra (lmms-eval and its dependencies, ~3 GB), which CI does not install, so it is
skipped there; run it in a venv with the extra:

    python3 -m venv .venv-lmms && . .venv-lmms/bin/activate && pip install torch==2.13.0 && \
        pip install -e ".[lmms,test]" && python -m pytest -q tests/test_lmms_plugin.py
"""

import glob
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("lmms_eval", reason="the lmms extra is not installed (pip install -e '.[lmms]')")

from ee_mllm_jax.data import synthetic  # noqa: E402
from ee_mllm_jax.evaluation import cli  # noqa: E402
from test_eval import VOCAB, _cli_config, _lines, checkpoint  # noqa: E402,F401  (test_eval's checkpoint, of this bench)

HERE = os.path.dirname(os.path.abspath(__file__))
MAX_NEW = 3
GEN_BATCH, LL_BATCH = 32, 8  # lmms-eval runs both tasks at --batch_size 32: 32 option rows = eval.py's 8 x 4



@pytest.fixture(scope="module")
def bench(tmp_path_factory):
  """A synthetic set of TextVQA-like and SEED-like questions only, ~20 of each (test_eval's
  `checkpoint` fixture writes its random tiny model with this set's tokenizer)."""
  root = str(tmp_path_factory.mktemp("bench") / "synthetic")
  return synthetic.generate(root, num_train=8, num_val=40, image_size=32, vocab_size=VOCAB, max_turns=1,
                            mix={"text": 1.0, "choice_spatial": 1.0})


TEXTVQA_YAML = """task: ee_synthetic_textvqa
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_visual: !function ee_tasks.doc_to_visual
doc_to_text: !function ee_tasks.textvqa_doc_to_text
doc_to_target: !function ee_tasks.textvqa_doc_to_target
generation_kwargs:
  max_new_tokens: {max_new}
  temperature: 0
  do_sample: false
process_results: !function ee_tasks.textvqa_process_results
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
lmms_eval_specific_kwargs:
  default:
    pre_prompt: ""
    post_prompt: "\\nAnswer the question using a single word or phrase."
"""

SEED_YAML = """task: ee_synthetic_seed_ll
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_visual: !function ee_tasks.doc_to_visual
doc_to_text: !function ee_tasks.seed_doc_to_text
doc_to_choice: !function ee_tasks.seed_doc_to_choice
doc_to_target: !function ee_tasks.seed_doc_to_target
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
lmms_eval_specific_kwargs:
  default:
    pre_prompt: ""
    post_prompt: "\\nAnswer the question using a single word or phrase."
"""


def _write_tasks(bench, directory):  # noqa: F811
  """The two task YAMLs, their functions, and their data: the benchmark files' rows as JSON Lines
  with absolute image paths."""
  os.makedirs(directory)
  shutil.copy(os.path.join(HERE, "lmms_tasks", "ee_tasks.py"), directory)
  with open(bench.benchmarks["textvqa"]) as f:
    textvqa = [{**r, "image": os.path.join(bench.root, r["image_path"])} for r in json.load(f)["data"]]
  with open(bench.benchmarks["seedbench"]) as f:
    seed = [{**r, "image": os.path.join(bench.root, r["data_id"])} for r in json.load(f)["questions"]]
  for name, rows, template in (("textvqa", textvqa, TEXTVQA_YAML), ("seed", seed, SEED_YAML)):
    assert rows, f"the synthetic set wrote no {name} question"
    data = os.path.join(directory, f"{name}.jsonl")
    with open(data, "w") as f:
      f.writelines(json.dumps(r) + "\n" for r in rows)
    with open(os.path.join(directory, f"ee_{name}.yaml"), "w") as f:
      f.write(template.format(data=data, max_new=MAX_NEW))
  return textvqa, seed


def _lmms_eval(checkpoint, tasks_dir, out, tmp_path):  # noqa: F811
  exe = os.path.join(os.path.dirname(sys.executable), "lmms-eval")
  if not os.path.exists(exe):
    pytest.skip(f"no lmms-eval command beside {sys.executable}")
  env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
         "WANDB_MODE": "disabled", "PYTHONPATH": os.path.dirname(HERE)}
  cmd = [exe, "--model", "ee_mllm", "--model_args", f"checkpoint={checkpoint},max_new_tokens={MAX_NEW}",
         "--tasks", "ee_synthetic_textvqa,ee_synthetic_seed_ll", "--include_path", tasks_dir,
         "--batch_size", str(GEN_BATCH), "--output_path", out, "--log_samples"]
  proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
  results = glob.glob(os.path.join(out, "**", "*results*.json"), recursive=True)
  assert len(results) == 1, (results, proc.stdout[-2000:], proc.stderr[-4000:])
  with open(results[0]) as f:
    scores = json.load(f)["results"]

  def samples(task):
    paths = glob.glob(os.path.join(out, "**", f"*samples_{task}.jsonl"), recursive=True)
    assert len(paths) == 1, paths
    with open(paths[0]) as f:
      return sorted((json.loads(line) for line in f), key=lambda r: r["doc_id"])
  return scores, samples


def _eval_py(checkpoint, bench, benchmark, out, batch_size):  # noqa: F811
  text, complete = cli.run(_cli_config(limit=0, batch_size=batch_size, images_per_batch=0, max_new_tokens=MAX_NEW),
                           checkpoint=checkpoint, benchmark=benchmark, data=bench.benchmarks[benchmark],
                           image_root=bench.root, out=str(out))
  assert complete, text
  with open(os.path.join(out, "metrics.json")) as f:
    return json.load(f), {r["question_id"]: r for r in _lines(str(out))}


@pytest.mark.slow
def test_lmms_eval_cli_scores_equal_eval_py_on_a_generation_and_a_likelihood_task(
    checkpoint, bench, tmp_path):  # noqa: F811
  textvqa, seed = _write_tasks(bench, str(tmp_path / "tasks"))
  scores, samples = _lmms_eval(checkpoint, str(tmp_path / "tasks"), str(tmp_path / "lmms_out"), tmp_path)

  # Generation: every answer and its score are eval.py's, and so is lmms-eval's TextVQA accuracy.
  metrics, records = _eval_py(checkpoint, bench, "textvqa", tmp_path / "textvqa", GEN_BATCH)
  got = samples("ee_synthetic_textvqa")
  assert [g["doc_id"] for g in got] == list(range(len(textvqa))) and len(textvqa) == metrics["questions"] >= 10
  for g in got:
    r = records[str(textvqa[g["doc_id"]]["question_id"])]
    assert (g["filtered_resps"], g["exact_match"]) == (r["output"], r["score"]), r["question_id"]
  assert scores["ee_synthetic_textvqa"]["exact_match,none"] == pytest.approx(metrics["accuracy"], abs=1e-12)

  # Log-likelihood: each option's score is eval.py's (lmms-eval picks the smallest negative
  # log-likelihood), and so are the option picked and the accuracy.
  metrics, records = _eval_py(checkpoint, bench, "seedbench", tmp_path / "seed", LL_BATCH)
  got = samples("ee_synthetic_seed_ll")
  assert [g["doc_id"] for g in got] == list(range(len(seed))) and len(seed) == metrics["questions"] >= 10
  for g in got:
    r = records[str(seed[g["doc_id"]]["question_id"])]
    nll = np.asarray([float(resp[0]) for resp in g["filtered_resps"]])
    np.testing.assert_allclose(-nll, r["option_logprobs"], rtol=1e-6, err_msg=r["question_id"])
    assert ("ABCD"[int(np.argmin(nll))], g["acc"]) == (r["likelihood_choice"], float(r["likelihood_correct"]))
  assert scores["ee_synthetic_seed_ll"]["acc,none"] == pytest.approx(metrics["likelihood_accuracy"], abs=1e-12)


def test_model_args_as_lmms_eval_passes_them_choose_the_mode_and_sampling(checkpoint, tmp_path):  # noqa: F811
  """`--model_args` reach the model as lmms-eval parses them (`create_from_arg_string`): the mode
  flags run the weights in another mode, as eval.py's `--config.*` do; an unknown one is refused
  by name; a request's generation settings pick greedy or sampled decoding."""
  from ee_mllm_jax.evaluation import lmms_model, model as model_lib  # pylint: disable=g-import-not-at-top
  extra = {"batch_size": "1", "max_batch_size": None, "device": None}  # what lmms-eval's CLI adds
  lm = lmms_model.EEMLLM.create_from_arg_string(
      f"checkpoint={checkpoint},attention=composite,visual_ffn=true,max_new_tokens=5", extra)
  assert lm.model.mode == model_lib.from_checkpoint(checkpoint, attention="composite", visual_ffn=True).mode
  assert lm.model.cfg.mode_name.startswith("EE-MLLM-F") and lm.settings.max_new_tokens == 5
  assert lm.runner.rows % lm.runner.dp == 0 and lm.settings.batch_size == 1
  with pytest.raises(ValueError, match=r"unknown model_args \['visual_fnn'\]"):
    lmms_model.EEMLLM.create_from_arg_string(f"checkpoint={checkpoint},visual_fnn=false", extra)
  assert lm._sampling({"until": ["\n\n"], "max_new_tokens": 7, "temperature": 0.2, "top_p": 0.9}) == (
      7, 0.2, 0.9, ("\n\n",))
  assert lm._sampling({"until": "ASSISTANT:", "temperature": 0.2, "do_sample": False, "top_p": 0.9}) == (
      5, 0.0, 1.0, ("ASSISTANT:",))
  assert lmms_model.cut("red\n\nUSER: more", ("\n\n",)) == "red"
  (tmp_path / "hf").mkdir()
  (tmp_path / "hf" / "model.safetensors").write_bytes(b"")
  assert lmms_model.is_hf_dir(str(tmp_path / "hf")) and not lmms_model.is_hf_dir(checkpoint)
