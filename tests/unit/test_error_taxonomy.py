"""One error taxonomy (issue 14): transient/terminal are mixins, one field name per meaning, old records still read."""

from __future__ import annotations

from pipeline.rollover import RollError, TerminalRollError, TransientRollError, roll_error
from sinks import SinkError, TerminalError, TransientError
from sinks.errors import Terminal, Transient, error_fields


def test_severity_comes_from_the_mixin_on_every_error_class():
    for cls, severity in ((TransientError, "transient"), (TerminalError, "terminal"),
                          (TransientRollError, "transient"), (TerminalRollError, "terminal")):
        err = cls("x", kind="network") if issubclass(cls, SinkError) else cls("x", kind="network", exception="E")
        assert err.severity == severity and err.transient is (severity == "transient")
        assert isinstance(err, Transient if severity == "transient" else Terminal)
    e = roll_error("boom", transient=True, kind="local_io", exception="OSError")
    assert isinstance(e, RollError) and isinstance(e, Transient) and e.exception == "OSError" and e.kind == "local_io"


def test_stored_records_read_with_one_name_per_meaning():
    assert error_fields({"severity": "terminal", "kind": "auth", "exception": "TerminalError"}) == \
        {"severity": "terminal", "kind": "auth", "exception": "TerminalError"}
    # written before: error_class was the severity in last_error.json and the Python class in reason.json
    assert error_fields({"error_class": "transient", "kind": "network"})["severity"] == "transient"
    old_reason = error_fields({"error_class": "TerminalError", "kind": "not_found"})
    assert old_reason == {"severity": None, "kind": "not_found", "exception": "TerminalError"}
