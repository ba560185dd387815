"""One stage of a run: build the model, carry earlier weights in, apply policies, wrap, train, save, export.

Every stage starts from a freshly built model (seeded, so from-scratch parts are reproducible) plus the cumulative
weights delta of the previous stage (or ``init_from``); this is the same whether the stages run back to back, after
a resume, or as separate commands.
"""
from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from safetensors import safe_open

from vlm.data.dataset import BadSamples, TooManyBadSamples
from vlm.encoders.base import as_pair
from vlm.data.datasets import build_dataset
from vlm.objectives import Objective, TrainModule, build as build_objective
from vlm.registry import plain
from vlm.train.batch_plan import BatchPlan, data_seed, make_loader
from vlm.train.build import build_model, describe_mismatch, fingerprint, seed_everything
from vlm.train.checkpoint import DONE, CheckpointManager, stage_done
from vlm.train.config_check import option_source
from vlm.train.errors import ConfigError
from vlm.train.schema import stage_config, trainer_config
from vlm.train.distributed import Strategy, resolve_precision
from vlm.eval.evaluator import evaluate
from vlm.train.export import STAGE_WEIGHTS, export_final, load_weights, merge_lora_state, trained_names, \
    write_stage_weights
from vlm.train.interrupt import kill_point
from vlm.train.loop import LoopState, StageLoop
from vlm.train.optim import build_optimizer, build_scheduler
from vlm.data.files import TooLongError
from vlm.train.policy import apply_policies, trainable_summary
from vlm.train.preference import evaluate_pairs, preference_setup
from vlm.train.resources import PeakMemory, typical_step_seconds
from vlm.train.rng import derive_seed, isolated
from vlm.train.schema import StageConfig, TrainerConfig



@dataclass
class StageResult:
    name: str
    steps: int
    losses: list[float]
    seconds: float
    weights: str
    resumed_from: str | None = None
    eval: dict[str, float] = field(default_factory=dict)
    skipped: bool = False
    skipped_samples: dict[str, Any] = field(default_factory=dict)  # total, by_reason, examples, num_samples
    # what the stage cost and what it trained (sweep tables): trainable parameters of the model (the objective's own
    # excluded), image tokens per image in the LLM's sequence (and the keys a fusion connector's blocks attend to),
    # the median step time (s) and the peak memory (MiB) of the training loop (vlm.train.resources)
    trainable_params: int | None = None
    image_tokens: int | None = None
    media_tokens: int | None = None
    step_seconds: float | None = None
    peak_memory_mb: float | None = None

    @property
    def final_loss(self) -> float | None:
        return self.losses[-1] if self.losses else None


def weight_names(path: Path) -> set[str]:
    with safe_open(str(path), framework="pt") as f:
        return set(f.keys())


