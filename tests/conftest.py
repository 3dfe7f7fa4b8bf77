"""Suite-wide guard: a test that hangs (a deadlocked worker process, a rank waiting for a peer) ends the run with
every thread's traceback after ``ADAPT_TEST_TIMEOUT`` seconds (default 300) instead of holding CI to its limit."""
import faulthandler
import os
import sys

import pytest

TIMEOUT_S = float(os.environ.get("ADAPT_TEST_TIMEOUT", "300"))


@pytest.fixture(autouse=True)
def _hang_guard():
    faulthandler.dump_traceback_later(TIMEOUT_S, exit=True, file=sys.__stderr__)
    yield
    faulthandler.cancel_dump_traceback_later()
