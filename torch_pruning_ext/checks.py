"""The one way this package refuses a value outside a fixed set: a one-line message naming both."""
from __future__ import annotations


def check_choice(value, allowed, what: str, also: str = ""):
    """Return `value` if it is one of `allowed`, else raise ValueError naming it and the choices
    (`also` adds a non-listed option, e.g. "or None")."""
    if value not in allowed:
        raise ValueError(f"unknown {what} {value!r}; choose one of: {', '.join(map(str, allowed))}"
                         + (f", {also}" if also else ""))
    return value
