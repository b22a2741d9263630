"""One warning per store outage, however often the store flaps between failing and working."""

from __future__ import annotations

from ai_cache.outage import Outage


def test_one_warning_when_it_starts_and_one_after_a_quiet_spell(caplog, monkeypatch):
    clock = [100.0]
    monkeypatch.setattr("ai_cache.outage.time.monotonic", lambda: clock[0])
    outage = Outage("store works again", quiet=10)
    for _ in range(100):  # a full disk: small writes pass, large ones fail, for a while
        outage.failed("store failed")
        clock[0] += 0.1
        outage.worked()
    clock[0] += 9
    outage.worked()  # not quiet long enough yet
    clock[0] += 1
    outage.worked()
    outage.worked()
    outage.failed("store failed")  # a new outage is reported again
    assert [r.getMessage() for r in caplog.records] == [
        "store failed",
        "store works again (100 calls failed meanwhile)",
        "store failed",
    ]
