"""Registries: what users choose by name (tasks, metrics, objectives) is a plain dict filled by a decorator.

OBJECTIVES: dict[str, Objective] = {}
register_objective = registrar(OBJECTIVES, "objective")

@register_objective("forward_kl")
def forward_kl(...): ...
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def registrar(table: dict[str, T], kind: str) -> Callable[[str], Callable[[T], T]]:
    """A decorator factory adding entries to `table`; registering a name twice is an error."""

    def register(name: str) -> Callable[[T], T]:
        def decorator(entry: T) -> T:
            if name in table:
                raise ValueError(f"{kind} '{name}' is already registered")
            table[name] = entry
            return entry

        return decorator

    return register


def lookup(table: dict[str, T], name: str, kind: str) -> T:
    """`table[name]`, or a one-line ValueError listing the valid names."""
    if name not in table:
        raise ValueError(f"unknown {kind} '{name}'; choose one of: {', '.join(sorted(table))}")
    return table[name]
