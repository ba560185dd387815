"""End to end: the command line, the run directory, stage chaining, LoRA export."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import vlm
from vlm.train import compose, run
from vlm.train.build import build_model, build_tokenizer, seed_everything
from vlm.train.export import load_weights
from vlm.train.policy import apply_policies


@pytest.mark.slow
def test_cli_run_directory(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "vlm.train", "recipe=micro", f"output_dir={out}"],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    for f in ("config.yaml", "run.json", "metrics.jsonl", "eval.json", "plot.png", "result.json",
              "predictions.jsonl", "final/config.json", "final/model.safetensors", "pretrain/weights.safetensors",
              "sft/DONE.json"):
        assert (out / f).is_file(), f
    assert list((out / "sft" / "checkpoints").glob("step_*/model.safetensors"))
    info = json.loads((out / "run.json").read_text())
    assert "commit" in info["git"] and info["seed"] == 0 and info["stage_seeds"]["sft"]["model"] == 0
    metrics = json.loads((out / "eval.json").read_text())["metrics"]
    assert "all" in metrics and any(k.startswith("vqa_") for k in metrics)
    assert "| task | score | n |" in proc.stdout and str(out / "final") in proc.stdout
    model = vlm.load(out / "final")
    assert model.tokenizer is not None
    from vlm.train.score import main as score

    again = score([str(out), "--size", "8"])  # re-evaluation reproduces the run's own numbers
    assert again["all"] == pytest.approx(metrics["all"])
    assert compose("micro").stage.sft.max_steps == 4  # the run used the recipe as composed
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r.get("stage") == "sft" and "loss" in r] == [1, 2, 3, 4]


def test_cli_unknown_key_exits_nonzero():
    proc = subprocess.run([sys.executable, "-m", "vlm.train", "recipe=micro", "trainer.bogus=1"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "bogus" in proc.stderr


def test_sft_alone_from_pretrain_checkpoint_equals_chained(tmp_path):
    base = ["eval.enabled=false", "stage.sft.max_steps=3"]
    chained = run(compose("micro", base + [f"output_dir={tmp_path / 'chain'}"]))
    alone = run(compose("micro", base + ["stages=[sft]", f"init_from={tmp_path / 'chain' / 'pretrain'}",
                                         f"output_dir={tmp_path / 'alone'}"]))
    assert alone.losses["sft"] == pytest.approx(chained.losses["sft"], abs=1e-6)
    fresh = run(compose("micro", base + ["stages=[sft]", f"output_dir={tmp_path / 'fresh'}"]))
    assert fresh.losses["sft"][0] != pytest.approx(chained.losses["sft"][0], abs=1e-4)  # pretrain mattered


def test_lora_sft_exports_merged_weights(tmp_path):
    ov = ["eval.enabled=false", "stage.sft.max_steps=3", "stage.sft.policy.llm=lora", "stage.sft.lr=1e-2",
          "stage.sft.lora.dropout=0.0", f"output_dir={tmp_path}"]
    res = run(compose("micro", ov))
    exported = vlm.load(res.final_dir)
    assert not any("lora" in k for k in exported.state_dict())
    # rebuild the live LoRA model from the checkpoint and compare outputs with the merged export
    cfg = compose("micro", ov)
    seed_everything(cfg.seed)
    live = build_model(cfg, build_tokenizer(cfg, ["plain", "chatml"]))
    load_weights(live, tmp_path / "pretrain")
    apply_policies(live, cfg.stage.sft)
    ckpt = load_file(str(tmp_path / "sft" / "checkpoints" / "step_000003" / "model.safetensors"))
    assert any("lora_B" in k for k in ckpt)
    live.load_state_dict(ckpt, strict=False)
    live.eval()
    exported.eval()
    k = live.num_image_tokens()
    ids = torch.cat([torch.full((2, k), live.image_token_id), torch.randint(0, 250, (2, 10))], 1)
    pixels = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(exported(ids, pixels).logits, live(ids, pixels).logits, atol=1e-4, rtol=1e-4)
    delta = load_file(str(tmp_path / "sft" / "weights.safetensors"))
    assert "llm.model.model.layers.0.self_attn.q_proj.weight" in delta and not any("lora" in k for k in delta)


def test_evaluation_off_says_which_periodic_evaluations_it_skips(tmp_path, capsys):
    res = run(compose("micro", ["stages=[sft]", "stage.sft.max_steps=2", "stage.sft.eval_every=1",
                                "eval.enabled=false", f"output_dir={tmp_path}"]))
    assert "eval.enabled=false: no evaluation at the end and no periodic evaluation (sft every 1 steps)" \
        in capsys.readouterr().out
    rows = [json.loads(line) for line in (res.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows and not any("eval" in r for r in rows)


def test_wandb_logger_path(tmp_path):
    res = run(compose("micro", ["logger=wandb", "logger.mode=disabled", "stages=[sft]", "stage.sft.max_steps=1",
                                "eval.enabled=false", f"output_dir={tmp_path}"]))
    assert (res.run_dir / "metrics.jsonl").is_file() and res.losses["sft"]


@pytest.mark.parametrize("weighting", ["square"])  # token: covered by the DDP/FSDP tests
def test_loss_weighting_is_exact_under_accumulation(tmp_path, weighting):
    base = ["stages=[sft]", "stage.sft.max_steps=2", "eval.enabled=false", "stage.sft.save_every=null",
            f"stage.sft.loss_weighting={weighting}"]
    whole = run(compose("micro", base + ["stage.sft.micro_batch_size=4", f"output_dir={tmp_path / 'a'}"]))
    split = run(compose("micro", base + ["stage.sft.micro_batch_size=1", f"output_dir={tmp_path / 'b'}"]))
    assert split.losses["sft"] == pytest.approx(whole.losses["sft"], abs=2e-6)


def test_gradient_checkpointing_gives_the_same_losses(tmp_path):
    base = ["stages=[sft]", "stage.sft.max_steps=2", "eval.enabled=false", "stage.sft.save_every=null"]
    plain = run(compose("micro", base + [f"output_dir={tmp_path / 'a'}"]))
    ckpt = run(compose("micro", base + ["trainer.gradient_checkpointing=true", f"output_dir={tmp_path / 'b'}"]))
    assert ckpt.losses["sft"] == pytest.approx(plain.losses["sft"], abs=1e-6)


def test_export_of_a_state_dict_made_of_views(tmp_path):
    """FSDP's gathered state dict can return small parameters (xattn's scalar gates) as views of a larger buffer;
    safetensors refuses to save a tensor that covers only part of its storage, so the export copies those."""
    from test_objectives import micro_model

    from vlm.train.export import export_final

    _, model = micro_model(["connector=xattn"])
    state = model.state_dict()
    flat = torch.cat([v.flatten() for v in state.values()])
    views, at = {}, 0
    for k, v in state.items():
        views[k] = flat[at: at + v.numel()].view(v.shape)
        at += v.numel()
    assert views["connector.blocks.0.attn_gate"].untyped_storage().nbytes() > 4
    out = export_final(tmp_path / "final", model, views, model.tokenizer)
    back = load_file(str(out / "model.safetensors"))
    torch.testing.assert_close(back["connector.blocks.0.attn_gate"], state["connector.blocks.0.attn_gate"])
