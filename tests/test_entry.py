"""ai_cache.entry: the tagged entry's byte encoding, old versions included."""

from __future__ import annotations

import json

from ai_cache.entry import Entry
from helpers import sample_entries


# Entries written before the checksum (version 1) are still read.
def test_version_1_entries_are_still_read():
    entry = sample_entries()[1]
    head = json.dumps({"version": 1, **entry.header_dict()}).encode()
    data = b"AIC" + bytes([1]) + len(head).to_bytes(4, "big") + head + entry.body
    assert Entry.from_bytes(data, entry.key) == entry
    assert Entry.from_bytes(entry.to_bytes(), entry.key) == entry
