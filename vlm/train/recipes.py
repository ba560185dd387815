"""Where recipes are found: the shipped ``recipes/`` folder (or a whole ``$VLM_RECIPES`` folder used instead), the
user folders that add options to it (``$VLM_RECIPES`` folders without a ``config.yaml``, ``--config-dir``), and the
options of a config group. Hydra composes from these (``vlm.train.config.compose``)."""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from vlm.train.errors import ConfigError

RECIPES_ENV = "VLM_RECIPES"
PRIMARY_CONFIG = "config"


def _shipped_recipes() -> Path:
    import vlm

    path = Path(vlm.__file__).resolve().parents[1] / "recipes"
    if not (path / f"{PRIMARY_CONFIG}.yaml").is_file():
        raise ConfigError(f"recipes/ not found at {str(path)!r} (install vlm with `pip install -e .` from a checkout, "
                          f"or point ${RECIPES_ENV} at a recipes folder)")
    return path


def _env_dirs() -> list[Path]:
    env = os.environ.get(RECIPES_ENV, "")
    out = []
    for part in filter(None, env.split(os.pathsep)):
        path = Path(part).expanduser().resolve()
        if not path.is_dir():
            raise ConfigError(f"${RECIPES_ENV}={env!r}: {str(path)!r} is not a folder; expected a folder of your own "
                              f"recipes (recipe/<name>.yaml, data/<name>.yaml, ...)")
        out.append(path)
    return out


def recipes_dir() -> Path:
    """The primary recipes folder: the shipped ``recipes/`` (next to the ``vlm`` package, editable install), or a
    ``$VLM_RECIPES`` folder that has its own ``config.yaml`` (a whole recipes folder, used instead)."""
    whole = [p for p in _env_dirs() if (p / f"{PRIMARY_CONFIG}.yaml").is_file()]
    return whole[0] if whole else _shipped_recipes()


def user_recipe_dirs(config_dir: str | os.PathLike | None = None) -> list[Path]:
    """Folders whose options *add to* the primary ones (Hydra's config search path): the ``$VLM_RECIPES`` folders
    (``os.pathsep``-separated) without a ``config.yaml``, and ``config_dir`` (``--config-dir``). A user recipe can
    extend a shipped one (``defaults: [tiny]``). An option with the name of a shipped one is an error (which one
    wins would depend on how the folder was given)."""
    dirs = [p for p in _env_dirs() if not (p / f"{PRIMARY_CONFIG}.yaml").is_file()]
    if config_dir is not None:
        path = Path(config_dir).expanduser().resolve()
        if not path.is_dir():
            raise ConfigError(f"--config-dir={str(config_dir)!r}: not a folder; expected a folder of your own recipes")
        dirs.append(path)
    dirs = list(dict.fromkeys(dirs))
    primary = recipes_dir()
    for d in dirs:
        for path in sorted(d.rglob("*.yaml")):
            rel = path.relative_to(d)
            if (primary / rel).is_file() and rel.as_posix() != f"{PRIMARY_CONFIG}.yaml":
                raise ConfigError(f"{path}: {rel.as_posix()} is a shipped option ({primary / rel}); expected a new "
                                  f"name (e.g. {rel.parent.as_posix()}/my_{rel.stem}.yaml with `defaults: "
                                  f"[{rel.stem}]` to extend it)")
    return dirs


def search_path_override(dirs: Sequence[Path]) -> list[str]:
    """``hydra.searchpath=[file://...]`` for ``dirs`` (none when empty)."""
    return [f"hydra.searchpath=[{','.join(f'file://{d}' for d in dirs)}]"] if dirs else []


def list_options(group: str) -> list[str]:
    """The options of a config group (``recipe``, ``encoder``, ...): the YAML files in ``recipes/<group>/`` and in
    the user recipe folders (``$VLM_RECIPES``)."""
    return sorted({p.stem for d in (recipes_dir(), *user_recipe_dirs()) for p in (d / group).glob("*.yaml")})
