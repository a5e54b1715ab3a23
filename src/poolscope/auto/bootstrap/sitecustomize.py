"""Loaded first by every Python process started under ``poolscope-instrument``."""

try:
    from poolscope.auto import _setup
except ImportError as exc:  # a Python without poolscope installed
    import sys
    sys.stderr.write(f"poolscope: {sys.executable} cannot import poolscope ({exc}); install "
                     "poolscope in the environment that runs the command\n")
else:
    _setup.start_in_process()
    _setup.chain_sitecustomize(__file__)
