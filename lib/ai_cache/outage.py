"""One warning when a store operation starts failing, one when it works again.

A store can fail for some calls and work for others for a long time: a full disk takes
a small write and refuses the next large one, a Redis out of memory serves reads and
refuses writes. An outage therefore ends only after a quiet spell without failures, so
the log says it once however often the store flaps in between (an adversarial run on a
full disk logged 965 fail/recover warnings in 25 s).
"""

from __future__ import annotations

import logging
import threading
import time

logger = logging.getLogger(__name__)
QUIET = 10.0  # seconds without a failure before an outage counts as over


class Outage:
    def __init__(self, recovered: str, quiet: float = QUIET) -> None:
        self.recovered = recovered  # logged when the outage ends
        self.quiet = quiet
        self.failures = 0  # in the current outage; 0 when there is none
        self.last_failure = 0.0
        self._lock = threading.Lock()  # L1 writes report from worker threads

    def failed(self, warning: str) -> None:
        """Count a failure; `warning` is logged when it starts an outage."""
        with self._lock:
            if not self.failures:
                logger.warning(warning)
            self.failures += 1
            self.last_failure = time.monotonic()

    def worked(self) -> None:
        """A success ends the outage once no failure came for `quiet` seconds."""
        if not self.failures:
            return
        with self._lock:
            if self.failures and time.monotonic() - self.last_failure >= self.quiet:
                logger.warning("%s (%d calls failed meanwhile)", self.recovered, self.failures)
                self.failures = 0
