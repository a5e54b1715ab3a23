"""Loaded first by every Python process started under ``poolscope-instrument``."""

from poolscope.auto import _setup

_setup.start_in_process()
_setup.chain_sitecustomize(__file__)
