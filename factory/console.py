"""A quiet console for long runs: Ray's own logs go to a file in the output folder, and the run
prints one progress line per stage (rows done, images/s, ETA), rewritten in place on a terminal
and repeated every `interval` seconds elsewhere (job logs)."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import time
import traceback

log = logging.getLogger(__name__)
# for the run's log file only (what `ray_logs_to` writes to), such as a skipped sample's traceback
RUN_LOG = logging.getLogger("factory.run_log")


@contextlib.contextmanager
def ray_logs_to(path: str):
    """While open, Ray's output goes to the log file `path` instead of the console: its Python
    loggers (ray, ray.data, ray.train, ...) and, as Ray's C++ core writes to the process's
    stderr directly, file descriptor 2 itself. Python's own console handlers (this program's
    messages) and the progress lines keep the real stderr, which the context yields. An
    exception leaving the context is written to the log with its full traceback. The file is
    appended to (its folder made if missing); for a URI `path` the log is kept in a local
    temporary file and uploaded when the context closes. Ray is not imported here: whether
    its workers may use Ray's uv hook is decided when it is (`pools.connect_ray`)."""
    from factory.store import open_location, put_atomic

    uri = "://" in path
    local = tempfile.mkstemp(prefix="factory-", suffix=".log")[1] if uri else path
    os.makedirs(os.path.dirname(os.path.abspath(local)), exist_ok=True)
    handler = logging.FileHandler(local, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    loggers = [logging.getLogger("ray"), RUN_LOG] + [
        logging.getLogger(name) for name in list(logging.root.manager.loggerDict)
        if name.startswith("ray.") and logging.getLogger(name).handlers]
    saved = [(lg, lg.handlers[:], lg.propagate) for lg in loggers]
    for lg in loggers:
        lg.handlers = [h for h in lg.handlers if isinstance(h, logging.FileHandler)] + [handler]
        lg.propagate = False
    sys.stderr.flush()
    real_fd = os.dup(2)
    console = os.fdopen(os.dup(real_fd), "w", buffering=1)
    moved = [(h, h.stream) for h in logging.root.handlers
             if type(h) is logging.StreamHandler and _fd(h.stream) == 2]
    for h, _ in moved:
        h.setStream(console)
    os.dup2(handler.stream.fileno(), 2)
    try:
        yield console
    except Exception:  # the whole story for the log; the console gets one line from the caller
        handler.stream.write(traceback.format_exc())
        handler.flush()
        raise
    finally:
        os.dup2(real_fd, 2)
        os.close(real_fd)
        for h, stream in moved:
            h.setStream(stream)
        console.close()
        for lg, handlers, propagate in saved:
            lg.handlers, lg.propagate = handlers, propagate
        handler.close()
        if uri:
            fs, target = open_location(path)
            with open(local, "rb") as f:
                put_atomic(fs, target, f.read())
            os.remove(local)


def _fd(stream) -> int | None:
    try:
        return stream.fileno()
    except (OSError, ValueError):  # pytest's capture streams have no descriptor
        return None


class StageCounter:
    """A tiny Ray actor the pool stages tell how many rows they finished, when an actor starts
    and ends its warm-up (model load and compile), which unit failed for good, and which
    samples were skipped after failing alone (`--max-failed-samples`)."""

    def __init__(self) -> None:
        self.rows: dict[str, int] = {}
        self.warming_up: dict[str, int] = {}  # stage -> actors still warming up
        self.warm_up_s: dict[str, list[float]] = {}  # stage -> each ready actor's warm-up
        self.actors: dict[str, list[dict]] = {}  # stage -> what each ready actor got
        self.failures: list[tuple[str, list[int], str]] = []  # (stage, sample indices, error)
        self.skips: list[dict] = []  # {"stage", "index", "error", "traceback"}, in arrival order

    def add(self, stage: str, n: int) -> None:
        self.rows[stage] = self.rows.get(stage, 0) + n

    def warming(self, stage: str) -> None:
        self.warming_up[stage] = self.warming_up.get(stage, 0) + 1

    def warmed(self, stage: str, seconds: float, got: dict | None = None) -> None:
        """An actor is ready after `seconds` of warm-up; `got`: its node, device, GPU ids and
        precision."""
        self.warming_up[stage] -= 1
        self.warm_up_s.setdefault(stage, []).append(seconds)
        if got is not None:
            self.actors.setdefault(stage, []).append(got)

    def ready_actors(self) -> dict[str, list[dict]]:
        return {k: list(v) for k, v in self.actors.items()}

    def fail(self, stage: str, indices: list[int], error: str) -> None:
        self.failures.append((stage, indices, error))

    def failed(self) -> list[tuple[str, list[int], str]]:
        return list(self.failures)

    def skip(self, samples: list[dict]) -> None:
        self.skips.extend(samples)

    def skipped(self, since: int = 0) -> list[dict]:
        """The skipped samples reported after the first `since`."""
        return self.skips[since:]

    def counts(self) -> dict[str, int]:
        return dict(self.rows)

    def warm_ups(self) -> tuple[dict[str, int], dict[str, list[float]]]:
        return dict(self.warming_up), {k: list(v) for k, v in self.warm_up_s.items()}


def _duration(seconds: float) -> str:
    if seconds != seconds or seconds == float("inf"):
        return "--:--"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class Progress:
    """One line per stage: `label  done/total rows  rate images/s  ETA`."""

    def __init__(self, totals: dict[str, int], labels: dict[str, str], *,
                 interval: float = 30.0, stream=None) -> None:
        self.totals, self.labels, self.interval = totals, labels, interval
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.start = self.shown = time.perf_counter()
        self.drawn = 0  # lines on screen to rewrite (terminal only)

    def lines(self, done: dict[str, int], warming: dict[str, int] | None = None,
              warm_up_s: dict[str, list[float]] | None = None,
              notes: list[str] = ()) -> list[str]:
        """`warming`: actors of a stage still warming up; `warm_up_s`: the finished warm-ups;
        `notes`: lines to show under the stages (what the run waits for)."""
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        out = []
        for key, label in self.labels.items():
            rows, total = done.get(key, 0), self.totals[key]
            rate = rows / elapsed
            eta = (total - rows) / rate if rate else float("inf")
            line = (f"{label:<18} {rows:>8}/{total} rows  {rate:7.2f} images/s  "
                    f"ETA {_duration(eta)}")
            if (warming or {}).get(key):
                line += f"  {warming[key]} actor(s) warming up (model load, compile)"
            elif (warm_up_s or {}).get(key):
                line += f"  warm-up {max(warm_up_s[key]):.0f} s"
            out.append(line)
        return out + list(notes)

    def due(self) -> bool:
        return time.perf_counter() - self.shown >= (1.0 if self.tty else self.interval)

    def show(self, done: dict[str, int], warming: dict[str, int] | None = None,
             warm_up_s: dict[str, list[float]] | None = None, notes: list[str] = ()) -> None:
        self.shown = time.perf_counter()
        lines = self.lines(done, warming, warm_up_s, notes)
        if self.tty:
            up = f"\x1b[{self.drawn}F" if self.drawn else ""
            gone = max(self.drawn - len(lines), 0)  # a note that went away: clear its line
            self.stream.write(up + "".join(f"\x1b[2K{line}\n" for line in lines)
                              + "\x1b[2K\n" * gone)
            self.stream.flush()
            self.drawn = len(lines) + gone
        else:
            for line in lines:
                log.info(line)
