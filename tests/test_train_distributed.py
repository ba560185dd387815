"""2-process DDP and FSDP2 on CPU (gloo, launched with torchrun) match a single-process run on the same global
batch, and what FSDP writes loads in one process."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vlm.train import compose, run

ARGS = ["recipe=micro", "stages=[sft]", "stage.sft.max_steps=10", "stage.sft.global_batch_size=8",
        "stage.sft.micro_batch_size=2", "stage.sft.save_every=5", "eval.limit=4"]


def losses(run_dir: Path, stage: str = "sft") -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r.get("stage") == stage and "loss" in r]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(args: list[str], nproc: int = 2) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}",
           "-m", "vlm.train", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    run(compose(overrides=ARGS + [f"output_dir={out}"]))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_match_one(strategy, single, tmp_path):
    out = tmp_path / strategy
    proc = torchrun(ARGS + [f"trainer.strategy={strategy}", f"output_dir={out}"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    ref, got = losses(single), losses(out)
    assert len(got) == len(ref) == 10
    assert max(abs(a - b) for a, b in zip(ref, got)) < 1e-5, (ref, got)
    run_info = json.loads((out / "run.json").read_text())
    assert run_info["world_size"] == 2
    assert json.loads((out / "eval.json").read_text())["metrics"]  # generation under the strategy worked
    if strategy == "fsdp":
        check_fsdp_outputs_load_on_one_process(out, single)


def check_fsdp_outputs_load_on_one_process(out: Path, single: Path) -> None:
    import vlm
    from safetensors.torch import load_file

    from vlm.train.build import build_model, build_tokenizer, seed_everything
    from vlm.train.checkpoint import check_keys

    model = vlm.load(out / "final")
    ref = vlm.load(single / "final")
    for (n, a), (_, b) in zip(model.state_dict().items(), ref.state_dict().items()):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=n)
    ckpt = out / "sft" / "checkpoints" / "step_000010"
    weights = load_file(str(ckpt / "model.safetensors"))
    cfg = compose(overrides=ARGS)
    seed_everything(0)
    fresh = build_model(cfg, build_tokenizer(cfg, ["chatml"]))
    check_keys(weights, fresh, "fsdp checkpoint")
    fresh.load_state_dict(weights, strict=False)
    final = model.state_dict()
    for k, v in weights.items():
        torch.testing.assert_close(v, final[k], atol=0, rtol=0, msg=k)
    optim = torch.load(ckpt / "optimizer.pt", weights_only=True)
    # full (unsharded) optimizer state keyed by parameter name (the tied lm_head is the embedding's entry)
    assert set(optim["state"]) == set(weights) - {"llm.model.lm_head.weight"}
    assert all(not hasattr(t, "device_mesh") for st in optim["state"].values() for t in st.values()
               if isinstance(t, torch.Tensor))


@pytest.mark.slow
def test_align_objective_under_ddp_matches_one_process(tmp_path):
    """The siglip objective's head is attached before DDP wraps the model: its gradients are averaged like the
    encoder's, and with the same micro-batches (negatives are per micro-batch) the losses match one process."""
    args = ["recipe=micro", "stage=[align,sft]", "stages=[align]", "stage.align.max_steps=5",
            "stage.align.global_batch_size=8", "stage.align.micro_batch_size=2", "eval.enabled=false"]
    run(compose(overrides=args + [f"output_dir={tmp_path / 'one'}"]))
    proc = torchrun(args + ["trainer.strategy=ddp", f"output_dir={tmp_path / 'ddp'}"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    ref, got = losses(tmp_path / "one", "align"), losses(tmp_path / "ddp", "align")
    assert len(got) == len(ref) == 5
    assert max(abs(a - b) for a, b in zip(ref, got)) < 1e-5, (ref, got)


@pytest.mark.slow
@pytest.mark.parametrize("connector", ["xattn", "qformer_tiny"])
def test_fsdp_matches_one_process_with_cross_attention_connectors(connector, tmp_path):
    """Gated cross-attention blocks inside the LLM (xattn) and a Q-Former's own layers (qformer) under FSDP2."""
    args = ["recipe=micro", "stages=[sft]", "stage.sft.max_steps=4", "stage.sft.global_batch_size=8",
            "stage.sft.micro_batch_size=2", "stage.sft.save_every=null", "eval.enabled=false", f"connector={connector}"]
    assert_matches_one_process(args, "fsdp", tmp_path, steps=4)


def assert_matches_one_process(args: list[str], strategy: str, out: Path, steps: int) -> None:
    """``args`` trained in one process and in two under ``strategy`` (in ``out``) log the same ``steps`` losses."""
    run(compose(overrides=args + [f"output_dir={out / 'one'}"]))
    proc = torchrun(args + [f"trainer.strategy={strategy}", f"output_dir={out / strategy}"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    ref, got = losses(out / "one"), losses(out / strategy)
    assert len(got) == len(ref) == steps
    assert max(abs(a - b) for a, b in zip(ref, got)) < 1e-5, (ref, got)


def write_mixed_data(d: Path, n: int = 16, images: tuple[int, ...] = (3,)) -> list[str]:
    """A LLaVA-JSON file of ``n`` conversations of which only the samples at ``images`` have an image (as in SFT
    mixtures), plus an evaluation file of one image and one text-only sample; the ``data=files`` overrides."""
    from PIL import Image

    Image.new("RGB", (32, 32), (200, 30, 30)).save(d / "red.png")
    records = []
    for i in range(n):
        if i in images:
            records.append({"id": f"img{i}", "image": "red.png", "conversations": [
                {"from": "human", "value": "<image>\nWhat color is it?"}, {"from": "gpt", "value": "red"}]})
        else:
            records.append({"id": f"txt{i}", "conversations": [
                {"from": "human", "value": f"What is {i} + 1?"}, {"from": "gpt", "value": str(i + 1)}]})
    (d / "train.json").write_text(json.dumps(records))
    (d / "val.json").write_text(json.dumps([records[images[0]], records[(images[0] + 1) % n]]))
    return ["data=files", f"data.train={d / 'train.json'}", f"data.eval={d / 'val.json'}"]


@pytest.mark.slow
@pytest.mark.parametrize("strategy,extra", [
    ("ddp", []), ("fsdp", []),
    # xattn's cross-attention blocks run only with images; a frozen tower still gathers its shards under FSDP
    ("fsdp", ["connector=xattn", "stage.sft.policy.encoder=frozen"]),
], ids=["ddp", "fsdp", "fsdp-xattn-frozen-tower"])
def test_text_only_micro_batches_train_and_match_one_process(strategy, extra, tmp_path):
    """1 image in 16 samples, global batch 8 of micro-batches of 2 on 2 processes: every step has a process whose
    micro-batches are all text-only (the one synchronized and the ones under no_sync), and one step of each epoch
    has no image at all. With the default find_unused_parameters=false, DDP and FSDP train and log the same losses
    as one process (the tower and connector run on a stand-in image, weighted 0: VLM.stand_in_zero), and FSDP's
    evaluation, where one process's prompt has an image and the other's not, runs in lockstep."""
    args = ["recipe=micro", "stages=[sft]", "stage.sft.max_steps=4", "stage.sft.global_batch_size=8",
            "stage.sft.micro_batch_size=2", "stage.sft.save_every=null", "eval.limit=2",
            *write_mixed_data(tmp_path), *extra]
    assert_matches_one_process(args, strategy, tmp_path, steps=4)
    assert json.loads((tmp_path / strategy / "eval.json").read_text())["metrics"]["all/n"] == 2
