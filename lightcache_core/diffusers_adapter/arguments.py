"""A forward call's named arguments, and its output's packing."""
from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch


# ----------------------------------------------------------------------------- arguments


class _Signature:
    """Finds a named argument of a forward call, positional or keyword, and replaces it."""

    def __init__(self, fn: Callable) -> None:
        try:
            params = list(inspect.signature(fn).parameters.values())
        except (TypeError, ValueError):
            params = []
        self.positions = {p.name: i for i, p in enumerate(params)
                          if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)}
        self.defaults = {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}

    def get(self, args: tuple, kwargs: dict, name: str, default: Any = None) -> Any:
        if name in kwargs:
            return kwargs[name]
        i = self.positions.get(name)
        if i is not None and i < len(args):
            return args[i]
        return self.defaults.get(name, default)

    def put(self, args: tuple, kwargs: dict, name: str, value: Any) -> tuple[tuple, dict]:
        i = self.positions.get(name)
        if name not in kwargs and i is not None and i < len(args):
            args = args[:i] + (value,) + args[i + 1:]
        else:
            kwargs = {**kwargs, name: value}
        return args, kwargs


def _first_tensor(value: Any) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    sample = getattr(value, "sample", None)
    return sample if isinstance(sample, torch.Tensor) else None


def _output_kind(out: Any) -> Any:
    """How the model packs its output: "tuple", "tensor", or the output class (with a ``sample`` field)."""
    if isinstance(out, tuple):
        return "tuple"
    if isinstance(out, torch.Tensor):
        return "tensor"
    return type(out)


def _with_tensor(kind: Any, tensor: torch.Tensor) -> Any:
    """``tensor`` packed as the model packs its output (``(t,)``, ``t`` or ``Output(sample=t)``)."""
    if kind == "tuple":
        return (tensor,)
    if kind == "tensor" or kind is None:
        return tensor
    return kind(sample=tensor)
