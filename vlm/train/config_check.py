"""Config mistakes as one-line ``ConfigError`` s: the key, the value, what was expected and the closest valid key or
option, raised before anything is built or written.

- ``explain(exc, overrides, ...)`` turns a Hydra composition error or an OmegaConf schema error into that form;
- ``check_components(cfg)`` (part of ``config.check``, i.e. at compose time) is the one pass over every name a config
  refers to, against the registries, without building or reading anything: strategy, precision, logger; ``encoder``,
  ``connector``, ``llm``, ``tokenizer`` and the data sets the run reads (names, arguments, each component's own
  ``check_options``); each stage's template, optimizer, scheduler, loss weighting and policies (``check_stage_parts``;
  the objective: ``config.check_objective``);
- ``check_runnable(cfg, device)`` (before a run) checks only what needs the machine: that the data and ``init_from``
  paths exist, and what the policies need on ``device`` (qlora: CUDA).
"""
from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from vlm.registry import OptionError, Registry, accepted_kwargs, did_you_mean, to_dict
from vlm.train.errors import ConfigError
from vlm.train.recipes import list_options, recipes_dir, user_recipe_dirs
from vlm.train.schema import KILL_SIGNALS, MODULES, RunConfig, TrainerConfig, stage_config


def unknown_choice(key: str, value: Any, what: str, options: Iterable[Any]) -> ConfigError:
    """``key=value: unknown <what>; expected one of [...] (did you mean ...?)``."""
    options = sorted(str(o) for o in options)
    return ConfigError(f"{key}={value!r}: unknown {what}; expected one of {options} ({did_you_mean(value, options)})")


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else text


# ---------------------------------------------------------------------------------------------------- schema keys
def schema_keys(path: Sequence[str]) -> list[str]:
    """The keys the schema allows under ``path`` (``["stage", "sft"]`` -> StageConfig's fields); [] if open."""
    tp: Any = RunConfig
    for part in path:
        if dataclasses.is_dataclass(tp):
            hints = typing.get_type_hints(tp)
            if part not in hints:
                return []
            tp = hints[part]
        elif typing.get_origin(tp) is dict:
            tp = typing.get_args(tp)[1]
        else:
            return []
    return [f.name for f in dataclasses.fields(tp)] if dataclasses.is_dataclass(tp) else []


def _node_keys(cfg: Any, path: Sequence[str]) -> list[str]:
    """Keys of the mapping at ``path`` in ``cfg``, plus the accepted arguments of the component it names."""
    node = cfg
    for part in path:
        if not isinstance(node, DictConfig) or part not in node:
            return []
        node = node[part]
    if not isinstance(node, DictConfig):
        return []
    keys = [str(k) for k in node]
    reg = _registry_at(path)
    if reg is not None and isinstance(node.get("name"), str) and node.name in reg[0]:
        keys += accepted_kwargs(reg[0].get(node.name)) or []
    return keys


def unknown_key(setting: str, full_key: str, candidates: Iterable[str]) -> ConfigError:
    """``setting`` (``key=value`` as given) names ``full_key``, which does not exist; ``candidates``: keys that do."""
    parent, _, key = full_key.rpartition(".")
    where = parent or "the top level"
    candidates = sorted(set(candidates) - {key})
    hint = ""
    if parent and "." not in parent:
        owners = options_defining(parent, key)
        if owners:
            hint = f"; {key!r} is a key of {' / '.join(f'{parent}={o}' for o in owners)}: add that option"
    close = did_you_mean(key, candidates)
    if close == "no close match" and candidates:  # no near spelling (learning_rate for lr): list what there is
        close = f"no close match; its keys: {', '.join(candidates[:40])}{', ...' if len(candidates) > 40 else ''}"
    return ConfigError(f"{setting}: unknown key; expected a key of {where} ({close}){hint}")


def options_defining(group: str, key: str) -> list[str]:
    """The options of config ``group`` (its YAML files in the recipes folders) that define ``group.key``, e.g.
    ``data.train`` -> ``['files']``: what a user who sets a key of an option they did not select should add."""
    from omegaconf import OmegaConf


    found = []
    for folder in [recipes_dir(), *user_recipe_dirs()]:
        for path in sorted((folder / group).glob("*.yaml")):
            try:
                node = OmegaConf.load(path)
            except Exception:  # an unreadable option says nothing about this key  # noqa: BLE001
                continue
            node = node.get(group) if isinstance(node, DictConfig) and group in node else None
            if isinstance(node, DictConfig) and key in node.keys() and path.stem not in found:  # `in`: not ???
                found.append(path.stem)
    return found


