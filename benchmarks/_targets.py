"""One line per benchmark target, in one format for every script.

``target: <what> <measured> vs <limit>: met`` (or ``not met``, or
``not measured (<why>)`` when the run skipped, capped or failed what the target needs).
Each script computes ``measured`` and ``met`` from the numbers it measured in the same run.
"""

from __future__ import annotations


def target_line(
    what: str, measured: str | None, limit: str, met: bool | None, why: str = ""
) -> str:
    """The target line; ``met=None`` means not measured (``why`` says why).

    Args:
        what: What the target is about, e.g. ``"W1 last-layer KFAC fit"``.
        measured: The measured value with its unit, or ``None`` when there is none.
        limit: The target, e.g. ``"<= 0.6 epochs"``.
        met: Whether the measured value meets the target; ``None``: not measured.
        why: Why the target was not measured (with ``met=None``).

    Returns:
        The line, without a trailing newline.

    Example:
        >>> target_line("demo wall time", "41.2 s", "<= 60 s", True)
        'target: demo wall time 41.2 s vs <= 60 s: met'
    """
    if met is None:
        verdict = f"not measured ({why})" if why else "not measured"
    else:
        verdict = "met" if met else "not met"
    return f"target: {what} {measured if measured is not None else '-'} vs {limit}: {verdict}"


def report(what: str, measured: str | None, limit: str, met: bool | None, why: str = "") -> str:
    """Print the target line (see :func:`target_line`) to stdout and return it."""
    line = target_line(what, measured, limit, met, why)
    print(line, flush=True)
    return line
