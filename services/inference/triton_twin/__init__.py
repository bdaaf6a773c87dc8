"""Template for the CPU twin's python-backend models (``model.py`` is copied, not imported)."""
