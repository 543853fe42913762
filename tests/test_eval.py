"""eval.py's package (the benchmarks' readers and scores: test_eval_benchmarks.py): the runner's
properties (prefix reuse = no reuse, 8 devices = 1, resume = one run, SIGTERM leaves a valid
file), bad input, and the command line."""

import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

import ee_mllm_jax as eem
from ee_mllm_jax import loading, sharding
from ee_mllm_jax.data import synthetic
from ee_mllm_jax.evaluation import benchmarks, model as model_lib, prompts as prompts_lib, runner as runner_lib
from ee_mllm_jax.mode import Composite, Self
from ee_mllm_jax.train import checkpoint as ckpt_lib
import conftest
from models import forward, init_params
from test_eval_benchmarks import circular_rows, write_mmbench

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = 384
CFG = eem.ModelConfig.preset("tiny", attention="self", visual_ffn=True).replace(
    llm=eem.ModelConfig.preset("tiny").llm.replace(vocab_size=VOCAB))
SETTINGS = runner_lib.EvalSettings(batch_size=8, images_per_batch=4, max_new_tokens=3, progress_bar=False)


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
  """A small synthetic set with every question type, so all four benchmark files have questions."""
  root = str(tmp_path_factory.mktemp("bench") / "synthetic")
  return synthetic.generate(root, num_train=8, num_val=64, image_size=32, vocab_size=VOCAB, max_turns=1,
                            mix=dict(synthetic.DEFAULT_MIX))


@pytest.fixture(scope="module")
def checkpoint(bench, tmp_path_factory):
  """A checkpoint as train.py writes it (state + config item) of a random tiny self-attention model."""
  directory = str(tmp_path_factory.mktemp("run") / "checkpoints")
  with open(bench.tokenizer_file) as f:
    tokenizer = f.read()
  run_config = {"model": CFG.to_dict(), "tokenizer": tokenizer,
                "data": dict(template="chatml", system_prompt="", buckets=[64, 128], image_preprocess="pad",
                             alpha_background="white", max_images=1, tokenizer_file=bench.tokenizer_file)}
  ckpt = ckpt_lib.Checkpointer(directory, run_config=run_config, async_save=False)
  ckpt.save(1, {"params": init_params(CFG)}, force=True)
  ckpt.wait()
  ckpt.close()
  return directory


@pytest.fixture(scope="module")
def model(checkpoint):
  return model_lib.from_checkpoint(checkpoint)


def _runner(model, mesh=None, **changes):
  """A runner on one device unless `mesh` says otherwise (the 8-device test does)."""
  mesh = mesh if mesh is not None else sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  return runner_lib.Runner(model, runner_lib.EvalSettings(**{**SETTINGS.__dict__, **changes}), mesh)


def _lines(path):
  with open(os.path.join(path, runner_lib.PREDICTIONS)) as f:
    return [json.loads(line) for line in f]


# ----------------------------------------------------------------------------- the runner


@pytest.mark.slow
def test_prefix_reuse_gives_the_same_predictions_as_no_reuse(model, tmp_path):
  path = str(tmp_path / "mmbench.tsv")
  write_mmbench(path, circular_rows())
  qs = benchmarks.get("mmbench").read(path)
  out = {}
  for reuse in (True, False):
    runner_lib.evaluate(_runner(model, reuse_prefix=reuse), "mmbench", qs, str(tmp_path / str(reuse)))
    out[reuse] = _lines(str(tmp_path / str(reuse)))
  assert [r["output"] for r in out[True]] == [r["output"] for r in out[False]]
  assert len(out[True]) == 7 and all(r["prompt"].startswith("<|im_start|>user\n<image>\n") for r in out[True])


