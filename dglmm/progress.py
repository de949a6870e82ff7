"""Progress reporting of a fit: log lines, a terminal bar, a notebook bar.

Every outer iteration gives one line on stderr (iteration, loglik, max |gradient|,
step, seconds), which is what batch logs keep.  When stderr is a terminal a bar
below the lines is redrawn in place; inside a Jupyter kernel an HTML bar is
updated instead.  The bar measures convergence: the Newton decrement falling
from its first value to the tolerance, on a log scale.
"""

from __future__ import annotations

import html
import math
import sys


def _in_notebook() -> bool:
    shell = sys.modules.get("IPython")
    if shell is None:
        return False
    try:
        ip = shell.get_ipython()
    except AttributeError:
        return False
    return ip is not None and type(ip).__name__ == "ZMQInteractiveShell"


class Progress:
    """Reports the iterations of a fit.

    Parameters
    ----------
    enabled : bool
        Print the per-iteration lines.
    tol : float
        The optimiser's decrement tolerance (the bar's end).
    stream : file, optional
        Where the lines go (default ``sys.stderr``).
    """

    width = 30

    def __init__(self, enabled: bool, tol: float = 1e-8, stream=None):
        self.enabled = enabled
        self.tol = tol
        self.stream = stream if stream is not None else sys.stderr
        self.notebook = enabled and _in_notebook()
        self.terminal = enabled and not self.notebook and _isatty(self.stream)
        self._first = None
        self._handle = None
        self._last = None

    def message(self, text: str) -> None:
        if self.enabled:
            self._clear_bar()
            print(f"dglmm: {text}", file=self.stream, flush=True)

    def iteration(self, stage: str, record) -> None:
        """Report one iteration (an ``IterationRecord``)."""
        if not self.enabled:
            return
        self._clear_bar()
        print(
            f"dglmm: [{stage}] iter {record.iteration:3d}  loglik {record.loglik:.6f}  "
            f"max|grad| {record.max_abs_grad:.3e}  step {record.step:.3g}  "
            f"{record.seconds:.2f}s",
            file=self.stream,
            flush=True,
        )
        dec = record.decrement
        if stage == "full" and math.isfinite(dec) and dec > 0:
            if self._first is None:
                self._first = max(dec, self.tol * 10)
            span = math.log(self._first / self.tol)
            frac = min(max(math.log(self._first / max(dec, 1e-300)) / span, 0.0), 1.0)
            self._last = record
            self._draw(frac, record)

    def close(self, converged: bool = True) -> None:
        """Finish the bar (at 100% when the fit converged)."""
        if self._last is not None and converged:
            self._clear_bar()
            self._draw(1.0, self._last)
        if self.terminal and self._first is not None:
            print(file=self.stream, flush=True)

    # ------------------------------------------------------------------ drawing

    def _clear_bar(self) -> None:
        if self.terminal and self._first is not None:
            self.stream.write("\r\033[K")

    def _draw(self, frac: float, record) -> None:
        pct = int(round(100 * frac))
        if self.terminal:
            filled = int(round(self.width * frac))
            bar = "#" * filled + "." * (self.width - filled)
            self.stream.write(f"[{bar}] {pct:3d}% converged (iteration {record.iteration})")
            self.stream.flush()
        elif self.notebook:
            from IPython.display import HTML, display

            body = HTML(
                f"<progress value='{pct}' max='100' style='width:30em'></progress> "
                f"{pct}% converged &middot; iteration {record.iteration} &middot; "
                f"loglik {html.escape(f'{record.loglik:.4f}')}"
            )
            if self._handle is None:
                self._handle = display(body, display_id=True)
            else:
                self._handle.update(body)


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False