@dataclass
class StageRunner:
    cfg: DictConfig
    name: str
    run_dir: Path
    strategy: Strategy
    tokenizer: Any
    log: Any
    init_files: list[Path]          # weights loaded into the fresh model, in order
    carried: set[str]               # tensor names changed by earlier stages (the delta stays cumulative)
    resume: bool
    is_last: bool
    eval_samples: Any = None
    global_step_offset: int = 0
    expected_base: dict[str, Any] | None = None   # fingerprint of the freshly built model recorded by the run
    check_later: list[str] = field(default_factory=list)  # later stages whose data is checked before this one trains
    base: dict[str, Any] = field(default_factory=dict)
    bad: BadSamples = field(default_factory=BadSamples)  # samples the data skipped (this process; see all_bad)
    stage: StageConfig = field(init=False)       # cfg.stage[name], typed
    trainer: TrainerConfig = field(init=False)   # cfg.trainer, typed

    def __post_init__(self) -> None:
        self.stage = stage_config(self.cfg, self.name)
        self.trainer = trainer_config(self.cfg)

    @property
    def dir(self) -> Path:
        return self.run_dir / self.name

    # ------------------------------------------------------------------------------------------------ setup
    def build(self) -> torch.nn.Module:
        seed_everything(self.cfg.seed)
        model = build_model(self.cfg, self.tokenizer, gradient_checkpointing=self.trainer.gradient_checkpointing)
        fp, shapes = fingerprint(model)
        want = self.expected_base
        if want and want.get("fingerprint") != fp:
            raise ConfigError(f"cannot resume {self.run_dir}: it was written by a different model (fingerprint "
                              f"{want.get('fingerprint')} vs {fp}): "
                              f"{describe_mismatch(want.get('param_shapes', {}), shapes)}")
        self.base = {"fingerprint": fp, "param_shapes": shapes}
        for f in self.init_files:
            try:
                load_weights(model, f)
            except ValueError as e:
                raise ConfigError(f"cannot start stage {self.name!r} from {f}: {e}") from e
        apply_policies(model, self.stage)
        return model

    def objective(self, model: torch.nn.Module) -> Objective:
        """The stage's objective (``stage.<name>.objective``); its own parameters (siglip's text tower) are trained
        and checkpointed with the stage, never exported."""
        return build_objective(plain(self.stage.objective), model=model,
                               loss_weighting=str(self.stage.loss_weighting))

    def run(self) -> StageResult:
        s, st, t0 = self.strategy, self.stage, time.perf_counter()
        if s.is_main:
            self.dir.mkdir(parents=True, exist_ok=True)
        t = self.setup()
        start, state, resumed_from, rng = self.resume_from_checkpoint(t)
        if self.resume:
            self.log.mark_resume(self.name, start)
        loader = SkipCounting(make_loader(t.dataset, t.collator, t.plan, start, t.total,
                                          self.trainer.num_workers), self.bad, lambda: self.check_bad(t))
        loop = StageLoop(name=self.name, stage=st, trainer=self.trainer, strategy=s, model=t.module,
                         wrapped=t.wrapped, optimizer=t.optimizer, scheduler=t.scheduler, loader=loader,
                         total_steps=t.total, accumulation=t.plan.accumulation, precision=t.precision, log=self.log,
                         save=lambda step, ls: self.save(t, step, ls),
                         evaluate=(lambda step: self.evaluate(t, self.cfg.eval.periodic_limit, step)[0])
                         if self.eval_samples is not None else None,
                         global_step_offset=self.global_step_offset, rng=rng,
                         run_dir=str(self.run_dir))
        memory = PeakMemory(s.device).start()
        state = loop.run(start, state)
        peak_mb = memory.mb()
        if start < t.total or resumed_from is None:
            self.save(t, t.total, state)
        result = StageResult(self.name, t.total, state.losses, 0.0, str(self.dir / STAGE_WEIGHTS), resumed_from,
                             skipped_samples=self.report_bad(t), step_seconds=typical_step_seconds(state.step_seconds),
                             peak_memory_mb=peak_mb, **model_facts(t.model, t.processor))
        self.export(t)
        if self.is_last and self.eval_samples is not None and self.cfg.eval.enabled:
            result.eval = self.final_eval(t)
        result.seconds = time.perf_counter() - t0
        if s.is_main:
            (self.dir / DONE).write_text(json.dumps({"steps": t.total, "final_loss": result.final_loss,
                                                     "seconds": result.seconds, "eval": result.eval,
                                                     "skipped_samples": result.skipped_samples}, indent=1))
        s.barrier()
        kill_point(self.trainer, self.name, "end", self.run_dir, s.rank)
        return result

    # ------------------------------------------------------------------------------------------------ parts
    def setup(self) -> "Training":
        """Model (policies applied, wrapped), optimizer, data, batch plan, scheduler, checkpoint manager."""
        s, st = self.strategy, self.stage
        model = self.build()
        if st.cache_features:  # (config check: the encoder is frozen)
            from vlm.encoders.cache import FeatureCache

            model.feature_cache = FeatureCache(self.trainer.feature_cache_dir, model.encoder, rank=s.rank)
        # FSDP: a batch without images still enters the sharded tower layers the others gather (VLM.stand_in_zero)
        model.image_path_in_lockstep = s.collective_forward
        module = TrainModule(model, self.objective(model))
        fp, shapes = fingerprint(module, module.checkpoint_key)  # what a checkpoint must match
        summary = trainable_summary(model)
        head = sum(p.numel() for p in module.objective.parameters() if p.requires_grad)
        self.log.info(f"[{self.name}] policies {vars(st.policy)}; trainable " + ", ".join(
            f"{m} {v['trainable'] / 1e6:.2f}M/{v['total'] / 1e6:.2f}M" for m, v in summary.items())
            + (f", objective head {head / 1e6:.2f}M (trained, never exported)" if head else ""))
        precision = resolve_precision(self.trainer.precision, s.device)
        if not s.shards_parameters:  # a sharding strategy places each shard on the device itself
            module.to(s.device)
        wrapped = s.wrap(module, precision)
        if self.trainer.compile:
            compile_layers(model)
        optimizer = build_optimizer(model, st, s.device, objective=module.objective)

        from vlm.data.processor import Processor

        processor = Processor.for_model(model, self.tokenizer, template=plain(st.template),
                                        max_length=st.max_length, tiling=plain(st.tiling),
                                        max_tiles_per_sample=st.max_tiles_per_sample, video=plain(st.video))
        dataset = stage_dataset(self.cfg, self.name, processor)
        if module.objective.images_per_sample is not None and hasattr(dataset, "images_per_sample"):
            dataset.images_per_sample = module.objective.images_per_sample  # others: counted, named skips
        known = getattr(dataset, "bad", None)  # bad samples the dataset found reading every sample up front
        if isinstance(known, BadSamples):
            self.bad.merge(known.state())
        if hasattr(dataset, "config_key"):
            dataset.config_key = f"data.{st.data}"  # named in its errors
            dataset.max_bad_fraction_key = max_bad_fraction_key(self.cfg, st.data)
        for later in self.check_later:  # their data against their own settings, before this stage trains
            stage_dataset(self.cfg, later, self.processor_for(model, later), only_checking=True)
        plan = BatchPlan(len(dataset), st.global_batch_size, st.micro_batch_size, s.rank, s.world_size,
                         seed=data_seed(self.cfg.seed, self.name))
        total = plan.total_steps(st.epochs, st.max_steps)
        most = getattr(dataset, "max_epochs", None)  # a dataset that bounds the passes over it (data=files)
        if selection := getattr(dataset, "selection", None):
            self.log.info(f"[{self.name}] data.{st.data}: {selection}")
        if most is not None:
            bound = plan.total_steps(float(most), None)
            self.log.info(f"[{self.name}] data.{st.data}: {len(dataset)} samples, at most {most:g} epochs "
                          f"(data.epochs): {min(total, bound)} steps of {st.global_batch_size} = "
                          f"{min(total, bound) / plan.steps_per_epoch:.1f} epochs ("
                          + (f"the recipe's {total} steps would be {total / plan.steps_per_epoch:.1f})"
                             if bound < total else f"the recipe's {total} steps)"))
            total = min(total, bound)
        scheduler = build_scheduler(optimizer, st, total)
        ckpt = CheckpointManager(self.dir / "checkpoints", s, self.trainer.keep_last, self.trainer.save_full)
        self.log.info(f"[{self.name}] {len(dataset)} samples, {total} steps of {st.global_batch_size} "
                      f"({plan.accumulation} x {st.micro_batch_size} per process x {s.world_size} processes), "
                      f"precision {str(precision).replace('torch.', '')}, device {s.device}")
        collator = make_collator(self.tokenizer, st, dataset)
        pairs = preference_setup(self, module, dataset, collator, processor, precision)
        return Training(model, module, wrapped, optimizer, scheduler, processor, dataset, collator,
                        plan, total, precision, ckpt, fp, shapes, pairs)

    def processor_for(self, model: torch.nn.Module, name: str) -> Any:
        """The processor of stage ``name`` for ``model`` (its template, ``max_length`` and tiling)."""
        from vlm.data.processor import Processor

        st = stage_config(self.cfg, name)
        return Processor.for_model(model, self.tokenizer, template=plain(st.template), max_length=st.max_length,
                                   tiling=plain(st.tiling), max_tiles_per_sample=st.max_tiles_per_sample,
                                   video=plain(st.video))

    def resume_from_checkpoint(self, t: "Training") -> tuple[int, LoopState, str | None, dict[str, Any] | None]:
        """``(start step, loop state, checkpoint, model RNG state)``: the latest checkpoint of this stage when
        resuming. The RNG state is restored by the loop, right before its first step."""
        latest = t.ckpt.latest() if self.resume else None
        if latest is None:
            return 0, LoopState(), None, None
        saved = json.loads((latest / "trainer_state.json").read_text())
        if saved.get("fingerprint") != t.fingerprint:
            raise ConfigError(f"cannot resume from {latest}: it was written by a different model or policy "
                              f"(fingerprint {saved.get('fingerprint')} vs {t.fingerprint}): "
                              f"{describe_mismatch(saved.get('param_shapes', {}), t.param_shapes)}")
        saved = t.ckpt.load(latest, t.wrapped, t.optimizer, t.scheduler, restore_rng=False)
        self.bad.merge(saved.get("skipped_samples", {}))
        start = int(saved["step"])
        self.log.info(f"[{self.name}] resumed from {latest} at step {start}/{t.total}")
        return start, LoopState(losses=list(saved.get("losses", []))), str(latest), t.ckpt.read_rng(latest)

    def save(self, t: "Training", step: int, state: LoopState) -> None:
        if t.model.feature_cache is not None:
            t.model.feature_cache.flush()
        t.ckpt.save(step, t.wrapped, t.optimizer, t.scheduler,
                    {"stage": self.name, "fingerprint": t.fingerprint, "param_shapes": t.param_shapes,
                     "total_steps": t.total, "epoch": t.plan.epoch_of(step),
                     "data": {"step": step, "seed": t.plan.seed, "num_samples": t.plan.n}, "losses": state.losses,
                     "skipped_samples": self.all_bad().state()})

    # ------------------------------------------------------------------------------------------ bad samples
    def all_bad(self) -> BadSamples:
        """Collective: the samples skipped on every process (each counted once)."""
        out = BadSamples()
        for state in self.strategy.all_gather_object(self.bad.state()):
            out.merge(state)
        return out

    def check_bad(self, t: "Training") -> None:
        """Stop (``TooManyBadSamples``) once more of this stage's data is known to be bad than it allows."""
        key = max_bad_fraction_key(self.cfg, self.stage.data)
        self.bad.check(len(t.dataset), getattr(t.dataset, "max_bad_fraction", None), f"data.{self.stage.data}",
                       option=key.lstrip("+"), override=key)

    def report_bad(self, t: "Training") -> dict[str, Any]:
        """Collective: print and log (``metrics.jsonl``) the samples this stage skipped; returns the record."""
        bad = self.all_bad()
        record = {**bad.to_dict(), "num_samples": len(t.dataset)}
        if bad.total or hasattr(t.dataset, "bad"):
            self.log.info(f"[{self.name}] data.{self.stage.data} ({len(t.dataset)} samples): {bad.summary()}")
        self.log.log({"stage": self.name, "step": t.total, "skipped_samples": record},
                     self.global_step_offset + t.total)
        return record

    def export(self, t: "Training") -> None:
        """The cumulative weights delta (LoRA merged) and, after the last stage, ``final/``."""
        s = self.strategy
        full = t.module.model_state(s.model_state_dict(t.wrapped, trainable_only=False))  # no objective parts
        if s.is_main:
            merged = merge_lora_state(full, t.model)
            write_stage_weights(self.dir / STAGE_WEIGHTS, merged, self.carried | trained_names(t.model))
            if self.is_last:
                export_final(self.run_dir / "final", t.model, merged, self.tokenizer, t.processor.template,
                             t.processor.image_processor, image_placement=self.image_placement(t),
                             video_processor=getattr(t.processor, "video_processor", None))
        s.barrier()

    def image_placement(self, t: "Training") -> Any:
        """How this stage's data joins a turn's images and text (``vlm.data.image_placement``), read off its samples
        (the evaluation set's fill in what they do not show, e.g. labels of several images); the default when no
        sample has an image next to text. Logged; ``final/`` records it so chat builds the trained prompts."""
        from vlm.data.image_placement import DEFAULT, ImagePlacement, dataset_samples

        train = ImagePlacement.infer(dataset_samples(t.dataset))
        held_out = ImagePlacement.infer(dataset_samples(self.eval_samples)) if self.eval_samples is not None else None
        placement = train or held_out
        if placement is not None and placement.label is None and held_out is not None and held_out.label \
                and (held_out.position, held_out.separator) == (placement.position, placement.separator):
            placement = ImagePlacement(placement.position, placement.separator, held_out.label)
        source = f"data.{self.stage.data}" if train is not None else "the evaluation data" if placement else None
        if placement is None:
            placement, source = DEFAULT, "no sample places an image next to text: the default"
        self.log.info(f"[{self.name}] image placement for chat: {placement.describe()} ({source})")
        return placement

    def evaluate(self, t: "Training", limit: int | None, step: int) -> tuple[dict[str, float], list[dict[str, Any]]]:
        """Generation-based evaluation after ``step``, with its own random stream (seeded by seed, stage, step):
        whatever it draws is reproducible and leaves the model's training stream untouched."""
        with isolated(derive_seed("eval", self.cfg.seed, self.name, step), self.strategy.device):
            metrics, records = evaluate(t.wrapped, self.strategy, t.processor, self.eval_samples,
                                        batch_size=self.cfg.eval.batch_size,
                                        max_new_tokens=self.cfg.eval.max_new_tokens, precision=t.precision,
                                        limit=limit, lockstep=self.strategy.collective_forward)
            if t.held_out_pairs is not None:
                metrics.update(evaluate_pairs(self, t))
        return metrics, records

    def final_eval(self, t: "Training") -> dict[str, float]:
        metrics, records = self.evaluate(t, self.cfg.eval.limit, t.total)
        if self.strategy.is_main:
            (self.run_dir / "eval.json").write_text(json.dumps({"metrics": metrics, "stage": self.name}, indent=1))
            with (self.run_dir / "predictions.jsonl").open("w") as f:
                for r in records:
                    f.write(json.dumps(r) + "\n")
        self.log.log({"stage": self.name, "step": t.total, "eval": metrics}, self.global_step_offset + t.total)
        return metrics


