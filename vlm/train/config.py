"""Find ``recipes/``, compose a recipe with Hydra, and check it against the schema.

``compose(recipe="tiny", overrides=["connector=linear", "stage.sft.lr=1e-4"])`` gives the same config as
``python -m vlm.train recipe=tiny connector=linear stage.sft.lr=1e-4``.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from vlm.recompute import mode as recompute_mode
from vlm.registry import did_you_mean
from vlm.train.config_check import check_components, check_kill_at, explain, raw_without_hydra, unknown_choice
from vlm.train.errors import ConfigError
from vlm.train.resolvers import register_resolvers
from vlm.train.recipes import (  # noqa: F401  (part of this module's API)
    PRIMARY_CONFIG,
    RECIPES_ENV,
    list_options,
    recipes_dir,
    search_path_override,
    user_recipe_dirs,
)
from vlm.train.schema import (  # noqa: F401  (stage_config, trainer_config, typed: part of this module's API)
    MODULES,
    RunConfig,
    StageConfig,
    TrainerConfig,
    stage_config,
    trainer_config,
    typed,
)

register_resolvers()  # ${vlm.image_size:...}, ${vlm.cells:...}: settings that follow the data


def compose(recipe: str | None = None, overrides: Sequence[str] = (), *, validate: bool = True,
            config_dir: str | os.PathLike | None = None) -> DictConfig:
    """Compose ``recipes/config.yaml`` + ``recipe`` + command-line style ``overrides`` into a checked config.
    Options come from the shipped recipes plus the user folders (``$VLM_RECIPES``, ``config_dir``)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException

    overrides = ([f"recipe={recipe}"] if recipe else []) + list(overrides)
    search = search_path_override(user_recipe_dirs(config_dir))

    def _compose(overrides: list[str]) -> DictConfig:
        if GlobalHydra.instance().is_initialized():  # e.g. called from inside a Hydra app
            GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(recipes_dir()), version_base=None):
            return hydra_compose(PRIMARY_CONFIG, overrides=overrides + search)

    def without(override: str) -> DictConfig | None:
        try:
            return _compose([o for o in overrides if o != override])
        except (HydraException, OmegaConfBaseException):
            return None

    try:
        cfg = _compose(overrides)
    except (HydraException, OmegaConfBaseException) as e:
        raise explain(e, overrides, compose_without=without) from e
    return check(cfg, overrides) if validate else cfg


def check(cfg: DictConfig | dict[str, Any], overrides: Sequence[str] = ()) -> DictConfig:
    """Merge onto the schema (filling defaults, rejecting unknown keys / wrong types), check cross-references and
    the components' names and arguments (``check_components``). ``overrides`` (those the config was composed with)
    only make error messages quote the value as given.

    Returns a struct-mode config: setting a key that does not exist raises.
    """
    raw = raw_without_hydra(cfg)
    if missing := missing_values(raw):
        raise ConfigError(f"{missing[0]}=???: not set; expected a value on the command line ({missing[0]}=...)"
                          + (f"; also not set: {missing[1:]}" if missing[1:] else ""))
    try:
        out = OmegaConf.merge(OmegaConf.structured(RunConfig), raw)
    except OmegaConfBaseException as e:
        raise explain(e, overrides, raw=raw) from e
    stages = list(out.stages)
    if not stages:
        raise ConfigError("stages=[]: nothing to train; expected a list of configured stages, e.g. "
                          f"{list(out.stage)}")
    for name in stages:
        if name in raw.get("stage", {}) and "data" not in raw["stage"][name]:
            raise ConfigError(f"stages={stages}: stage {name!r} has only the recipe's settings for it (no stage option "
                              f"selected it: every recipes/stage/*.yaml sets `data`); with stage=[...] list it too, or "
                              f"give the stages to run: stages=[...] (the configured stages run in order otherwise)")
        if name not in out.stage:
            known = sorted(set(out.stage) | set(list_options("stage")))
            raise ConfigError(f"stages={stages}: {name!r} is not a configured stage; expected names from "
                              f"{list(out.stage)} (or add one with stage=[...] from recipes/stage/: "
                              f"{list_options('stage')}) ({did_you_mean(name, known)})")
        st = out.stage[name]
        if st.data not in data_sets(out.data):
            configured = data_sets(out.data)
            raise ConfigError(f"stage.{name}.data={st.data!r}: no such data set is configured; expected one of "
                              f"{configured} ({did_you_mean(st.data, configured)})")
        for module in MODULES:
            lr = st.module_lr[module]
            if lr is not None and lr < 0:
                raise ConfigError(f"stage.{name}.module_lr.{module}={lr}: negative; expected a learning rate >= 0 "
                              f"or null (use stage.{name}.lr)")
        for key in ("global_batch_size", "micro_batch_size"):
            if st[key] < 1:
                raise ConfigError(f"stage.{name}.{key}={st[key]}: expected a batch size >= 1")
        if st.packing and st.max_length is None:
            raise ConfigError(f"stage.{name}.packing=true: needs stage.{name}.max_length (the packed row length); "
                              f"got null")
        if st.cache_features and st.policy.encoder != "frozen":
            raise ConfigError(f"stage.{name}.cache_features=true stores the encoder's outputs, so it needs a frozen "
                              f"encoder; got stage.{name}.policy.encoder={st.policy.encoder!r} (set it to frozen or "
                              f"cache_features=false)")
        check_objective(name, st, out.trainer.strategy)
    for module in MODULES:
        if "name" not in out[module]:
            raise ConfigError(f"`{module}` has no `name` (pick an option: {module}=<one of {list_options(module)}>)")
    if (bad := check_kill_at(out.trainer, stages)) is not None:
        raise ConfigError(bad)
    try:
        out.trainer.gradient_checkpointing = recompute_mode(out.trainer.gradient_checkpointing)
    except ValueError as e:
        raise ConfigError(f"trainer.{e}") from None
    if out.eval.enabled and out.eval.data is not None:
        if out.eval.data not in out.data:
            raise ConfigError(f"eval.data={out.eval.data!r}: no such data set is configured; expected one of "
                              f"{list(out.data)} or null ({did_you_mean(out.eval.data, list(out.data))})")
        if out.data[out.eval.data] is None:  # a recipe without an evaluation set (data.eval: null)
            out.eval.enabled = False
    try:
        check_components(out)  # resolves the components' values: data-dependent ones read the data here
    except OmegaConfBaseException as e:
        raise unresolvable(e) from e
    OmegaConf.set_struct(out, True)
    return out


