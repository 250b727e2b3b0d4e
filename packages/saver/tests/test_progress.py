"""recstack.saver.progress: the one-line progress display of saves, loads, exports and the
data converters."""

from __future__ import annotations

import io

from recstack.saver.progress import Progress


def test_progress_line() -> None:
    stream = io.StringIO()
    bar = Progress("criteo train.txt", 4_000_000_000, enabled=True, stream=stream)
    bar.add(1_000_000_000)
    bar.close()
    text = stream.getvalue()
    assert "\rcriteo train.txt: 1.00 GB / 4.00 GB  25%" in text and text.endswith("\n")
    assert bar.done == 1_000_000_000
    rows = io.StringIO()
    Progress("histories", 2_000_000, enabled=True, stream=rows, unit="rows").add(500_000)
    assert "\rhistories: 0.50M rows / 2.00M rows  25%" in rows.getvalue()
    silent = io.StringIO()  # not a terminal: nothing printed by default
    Progress("x", stream=silent).add(5)
    assert silent.getvalue() == ""
