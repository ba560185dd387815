"""The ``dpo`` stage end to end (recipe ``dpo_micro``, small): exact resume with a LoRA policy and the adapters
reference (LoRA dropout draws randomness), a precomputed reference and periodic held-out preference metrics; DDP with
2 processes (gloo) matches one process; the exported model loads and holds no reference or objective weights."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import vlm
from vlm.train import ConfigError, compose, run

from test_dpo import write_pairs
from test_train_checkpoint import crash_at
from test_train_distributed import losses, torchrun

SMALL = ["recipe=dpo_micro", "data.dpo.size=16", "data.dpo.heldout=4", "stage.dpo.global_batch_size=4",
         "stage.dpo.micro_batch_size=2", "stage.dpo.max_steps=4", "data.eval.size=2", "eval.max_new_tokens=2",
         "trainer.threads=1"]


def metric_rows(run_dir, key):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r.get("stage") == "dpo" and key in r]


@pytest.mark.slow
@pytest.mark.parametrize("policy, reference", [("lora", "adapters"), ("full", "precomputed")])
def test_dpo_stage_resumes_bit_identically(policy, reference, tmp_path, monkeypatch):
    ov = SMALL + [f"stage.dpo.policy.llm={policy}", f"stage.dpo.objective.reference={reference}",
                  "stage.dpo.save_every=2", "stage.dpo.eval_every=2", "eval.periodic_limit=2"]
    full = run(compose("dpo_micro", ov + [f"output_dir={tmp_path / 'full'}"]))
    crash_at(monkeypatch, "dpo", 4)  # steps 1-3 done, checkpoint at step 2
    with pytest.raises(KeyboardInterrupt):
        run(compose("dpo_micro", ov + [f"output_dir={tmp_path / 'cut'}"]))
    monkeypatch.undo()
    resumed = run(compose("dpo_micro", ov + [f"output_dir={tmp_path / 'cut'}", "resume=auto"]))
    assert resumed.stages[0].resumed_from.endswith("step_000002")
    assert resumed.losses["dpo"] == full.losses["dpo"]  # bit-identical
    a, b = load_file(str(tmp_path / "full" / "final" / "model.safetensors")), \
        load_file(str(tmp_path / "cut" / "final" / "model.safetensors"))
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    # the objective's metrics per step, held-out preference metrics in the periodic and final evaluation
    steps = metric_rows(tmp_path / "full", "loss")
    assert {"rewards_chosen", "rewards_rejected", "reward_margin", "preference_accuracy"} <= set(steps[0]["objective"])
    evals = metric_rows(tmp_path / "full", "eval")
    assert len(evals) == 2 and all(0 <= e["eval"]["pairs/preference_accuracy"] <= 1 for e in evals)
    # the export: a plain VLM (LoRA merged), nothing of the objective or the reference
    model = vlm.load(tmp_path / "full" / "final")
    assert not any("objective" in k or "lora_" in k for k in model.state_dict())


@pytest.mark.slow
@pytest.mark.parametrize("strategy, extra", [
    ("ddp", []), ("fsdp", []),
    ("fsdp", ["stage.dpo.policy.llm=lora", "stage.dpo.policy.connector=frozen", "stage.dpo.objective.reference=adapters",
              "stage.dpo.lora.dropout=0.0"]),  # LoRA dropout draws per process: another stream with 2 processes
], ids=["ddp", "fsdp-copy", "fsdp-lora-adapters"])
def test_dpo_under_two_processes_matches_one_process(strategy, extra, tmp_path):
    """DDP and FSDP2 (each decoder layer and the root sharded; the ``copy`` reference a full copy per process, the
    ``adapters`` reference the sharded policy with its adapters off): 2 processes (gloo) log the losses of one, the
    held-out pairs are scored and the export loads."""
    args = SMALL + ["stage.dpo.max_steps=3"] + extra
    run(compose(overrides=args + [f"output_dir={tmp_path / 'one'}"]))
    proc = torchrun(args + [f"trainer.strategy={strategy}", f"output_dir={tmp_path / strategy}"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    ref, got = losses(tmp_path / "one", "dpo"), losses(tmp_path / strategy, "dpo")
    assert len(got) == len(ref) == 3
    assert max(abs(a - b) for a, b in zip(ref, got)) < 1e-5, (ref, got)
    one, two = (json.loads((tmp_path / d / "eval.json").read_text())["metrics"] for d in ("one", strategy))
    assert abs(one["pairs/preference_accuracy"] - two["pairs/preference_accuracy"]) < 1e-6
    assert abs(one["pairs/reward_margin"] - two["pairs/reward_margin"]) < 1e-4
    a, b = vlm.load(tmp_path / "one" / "final").state_dict(), vlm.load(tmp_path / strategy / "final").state_dict()
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-4, rtol=1e-4) for k in a)


def test_dpo_on_sft_data_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="needs preference pairs"):
        run(compose("dpo_micro", SMALL + ["stage.dpo.data=sft", "stage.dpo.max_steps=1", "eval.enabled=false",
                                          f"output_dir={tmp_path}"]))


def test_unknown_reference_is_a_config_error():
    with pytest.raises((ConfigError, ValueError), match="reference"):
        run(compose("dpo_micro", SMALL + ["stage.dpo.objective.reference=frozen", "eval.enabled=false"]))


def test_dpo_trains_on_a_users_file(tmp_path):
    """``stage.dpo.data=pairs data.pairs.train=FILE``: the user's pairs (14 records, 2 held out), the bad ones (6 of
    the 14) counted by reason in the result."""
    path = write_pairs(tmp_path)
    res = run(compose("dpo_micro", SMALL + ["stage.dpo.data=pairs", f"data.pairs.train={path}", "data.pairs.heldout=2",
                                            "+data.pairs.max_bad_fraction=1.0", "stage.dpo.max_steps=3",
                                            "eval.enabled=false", f"output_dir={tmp_path / 'run'}"]))
    assert res.stages[0].steps == 3  # one epoch of the 12 training records: every one is read
    skipped = res.stages[0].skipped_samples
    assert skipped["num_samples"] == 12 and skipped["total"] >= 4
    assert set(skipped["by_reason"]) <= {"same_answers", "no_answer", "too_long", "mismatched_images",
                                         "mismatched_prompt", "missing_image"}


def test_too_many_bad_pairs_stop_the_run_naming_the_override(tmp_path):
    """Bad pairs found in a DataLoader worker over ``max_bad_fraction``: the command exits 2 (it hung at exit, its
    other workers waiting) and the message names the override that exists (``+data.pairs.max_bad_fraction``)."""
    path = write_pairs(tmp_path)  # 6 of its 14 records are bad
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-m", "vlm.train", *SMALL, "stage.dpo.data=pairs", f"data.pairs.train={path}",
                           "data.pairs.heldout=2", "stage.dpo.max_steps=3", "eval.enabled=false",
                           f"output_dir={tmp_path / 'run'}"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])})
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "+data.pairs.max_bad_fraction=FRACTION" in proc.stderr, proc.stderr[-3000:]


# ------------------------------------------------------------------------ init_from: the checkpoint's own tokenizer
TINY_SMALL = ["data.dpo.size=8", "data.dpo.heldout=8", "stage.dpo.global_batch_size=4", "stage.dpo.micro_batch_size=4",
              "stage.dpo.max_steps=2", "data.eval.size=2", "eval.max_new_tokens=2", "trainer.threads=1",
              "trainer.num_workers=0"]


@pytest.fixture(scope="module")
def small_tiny_model(tmp_path_factory):
    """A ``tiny`` model (random weights) saved with a byte-BPE tokenizer trained on a small corpus, as a short run of
    the default job would: its vocabulary is not the one ``recipe=dpo_tiny`` trains at its own sizes."""
    from vlm.train.build import build_model, build_tokenizer

    d = tmp_path_factory.mktemp("small_tiny")
    cfg = compose("tiny", ["+tokenizer.corpus_samples=40", "tokenizer.vocab_size=300"])
    tok = build_tokenizer(cfg, ["plain", "chatml"])
    build_model(cfg, tok).save_pretrained(d / "run" / "final")
    (d / "run" / "sft").mkdir()
    os.link(d / "run" / "final" / "model.safetensors", d / "run" / "sft" / "weights.safetensors")
    return d


def test_saved_tokenizer_is_found_for_every_form_of_init_from(small_tiny_model, tmp_path):
    from vlm.train.build import saved_tokenizer

    run_dir = small_tiny_model / "run"
    final = run_dir / "final"
    for source in (final, final / "model.safetensors", run_dir, run_dir / "sft", run_dir / "sft" / "weights.safetensors"):
        assert saved_tokenizer(source) == final, source
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "model.safetensors").write_bytes((final / "model.safetensors").read_bytes())
    assert saved_tokenizer(bare) is None and saved_tokenizer(bare / "model.safetensors") is None
    assert saved_tokenizer(None) is None


def test_dpo_starts_from_a_checkpoint_with_the_tokenizer_saved_with_it(small_tiny_model, tmp_path):
    """``recipe=dpo_tiny init_from=<a run trained at another size>``: the recipe's own byte-BPE tokenizer (trained on
    its data at its sizes) has another vocabulary; the stage uses the checkpoint's, and exports it."""
    from vlm.data.tokenizer import load_tokenizer
    from vlm.train.build import build_tokenizer

    final = small_tiny_model / "run" / "final"
    saved = load_tokenizer(final)
    ours = build_tokenizer(compose("dpo_tiny", TINY_SMALL), ["chatml"])
    assert ours.get_vocab() != saved.get_vocab()  # what made the recipe work only at full size
    res = run(compose("dpo_tiny", TINY_SMALL + [f"init_from={small_tiny_model / 'run' / 'sft'}",
                                                f"output_dir={tmp_path / 'dpo'}"]))
    assert res.stages[0].steps == 2
    assert load_tokenizer(tmp_path / "dpo" / "final").get_vocab() == saved.get_vocab()
    # the held-out pairs (auto: the val split of data.dpo) scored per kind (the shapes task)
    kinds = {k.rsplit("/", 1)[1] for k in res.eval if k.startswith("pairs/preference_accuracy/")}
    assert kinds and kinds <= {"vqa_color", "vqa_count", "vqa_shape", "grounding", "caption"}, res.eval


