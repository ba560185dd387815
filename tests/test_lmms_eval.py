"""vlm as an lmms-eval model, on a task of our own (a local YAML over a local JSON-lines dataset), offline.

Skipped when lmms-eval is not installed (``pip install -e ".[lmms]" -c constraints.txt``; not a dependency of vlm),
except under ``VLM_REQUIRE_LMMS_EVAL=1`` (CI's lmms-eval step), where a failed import is an error."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

from tests.conftest import chat_model

if os.environ.get("VLM_REQUIRE_LMMS_EVAL"):
    import lmms_eval
else:
    lmms_eval = pytest.importorskip("lmms_eval")

UTILS = '''
from PIL import Image


def doc_to_visual(doc):
    return [Image.open(doc["image"]).convert("RGB")]


def doc_to_text(doc):
    return doc["question"]


def process_results(doc, results):
    return {"acc": float(results[0].strip().lower() == doc["answer"].lower())}
'''

TASK = '''
task: vlm_local_vqa
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: 5
  until: ["zzz"]
process_results: !function utils.process_results
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
'''


def test_lmms_eval_runs_vlm_on_a_local_task(tmp_path):
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    import vlm
    from vlm.eval.lmms import register

    model_dir = tmp_path / "model"
    chat_model().save_pretrained(model_dir)
    model = vlm.load(model_dir)
    docs = []
    for i in range(3):
        path = tmp_path / f"{i}.png"
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(path)
        question = f"What is in picture {i}?"
        reply, _ = model.chat(str(path), question, max_new_tokens=5, stop=["zzz"])
        # the first two are answered as vlm answers them, the last one is not
        docs.append({"image": str(path), "question": question, "answer": reply if i < 2 else reply + "!?"})
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps(d) for d in docs))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "utils.py").write_text(UTILS)
    (tasks / "vlm_local_vqa.yaml").write_text(TASK.format(data=data))

    register()
    out = simple_evaluate(model="vlm", model_args=f"pretrained={model_dir},batch_size=2", tasks=["vlm_local_vqa"],
                          task_manager=TaskManager(include_path=str(tasks)), log_samples=True)
    acc = out["results"]["vlm_local_vqa"]["acc,none"]
    assert acc == pytest.approx(2 / 3)
    answers = [s["resps"][0][0] if isinstance(s["resps"][0], list) else s["resps"][0]
               for s in out["samples"]["vlm_local_vqa"]]
    assert answers[:2] == [docs[0]["answer"], docs[1]["answer"]]