@pytest.mark.slow
def test_seed_option_likelihoods_with_a_shared_prefix_equal_full_forwards(model, bench, tmp_path):
  qs = benchmarks.get("seedbench").read(bench.benchmarks["seedbench"], bench.root)[:6]
  scores = {}
  for reuse in (True, False):
    summary = runner_lib.evaluate(_runner(model, reuse_prefix=reuse), "seedbench", qs, str(tmp_path / str(reuse)))
    scores[reuse] = [r["option_logprobs"] for r in _lines(str(tmp_path / str(reuse)))]
    assert "likelihood_accuracy" in summary["metrics"]
  np.testing.assert_allclose(scores[True], scores[False], rtol=1e-4, atol=1e-4)
  assert np.ptp(np.asarray(scores[True]), axis=1).min() > 0  # the options are told apart


@pytest.mark.slow
def test_eight_devices_give_the_same_predictions_as_one(model, bench, tmp_path):
  qs = benchmarks.get("textvqa").read(bench.benchmarks["textvqa"], bench.root)
  one = _runner(model)
  eight = _runner(model, sharding.make_mesh((8, 1, 1)))
  assert eight.rows == 8 and len(jax.devices()) == 8
  a = runner_lib.evaluate(one, "textvqa", qs, str(tmp_path / "one"))
  b = runner_lib.evaluate(eight, "textvqa", qs, str(tmp_path / "eight"))
  assert [r["output"] for r in _lines(str(tmp_path / "one"))] == [r["output"] for r in _lines(str(tmp_path / "eight"))]
  assert a["metrics"] == b["metrics"]


def test_resume_skips_done_questions_and_gives_the_same_metrics(model, bench, tmp_path):
  qs = benchmarks.get("docvqa").read(bench.benchmarks["docvqa"], bench.root)
  full = runner_lib.evaluate(_runner(model), "docvqa", qs, str(tmp_path / "full"))
  lines = open(tmp_path / "full" / runner_lib.PREDICTIONS).readlines()
  os.makedirs(tmp_path / "part")
  with open(tmp_path / "part" / runner_lib.PREDICTIONS, "w") as f:  # 3 done, then a torn line
    f.writelines(lines[:3] + [lines[3][:20]])
  resumed = runner_lib.evaluate(_runner(model), "docvqa", qs, str(tmp_path / "part"))
  assert resumed["run"]["resumed"] == 3 and resumed["run"]["predicted"] == len(qs) - 3
  assert resumed["metrics"] == full["metrics"]
  assert sorted(r["question_id"] for r in _lines(str(tmp_path / "part"))) == sorted(q.qid for q in qs)


def test_sigterm_stops_after_a_batch_and_leaves_a_valid_file(model, bench, tmp_path):
  qs = benchmarks.get("textvqa").read(bench.benchmarks["textvqa"], bench.root)
  qs += [dataclasses.replace(q, qid=q.qid + "-again", image_key=q.image_key + "-again") for q in qs]
  assert len(qs) > SETTINGS.images_per_batch  # more than one batch
  runner = _runner(model)
  predict = runner.predict

  def predict_then_sigterm(benchmark, items, sink, stop):
    def sink_and_signal(records):
      sink(records)
      os.kill(os.getpid(), signal.SIGTERM)  # as `kill` would, in the middle of the run
    return predict(benchmark, items, sink_and_signal, stop)

  runner.predict = predict_then_sigterm
  summary = runner_lib.evaluate(runner, "textvqa", qs, str(tmp_path))
  assert summary["run"]["stopped"] and not summary["run"]["complete"]
  assert len(_lines(str(tmp_path))) == SETTINGS.images_per_batch  # one whole batch
  done = runner_lib.evaluate(_runner(model), "textvqa", qs, str(tmp_path))
  assert done["run"]["complete"] and done["run"]["resumed"] == SETTINGS.images_per_batch


