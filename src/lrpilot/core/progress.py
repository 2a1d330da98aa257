"""Progress of work that takes more than a few seconds: a bar on a terminal, a log line otherwise.

An LR range test or a grid search trains the model many times before the run proper starts; on a GPU
node, in CI or under ``nohup`` nothing else would show for minutes. :class:`Progress` gives one
``tqdm`` bar when standard error is a terminal and, otherwise, one ``INFO`` line per finished item on
the ``"lrpilot"`` logger (which the CLI shows when it is not on a terminal), e.g.::

    lrpilot: sgd-cosine-tuned search [3/6] lr 0.03 -> best_val_metric 0.8712 (completed), 4.1 s
"""

from __future__ import annotations

import logging
import sys
import time
from types import TracebackType
from typing import Any, Self

__all__ = ["Progress"]

log = logging.getLogger("lrpilot")


class Progress:
    """Count finished items of a long piece of work and show them.

    Args:
        total: the number of items expected (an upper bound is fine: a range test that stops early).
        desc: what is running, e.g. ``"mi-decay range test"``.
        enabled: ``None`` (default): a bar when stderr is a terminal, log lines otherwise; ``True``: a
            bar; ``False``: log lines only.
        logger: where the lines go (default ``logging.getLogger("lrpilot")``).
        unit: what an item is, for the bar (default ``"trial"``).
        log_every: without a bar, log every ``log_every``-th item only (and the last one, at
            :meth:`close`): an LR sweep's 200 steps make 10 lines, not 200.

    Use as a context manager (the bar is closed on exit) and call :meth:`update` once per finished item
    with a short description of its outcome.
    """

    def __init__(self, total: int, desc: str, *, enabled: bool | None = None,
                 logger: logging.Logger | None = None, unit: str = "trial", log_every: int = 1) -> None:
        if log_every < 1:
            raise ValueError(f"log_every must be >= 1, got {log_every!r}")
        self.total, self.desc, self.done = int(total), desc, 0
        self.logger = logger or log
        self.log_every = log_every
        self._unlogged: str | None = None  # the last item's message while it is not logged yet
        self._t0 = self._last = time.perf_counter()
        use_bar = sys.stderr.isatty() if enabled is None else enabled
        self.bar: Any = None
        if use_bar:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.total, desc=desc, unit=unit, leave=False, dynamic_ncols=True, file=sys.stderr)

    def update(self, message: str = "") -> None:
        """One item finished; ``message`` says how it went (shown beside the bar, or logged)."""
        self.done += 1
        if self.bar is not None:
            if message:
                self.bar.set_postfix_str(message[:80], refresh=False)
            self.bar.update(1)
        elif self.done % self.log_every == 0:
            self._log(message)
        else:
            self._unlogged = message

    def _log(self, message: str) -> None:
        now = time.perf_counter()
        took, self._last = now - self._last, now
        self.logger.info("%s [%d/%d] %s, %.1f s", self.desc, self.done, self.total, message, took)
        self._unlogged = None

    def close(self) -> None:
        if self._unlogged is not None:  # the last item, when it fell between two log lines
            self._log(self._unlogged)
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
