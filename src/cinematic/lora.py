"""Temporary: ``cinematic.cli`` still imports :func:`parse_spec` from here. The module is now
:mod:`cinematic.lora_loading`; delete this file once the CLI imports from there."""

from cinematic.lora_loading import parse_spec

__all__ = ["parse_spec"]
