"""Checks of the processor's constructor arguments: a clear TypeError/ValueError naming the
argument and what was expected, before anything is built."""

from __future__ import annotations

from .scheduler import Scheduler

__all__ = [
    "MAX_QUEUE_SIZE",
    "check_fraction",
    "check_padding",
    "check_profile",
    "check_serving_arguments",
    "check_size",
]

# As large as an iteration may read ahead (processor.py); ~600 MiB of request table.
MAX_QUEUE_SIZE = 2**22


def check_fraction(name: str, value: object, *, inclusive: bool) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not (0.0 < value <= 1.0 if inclusive else 0.0 < value < 1.0):
        bounds = "(0, 1]" if inclusive else "(0, 1)"
        raise ValueError(f"{name} must be in {bounds}, got {value}")


def check_profile(profile: object) -> None:
    """None (an automatic name), a name, or False (no profile)."""
    if profile is None or profile is False:
        return
    if profile is True:
        raise ValueError(
            "profile=True is not a choice: None (the default) names the profile after the "
            "job, a str names it, False keeps none"
        )
    if not isinstance(profile, str):
        raise TypeError(
            f"profile must be None, a name (str) or False, got {type(profile).__name__}"
        )
    if not profile.strip() or "\0" in profile:
        raise ValueError(
            f"profile must be a non-empty name without NUL characters, got {profile!r}"
        )


def check_padding(
    collate: object, pad_value: object, pad_to_multiple_of: object
) -> tuple[float | None, int]:
    """(pad value, or None to stack; the padded length's multiple)."""
    if collate not in ("stack", "pad"):
        raise ValueError(f"collate must be 'stack' or 'pad', got {collate!r}")
    if not isinstance(pad_value, (bool, int, float)):
        raise TypeError(f"pad_value must be a number, got {type(pad_value).__name__}")
    if pad_to_multiple_of is not None:
        if collate != "pad":
            raise ValueError("pad_to_multiple_of needs collate='pad'")
        check_size("pad_to_multiple_of", pad_to_multiple_of)
    multiple = pad_to_multiple_of if isinstance(pad_to_multiple_of, int) else 1
    return (pad_value if collate == "pad" else None), multiple


def check_serving_arguments(
    model: object,
    max_delay_ms: object,
    max_queue_size: object,
    block_timeout: object,
    isolate_errors: object,
    priority_aging_ms: object,
    scheduler: object,
    task_priority: object,
) -> None:
    if model is not None and not callable(model):
        raise TypeError(f"model must be callable, got {type(model).__name__}")
    for name, value, low, high in (
        ("max_delay_ms", max_delay_ms, 0.0, 3.6e6),
        ("priority_aging_ms", priority_aging_ms, 1e-3, 3.6e6),
    ):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{name} must be a number of milliseconds, got {type(value).__name__}")
        if not low <= value <= high:
            raise ValueError(f"{name} must be between {low:g} and {high:g}, got {value}")
    check_size("max_queue_size", max_queue_size)
    if max_queue_size > MAX_QUEUE_SIZE:  # type: ignore[operator]
        raise ValueError(
            f"max_queue_size must be at most {MAX_QUEUE_SIZE} (its request table is allocated "
            f"up front, ~150 bytes per request), got {max_queue_size}"
        )
    if block_timeout is not None:
        if isinstance(block_timeout, bool) or not isinstance(block_timeout, (int, float)):
            raise TypeError(
                f"block_timeout must be seconds or None, got {type(block_timeout).__name__}"
            )
        if not block_timeout >= 0:
            raise ValueError(f"block_timeout must be >= 0 seconds, got {block_timeout}")
    if not isinstance(isolate_errors, bool):
        raise TypeError(f"isolate_errors must be a bool, got {type(isolate_errors).__name__}")
    if scheduler is not None and not isinstance(scheduler, Scheduler):
        raise TypeError(f"scheduler must be a dynbatch.Scheduler, got {type(scheduler).__name__}")
    if isinstance(task_priority, bool) or not isinstance(task_priority, int):
        raise TypeError(f"task_priority must be an int, got {type(task_priority).__name__}")
    if not -(2**31) <= task_priority < 2**31:
        raise ValueError(f"task_priority must fit in 32 bits, got {task_priority}")


def check_size(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be at least 1, got {value}")
    return value
