"""One resolver for every extension point: a registry name or a `package.module:attr` path."""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

from asyncrl.errors import PluginError


def resolve(field: str, spec: str, registry: Mapping[str, Any]) -> Any:
    """Return `registry[spec]`, or import `module:attr`.

    Args:
        field: the config field the spec came from, named in errors (e.g. "reward.fn").
        spec: a registered name, or "package.module:attr".
        registry: the built-ins of this extension point.

    Raises:
        PluginError: naming the field, the spec, the known names and how to write a path.
    """
    if spec in registry:
        return registry[spec]
    known = ", ".join(sorted(registry))
    if ":" not in spec:
        raise PluginError(
            f"{field}: unknown name {spec!r}. Use one of: {known}, "
            "or a 'package.module:function' path to your own"
        )
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # any import-time failure of user code is a plugin error
        raise PluginError(
            f"{field}: cannot import module {module_name!r} from {spec!r} "
            f"({type(exc).__name__}: {exc}); check that it is importable (on PYTHONPATH)"
        ) from None
    try:
        return getattr(module, attr)
    except AttributeError:
        raise PluginError(
            f"{field}: module {module_name!r} has no attribute {attr!r} (from {spec!r})"
        ) from None