# --------------------------------------------------------------------------------------------- Hydra / OmegaConf
def explain(exc: BaseException, overrides: Sequence[str] = (), raw: Any = None,
            compose_without: Callable[[str], Any] | None = None) -> ConfigError:
    """One line for a composition (Hydra) or schema-merge (OmegaConf) error.

    ``raw`` is the composed config the schema refused (for the offending value); ``compose_without(override)``
    composes without one override (for the keys that exist where an unknown key was set).
    """
    from hydra.errors import MissingConfigException, OverrideParseException

    if isinstance(exc, MissingConfigException):
        return _missing_option(exc, overrides)
    if isinstance(exc, OverrideParseException):
        return ConfigError(f"cannot parse the overrides {list(overrides)}: {_first_line(str(exc))}")
    cause = exc if isinstance(exc, OmegaConfBaseException) else exc.__cause__
    full_key = getattr(cause, "full_key", None)
    if isinstance(cause, OmegaConfBaseException) and full_key:
        path = full_key.split(".")
        keys = [o.lstrip("+~").partition("=")[0] for o in overrides]
        given = [o for o, k in zip(overrides, keys) if k == full_key or k.startswith(f"{full_key}.")]
        setting = given[-1].lstrip("+~") if given else f"{full_key}={_value_at(raw, path)!r}"
        if isinstance(cause, (KeyError, AttributeError)):  # ConfigKeyError / ConfigAttributeError: no such key
            if given and path[-1] in schema_keys(path[:-1]):  # a schema key the recipe leaves at its default
                return ConfigError(f"{setting}: {full_key} is not set by the recipe (the schema default applies); "
                                   f"expected +{setting} to set it")
            base = compose_without(given[-1]) if given and compose_without else raw
            return unknown_key(setting, full_key, schema_keys(path[:-1]) + _node_keys(base, path[:-1]))
        return ConfigError(f"{setting}: {_first_line(getattr(cause, 'msg', str(cause)))}")
    return ConfigError(f"cannot compose the recipe with overrides {list(overrides)}: {_first_line(str(exc))}")


def _value_at(cfg: Any, path: Sequence[str]) -> Any:
    node = cfg
    for part in path:
        if not isinstance(node, DictConfig) or part not in node:
            return None
        node = node[part]
    return node


def _missing_option(exc: Any, overrides: Sequence[str]) -> ConfigError:

    missing = str(getattr(exc, "missing_cfg_file", "") or "")
    group, _, option = missing.rpartition("/")
    if not group:
        return ConfigError(_first_line(str(exc)))
    given = [o for o in overrides if o.lstrip("+~").partition("=")[0] in (group, f"/{group}")]
    key = f"{group}={given[-1].partition('=')[2]}" if given else group
    options = list_options(group)
    return ConfigError(f"{key}: no option {option!r} in recipes/{group}/; expected one of {options} "
                       f"({did_you_mean(option, options)})")


# ------------------------------------------------------------------------------------------------ registry checks
def _registries() -> dict[str, tuple[Registry[Any], tuple[str, ...]]]:
    """Config group -> (registry, arguments the composer passes itself)."""
    from vlm import arrangements, connectors, encoders, llm
    from vlm.data.datasets import DATASETS
    from vlm.data.tokenizer import TOKENIZERS

    return {"encoder": (encoders.ENCODERS, ()), "connector": (connectors.CONNECTORS, ("in_dim", "out_dim")),
            "llm": (llm.LLMS, ()), "tokenizer": (TOKENIZERS, ("data",)),
            "data": (DATASETS, ("processor", "add_generation_prompt")),
            "arrangement": (arrangements.ARRANGEMENTS, ("dim",))}


def _registry_at(path: Sequence[str]) -> tuple[Registry[Any], tuple[str, ...]] | None:
    regs = _registries()
    if len(path) == 1 and path[0] in regs and path[0] != "data":
        return regs[path[0]]
    if len(path) == 2 and path[0] == "data":
        return regs["data"]
    return None


