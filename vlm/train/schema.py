"""The typed schema every composed recipe is checked against (unknown keys and wrong types are errors).

Component configs (``encoder``, ``connector``, ``llm``, ``tokenizer``, ``data.*``) and a stage's ``template`` and
``objective`` are open mappings here: their names and keys are checked against the component's registry when the
config is checked (``config_check.check_components``), before anything is built. Code that runs a stage reads it
typed: ``config.stage_config(cfg, name)`` / ``config.trainer_config(cfg)``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, TypeVar

from omegaconf import DictConfig, ListConfig, OmegaConf

MODULES = ("encoder", "connector", "llm")


@dataclass
class PolicyConfig:
    """How each module is trained: ``frozen`` | ``full`` | ``lora`` | ``qlora`` | ``partial``."""

    encoder: str = "frozen"
    connector: str = "full"
    llm: str = "frozen"


@dataclass
class PartialConfig:
    """First trained layer of a module whose policy is ``partial`` (negative counts from the end)."""

    encoder: int = 0
    connector: int = 0
    llm: int = 0


@dataclass
class LoraConfig:
    """peft ``LoraConfig`` arguments shared by every module whose policy is ``lora`` / ``qlora``."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: Any = "all-linear"   # "all-linear" or a list of module-name suffixes (q_proj, v_proj, ...)
    use_rslora: bool = False


@dataclass
class ModuleLR:
    encoder: Optional[float] = None
    connector: Optional[float] = None
    llm: Optional[float] = None


@dataclass
class StageConfig:
    data: str = "pretrain"
    template: Any = "plain"               # a template name or {name: ..., options}
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    partial_from: PartialConfig = field(default_factory=PartialConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    optimizer: str = "adamw"
    lr: float = 1e-3
    module_lr: ModuleLR = field(default_factory=ModuleLR)
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    scheduler: str = "cosine"
    warmup_ratio: float = 0.03
    warmup_steps: Optional[int] = None
    min_lr_ratio: float = 0.0
    epochs: float = 1.0
    max_steps: Optional[int] = None
    global_batch_size: int = 256
    micro_batch_size: int = 32
    max_grad_norm: Optional[float] = 1.0
    loss_weighting: str = "token"            # token | sample | square (vlm.loss): how answers of different lengths weigh
    objective: Any = field(default_factory=lambda: {"name": "lm"})  # lm | siglip (vlm.objectives) + its options
    max_length: Optional[int] = 2048
    # high resolution: ImageProcessor tiling ({kind: dynamic, min_tiles, max_tiles, thumbnail} = InternVL's dynamic
    # tiles; {kind: anyres, pinpoints} = LLaVA-NeXT) and the tile budget over all images of a sample
    tiling: Optional[dict[str, Any]] = None
    max_tiles_per_sample: Optional[int] = None
    # videos (models whose encoder takes them): sampling and budget, vlm.data.video.PER_VIDEO (fps | num_frames,
    # min_frames, max_frames, min_pixels, max_pixels, total_pixels, frame_rate); null: the model's record / defaults
    video: Optional[dict[str, Any]] = None
    packing: bool = False
    cache_features: bool = False             # frozen encoder: its outputs cached on disk (vlm.encoders.cache)
    eval_every: Optional[int] = None
    save_every: Optional[int] = 500


@dataclass
class FSDPConfig:
    reshard_after_forward: bool = True
    param_dtype: Optional[str] = None
    reduce_dtype: str = "float32"
    shard_encoder: bool = True


@dataclass
class DDPConfig:
    find_unused_parameters: bool = False


@dataclass
class TrainerConfig:
    strategy: str = "single"
    device: str = "auto"
    precision: str = "auto"
    gradient_checkpointing: Any = False     # false | true (= full) | full | selective (vlm.recompute)
    compile: bool = False
    tf32: bool = True
    threads: Optional[int] = None
    num_workers: int = 0
    feature_cache_dir: str = "cache/features"   # stage.<name>.cache_features: where (shared across runs)
    log_every: int = 10
    progress: bool = True
    keep_last: int = 2
    save_full: bool = False
    kill_at: Optional[str] = None       # testing preemption: "<stage>:<step>" | "<stage>:end" (vlm.train.interrupt)
    kill_signal: str = "KILL"           # KILL | TERM | INT: what kill_at sends this process
    fsdp: FSDPConfig = field(default_factory=FSDPConfig)
    ddp: DDPConfig = field(default_factory=DDPConfig)


@dataclass
class LoggerConfig:
    name: str = "none"
    project: Optional[str] = None
    entity: Optional[str] = None
    mode: str = "offline"
    run_name: Optional[str] = None
    tags: list[str] = field(default_factory=list)


@dataclass
class EvalConfig:
    enabled: bool = True
    data: Optional[str] = "eval"
    batch_size: int = 64
    max_new_tokens: int = 32
    limit: Optional[int] = None
    periodic_limit: Optional[int] = 128


@dataclass
class RunConfig:
    name: str = "tiny"
    seed: int = 0
    output_dir: Optional[str] = None
    resume: Optional[str] = None
    init_from: Optional[str] = None
    image_token: Optional[str] = None   # the image placeholder token (null: <image>, added to the tokenizer)
    stages: list[str] = field(default_factory=lambda: ["pretrain", "sft"])
    encoder: dict[str, Any] = field(default_factory=dict)
    connector: dict[str, Any] = field(default_factory=dict)
    llm: dict[str, Any] = field(default_factory=dict)
    # how each image's view tokens are arranged (vlm.arrangements, e.g. LLaVA-NeXT's anyres_grid); null: none
    arrangement: Optional[dict[str, Any]] = None
    tokenizer: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    stage: dict[str, StageConfig] = field(default_factory=dict)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# ---------------------------------------------------------------------------------------------------- typed views
T = TypeVar("T")
KILL_SIGNALS = ("KILL", "TERM", "INT")  # trainer.kill_signal


def typed(node: Any, schema: type[T]) -> T:
    """A config node as an instance of its schema dataclass (``StageConfig``, ``TrainerConfig``, ...): attribute
    access that static checkers verify. Open fields (``Any``: a stage's ``template``, ``objective``) become plain
    dicts / strings."""
    if isinstance(node, schema):
        return node
    if isinstance(node, (DictConfig, ListConfig)):
        # resolved where it stands: merged alone, an interpolation of another key (`${oc.select:data.x,default}`)
        # would resolve against the detached copy and silently take its default
        node = OmegaConf.to_container(node, resolve=True)
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), node))


def stage_config(cfg: DictConfig, name: str) -> StageConfig:
    """Stage ``name`` of a checked config, typed."""
    return typed(cfg.stage[name], StageConfig)


def trainer_config(cfg: DictConfig) -> TrainerConfig:
    """``trainer`` of a checked config, typed."""
    return typed(cfg.trainer, TrainerConfig)