@dataclass
class Training:
    """The objects one stage trains with."""

    model: torch.nn.Module          # the VLM
    module: TrainModule             # model + objective (what the loop trains)
    wrapped: torch.nn.Module        # the module as the strategy wrapped it
    optimizer: torch.optim.Optimizer
    scheduler: Any
    processor: Any
    dataset: Any
    collator: Any
    plan: BatchPlan
    total: int
    precision: torch.dtype
    ckpt: CheckpointManager
    fingerprint: str
    param_shapes: dict[str, list[int]]
    held_out_pairs: Any = None      # preference objectives: held-out pairs scored in every evaluation


def stage_dataset(cfg: DictConfig, name: str, processor: Any, only_checking: bool = False) -> Any:
    """Stage ``name``'s training set, processed by ``processor``; its mistakes as one-line ``ConfigError`` s naming
    the stage's key: a sample longer than its ``max_length``, fewer samples than its global batch.
    ``only_checking``: a later stage checked before the first one trains; only datasets that check their samples
    when built (``checks_samples``: ``data=files``) are built, the others are left alone (no reading, no
    randomness drawn)."""
    from vlm.data.datasets import DATASETS

    st = stage_config(cfg, name)
    spec = cfg.data[st.data]
    if only_checking and not getattr(DATASETS.get(spec.name), "checks_samples", False):
        return None
    try:
        dataset = build_dataset(spec, processor)
    except TooLongError as e:  # the dataset checks its longest sample; the stage knows its own key
        raise ConfigError(e.for_stage(name)) from None
    except TooManyBadSamples as e:  # counted when built (data=files): named by the key that raises the limit
        key = max_bad_fraction_key(cfg, st.data)
        raise e.for_key(key.lstrip("+"), key) from None
    if len(dataset) < st.global_batch_size:
        raise ConfigError(f"stage.{name}.global_batch_size={st.global_batch_size}: data.{st.data} has "
                          f"{len(dataset)} training samples, fewer than one global batch; expected "
                          f"stage.{name}.global_batch_size <= {len(dataset)} (and micro_batch_size <= it), or more "
                          f"samples")
    return dataset


