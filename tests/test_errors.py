"""How library errors are quoted in our one-line messages (megatron_srft.errors.first_line)."""

from __future__ import annotations

from megatron_srft.errors import first_line


def test_first_line_of_an_exception():
    assert first_line(ValueError("  bad value\nsecond line\n")) == "bad value"
    assert first_line(ValueError("x" * 50), 10) == "x" * 10
    assert first_line(KeyError()) == "KeyError"
    assert first_line(RuntimeError(""), empty="") == ""