def test_a_missing_image_is_an_error_naming_the_question_and_skip_mode_counts_it(model, bench, tmp_path):
  qs = benchmarks.get("docvqa").read(bench.benchmarks["docvqa"], bench.root)
  os.makedirs(tmp_path / "images", exist_ok=True)
  broken = qs[1].__class__(**{**qs[1].__dict__, "image": os.path.join(bench.root, "images", "gone.png"),
                              "image_key": "gone"})  # inside the image root (outside: refused as such)
  qs = [qs[0], broken] + qs[2:4]
  with pytest.raises(runner_lib.EvalError, match=f"question {broken.qid}: image file not found"):
    runner_lib.evaluate(_runner(model), "docvqa", qs, str(tmp_path / "raise"))
  summary = runner_lib.evaluate(_runner(model, on_bad_image="skip"), "docvqa", qs, str(tmp_path / "skip"))
  assert summary["metrics"]["skipped"] == 1 and summary["metrics"]["questions"] == 3


def test_a_fifth_benchmark_runs_through_the_runner_from_its_one_file(model, bench, tmp_path):
  """ChartQA (`benchmarks/chartqa.py`, nothing else): a file in its format made of the synthetic
  count questions runs, its records carry the relaxed score, its metrics the per-split mean."""
  from ee_mllm_jax.evaluation.benchmarks import chartqa  # pylint: disable=g-import-not-at-top
  with open(bench.val_file) as f:
    count = [r for r in json.load(f) if r["question_type"] == "count"][:5]
  os.makedirs(tmp_path / "png")
  for r in count:
    shutil.copy(os.path.join(bench.root, r["image"]), tmp_path / "png")
  rows = [{"imgname": os.path.basename(r["image"]), "query": r["question"], "label": r["answer"]} for r in count]
  (tmp_path / "test_augmented.json").write_text(json.dumps(rows))
  qs = benchmarks.get("chartqa").read(str(tmp_path / "test_augmented.json"))
  summary = runner_lib.evaluate(_runner(model), "chartqa", qs, str(tmp_path / "out"))
  lines = _lines(str(tmp_path / "out"))
  assert [r["score"] for r in lines] == [float(chartqa.relaxed_correct(r["output"], r["answers"][0])) for r in lines]
  assert all(prompts_lib.SHORT_ANSWER + "<|im_end|>" in r["prompt"] for r in lines) and len(lines) == 5
  mean = sum(r["score"] for r in lines) / 5
  assert summary["metrics"] == {"questions": 5, "skipped": 0, "relaxed_accuracy": mean,
                                "per_split": {"augmented_test": mean}}
  assert "relaxed_accuracy" in runner_lib.summary_table(summary)


# ----------------------------------------------------------------------------- model and command line


def test_composite_on_a_self_checkpoint_is_ee_mllm_f_and_a_wrong_preset_is_named(checkpoint):
  f = model_lib.from_checkpoint(checkpoint, attention="composite")
  assert f.cfg.mode == Composite(visual_ffn=True) and f.cfg.trained_mode == Self()  # the visual FFN kept
  assert f.mode == "EE-MLLM-F: composite, visual FFN, on self-trained weights"
  assert not model_lib.from_checkpoint(checkpoint, attention="composite", visual_ffn=False).cfg.mode.runs_visual_ffn
  with pytest.raises(loading.ConfigMismatchError, match="llm.vocab_size: checkpoint 384 vs run 256"):
    model_lib.from_checkpoint(checkpoint, preset="tiny")


