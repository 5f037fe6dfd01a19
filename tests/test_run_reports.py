"""Reports of http-task services (progress and result), on the real wire server."""

from __future__ import annotations

import pytest

from cloudtask.exceptions import Conflict


def test_progress_then_result_then_nothing_more(store):
    assert store.get_report("r1") is None
    store.report_progress("r1", 10, "starting")
    store.report_progress("r1", 55.5, "half way")
    doc = store.get_report("r1")
    assert (doc["percent"], doc["message"], doc["result"]) == (55.5, "half way", None)
    store.report_result("r1", "succeeded", "all rows synced")
    doc = store.get_report("r1")
    assert doc["result"]["status"] == "succeeded"
    assert doc["result"]["message"] == "all rows synced"
    assert doc["percent"] == 55.5  # the last progress is kept
    with pytest.raises(Conflict):
        store.report_result("r1", "failed", "late")
    with pytest.raises(Conflict):
        store.report_progress("r1", 99, "late")
    assert store.get_report("r1")["result"]["status"] == "succeeded"


def test_a_result_without_progress(store):
    store.report_result("r2", "failed", "the remote job crashed")
    assert store.get_report("r2")["result"]["status"] == "failed"
    with pytest.raises(Conflict):
        store.report_result("r2", "succeeded", "")