def missing_values(cfg: Any, prefix: str = "") -> list[str]:
    """The keys of ``cfg`` whose value is ``???`` (to be given on the command line), without resolving anything."""
    out: list[str] = []
    if isinstance(cfg, DictConfig):
        for key in cfg.keys():
            if OmegaConf.is_missing(cfg, key):
                out.append(f"{prefix}{key}")
            else:
                out += missing_values(cfg._get_node(key), f"{prefix}{key}.")
    return out


def unresolvable(e: BaseException) -> ConfigError:
    """A value that cannot be resolved: the ``ConfigError`` a resolver raised (``${vlm.image_size:...}`` on a
    missing file), else the key and OmegaConf's first line."""
    seen: BaseException | None = e
    while seen is not None:
        if isinstance(seen, ConfigError):
            return seen
        seen = seen.__cause__ or seen.__context__
    message = str(getattr(e, "msg", e)).strip().splitlines()
    return ConfigError(f"{getattr(e, 'full_key', None) or 'config'}: {message[0] if message else type(e).__name__}")


def check_objective(name: str, st: DictConfig, strategy: str) -> None:
    """``stage.<name>.objective``: a registered objective whose options fit, on a strategy and batching it supports."""
    from vlm.objectives import OBJECTIVES
    from vlm.registry import accepted_kwargs, check_kwargs
    from vlm.train.distributed import STRATEGIES

    obj = st.objective
    if not isinstance(obj, DictConfig) or "name" not in obj:
        raise ConfigError(f"stage.{name}.objective must be a mapping with a `name` (one of "
                          f"{OBJECTIVES.names()}); got {obj!r}")
    if obj.name not in OBJECTIVES:
        raise unknown_choice(f"stage.{name}.objective.name", obj.name, "objective", OBJECTIVES.names())
    cls = OBJECTIVES.get(obj.name)
    opts = {k: v for k, v in obj.items() if k != "name"}
    if opts and not set(accepted_kwargs(cls) or ["*"]) - set(cls.stage_args):
        raise ConfigError(f"stage.{name}.objective: `{obj.name}` takes no options; got {sorted(opts)}")
    try:
        check_kwargs(cls, {**opts, **{k: None for k in cls.stage_args}}, f"stage.{name}.objective {obj.name!r}")
    except TypeError as e:
        raise ConfigError(str(e)) from e
    if strategy in STRATEGIES and STRATEGIES.get(strategy).shards_parameters and not cls.shardable:
        raise ConfigError(f"stage.{name}.objective={obj.name!r} runs on one process or with trainer.strategy=ddp, "
                          f"not {strategy} (its parameters are not sharded)")
    if st.packing and not cls.supports_packing:
        raise ConfigError(f"stage.{name}.objective={obj.name!r} needs one whole sample per row (no packing): set "
                          f"stage.{name}.packing=false")


def data_sets(data: DictConfig) -> list[str]:
    """The keys of ``data`` that are data sets (a mapping with a reader/dataset ``name``), not the data option's own
    settings (``data=files``: ``train``, ``heldout``, ...) or a set switched off (``null``)."""
    return [k for k in data if isinstance(data._get_node(k), DictConfig) and not data._get_node(k)._is_none()]


def model_config(cfg: DictConfig) -> dict[str, Any]:
    """The ``vlm.build`` config of a run: ``{encoder, connector, llm}`` as plain dicts (+ ``arrangement`` when set,
    + ``image_token`` when the run names one, e.g. Qwen-VL's ``<imgpad>``)."""
    out = {k: OmegaConf.to_container(cfg[k], resolve=True) for k in MODULES}
    if cfg.get("arrangement") is not None:
        out["arrangement"] = OmegaConf.to_container(cfg.arrangement, resolve=True)
    if cfg.get("image_token") is not None:
        out["image_token"] = cfg.image_token
    return out


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)
