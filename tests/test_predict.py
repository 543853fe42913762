"""eval.py --predict: every question of a question file (LLaVA JSON or JSON Lines) answered once, as
the single-question path answers it; resume after SIGTERM, sampled runs reproducible per seed and
compiled once, bad files named. The tiny checkpoint and helpers are test_eval.py's."""

import json
import os
import re
import signal
import subprocess
import sys

import pytest

from ee_mllm_jax.evaluation import benchmarks, cli, questions as questions_lib, run_header, runner as runner_lib
import conftest
from test_eval import ROOT, _cli_config, _lines, _runner, bench, checkpoint, model  # noqa: F401  (fixtures)

generate_lib = sys.modules["ee_mllm_jax.generate"]  # the package's `generate` attribute is the function


def _val_questions(bench, count=12):  # noqa: F811
  """(id, image, question) of the synthetic val set: `count // 2` images, two questions about each."""
  with open(bench.val_file) as f:
    val = json.load(f)[:count // 2]
  return [(7 * i + k, r["image"], q) for i, r in enumerate(val)
          for k, q in enumerate((r["question"], f"Is there a {r['answer']} in the picture?"))]


def _write_jsonl(path, rows):
  """As LLaVA's model_vqa.py question files: question_id (an int), image, text."""
  with open(path, "w") as f:
    f.writelines(json.dumps({"question_id": qid, "image": image, "text": text}) + "\n" for qid, image, text in rows)


def _write_llava(path, rows):
  """As LLaVA's conversation files: id (a string), image (a list here), the question as the first
  human turn with LLaVA's "<image>" marker, then an answer and a second turn (not asked)."""
  records = [{"id": f"q{qid}", "image": [image], "conversations": [
      {"from": "human", "value": f"<image>\n{text}"}, {"from": "gpt", "value": "an answer"},
      {"from": "human", "value": "And a second question?"}]} for qid, image, text in rows]
  with open(path, "w") as f:
    json.dump(records, f)


def _predict(checkpoint, bench, questions, out, **changes):  # noqa: F811
  return cli.run(_cli_config(limit=0, **changes), checkpoint=checkpoint, predict=questions, image_root=bench.root,
                 out=str(out))


def test_every_question_is_answered_once_in_both_formats_as_the_single_question_path_answers_it(
    checkpoint, bench, model, tmp_path):  # noqa: F811
  rows = _val_questions(bench)
  _write_jsonl(tmp_path / "q.jsonl", rows)
  _write_llava(tmp_path / "q.json", rows)
  text, complete = _predict(checkpoint, bench, str(tmp_path / "q.jsonl"), tmp_path / "jsonl")
  assert complete and "questions 12  skipped 0  (12 predicted now" in text
  got = {r["question_id"]: r for r in _lines(str(tmp_path / "jsonl"))}
  assert len(_lines(str(tmp_path / "jsonl"))) == len(got) == len(rows)  # one line each
  assert set(got) == {str(qid) for qid, _, _ in rows}
  for qid, image, question in rows:
    assert (got[str(qid)]["question"], got[str(qid)]["image"]) == (question, image)
    assert got[str(qid)]["prompt"].startswith("<|im_start|>user\n<image>\n" + question + "<|im_end|>")
  one = _runner(model, batch_size=1)  # eval.py --image --question's path (`cli.ask`), greedy
  asked = {str(qid): cli.ask(one, os.path.join(bench.root, image), question) for qid, image, question in rows}
  assert {k: r["output"] for k, r in got.items()} == asked
  assert len(set(asked.values())) > 1  # the answers depend on the question (a random model: any text)

  _predict(checkpoint, bench, str(tmp_path / "q.json"), tmp_path / "llava")
  llava = {r["question_id"]: r for r in _lines(str(tmp_path / "llava"))}
  assert {k: r["output"] for k, r in llava.items()} == {f"q{k}": r["output"] for k, r in got.items()}
  assert "questions" not in benchmarks.names()  # not a scoring benchmark
  with open(tmp_path / "jsonl" / "metrics.json") as f:
    assert json.load(f) == {"questions": 12, "skipped": 0}  # no metric


def test_sigterm_then_a_rerun_finishes_without_duplicates_or_loss_and_other_settings_are_refused(
    checkpoint, bench, tmp_path, monkeypatch):  # noqa: F811
  """Sampled (temperature 0.7, top-p 0.9): the resumed run's answers are those of a run that was
  not stopped, since a batch's key comes from the seed and its first question."""
  rows = _val_questions(bench)
  _write_jsonl(tmp_path / "q.jsonl", rows)
  sampled = dict(temperature=0.7, top_p=0.9, seed=3)
  _predict(checkpoint, bench, str(tmp_path / "q.jsonl"), tmp_path / "whole", **sampled)
  predict = runner_lib.Runner.predict

  def predict_then_sigterm(self, benchmark, items, sink, stop):
    def sink_and_signal(records):
      sink(records)
      os.kill(os.getpid(), signal.SIGTERM)  # as a preemption would, during the run
    return predict(self, benchmark, items, sink_and_signal, stop)

  monkeypatch.setattr(runner_lib.Runner, "predict", predict_then_sigterm)
  text, complete = _predict(checkpoint, bench, str(tmp_path / "q.jsonl"), tmp_path / "out", **sampled)
  assert not complete and "stopped by SIGTERM" in text
  first = _lines(str(tmp_path / "out"))
  assert 0 < len(first) < len(rows)  # one whole batch (8 questions about 4 images)
  monkeypatch.setattr(runner_lib.Runner, "predict", predict)
  text, complete = _predict(checkpoint, bench, str(tmp_path / "q.jsonl"), tmp_path / "out", **sampled)
  assert complete and f"{len(rows) - len(first)} predicted now, {len(first)} resumed" in text
  lines = _lines(str(tmp_path / "out"))
  assert sorted(r["question_id"] for r in lines) == sorted(str(qid) for qid, _, _ in rows)  # each once
  whole = {r["question_id"]: r["output"] for r in _lines(str(tmp_path / "whole"))}
  assert {r["question_id"]: r["output"] for r in lines} == whole
  with open(tmp_path / "out" / run_header.HEADER) as f:
    assert json.load(f)["sampling"] == {"temperature": 0.7, "top_p": 0.9, "seed": 3}
  for changes, field in (({**sampled, "seed": 4}, "sampling.seed"), ({}, "sampling.temperature"),
                         ({**sampled, "max_new_tokens": 5}, "prompt.max_new_tokens")):
    with pytest.raises(run_header.MixedRunError, match=f"holds predictions of another run: {field} is "):
      _predict(checkpoint, bench, str(tmp_path / "q.jsonl"), tmp_path / "out", **changes)


def test_several_sampling_settings_compile_the_decode_loop_once_and_a_seed_reproduces(model, bench, tmp_path):  # noqa: F811
  rows = _val_questions(bench, count=6)
  _write_jsonl(tmp_path / "q.jsonl", rows)
  qs = questions_lib.QuestionFile().read(str(tmp_path / "q.jsonl"), bench.root)

  def outputs(name, **sampling):
    runner_lib.evaluate(_runner(model, **sampling), questions_lib.QuestionFile(), qs, str(tmp_path / name))
    return [r["output"] for r in sorted(_lines(str(tmp_path / name)), key=lambda r: r["question_id"])]

  a = outputs("a", temperature=0.7, top_p=0.9, seed=0)
  compiled = generate_lib._decode._cache_size()  # pylint: disable=protected-access
  b = outputs("b", temperature=1.3, top_p=0.5, seed=0)
  c = outputs("c", temperature=0.7, top_p=0.9, seed=1)
  again = outputs("again", temperature=0.7, top_p=0.9, seed=0)
  assert generate_lib._decode._cache_size() == compiled  # pylint: disable=protected-access
  assert again == a and c != a and len(b) == len(a)  # a seed reproduces its answers; another draws others


@pytest.mark.parametrize("name, content, message", [
    ("dup.jsonl", '{"question_id": 1, "image": "a.png", "text": "A?"}\n\n{"question_id": 1, "image": "b.png", '
     '"text": "B?"}\n', r"line 3: question id '1' occurs more than once \(first at line 1\)"),
    ("torn.jsonl", '{"question_id": 1, "image": "a.png", "text": "A?"}\n{"question_id": 2, "ima\n',
     r"line 2: not valid JSON \(Unterminated string"),
    ("noimage.jsonl", '{"question_id": 1, "text": "A?"}\n', r"line 1: has no 'image' or 'images' field"),
    ("two.jsonl", '{"id": "x", "images": ["a.png", "b.png"], "question": "A?"}\n',
     r"line 1: has 2 images; each question is about one image"),
    ("noid.json", '[{"id": "x", "image": "a.png", "conversations": [{"from": "human", "value": "<image>\\nA?"}]},'
     '{"image": "a.png", "text": "B?"}]', r"record 1: has no 'question_id' or 'id' field"),
    ("nohuman.json", '[{"id": "x", "image": "a.png", "conversations": [{"from": "gpt", "value": "A"}]}]',
     r"record 0: its 'conversations' have no human turn"),
    ("empty.json", '[{"id": 3, "image": "a.png", "conversations": [{"from": "human", "value": "<image>\\n "}]}]',
     r"record 0: its question is empty"),
    ("none.jsonl", "\n", r"no questions"),
], ids=lambda v: v if isinstance(v, str) and v.endswith(("json", "jsonl")) else "")
def test_a_bad_question_file_is_an_error_naming_the_file_and_the_record_before_the_model_loads(
    tmp_path, monkeypatch, name, content, message):
  def no_model(*args, **kwargs):
    raise AssertionError("the model was loaded before the question file was read")

  monkeypatch.setattr(cli, "load_model", no_model)
  path = tmp_path / name
  path.write_text(content)
  with pytest.raises(benchmarks.BenchmarkFormatError, match=f"^{re.escape(str(path))}: {message}") as e:
    cli.run(_cli_config(), checkpoint="unused", predict=str(path), out=str(tmp_path / "out"))
  assert isinstance(e.value, cli.USER_ERRORS)  # eval.py: one line, exit 1
  with pytest.raises(cli.UsageError, match="--predict answers a question file; leave out --benchmark"):
    cli.run(_cli_config(), checkpoint="unused", predict=str(path), benchmark="docvqa", data=str(path))


@pytest.mark.slow  # eval.py in a subprocess
def test_eval_py_predict_from_the_command_line(checkpoint, bench, tmp_path):  # noqa: F811
  rows = _val_questions(bench, count=4)
  _write_jsonl(tmp_path / "q.jsonl", rows)
  (tmp_path / "bad.jsonl").write_text('{"question_id": 1, "image": "a.png"}\n')
  env = {**os.environ, "XLA_FLAGS": conftest.TEST_XLA_FLAGS, "JAX_PLATFORMS": "cpu"}  # one device, fast compiles
  command = lambda questions: [sys.executable, "eval.py", "--checkpoint", checkpoint, "--predict", questions,
                               "--image-root", bench.root, "--out", str(tmp_path / "out"), "--config.max_new_tokens=3",
                               "--config.temperature=0.5", "--config.progress_bar=false"]
  ok = subprocess.run(command(str(tmp_path / "q.jsonl")), cwd=ROOT, env=env, capture_output=True, text=True,
                      timeout=300)
  assert ok.returncode == 0 and "questions 4  skipped 0" in ok.stdout, ok.stderr[-2000:]
  assert sorted(r["question_id"] for r in _lines(str(tmp_path / "out"))) == sorted(str(q) for q, _, _ in rows)
  bad = subprocess.run(command(str(tmp_path / "bad.jsonl")), cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
  assert bad.returncode == 1 and bad.stderr.strip().splitlines()[-1] == (
      f"error: {tmp_path / 'bad.jsonl'}: line 1: has no 'question' or 'text' field")
