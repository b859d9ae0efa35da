"""Helpers the tests share, exposed to them as fixtures by tests/conftest.py: tiny local models, the real CLI
and server as subprocesses, the app in process, ports. No test module imports another."""
