"""Setup steps report their duration (a spinner on a TTY; always a log line)."""

from __future__ import annotations

import logging
import time

from asyncrl.metrics.report import setup_phase


def test_a_setup_phase_logs_what_it_did_and_how_long_it_took(caplog):
    with caplog.at_level(logging.INFO, logger="asyncrl.metrics.report"):
        with setup_phase("warming up"):
            time.sleep(0.05)
    (record,) = [r for r in caplog.records if "warming up" in r.getMessage()]
    seconds = float(record.getMessage().split("done in ")[1].split(" s")[0])
    assert 0.0 < seconds < 5.0
