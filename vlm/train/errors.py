"""The training package's config error, below every module that raises it (recipes, checks, data options, stages)."""


class ConfigError(ValueError):
    """A recipe that cannot run: unknown key or option, wrong type, missing file. Raised before training starts."""