def check_component(key: str, spec: Any, registry: Registry[Any], provided: Sequence[str] = (),
                    context: dict[str, Any] | None = None) -> None:
    """``spec`` (``name`` + arguments, or a bare name) names a registered component and passes only arguments it
    takes; then the component's own ``check_options`` (if it states one) checks the options without building
    anything. ``context``: run-level values (e.g. ``data``) handed to ``check_options`` when it takes them."""
    bare, node = isinstance(spec, str), spec
    spec = {"name": spec} if bare else (to_dict(spec) if spec is not None else {})
    if "name" not in spec:
        raise ConfigError(f"{key}: no `name`; expected one of {registry.names()}")
    name = spec.pop("name")
    if name not in registry:
        raise unknown_choice(key if bare else f"{key}.name", name, registry.family, registry.names())
    factory = registry.get(name)
    accepted = accepted_kwargs(factory)
    if accepted is not None:
        accepted = [a for a in accepted if a not in provided] + list(registry.common_args)
        for arg in spec:
            if arg not in accepted:
                raise ConfigError(f"{key}.{arg}={spec[arg]!r}: {registry.family} {name!r} takes no argument {arg!r}; "
                                  f"expected one of {accepted} ({did_you_mean(arg, accepted)})")
    checker = getattr(factory, "check_options", None)  # a component's own check of nested options (no build)
    if checker is not None:
        wanted = accepted_kwargs(checker)
        extra = {k: v for k, v in (context or {}).items() if wanted is None or k in wanted}
        try:
            checker(**spec, **extra)
        except ConfigError:  # already names its key
            raise
        except OptionError as e:  # one argument: name the key its value was set at (data.format, not data.sft)
            raise ConfigError(f"{option_source(node, key, e.option)}={e.value!r}: {_first_line(e.problem)}") from e
        except (TypeError, ValueError, KeyError) as e:
            raise ConfigError(f"{key}: {_first_line(str(e.args[0] if e.args else e))}") from e


def option_source(node: Any, key: str, option: str) -> str:
    """The config key where argument ``option`` of the component at ``key`` was set: the key a plain interpolation
    points at (``data.sft.format: ${data.format}`` -> ``data.format``), else ``key.option``."""
    import re

    raw = node._get_node(option)._value() if isinstance(node, DictConfig) and option in node else None
    found = re.fullmatch(r"\$\{([A-Za-z_][\w.]*)\}", raw) if isinstance(raw, str) else None
    return found.group(1) if found else f"{key}.{option}"


def used_data_keys(cfg: DictConfig) -> list[str]:
    """The ``data`` keys the run reads: each stage's training set, then the evaluation set."""
    keys = list(dict.fromkeys(cfg.stage[n].data for n in cfg.stages))
    if cfg.eval.enabled and cfg.eval.data is not None:
        keys.append(cfg.eval.data)
    return list(dict.fromkeys(keys))


def check_components(cfg: DictConfig) -> None:
    """The one pass over every name the run refers to (part of ``config.check``; nothing is built, nothing read
    from disk): strategy, precision, logger; ``encoder``, ``connector``, ``llm``, ``tokenizer`` and the data sets
    the run reads (names and arguments, ``check_options``); each stage's parts (``check_stage_parts``)."""
    from vlm.train.distributed import DTYPES, STRATEGIES
    from vlm.train.loggers import BACKENDS

    for key, value, options, what in (
            ("trainer.strategy", cfg.trainer.strategy, STRATEGIES.names(), "strategy"),
            ("trainer.precision", cfg.trainer.precision, ["auto", *DTYPES], "precision"),
            ("logger.name", cfg.logger.name, BACKENDS.names(), "logger")):
        if value not in options:
            raise unknown_choice(key, value, what, options)
    regs = _registries()
    for group in MODULES:
        check_component(group, cfg[group], *regs[group])
    if cfg.get("arrangement") is not None:
        check_component("arrangement", cfg.arrangement, *regs["arrangement"])
    check_component("tokenizer", cfg.tokenizer, *regs["tokenizer"], context={"data": to_dict(cfg.data)})
    for key in used_data_keys(cfg):
        check_component(f"data.{key}", cfg.data[key], *regs["data"])
    check_stage_parts(cfg)


