"""The names logging.trackers may give: Accelerate's tracker registry. Apart from tracking.py (which starts the
trackers) so that the recipe checks a name without importing the training side."""

from __future__ import annotations

import difflib


def tracker_names() -> list[str]:
    """The trackers logging.trackers may name: Accelerate's registry as installed (it grows with Accelerate)."""
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    return sorted(LOGGER_TYPE_TO_CLASS)


def unknown_tracker(name: str) -> str | None:
    """Why ``name`` is not a tracker, naming the valid ones; None when Accelerate supports it."""
    valid = tracker_names()
    if name in valid:
        return None
    close = difflib.get_close_matches(name, valid, n=1)
    hint = f"did you mean '{close[0]}'? " if close else ""
    return f"unknown tracker '{name}': {hint}Accelerate supports {', '.join(valid)}"
