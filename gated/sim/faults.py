"""Faults the simulator can inject, and which one hits a given request.

A fault set is immutable. The admin endpoint ``PUT /_sim/faults`` and the CLI
flags replace it whole. ``PATCH /_sim/faults`` and ``SimState.update_faults``
change only the fields they name.

When several faults are set, one request meets at most one of them, picked in
this order: ``drop``, ``hang``, ``rate_limit_s``, ``error_status`` (at
``error_rate``), ``garbage``, ``wrong_content_type``. ``latency_ms`` adds to
any of them. ``path_kind`` limits every fault to some kinds of request.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any, Literal

# The kinds of API request a fault can be limited to. Admin requests under
# /_sim/ never meet a fault.
PATH_KINDS = ("list", "create", "get", "start", "end")

# Upper bounds that catch a unit mix-up (seconds given as milliseconds).
MAX_LATENCY_MS = 600_000
MAX_RATE_LIMIT_S = 86_400

FaultAction = Literal["drop", "hang", "rate_limit", "error", "garbage", "wrong_content_type"]


@dataclass(frozen=True, slots=True)
class Faults:
    """One fault set. The defaults inject nothing."""

    # Delay before every response, in milliseconds.
    latency_ms: int = 0
    # Respond with this status and a JSON error body, at error_rate (0 to 1).
    error_status: int | None = None
    error_rate: float = 1.0
    # Respond 429 with Retry-After set to this many seconds.
    rate_limit_s: int | None = None
    # Read the request and send nothing until the fault is cleared or the
    # client closes the connection, then respond normally.
    hang: bool = False
    # Close the connection right after reading the request.
    drop: bool = False
    # Run the request, then respond 200 with a body that is not JSON.
    garbage: bool = False
    # Run the request, then respond 200 with its JSON body labelled text/html.
    wrong_content_type: bool = False
    # The request kinds these faults apply to. Empty means every API request.
    path_kinds: frozenset[str] = frozenset()

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], *, base: Faults | None = None) -> Faults:
        """Build a fault set from JSON-like data, taking the fields not given from ``base``.

        Raises ValueError naming every invalid field.
        """
        start = base if base is not None else cls()
        known = {f.name for f in fields(cls)} - {"path_kinds"} | {"path_kind"}
        problems = [f"unknown fault {name!r}" for name in data if name not in known]
        changes: dict[str, Any] = {}
        for name, value in data.items():
            if name not in known:
                continue
            try:
                key, checked = _check_field(name, value)
            except ValueError as exc:
                problems.append(str(exc))
                continue
            changes[key] = checked
        if problems:
            raise ValueError("; ".join(problems))
        return replace(start, **changes)

    def to_json(self) -> dict[str, Any]:
        """Return the fault set as the admin endpoint shows it."""
        data: dict[str, Any] = {f.name: getattr(self, f.name) for f in fields(self)}
        del data["path_kinds"]
        data["path_kind"] = sorted(self.path_kinds) if self.path_kinds else "any"
        return data

    def applies_to(self, kind: str | None) -> bool:
        """Tell whether these faults cover a request of ``kind`` (None: an unknown path)."""
        return not self.path_kinds or kind in self.path_kinds

    def pick(self, kind: str | None, rng: random.Random) -> FaultAction | None:
        """Return the fault that a request of ``kind`` meets, or None."""
        if not self.applies_to(kind):
            return None
        # NOTE: the rate is drawn even when an earlier fault wins, so one seed
        # gives the same sequence of draws whatever else is set.
        error_hit = self.error_status is not None and rng.random() < self.error_rate
        candidates: tuple[tuple[FaultAction, bool], ...] = (
            ("drop", self.drop),
            ("hang", self.hang),
            ("rate_limit", self.rate_limit_s is not None),
            ("error", error_hit),
            ("garbage", self.garbage),
            ("wrong_content_type", self.wrong_content_type),
        )
        return next((action for action, active in candidates if active), None)


def _check_field(name: str, value: Any) -> tuple[str, Any]:
    """Validate one field of a fault set and return its attribute name and value."""
    if name == "path_kind":
        return "path_kinds", _check_path_kind(value)
    if name in ("hang", "drop", "garbage", "wrong_content_type"):
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be true or false, not {value!r}")
        return name, value
    if name == "error_rate":
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
            raise ValueError(f"error_rate must be a number from 0 to 1, not {value!r}")
        return name, float(value)
    if value is None and name in ("error_status", "rate_limit_s"):
        return name, None
    limits = {
        "latency_ms": (0, MAX_LATENCY_MS),
        "error_status": (400, 599),
        "rate_limit_s": (0, MAX_RATE_LIMIT_S),
    }
    low, high = limits[name]
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{name} must be an integer from {low} to {high}, not {value!r}")
    return name, value


def _check_path_kind(value: Any) -> frozenset[str]:
    """Accept ``"any"``, one kind, a comma-separated list or a JSON list of kinds."""
    if isinstance(value, str):
        items = [part.strip() for part in value.split(",") if part.strip()]
    elif isinstance(value, list) and all(isinstance(item, str) for item in value):
        items = list(value)
    else:
        raise ValueError(f"path_kind must be a string or a list of strings, not {value!r}")
    if items in ([], ["any"]):
        return frozenset()
    unknown = [item for item in items if item not in PATH_KINDS]
    if unknown:
        choices = ", ".join(PATH_KINDS)
        raise ValueError(f"path_kind {unknown[0]!r} is unknown: use any, or some of {choices}")
    return frozenset(items)
