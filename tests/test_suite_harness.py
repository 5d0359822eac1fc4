"""The test suite's own harness (tests/conftest.py)."""

from __future__ import annotations

import threading
import time
import types

import pytest

import conftest


def test_the_xdist_controller_rebuilds_warnings_one_at_a_time(monkeypatch):
    """Two workers' warnings rebuilt at once imported torch from two threads of the controller (INTERNALERROR,
    "partially initialized module 'torch'", then a segmentation fault, in a full run): conftest serialises them."""
    pytest.importorskip("xdist")
    from xdist import workermanage

    inside, most = [0], [0]
    guard = threading.Lock()

    def slow(data):
        with guard:
            inside[0] += 1
            most[0] = max(most[0], inside[0])
        time.sleep(0.05)
        with guard:
            inside[0] -= 1
        return data

    monkeypatch.setattr(workermanage, "unserialize_warning_message", slow)
    conftest.pytest_configure(types.SimpleNamespace())          # as the controller: no workerinput
    wrapped = workermanage.unserialize_warning_message
    assert wrapped is not slow
    conftest.pytest_configure(types.SimpleNamespace())          # configured twice: wrapped once
    assert workermanage.unserialize_warning_message is wrapped
    results = []
    threads = [threading.Thread(target=lambda i=i: results.append(wrapped(i))) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [0, 1, 2, 3] and most[0] == 1
    conftest.pytest_configure(types.SimpleNamespace(workerinput={}))   # a worker leaves it alone
    assert workermanage.unserialize_warning_message is wrapped