def _eval_py_config():
  """eval.py's default_config() (the module defines its absl flags once per process)."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location("eval_py", os.path.join(ROOT, "eval.py"))
  module = sys.modules.get("eval_py") or importlib.util.module_from_spec(spec)
  if "eval_py" not in sys.modules:
    spec.loader.exec_module(module)
    sys.modules["eval_py"] = module
  return module.default_config()


@pytest.mark.slow
def test_a_layer_schedule_on_a_self_checkpoint_runs_that_config_and_names_it(checkpoint):
  """eval.py's --config.attention=composite --config.composite_from_layer=n: the checkpoint's weights
  run as the config with that schedule (the same logits as the model called with it directly), the
  mode names the self layers after the EE-MLLM-F prefix, and a schedule that cannot run is refused.
  Guard: the same weights without the schedule give other logits."""
  from ee_mllm_jax.evaluation import cli  # pylint: disable=g-import-not-at-top
  config = _eval_py_config()
  assert config.composite_from_layer is None  # as trained
  config.attention, config.composite_from_layer = "composite", 1
  scheduled = cli.load_model(config, checkpoint=checkpoint, hf=None)
  direct_cfg = CFG.run_as(attention="composite", composite_from_layer=1)
  assert scheduled.cfg == direct_cfg and scheduled.cfg.layer_schedule == (("self", 1), ("composite", 1))
  assert scheduled.mode == ("EE-MLLM-F: composite, visual FFN, from layer 1 (layer 0 self), on self-trained "
                            "weights")
  batch = eem.batch.from_plans(CFG, [[3, "img", 5], [2, "img", 7]])
  got = np.asarray(forward(scheduled.cfg, scheduled.params, batch))[batch["text_valid"]]
  np.testing.assert_array_equal(got, np.asarray(forward(direct_cfg, init_params(CFG), batch))[batch["text_valid"]])
  unscheduled = np.asarray(forward(CFG.replace(attention="composite"), init_params(CFG), batch))[batch["text_valid"]]
  assert np.max(np.abs(got - unscheduled)) > 1e-3 * np.max(np.abs(got))
  two = model_lib.from_checkpoint(checkpoint, attention="composite", visual_ffn=False, composite_from_layer=2)
  assert two.mode == "EE-MLLM-F: composite (EE-MLLM), from layer 2 (layers 0-1 self), on self-trained weights"
  assert model_lib.from_checkpoint(checkpoint, attention="composite").mode == (
      "EE-MLLM-F: composite, visual FFN, on self-trained weights")  # n=0 names no schedule
  for n, message in ((3, r"composite_from_layer must be an int in \[0, 2\] \(the decoder's layers\), got 3"),
                     (-1, r"composite_from_layer must be an int in \[0, 2\] \(the decoder's layers\), got -1")):
    config.composite_from_layer = n
    with pytest.raises(cli.UsageError, match=message):
      cli.load_model(config, checkpoint=checkpoint, hf=None)
  config.attention, config.composite_from_layer = None, 1  # the checkpoint runs self attention: said, not ignored
  with pytest.raises(cli.UsageError, match=r"composite_from_layer=1 does not apply to attention='self'"):
    cli.load_model(config, checkpoint=checkpoint, hf=None)


@pytest.mark.slow  # eval.py in a subprocess
def test_ask_about_one_image_from_the_command_line(checkpoint, bench, tmp_path):
  image = os.path.join(bench.root, "images", "val", "000000.png")
  env = {**os.environ, "XLA_FLAGS": conftest.TEST_XLA_FLAGS, "JAX_PLATFORMS": "cpu"}  # one device, fast compiles
  ok = subprocess.run([sys.executable, "eval.py", "--checkpoint", checkpoint, "--image", image, "--question",
                       "What colour is the square?", "--config.max_new_tokens=3"],
                      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert ok.returncode == 0 and ok.stdout.strip(), ok.stderr[-2000:]  # the answer (random weights: any text)
  bad = subprocess.run([sys.executable, "eval.py", "--checkpoint", checkpoint, "--image", str(tmp_path / "no.png"),
                        "--question", "?"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert bad.returncode == 1 and bad.stderr.strip().splitlines()[-1] == f"error: --image {tmp_path / 'no.png'} does not exist"


def test_an_hf_llava_directory_loads_with_its_tokenizer_and_mode_overrides(tmp_path):
  pytest.importorskip("torch")
  pytest.importorskip("transformers")
  import tokenizers  # pylint: disable=g-import-not-at-top
  from test_vs_hf import tiny_hf_llava  # pylint: disable=g-import-not-at-top
  tiny_hf_llava("clip-llama").save_pretrained(tmp_path)
  words = ["<unk>", "<s>", "</s>", "<pad>", "<image>", "USER:", "ASSISTANT:", "what", "colour", "?"]
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
  tok.add_special_tokens(["<s>", "</s>", "<pad>"])
  tok.save(str(tmp_path / "tokenizer.json"))
  llava = model_lib.from_hf(str(tmp_path))
  assert llava.mode == "self (LLaVA)" and llava.template.name == "vicuna_v1"
  f = model_lib.from_hf(str(tmp_path), attention="composite", visual_ffn=False)
  assert f.mode == "EE-MLLM-F: composite (EE-MLLM), on self-trained weights" and not f.cfg.mode.runs_visual_ffn
  scheduled = model_lib.from_hf(str(tmp_path), attention="composite", composite_from_layer=1)
  assert scheduled.cfg.layer_schedule == (("self", 1), ("composite", 1))
  assert "from layer 1 (layer 0 self)" in scheduled.mode
  layout = prompts_lib.Encoder(llava.tokenizer, llava.template, llava.cfg.tokens_per_image).prompt("what colour ?")
  assert layout.input_ids[0] == 1 and len(layout.image_starts) == 1  # <s> first, one image
  with pytest.raises(FileNotFoundError, match="has no tokenizer.json"):
    os.remove(tmp_path / "tokenizer.json")
    model_lib.from_hf(str(tmp_path))


# ----------------------------------------------------------------------------- issue 20: nothing lost, nothing mixed


def _cli_config(**changes):
  config = _eval_py_config()
  config.progress_bar, config.batch_size, config.images_per_batch, config.max_new_tokens = False, 8, 4, 3
  config.limit = 4
  for k, v in changes.items():
    config[k] = v
  return config


@pytest.mark.slow
def test_out_holding_another_run_is_refused_naming_the_field_resumed_when_equal_or_overwritten(
    checkpoint, bench, tmp_path):
  from ee_mllm_jax.evaluation import cli, run_header  # pylint: disable=g-import-not-at-top
  out = str(tmp_path / "out")
  run = lambda benchmark="docvqa", overwrite=False, **changes: cli.run(
      _cli_config(**changes), checkpoint=checkpoint, benchmark=benchmark, data=bench.benchmarks[benchmark],
      image_root=bench.root, out=out, overwrite=overwrite)
  run()
  with open(os.path.join(out, run_header.HEADER)) as f:
    header = json.load(f)
  assert header["benchmark"] == "docvqa" and header["model"]["step"] == 1 and header["model"]["fingerprint"]
  with open(bench.benchmarks["docvqa"], "rb") as f:
    assert header["data"]["sha256"] == __import__("hashlib").sha256(f.read()).hexdigest()
  for changes, field in (({"benchmark": "textvqa"}, "benchmark"),
                         ({"attention": "composite"}, "model.mode"),
                         ({"short_answer_prompt": "Answer briefly."}, "prompt.short_answer_prompt")):
    with pytest.raises(run_header.MixedRunError, match=rf"--out {re.escape(out)} holds predictions of another run: "
                       rf"{re.escape(field)} is .* there, .* now; --overwrite starts afresh"):
      run(**changes)
  assert isinstance(run_header.MixedRunError("x"), cli.USER_ERRORS)
  again = json.load(open(os.path.join(out, "summary.json")))
  text, complete = run()  # the same run: resumed
  assert complete and json.load(open(os.path.join(out, "summary.json")))["run"]["resumed"] == 4
  assert again["metrics"] == json.load(open(os.path.join(out, "summary.json")))["metrics"]
  run(benchmark="textvqa", overwrite=True)  # starts afresh: only textvqa's predictions
  with open(bench.benchmarks["textvqa"]) as f:
    textvqa_ids = {str(r["question_id"]) for r in json.load(f)["data"]}
  assert {r["question_id"] for r in _lines(out)} <= textvqa_ids and len(_lines(out)) == 4
  with open(os.path.join(out, run_header.HEADER)) as f:
    assert json.load(f)["benchmark"] == "textvqa"


def test_a_bad_benchmark_file_is_reported_before_the_model_loads(checkpoint, tmp_path, monkeypatch):
  from ee_mllm_jax.evaluation import cli  # pylint: disable=g-import-not-at-top

  def no_model(*args, **kwargs):
    raise AssertionError("the model was loaded before the benchmark file was read")

  monkeypatch.setattr(cli, "load_model", no_model)
  bad = tmp_path / "bad.json"
  bad.write_text(json.dumps({"data": [{"question_id": 1, "image_id": "x", "answers": ["a"]}]}))
  with pytest.raises(benchmarks.BenchmarkFormatError, match="question 1 .*has no 'question' field"):
    cli.run(_cli_config(), checkpoint=checkpoint, benchmark="textvqa", data=str(bad), out=str(tmp_path / "out"))


def _damage_checkpoint(source, target, how):
  import glob  # pylint: disable=g-import-not-at-top
  import shutil  # pylint: disable=g-import-not-at-top
  shutil.copytree(os.path.dirname(source), target)
  step_dir = os.path.join(target, os.path.basename(source), "1")
  data = max(glob.glob(os.path.join(step_dir, "state", "ocdbt.process_0", "d", "*")), key=os.path.getsize)
  if how == "ff":
    with open(data, "r+b") as f:
      f.seek(os.path.getsize(data) // 2)
      f.write(b"\xff" * 64)
  else:
    os.truncate(data, os.path.getsize(data) // 2)
  return step_dir


@pytest.mark.parametrize("how", ["ff", "truncated"])
def test_a_damaged_checkpoint_is_one_line_naming_it(checkpoint, tmp_path, how):
  """64 0xFF bytes (NaN weights) or a truncated chunk: `load_model` and eval.py's loader refuse it
  in one line naming the checkpoint, checked as training checks it (checksums, finite values)."""
  from ee_mllm_jax.evaluation import cli  # pylint: disable=g-import-not-at-top
  step_dir = _damage_checkpoint(checkpoint, str(tmp_path / "run"), how)
  with pytest.raises(loading.DamagedCheckpointError, match=f"^checkpoint {re.escape(step_dir)}") as raised:
    loading.load_model(step_dir)
  assert "\n" not in str(raised.value)
  with pytest.raises(cli.UsageError, match=f"^checkpoint {re.escape(step_dir)}"):
    cli.load_model(_cli_config(), checkpoint=step_dir, hf=None)


def test_eval_py_exits_1_on_a_damaged_checkpoint_and_keeps_library_logs_quiet(checkpoint, bench, tmp_path):
  step_dir = _damage_checkpoint(checkpoint, str(tmp_path / "run"), "ff")
  env = {**os.environ, "XLA_FLAGS": conftest.TEST_XLA_FLAGS, "JAX_PLATFORMS": "cpu"}
  bad = subprocess.run([sys.executable, "eval.py", "--checkpoint", step_dir, "--benchmark", "docvqa", "--data",
                        bench.benchmarks["docvqa"], "--image-root", bench.root, "--out", str(tmp_path / "out")],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert bad.returncode == 1, bad.stderr[-2000:]
  last = bad.stderr.strip().splitlines()[-1]
  assert last.startswith(f"error: checkpoint {step_dir}") and "does not match its checksum" in last, last
  assert not [line for line in bad.stderr.splitlines() if line.startswith("I") and "orbax" in line.lower()], \
      bad.stderr[-2000:]  # Orbax's INFO lines stay out unless --library_logs


def test_benchmark_image_paths_stay_inside_the_image_root(model, tmp_path):
  """`..`, an absolute path and a symlink out of --image-root are an error naming the question
  (skip mode counts them); a symlink that stays inside is read. Training's check, reused."""
  root = tmp_path / "root"
  (root / "documents").mkdir(parents=True)
  Image.new("RGB", (32, 32), (200, 0, 0)).save(root / "documents" / "ok.png")
  Image.new("RGB", (32, 32), (0, 0, 200)).save(tmp_path / "secret.png")
  (root / "documents" / "inside.png").symlink_to(root / "documents" / "ok.png")
  (root / "documents" / "out.png").symlink_to(tmp_path / "secret.png")
  images = {"q-ok": "documents/ok.png", "q-inside": "documents/inside.png", "q-dotdot": "../secret.png",
            "q-absolute": str(tmp_path / "secret.png"), "q-symlink": "documents/out.png"}
  data = tmp_path / "docvqa.json"
  data.write_text(json.dumps({"data": [{"questionId": k, "image": v, "question": "What?", "answers": ["x"]}
                                       for k, v in images.items()]}))
  qs = benchmarks.get("docvqa").read(str(data), str(root))
  for bad in ("q-dotdot", "q-absolute", "q-symlink"):
    with pytest.raises(runner_lib.EvalError, match=f"question {bad}: image .* outside the image directory"):
      _runner(model).pixels(next(q for q in qs if q.qid == bad))
  summary = runner_lib.evaluate(_runner(model, on_bad_image="skip"), "docvqa", qs, str(tmp_path / "out"))
  assert summary["metrics"]["skipped"] == 3 and summary["metrics"]["questions"] == 2
  skipped = {r["question_id"] for r in _lines(str(tmp_path / "out")) if "skipped" in r}
  assert skipped == {"q-dotdot", "q-absolute", "q-symlink"}


