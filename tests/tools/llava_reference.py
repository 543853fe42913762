"""Regenerates tests/data/llava_parity.json: LLaVA's own tokenisation and labels of the parity cases.

Not imported by the test suite. It runs LLaVA's `preprocess_multimodal`, `preprocess_v1` and
`preprocess_plain` (`llava/train/train.py` of the `llava-torch==1.2.2.post1` wheel) on the
tokenizer of tests/llama_tokenizer.py, in an environment of its own:

    python3 -m venv /tmp/llava_ref
    /tmp/llava_ref/bin/pip install transformers==4.37.2 tokenizers==0.15.1 torch==2.13.0 pillow
    pip download --no-deps -d /tmp/wheels llava-torch==1.2.2.post1
    (cd /tmp/wheels && mkdir llava && cd llava && unzip ../llava_torch-1.2.2.post1-py3-none-any.whl)
    /tmp/llava_ref/bin/python tests/tools/llava_reference.py /tmp/wheels/llava tests/data/llava_parity.json

LLaVA's model classes and trainer are stubbed (only the preprocessing functions run). The
tokenizer is handed to LLaVA as a `LlamaTokenizerFast` over the same `tokenizer.json` the test
builds, with `legacy` set as the tokenizer behaves and `<unk>` as padding (LLaVA's v1 setup).

Each case names what LLaVA is given: `multimodal` runs `preprocess_multimodal` first (LLaVA
does for every record with an image; ours does for single-image records unless
`image_in_place`); the test encodes the same conversation with the options in `ours`.
Messages holding "</s>" are not cases: LLaVA's tokenizer makes the typed string a control token
(and its mask check then drops the sample), ours encodes it as text on purpose.
"""

import copy
import importlib.util
import json
import os
import sys
import tempfile
import types

HERE = os.path.dirname(os.path.abspath(__file__))

SYSTEM = "Be brief. You are a helpful assistant."

# (name, template, conversations, system, multimodal, ours)
CASES = [
    ("text_one_round", "v1", [("human", "What colour is the cat?"), ("gpt", "The cat is red.")], None, False, {}),
    ("digit_first_answer", "v1", [("human", "How many dogs are there?"), ("gpt", "2")], None, False, {}),
    ("number_first_answer", "v1", [("human", "How many?"), ("gpt", "25 dogs")], None, False, {}),
    ("cjk_first_answer", "v1", [("human", "Wie heißt das?"), ("gpt", "東京 is Tokyo")], None, False, {}),
    ("emoji_first_answer", "v1", [("human", "How is it?"), ("gpt", "😀 good")], None, False, {}),
    ("unicode_answer", "v1", [("human", "Grüße?"), ("gpt", "café, naïve ✓")], None, False, {}),
    ("multi_turn", "v1", [("human", "What colour is the cat?"), ("gpt", "red"), ("human", "And now?"),
                          ("gpt", "3"), ("human", "Which option? A. red B. blue"), ("gpt", "B")], None, False, {}),
    ("image_first", "v1", [("human", "<image>\nWhat is written on the sign?"), ("gpt", "STOP")], None, True, {}),
    ("image_last", "v1", [("human", "What is written on the sign?\n<image>"), ("gpt", "1,000")], None, True, {}),
    ("image_mid_text", "v1", [("human", "What is <image> written here?"), ("gpt", "It is blue.")], None, True, {}),
    ("image_mid_text_in_place", "v1", [("human", "What is <image> written here?"), ("gpt", "It is blue.")], None,
     False, {"image_in_place": True}),
    ("image_second_turn", "v1", [("human", "Hi?"), ("gpt", "yes"), ("human", "Now this: <image>"), ("gpt", "2 dogs")],
     None, True, {}),
    ("image_multi_turn_digits", "v1", [("human", "<image>\nHow many?"), ("gpt", "3"), ("human", "And now?"),
                                       ("gpt", "10"), ("human", "Which?"), ("gpt", "東京")], None, True, {}),
    ("two_images_in_order", "v1", [("human", "<image>\nCompare with <image> please."), ("gpt", "same")], None, False,
     {}),
    ("system_prompt", "v1", [("human", "<image>\nWhat colour?"), ("gpt", "blue"), ("human", "Sure?"), ("gpt", "4")],
     SYSTEM, True, {}),
    ("plain_caption", "plain", [("human", "<image>\nDescribe the image."), ("gpt", "A small house near a river.")],
     None, True, {}),
    ("plain_digit_caption", "plain", [("human", "<image>"), ("gpt", "3 dogs")], None, True, {}),
]


