"""Runs a check in a fresh `python -O` process: asserts vanish there, so a decoder that relied on
them would accept what a node run without -O refuses, and the two would diverge."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def refused_under_dash_o(imports: str, call: str, error: str = "DecodeError") -> bool:
    """True if `call` raises `error` (from valuemesh.protocol.errors) under `python -O`."""
    script = textwrap.dedent(imports) + textwrap.dedent(f"""
        from valuemesh.protocol.errors import {error}
        try:
            {call}
        except {error}:
            print("refused")
        else:
            print("accepted")
    """)
    out = subprocess.run([sys.executable, "-O", "-c", script], capture_output=True, text=True, timeout=60, check=True)
    return out.stdout.strip() == "refused"