def test_a_thin_image_bomb_is_refused_before_decoding_naming_the_question(model, tmp_path, monkeypatch):
  from ee_mllm_jax.data import images as image_lib  # pylint: disable=g-import-not-at-top
  root = tmp_path / "root"
  root.mkdir()
  Image.new("RGB", (20000, 1), (255, 255, 255)).save(root / "thin.png", optimize=True)
  assert os.path.getsize(root / "thin.png") < 200
  Image.new("RGB", (32, 32), (200, 0, 0)).save(root / "ok.png")
  data = tmp_path / "docvqa.json"
  data.write_text(json.dumps({"data": [{"questionId": k, "image": v, "question": "What?", "answers": ["x"]}
                                       for k, v in (("q-thin", "thin.png"), ("q-ok", "ok.png"))]}))
  qs = benchmarks.get("docvqa").read(str(data), str(root))
  padded = []
  real_pad = image_lib.expand_to_square
  monkeypatch.setattr(image_lib, "expand_to_square", lambda img, fill: padded.append(img.size) or real_pad(img, fill))
  with pytest.raises(runner_lib.EvalError, match=r"question q-thin: image is 20000 x 1 pixels, beyond the bounds"):
    runner_lib.evaluate(_runner(model), "docvqa", qs, str(tmp_path / "raise"))
  summary = runner_lib.evaluate(_runner(model, on_bad_image="skip"), "docvqa", qs, str(tmp_path / "skip"))
  assert summary["metrics"]["skipped"] == 1 and summary["metrics"]["questions"] == 1
  assert padded == [(32, 32)]  # only ok.png: the thin image was never decoded nor padded


@pytest.mark.parametrize("kind", ["image marker", "too long"])
def test_a_question_that_cannot_be_asked_is_named_or_counted(model, bench, tmp_path, kind):
  qs = benchmarks.get("docvqa").read(bench.benchmarks["docvqa"], bench.root)[:4]
  text = "What is <image> here?" if kind == "image marker" else " ".join(["colour"] * 400)
  qs[1] = dataclasses.replace(qs[1], question=text)
  message = "its text contains '<image>'" if kind == "image marker" else "its prompt has"
  with pytest.raises(runner_lib.EvalError, match=f"question {qs[1].qid}: {re.escape(message)}"):
    runner_lib.evaluate(_runner(model), "docvqa", qs, str(tmp_path / "raise"))
  summary = runner_lib.evaluate(_runner(model, on_bad_image="skip"), "docvqa", qs, str(tmp_path / "skip"))
  assert summary["metrics"]["skipped"] == 1 and summary["metrics"]["questions"] == 3
  assert [r["question_id"] for r in _lines(str(tmp_path / "skip")) if "skipped" in r] == [qs[1].qid]
