"""The MONAI configuration a component is being built from, for the few components that need it.

MONAI hands a config component its arguments, never the ``ConfigParser`` that builds it. Two parts
of the bundle need the configuration itself: stage 2 runs stage 1 on its own configuration
(:mod:`custom.engines.stages`), and the MLflow handler logs the run's settings
(:mod:`custom.handlers.tracking`). Both read it here, so that no list of keys has to be kept in step
with the config files.
"""

from __future__ import annotations

import copy
import inspect
from pathlib import Path

from monai.bundle import ConfigParser
from monai.bundle.utils import ID_SEP_KEY

#: longest list of plain values :func:`plain_settings` reports (longer ones are data, not settings)
MAX_LIST = 16


def calling_parser() -> ConfigParser | None:
    """The MONAI ``ConfigParser`` evaluating the caller (the innermost one on the call stack), or None
    when the caller is not being built from a configuration."""
    frame = inspect.currentframe()
    while frame is not None:
        owner = frame.f_locals.get("self")
        if isinstance(owner, ConfigParser):
            return owner
        frame = frame.f_back
    return None


def calling_config() -> dict:
    """A copy of the raw configuration (all files merged, all overrides applied) of the ``ConfigParser``
    that is evaluating the caller."""
    parser = calling_parser()
    if parser is None:
        raise RuntimeError("calling_config() must be called while a MONAI bundle config is being parsed")
    return copy.deepcopy(parser.get())


def _plain(value) -> bool:
    if isinstance(value, bool | int | float | str | Path):
        return True
    if isinstance(value, list | tuple) and len(value) <= MAX_LIST:
        return all(isinstance(v, bool | int | float | str) for v in value)
    return False


def plain_settings(parser: ConfigParser) -> dict[str, str]:
    """Every top-level setting ``parser`` has resolved so far whose value is plain (a number, string,
    bool, path, or a list of at most :data:`MAX_LIST` of those), as strings: the settings a run
    actually used, overrides included, with expressions evaluated. Nothing is evaluated here, so a
    setting no component referenced is left out, and so are ``None`` (not set) and objects."""
    resolved = parser.ref_resolver.resolved_content
    top_level = {k: v for k, v in resolved.items() if ID_SEP_KEY not in k and "#" not in k}
    return {k: str(v) for k, v in top_level.items() if v is not None and _plain(v)}
