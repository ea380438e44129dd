"""Printable forms of untrusted text (process names, command lines, reasons), free of any logging import."""

from __future__ import annotations


def escape(text: str) -> str:
    """Printable form of untrusted text: control characters and lone surrogates as escapes."""
    if text.isprintable():
        return text
    out = []
    for ch in text:
        code = ord(ch)
        if ch.isprintable():
            out.append(ch)
        elif code < 0x100:
            out.append(f"\\x{code:02x}")
        elif code < 0x10000:
            out.append(f"\\u{code:04x}")
        else:
            out.append(f"\\U{code:08x}")
    return "".join(out)
