"""The launcher: ``poolscope-instrument`` and the bootstrap that runs inside the application."""
