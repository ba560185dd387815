"""One registry per component family: ``@REG.register("name")``, exact lookup, ``REG.build(cfg)``.

``cfg`` is a mapping (a dict or an OmegaConf node, as a Hydra YAML gives) holding ``name`` plus the component's
keyword arguments. Lookup is exact: no prefix or substring matching, so names cannot collide silently.
"""
from __future__ import annotations

import difflib
import inspect
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Generic, TypeVar

T = TypeVar("T")


def _tokens(name: str) -> list[str]:
    return [t for t in re.split(r"[_\-.\s]+", name.lower()) if t]


def similarity(word: Any, option: Any) -> float:
    """How close ``option`` is to ``word`` in [0, 1]: the larger of ``difflib``'s ratio of the whole names and the
    Dice overlap of their ``_``-separated words (``lr_rate`` ~ ``lr``: 0.67, ``min_lr_ratio``: 0.4 by words and 0.63
    by characters), so a name that adds or drops a whole word stays close to it."""
    word, option = str(word), str(option)
    ratio = difflib.SequenceMatcher(None, word.lower(), option.lower()).ratio()
    a, b = _tokens(word), _tokens(option)
    if not a or not b:
        return ratio
    rest, shared = list(b), 0
    for t in a:
        if t in rest:
            rest.remove(t)
            shared += 1
    return max(ratio, 2 * shared / (len(a) + len(b)))


def close_matches(word: Any, options: Iterable[Any], n: int = 3, cutoff: float = 0.6) -> list[str]:
    """The ``n`` entries of ``options`` closest to ``word`` (:func:`similarity` >= ``cutoff``), best first (ties:
    in the order given)."""
    scored = [(similarity(word, o), i, str(o)) for i, o in enumerate(dict.fromkeys(str(o) for o in options))]
    return [o for s, _, o in sorted(scored, key=lambda x: (-x[0], x[1])) if s >= cutoff][:n]


class OptionError(ValueError):
    """A component option with a bad value, raised by a component's ``check_options``: ``option`` names the
    argument (``format``) so that a config check can name the key the user set (``data.format``, where the
    argument's value comes from); ``str(err)`` is ``option=value: problem``."""

    def __init__(self, option: str, value: Any, problem: str) -> None:
        self.option, self.value, self.problem = option, value, problem
        super().__init__(f"{option}={value!r}: {problem}")

    def __reduce__(self):
        return (type(self), (self.option, self.value, self.problem))


def did_you_mean(word: Any, options: Iterable[Any]) -> str:
    """``"did you mean 'a' or 'b'?"`` for the options closest to ``word``, or ``"no close match"``."""
    close = close_matches(word, options)
    return f"did you mean {' or '.join(repr(c) for c in close)}?" if close else "no close match"


def plain(value: Any) -> Any:
    """``value`` as plain Python data: an OmegaConf node becomes its ``dict`` / ``list`` (interpolations resolved);
    anything else is returned as is."""
    try:
        from omegaconf import Container, OmegaConf
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        return value
    return OmegaConf.to_container(value, resolve=True) if isinstance(value, Container) else value


def to_dict(cfg: Any) -> dict[str, Any]:
    """A plain ``dict`` copy of a mapping or OmegaConf node (interpolations resolved); ``TypeError`` otherwise."""
    cfg = plain(cfg)
    if not isinstance(cfg, Mapping):
        raise TypeError(f"expected a mapping with a 'name' key, got {type(cfg).__name__}: {cfg!r}")
    return dict(cfg)


class Registry(Generic[T]):
    """Maps exact names to component classes or factory functions of one family."""

    def __init__(self, family: str, common_args: tuple[str, ...] = ()) -> None:
        """``common_args``: arguments the family's own ``build`` takes for every member (e.g. a connector's
        ``dtype``), accepted by config checks beside each member's own."""
        self.family, self.common_args = family, tuple(common_args)
        self._entries: dict[str, Callable[..., T]] = {}

    def register(self, name: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
        def deco(obj: Callable[..., T]) -> Callable[..., T]:
            if name in self._entries:
                raise ValueError(f"{self.family} {name!r} is already registered (by {self._entries[name]!r})")
            self._entries[name] = obj
            try:
                obj.registry_name = name  # type: ignore[attr-defined]
            except (AttributeError, TypeError):
                pass
            return obj

        return deco

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def get(self, name: str) -> Callable[..., T]:
        if name not in self._entries:
            raise KeyError(f"unknown {self.family} {name!r} ({did_you_mean(name, self.names())}); known "
                           f"{self.family}s: {', '.join(self.names()) or '(none)'}")
        return self._entries[name]

    def build(self, cfg: Any, **extra: Any) -> T:
        """Build from ``cfg`` (``name`` + kwargs). ``extra`` kwargs (e.g. dimensions filled in by the composer)
        are passed only when the component does not already get them from ``cfg``."""
        kwargs = to_dict(cfg)
        if "name" not in kwargs:
            raise KeyError(f"{self.family} config needs a 'name' key (one of: {', '.join(self.names())}); got keys "
                           f"{sorted(kwargs)}")
        name = kwargs.pop("name")
        factory = self.get(name)
        for k, v in extra.items():
            kwargs.setdefault(k, v)
        check_kwargs(factory, kwargs, f"{self.family} {name!r}")
        return factory(**kwargs)


def accepted_kwargs(factory: Callable[..., Any]) -> list[str] | None:
    """The keyword arguments ``factory`` takes, in order; ``None`` when it takes any (``**kwargs``).

    A factory that passes its ``**kwargs`` on to one callable states it as ``factory.forwards_to = callable``:
    its accepted arguments are then its own plus that callable's."""
    params = inspect.signature(factory).parameters
    own = [n for n, p in params.items() if n != "self" and p.kind not in (inspect.Parameter.VAR_POSITIONAL,
                                                                         inspect.Parameter.VAR_KEYWORD)]
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        target = getattr(factory, "forwards_to", None)
        forwarded = accepted_kwargs(target) if target is not None else None
        return None if forwarded is None else own + [n for n in forwarded if n not in own]
    return own


def check_kwargs(factory: Callable[..., Any], kwargs: Mapping[str, Any], what: str) -> None:
    """Raise ``TypeError`` naming unknown keys and the accepted ones, before calling ``factory``."""
    params = inspect.signature(factory).parameters
    accepted = accepted_kwargs(factory)
    if accepted is None:
        return
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        hints = ", ".join(f"{k!r} ({did_you_mean(k, accepted)})" for k in unknown)
        raise TypeError(f"{what}: unknown argument(s) {hints}; accepted: {accepted}")
    missing = [n for n, p in params.items()
               if n != "self" and p.default is inspect.Parameter.empty and n not in kwargs
               and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)]
    if missing:
        raise TypeError(f"{what}: missing required argument(s) {missing}")