def test_weights_of_another_vocabulary_are_a_clear_error(small_tiny_model, tmp_path):
    """Bare weights (no tokenizer saved with them) trained with another vocabulary than the recipe's tokenizer."""
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "model.safetensors").write_bytes((small_tiny_model / "run" / "final" / "model.safetensors").read_bytes())
    with pytest.raises(ConfigError, match=r"cannot start stage 'dpo' from .*model\.safetensors: .*its vocabulary has "
                                          r"\d+ tokens, this run's tokenizer \d+: the weights were trained with "
                                          r"another tokenizer"):
        run(compose("dpo_tiny", TINY_SMALL + [f"init_from={bare}", f"output_dir={tmp_path / 'dpo'}"]))


# ------------------------------------------------------------------------------ held-out pairs of the user's file
def test_heldout_pairs_come_from_the_users_file(tmp_path):
    """``stage.dpo.data=pairs data.pairs.train=FILE``: the held-out pairs (objective.eval_data=auto) are
    ``data.pairs.heldout`` pairs of FILE, left out of training; with ``data.pairs.eval=FILE2``, FILE2's pairs."""
    from vlm.data.datasets import build_dataset
    from vlm.train.preference import held_out_spec

    path = write_pairs(tmp_path)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    cfg = compose("dpo_micro", ["stage.dpo.data=pairs", f"data.pairs.train={path}", "data.pairs.heldout=3"])
    held = build_dataset(held_out_spec(cfg, "dpo", cfg.stage.dpo.objective.eval_data))
    train = build_dataset(cfg.data.pairs)
    assert len(held) == 3 and len(train) == len(records) - 3 and not set(held.indices) & set(train.indices)
    other = tmp_path / "eval"
    other.mkdir()
    eval_path = write_pairs(other)
    cfg = compose("dpo_micro", ["stage.dpo.data=pairs", f"data.pairs.train={path}", f"data.pairs.eval={eval_path}"])
    held = build_dataset(held_out_spec(cfg, "dpo", cfg.stage.dpo.objective.eval_data))
    assert held.source_name == str(eval_path) and len(held) == len(records)
    assert len(build_dataset(cfg.data.pairs)) == len(records)  # nothing of the training file held out
    # the recipe's own pairs: the val split of data.dpo; a key of data; a bad key names the keys
    cfg = compose("dpo_micro", [])
    assert held_out_spec(cfg, "dpo", "auto") == {**cfg.data.dpo, "split": "val", "size": cfg.data.dpo.heldout}
    tiny = compose("dpo_tiny", [])
    assert held_out_spec(tiny, "dpo", "auto")["size"] == 256  # auto: a tenth of the 4,096 pairs, at most 256
    with pytest.raises(ConfigError, match=r"eval_data='nope' is not a key of data"):
        held_out_spec(cfg, "dpo", "nope")
    assert held_out_spec(cfg, "dpo", None) is None
    assert held_out_spec(compose("dpo_micro", ["stage.dpo.data=sft"]), "dpo", "auto") is None  # no held-out part
