"""Construct a built-in from config kwargs, with errors that name `<field>.<kwarg>`.

Convention: a built-in's constructor raises `ValueError("<kwarg>: <what is wrong and the fix>")`
for a bad value, so the error becomes `reward.kwargs.<kwarg>: ...` in the driver.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

from asyncrl.errors import PluginError

_NAMED = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)


def accepted_kwargs(target: Any, inject: Mapping[str, Any] = {}) -> dict[str, inspect.Parameter]:
    """The keyword parameters of a class or function that config may set (injected ones aside)."""
    return {name: p for name, p in inspect.signature(target).parameters.items()
            if p.kind in _NAMED and name not in inject}


def check_kwargs(field: str, target: Any, kwargs: Mapping[str, Any], *, what: str,
                 inject: Mapping[str, Any] = {}, skip: int = 0) -> None:
    """Raise PluginError naming `field.<name>` for an unknown or a missing kwarg.

    Args:
        skip: leading positional parameters that are not config (a user function's
            `prompt, response`).
    """
    params = dict(list(accepted_kwargs(target, inject).items())[skip:])
    accepted = ", ".join(params) or "none"
    takes_any = any(p.kind is p.VAR_KEYWORD
                    for p in inspect.signature(target).parameters.values())
    for name in kwargs:
        if name not in params and not takes_any:
            raise PluginError(f"{field}.{name}: not a parameter of {what}; accepted: {accepted}")
    for name, p in params.items():
        if p.default is p.empty and name not in kwargs:
            raise PluginError(f"{field}.{name}: required by {what}; accepted: {accepted}")


def construct(field: str, cls: type, kwargs: Mapping[str, Any], *, what: str,
              inject: Mapping[str, Any] = {}) -> Any:
    """`cls(**kwargs, **injected)`; `inject` supplies parameters config does not set (the task).

    Raises:
        PluginError: naming `field.<kwarg>` and the accepted kwargs, for an unknown, missing or
            invalid kwarg.
    """
    check_kwargs(field, cls, kwargs, what=what, inject=inject)
    signature = inspect.signature(cls).parameters
    injected = {name: value for name, value in inject.items() if name in signature}
    try:
        return cls(**kwargs, **injected)
    except (TypeError, ValueError) as exc:
        head = str(exc).partition(":")[0]
        where = f"{field}.{exc}" if head in kwargs or head in signature else f"{field}: {exc}"
        raise PluginError(f"{where} ({what})") from None
