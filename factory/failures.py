"""What a run does when work fails: the one line for an output that cannot be written, and the
budget of samples a folder may lack because a stage kept failing on them
(`--max-failed-samples`)."""

from __future__ import annotations

import errno
import logging
import os

from factory.errors import RunFailure

log = logging.getLogger(__name__)

WRITE_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS)


def run_failure(e: BaseException, log_path: str) -> RunFailure | None:
    """The one line for a run whose output cannot be written (a full disk, no permission: its
    full traceback is in the log), or None."""
    seen, todo = set(), [e]
    while todo:  # Ray wraps a worker's exception: follow every link
        cause = todo.pop()
        if cause is None or id(cause) in seen:
            continue
        seen.add(id(cause))
        if isinstance(cause, OSError) and cause.errno in WRITE_ERRORS:
            where = f" {cause.filename}" if cause.filename else ""
            return RunFailure(f"cannot write the output{where}: {os.strerror(cause.errno)}; "
                              f"the full traceback is in {log_path}")
        todo += [cause.__cause__, cause.__context__, getattr(cause, "cause", None)]
    return None


class FailureBudget:
    """`--max-failed-samples`: how many samples the folder may lack because a stage kept
    failing on them, counting those its finished shards already lack (`already`). Each skipped
    sample is named on the console, its traceback goes to the run's log, and one more than the
    budget stops the run."""

    def __init__(self, limit: int, already: int, log_path: str) -> None:
        self.limit, self.already, self.log_path = limit, already, log_path
        self.skipped: list[dict] = []

    @property
    def left(self) -> int:
        return self.limit - self.already - len(self.skipped)

    def spend(self, samples: list[dict]) -> None:
        from factory.console import RUN_LOG
        from factory.pools import StageFailure

        self.skipped += samples
        for f in samples:
            log.warning("skipped sample %d: the %s stage kept failing on it (%s)", f["index"],
                        f["stage"], f["error"])
            RUN_LOG.error("sample %d skipped; the %s stage's traceback:\n%s", f["index"],
                          f["stage"], f["traceback"])
        if self.left >= 0:
            return
        first = self.skipped[0]
        earlier = f", with {self.already} skipped by earlier runs" if self.already else ""
        more = len(self.skipped) - 1
        raise RunFailure(
            f"more than {self.limit} samples failed (--max-failed-samples {self.limit}{earlier})"
            f": {StageFailure(first['stage'], [first['index']], first['error'])}"
            + (f" and {more} more" if more else "")
            + f"; their tracebacks are in {self.log_path}")