def max_bad_fraction_key(cfg: DictConfig, data: str) -> str:
    """The exact override that raises data set ``data.<data>``'s ``max_bad_fraction``: the key its value comes from
    (``data.max_bad_fraction`` with ``data=files``, whose sets read it), ``data.<data>.max_bad_fraction`` when
    the set holds the key, else ``+data.<data>.max_bad_fraction`` (a key the config does not hold is added)."""
    node = cfg.data[data]
    if "max_bad_fraction" not in node:
        return f"+data.{data}.max_bad_fraction"
    return option_source(node, f"data.{data}", "max_bad_fraction")


def model_facts(model: torch.nn.Module, processor: Any = None) -> dict[str, int | None]:
    """``trainable_params``, ``image_tokens`` (per square image of the encoder's size, in the LLM's sequence: with an
    arrangement, its base view and tiles arranged; else, with the stage ``processor``'s image layout (``tiling``),
    its views' tokens, e.g. Idefics3's crops + global image; else one view) and ``media_tokens`` (the keys per image
    a fusion connector's cross-attention reads; None for token connectors)."""
    size = as_pair(model.image_size)
    connector = model.connector
    media = connector.num_media_tokens(model.encoder.num_tokens(size), model.encoder.grid(size)) \
        if connector.fuses_by_cross_attention else None
    layout = getattr(getattr(processor, "image_processor", None), "layout", None)
    if model.arrangement is None and layout is not None:  # (H, W) of each view of a W x H image
        tokens = sum(model.num_image_tokens(view) for view in layout.view_sizes(size[1], size[0]))
    else:
        tokens = model.image_token_count(*size, view_size=size)
    return {"trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "image_tokens": int(tokens), "media_tokens": media}


def skipped_result(name: str, stage_dir: Path) -> StageResult:
    done = stage_done(stage_dir) or {}
    return StageResult(name, int(done.get("steps", 0)), [], float(done.get("seconds", 0.0)),
                       str(stage_dir / STAGE_WEIGHTS), eval=done.get("eval", {}), skipped=True,
                       skipped_samples=done.get("skipped_samples", {}))


class SkipCounting:
    """Iterates ``loader``, counting the samples each batch's ``meta["skipped"]`` lists (made in DataLoader workers)
    into ``bad`` and calling ``check`` after each batch that skipped any; other attributes are the loader's."""

    def __init__(self, loader: Any, bad: BadSamples, check: Any) -> None:
        self.loader, self.bad, self.check = loader, bad, check

    def __iter__(self) -> Iterator[Any]:
        batches = iter(self.loader)
        try:
            for batch in batches:
                skipped = (batch.get("meta") or {}).get("skipped") if isinstance(batch, dict) else None
                if skipped:
                    self.bad.update(skipped)
                    self.check()
                yield batch
        except Exception:
            # an error raised in a DataLoader worker (too many bad samples, a data error) leaves the other workers
            # waiting for indices, and the process would hang at exit joining them: stop them now (torch does it
            # only when the iterator is collected, which the error's traceback prevents)
            stop = getattr(batches, "_shutdown_workers", None)
            if callable(stop):
                stop()
            raise

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.loader, name)


def make_collator(tokenizer: Any, stage: StageConfig, dataset: Any = None) -> Any:
    from vlm.data.collate import PackCollator, PadCollator
    from vlm.data.preference import PairCollator

    if getattr(dataset, "is_preference", False):  # one row per pair: prompt + chosen + rejected
        return PairCollator(tokenizer.pad_token_id)

    if stage.packing:  # (config.check: packing has a max_length)
        return PackCollator(tokenizer.pad_token_id, int(stage.max_length))
    return PadCollator(tokenizer.pad_token_id, padding_side="right")


def compile_layers(model: torch.nn.Module) -> None:
    """``torch.compile`` each block of the LLM and the vision tower in place (names and state dicts unchanged)."""
    from vlm.train.policy import layer_stack

    for host in (model.llm, model.encoder):  # their stated decoder_layers() / blocks()
        for layer in layer_stack(host)[1]:
            layer.compile()


