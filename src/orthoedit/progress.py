"""Where long work reports, and the output of the libraries orthoedit drives.

``Progress`` is the one progress protocol of the library: a named step with its size, then
advances; it reports nothing, and the CLI passes one that drives its progress display.

lm-eval (and the datasets it loads) draw tqdm bars and print to standard error. Left alone,
their carriage-return updates land between orthoedit's own lines as one long raw line. Inside
``library_output(progress, log)``:

* a tqdm bar (``desc: 27%|##7  | 49/180 [...]``) drives ``progress``: its description and
  size start a step, its count advances it;
* any other line the libraries print goes to ``log``, one line at a time;
* rich consoles (orthoedit's own output, its progress display) still reach the terminal:
  the stand-in streams name the real ones as ``rich_proxied_file``, which rich writes to.
"""

from __future__ import annotations

import contextlib
import io
import re
import sys
from collections.abc import Callable, Iterator


class Progress:
    """Where long loops report: a named step with its size, then advances. Reports nothing;
    the CLI passes one that drives its progress display."""

    def start(self, name: str, total: int | None) -> None:
        pass

    def advance(self, n: int = 1) -> None:
        pass


#: One state of a tqdm bar: an optional description, the percentage, the bar, n/total.
BAR = re.compile(r"^(?:(?P<desc>.*?):\s*)?\d+%\|[^|]*\|\s*(?P<n>\d+)/(?P<total>\d+)\b")


class _Stream(io.TextIOBase):
    """A stand-in for sys.stdout / sys.stderr that splits what is written into segments at
    each carriage return or newline and hands every finished segment to ``sink``."""

    def __init__(self, real, sink: Callable[[str], None]):
        super().__init__()
        # rich writes past a stream that names its real file (as its own FileProxy does)
        self.rich_proxied_file = getattr(real, "rich_proxied_file", real)
        self._sink = sink
        self._pending = ""

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return False

    def write(self, text: str) -> int:
        self._pending += text
        *done, self._pending = re.split(r"[\r\n]", self._pending)
        for segment in done:
            self._sink(segment)
        return len(text)

    def close_pending(self) -> None:
        if self._pending:
            self._sink(self._pending)
            self._pending = ""


class _Router:
    """Bars to ``progress``, other text to ``log``."""

    def __init__(self, progress: Progress, log: Callable[[str], None], real, unnamed: str):
        self.progress, self.log, self.real, self.unnamed = progress, log, real, unnamed
        self.bar: tuple[str, int] | None = None  # the bar shown: (description, total)
        self.count = 0
        self.busy = False

    def __call__(self, segment: str) -> None:
        text = segment.strip()
        if not text:
            return
        if self.busy:  # ``log`` itself printed (plain ``print`` does): past the capture
            self.real.write(text + "\n")
            return
        match = BAR.match(text)
        if match is None:
            self.busy = True
            try:
                self.log(text)
            finally:
                self.busy = False
            return
        bar = ((match["desc"] or "").strip() or self.unnamed, int(match["total"]))
        n = int(match["n"])
        if bar != self.bar or n < self.count:  # a new bar (or the same one restarted)
            self.bar, self.count = bar, 0
            self.progress.start(*bar)
        if n > self.count:
            self.progress.advance(n - self.count)
            self.count = n


@contextlib.contextmanager
def library_output(
    progress: Progress | None, log: Callable[[str], None], unnamed: str = "working"
) -> Iterator[None]:
    """Capture sys.stdout and sys.stderr while libraries run: bars into ``progress`` (a bar
    without a description is called ``unnamed``), text into ``log`` (see the module's text).
    Restores both streams on the way out."""
    saved = sys.stdout, sys.stderr
    route = _Router(progress or Progress(), log, saved[1], unnamed)
    streams = [_Stream(saved[0], route), _Stream(saved[1], route)]
    sys.stdout, sys.stderr = streams
    try:
        yield
    finally:
        sys.stdout, sys.stderr = saved
        for stream in streams:
            stream.close_pending()