def check_stage_parts(cfg: DictConfig) -> None:
    """Each stage's template (name and options), optimizer, scheduler, loss weighting and policies (names, and
    each policy's device-free ``check``: e.g. no ``lora`` on the connector). The objective is checked by
    ``config.check_objective``."""
    from vlm.data.templates import TEMPLATES
    from vlm.loss import WEIGHTINGS
    from vlm.train.optim import OPTIMIZERS, SCHEDULES
    from vlm.train.policy import POLICIES

    for name in cfg.stages:
        st, pre = cfg.stage[name], f"stage.{name}"
        check_component(f"{pre}.template", st.template, TEMPLATES)
        for key, value, reg in ((f"{pre}.optimizer", st.optimizer, OPTIMIZERS),
                                (f"{pre}.scheduler", st.scheduler, SCHEDULES)):
            if value not in reg:
                raise unknown_choice(key, value, reg.family, reg.names())
        if st.loss_weighting not in WEIGHTINGS:  # the registry, so a newly registered weighting is accepted
            raise unknown_choice(f"{pre}.loss_weighting", st.loss_weighting, "loss weighting", WEIGHTINGS.names())
        for module in MODULES:
            if st.policy[module] not in POLICIES:
                raise unknown_choice(f"{pre}.policy.{module}", st.policy[module], "policy", POLICIES.names())
        check_stage_counts(st, pre)
        check_stage_tiling(st, pre)
        check_stage_arrangement(cfg, st, pre)
        check_stage_video(st, pre)
        check_stage_policies(cfg, name)


def check_stage_tiling(st: Any, pre: str) -> None:
    """A stage's ``tiling`` (``ImageProcessor``'s: kind, keys, ``1 <= min_tiles <= max_tiles``)."""
    from vlm.data.images import check_tiling
    from vlm.registry import plain

    if st.get("tiling") is None:
        return
    try:
        check_tiling(plain(st.tiling))
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{pre}.tiling: {e}") from e


def check_stage_arrangement(cfg: DictConfig, st: Any, pre: str) -> None:
    """With an ``arrangement`` (``vlm.arrangements``), a stage's ``tiling`` is null (the arrangement's layout is
    used) or exactly the layout the arrangement arranges (``Arrangement.layout()``: e.g. ``anyres`` with the same
    pinpoints); anything else would give the model views it cannot place."""
    from vlm.arrangements import ARRANGEMENTS
    from vlm.registry import plain

    if cfg.get("arrangement") is None or st.get("tiling") is None:
        return
    spec = to_dict(cfg.arrangement)
    expected = ARRANGEMENTS.get(spec["name"]).expected_layout(spec)
    tiling = plain(st.tiling)
    differs = {k: tiling.get(k) for k, v in expected.items() if tiling.get(k) != v}
    if differs:
        raise ConfigError(f"{pre}.tiling={tiling}: the {spec['name']} arrangement arranges the views of "
                          f"{expected}; {differs} differ (set {pre}.tiling=null to use the arrangement's layout)")


def check_stage_video(st: Any, pre: str) -> None:
    """A stage's ``video`` options (``vlm.data.video.PER_VIDEO`` keys, valid values)."""
    from vlm.data.video import PER_VIDEO, check_video_options
    from vlm.registry import plain

    if st.get("video") is None:
        return
    try:
        check_video_options(plain(st.video), accepted=PER_VIDEO)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{pre}.video: {e}") from e


#: stage keys that count something: (key, smallest valid value, whether null is allowed)
STAGE_COUNTS = (("max_steps", 1, True), ("global_batch_size", 1, False), ("micro_batch_size", 1, False),
                ("save_every", 1, True), ("eval_every", 1, True), ("warmup_steps", 0, True),
                ("max_tiles_per_sample", 1, True), ("max_length", 1, True))
#: stage keys that are amounts: (key, lowest, highest, whether the lowest itself is allowed, whether null is allowed)
STAGE_AMOUNTS = (("lr", 0.0, None, True, False), ("weight_decay", 0.0, None, True, False),
                 ("warmup_ratio", 0.0, 1.0, True, False), ("min_lr_ratio", 0.0, 1.0, True, False),
                 ("eps", 0.0, None, False, False), ("max_grad_norm", 0.0, None, False, True))