def _load_llava(src: str):
  """llava.train.train with its model imports stubbed."""
  sys.path.insert(0, src)
  stubs = {"llava.model": types.ModuleType("llava.model"),
           "llava.train.llava_trainer": types.ModuleType("llava.train.llava_trainer")}
  stubs["llava.model"].__all__ = []
  stubs["llava.model"].LlavaLlamaForCausalLM = object
  stubs["llava.train.llava_trainer"].LLaVATrainer = object
  sys.modules.update(stubs)
  from llava import conversation  # pylint: disable=g-import-not-at-top
  from llava.train import train  # pylint: disable=g-import-not-at-top
  return train, conversation


def _tokenizer(legacy: bool, workdir: str):
  import transformers  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location("llama_tokenizer", os.path.join(HERE, "..", "llama_tokenizer.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  path = os.path.join(workdir, f"tokenizer_{legacy}.json")
  module.build(legacy).save(path)
  tok = transformers.LlamaTokenizerFast(tokenizer_file=path, legacy=legacy, unk_token="<unk>", bos_token="<s>",
                                        eos_token="</s>", add_bos_token=True, add_eos_token=False,
                                        model_max_length=4096)
  tok.pad_token = tok.unk_token  # LLaVA's train(): v1 pads with <unk>
  tok.legacy = legacy  # read by preprocess_v1; LLaVA's slow LlamaTokenizer has it, the fast one of 4.37 not
  return tok


def run_case(train, conversation, tok, case):
  name, template, turns, system, multimodal, _ = case
  sources = [[{"from": r, "value": v} for r, v in turns]]
  sources = copy.deepcopy(sources)
  has_image = any("<image>" in v for _, v in turns)
  if template == "plain":
    conversation.default_conversation = conversation.conv_templates["plain"]
  else:
    conv = conversation.conv_templates["vicuna_v1"].copy()
    if system is not None:
      conv.system = system
    conversation.default_conversation = conv
  train.conversation_lib.default_conversation = conversation.default_conversation
  if multimodal:
    args = types.SimpleNamespace(is_multimodal=True, mm_use_im_start_end=False)
    sources = train.preprocess_multimodal(sources, args)
  out = train.preprocess(sources, tok, has_image=has_image)
  ids, labels = out["input_ids"][0], out["labels"][0]
  return [int(i) for i in ids], [int(i) for i in labels]


def main(src: str, out: str):
  train, conversation = _load_llava(src)
  workdir = tempfile.mkdtemp()
  result = {"source": "llava-torch==1.2.2.post1 llava/train/train.py (preprocess_multimodal, preprocess_v1, "
                      "preprocess_plain), transformers 4.37.2, tokenizers 0.15.1", "cases": []}
  for legacy in (True, False):
    tok = _tokenizer(legacy, workdir)
    for case in CASES:
      ids, labels = run_case(train, conversation, tok, case)
      name, template, turns, system, multimodal, ours = case
      result["cases"].append(dict(name=name, legacy=legacy, template=template, turns=turns, system=system,
                                  llava_multimodal=multimodal, ours=ours, input_ids=ids, labels=labels,
                                  tokens=[tok.convert_ids_to_tokens(i) if i >= 0 else str(i) for i in ids]))
  with open(out, "w", encoding="utf-8") as f:
    f.write("{\"source\": " + json.dumps(result["source"]) + ", \"cases\": [\n")
    f.write(",\n".join(json.dumps(c, ensure_ascii=False) for c in result["cases"]))
    f.write("\n]}\n")


if __name__ == "__main__":
  main(sys.argv[1], sys.argv[2])
