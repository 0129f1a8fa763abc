"""Protobuf wire format, the little of it bnfold writes by hand.

``export.py`` streams an ONNX file's weights into place and ``check.py`` reads them in
place; both need the length-delimited record header: a key (field number, wire type 2)
and a varint length.
"""

from __future__ import annotations

__all__ = ["key", "varint"]


def varint(value: int) -> bytes:
    """``value`` (>= 0) as a protobuf base-128 varint."""
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def key(number: int) -> bytes:
    """The key of a length-delimited field (wire type 2) with this field number."""
    return varint(number << 3 | 2)