def check_stage_counts(st: Any, pre: str) -> None:
    """Step and batch counts are whole numbers in range (``max_steps=-1`` would silently train nothing: leave it
    unset to train ``epochs``); ``epochs`` is positive."""
    for key, low, nullable in STAGE_COUNTS:
        value = st.get(key)
        if value is None and nullable:
            continue
        if value is None or int(value) < low:
            unset = " or leave it unset" + (" (then `epochs` sets the length)" if key == "max_steps" else "")
            raise ConfigError(f"{pre}.{key}={value!r}: expected a whole number >= {low}{unset if nullable else ''}")
    if st.get("epochs") is not None and float(st.epochs) <= 0:
        raise ConfigError(f"{pre}.epochs={st.epochs!r}: expected a positive number of epochs")
    for key, low, high, closed, nullable in STAGE_AMOUNTS:  # what the optimizer would refuse when the stage starts
        value = st.get(key)
        if value is None and nullable:
            continue
        if value is None or (value < low if closed else value <= low) or (high is not None and value > high):
            span = f"{'>=' if closed else '>'} {low:g}" + (f" and <= {high:g}" if high is not None else "")
            raise ConfigError(f"{pre}.{key}={value!r}: expected a number {span}" + (" or null" if nullable else ""))
    betas = list(st.get("betas") or [])
    if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
        raise ConfigError(f"{pre}.betas={betas!r}: expected two numbers in [0, 1), e.g. [0.9, 0.999]")


def check_stage_policies(cfg: DictConfig, name: str, device: Any = None) -> None:
    """``policy.check_policies`` of stage ``name`` as a ``ConfigError``: the config alone (``device=None``), or what
    the policies need on the run's ``device``."""
    from vlm.train.policy import check_policies

    try:
        check_policies(stage_config(cfg, name), device)
    except (ValueError, RuntimeError) as e:
        raise ConfigError(f"stage.{name}.{_first_line(str(e))}") from e


def check_runnable(cfg: DictConfig, device: Any = None) -> None:
    """What a run needs beyond a checked config (``config.check``: every name, before this): the files it reads
    (``check_files``) and, given the ``device`` it runs on, what each stage's policies need there (qlora: CUDA,
    bitsandbytes). ``python -m vlm.train`` calls it for every job before starting (no device yet); ``run`` with
    its device."""
    check_files(cfg)
    if device is not None:
        for name in cfg.stages:
            check_stage_policies(cfg, name, device)


def check_files(cfg: DictConfig) -> None:
    """The data files/folders and ``init_from`` the run reads exist (``init_from``: and hold weights)."""
    from vlm.train.export import resolve_weights

    for key in used_data_keys(cfg):
        spec = cfg.data[key]
        for field in ("path", "image_root"):
            value = spec.get(field)
            if value is not None and not Path(value).exists():
                raise ConfigError(f"data.{key}.{field}={value!r}: does not exist; expected an existing "
                                  f"{'file' if field == 'path' else 'folder'} (set it, or $VLM_DATA)")
    if cfg.init_from is not None:
        if not Path(cfg.init_from).exists():
            raise ConfigError(f"init_from={cfg.init_from!r}: does not exist; expected a run, stage or final/ "
                              f"directory or a .safetensors file")
        try:
            resolve_weights(Path(cfg.init_from))
        except (FileNotFoundError, ValueError) as e:
            raise ConfigError(f"init_from={cfg.init_from!r}: {_first_line(str(e))}") from e


def raw_without_hydra(cfg: Any) -> DictConfig:
    raw = cfg if isinstance(cfg, DictConfig) else OmegaConf.create(cfg)
    return OmegaConf.masked_copy(raw, [k for k in raw if k != "hydra"]) if "hydra" in raw else raw


def check_kill_at(trainer: TrainerConfig, stages: Sequence[str]) -> str | None:
    """Why ``trainer.kill_at`` / ``trainer.kill_signal`` are invalid, or ``None``."""
    if trainer.kill_signal not in KILL_SIGNALS:
        return f"trainer.kill_signal={trainer.kill_signal!r}; expected one of {list(KILL_SIGNALS)}"
    if trainer.kill_at is None:
        return None
    stage, _, point = str(trainer.kill_at).rpartition(":")
    if stage not in stages or not (point == "end" or point.isdigit()):
        return (f"trainer.kill_at={trainer.kill_at!r}; expected '<stage>:<step>' or '<stage>:end' with a stage of "
                f"{list(stages)}")
    return None
