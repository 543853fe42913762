"""lmms-eval 0.7.3's own metric code, run offline, and the pinned results of the parity cases.

    pip download --no-deps -d /tmp/wheels lmms-eval==0.7.3
    (cd /tmp/wheels && mkdir lmms && cd lmms && unzip ../lmms_eval-0.7.3-py3-none-any.whl)
    python tests/tools/lmms_eval_reference.py /tmp/wheels/lmms tests/data/lmms_eval_parity.json

`load(src)` imports, from the unzipped wheel, the files that score each benchmark (heavy
imports stubbed: pandas, requests, loguru, sacrebleu, the metric registry; none is reached by
the functions used) and returns one scorer per benchmark, called the way lmms-eval calls them:

  textvqa  tasks/textvqa/utils.py textvqa_process_results (EvalAIAnswerProcessor, VQA accuracy)
  docvqa   api/metrics.py anls
  mmbench  tasks/mmbench/mmbench_evals.py MMBench_Evaluator.can_infer on the stripped output
           (False where lmms-eval would ask its GPT judge)
  seed     tasks/seedbench/utils.py seed_process_result + seed_aggregation_result (one row)

`main` scores tests/test_eval_metrics_parity.py's CASES and writes the JSON that test pins.
tests/test_eval_metrics_parity.py also compares directly when LMMS_EVAL_SRC names the unzipped
wheel. Nothing here is imported by the package.
"""

import importlib.util
import json
import os
import sys
import types

HERE = os.path.dirname(os.path.abspath(__file__))


def _module(name: str, path: str):
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[name] = module
  spec.loader.exec_module(module)
  return module


def load(src: str) -> dict:
  root = os.path.join(src, "lmms_eval")
  stubs = {}
  for name in ("lmms_eval", "lmms_eval.api", "lmms_eval.tasks", "lmms_eval.tasks._task_utils"):
    package = types.ModuleType(name)
    package.__path__ = [os.path.join(root, *name.split(".")[1:])]
    stubs[name] = package
  registry = types.ModuleType("lmms_eval.api.registry")
  registry.register_metric = lambda **kw: (lambda f: f)
  registry.register_aggregation = lambda *a, **kw: (lambda f: f)
  loguru = types.ModuleType("loguru")
  loguru.logger = types.SimpleNamespace(info=lambda *a, **k: None, warning=lambda *a, **k: None,
                                        debug=lambda *a, **k: None, error=lambda *a, **k: None)
  stubs.update({"lmms_eval.api.registry": registry, "loguru": loguru, "sacrebleu": types.ModuleType("sacrebleu"),
                "requests": types.ModuleType("requests"), "pandas": types.ModuleType("pandas")})
  saved = {k: sys.modules.get(k) for k in stubs}
  sys.modules.update(stubs)
  try:
    _module("lmms_eval.tasks._task_utils.file_utils", os.path.join(root, "tasks/_task_utils/file_utils.py"))
    _module("lmms_eval.tasks._task_utils.vqa_eval_metric", os.path.join(root, "tasks/_task_utils/vqa_eval_metric.py"))
    textvqa = _module("lmms_eval_textvqa_utils", os.path.join(root, "tasks/textvqa/utils.py"))
    metrics = _module("lmms_eval.api.metrics", os.path.join(root, "api/metrics.py"))
    mmbench = _module("lmms_eval_mmbench_evals", os.path.join(root, "tasks/mmbench/mmbench_evals.py"))
    seed = _module("lmms_eval_seedbench_utils", os.path.join(root, "tasks/seedbench/utils.py"))
  finally:
    for k, v in saved.items():
      if v is None:
        sys.modules.pop(k, None)
      else:
        sys.modules[k] = v

  def textvqa_score(prediction, answers):
    doc = {"answers": list(answers), "question_id": 0}
    return textvqa.textvqa_process_results(doc, [prediction])["exact_match"]

  def anls(prediction, answers):
    return metrics.anls(list(answers), [prediction])["anls"]

  def mmbench_option(prediction, options):
    got = mmbench.MMBench_Evaluator().can_infer(prediction.strip(), dict(options))
    return got or None

  def seed_correct(prediction, answer):
    row = seed.seed_process_result({"answer": answer, "data_type": "t", "question_id": 0}, [prediction])["seed_all"]
    return bool(seed.seed_aggregation_result([row]))

  return dict(textvqa=textvqa_score, docvqa=anls, mmbench=mmbench_option, seedbench=seed_correct)


def main(src: str, out: str):
  sys.path.insert(0, os.path.join(HERE, ".."))
  spec = importlib.util.spec_from_file_location("parity_cases", os.path.join(HERE, "..", "metric_parity_cases.py"))
  cases = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(cases)
  scorers = load(src)
  rows = []
  for benchmark, prediction, reference in cases.CASES:
    rows.append(dict(benchmark=benchmark, prediction=prediction, reference=reference,
                     lmms_eval=scorers[benchmark](prediction, reference)))
  with open(out, "w", encoding="utf-8") as f:
    f.write('{"source": "lmms-eval==0.7.3 (tasks/textvqa/utils.py, api/metrics.py anls, tasks/mmbench/mmbench_evals.py '
            'can_infer, tasks/seedbench/utils.py)", "cases": [\n')
    f.write(",\n".join(json.dumps(r, ensure_ascii=False) for r in rows))
    f.write("\n]}\n")


if __name__ == "__main__":
  main(sys.argv[1], sys.argv[2])
