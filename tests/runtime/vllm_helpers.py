"""What the vLLM tests share: reading the flags of a `vllm serve` command."""

from __future__ import annotations


def serve_flags(command: list[str]) -> dict[str, str | bool]:
    """--flag value pairs after `vllm serve MODEL`; a flag without a value is True."""
    flags, i = {}, 3
    while i < len(command):
        has_value = i + 1 < len(command) and not command[i + 1].startswith("--")
        flags[command[i]] = command[i + 1] if has_value else True
        i += 2 if has_value else 1
    return flags
