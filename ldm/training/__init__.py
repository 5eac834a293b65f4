"""Training-only parts of ``main.py``: Lightning callbacks and plugins, and the framework hooks."""
