"""The dashboard: one Panel ``Viewer`` per view, composed in ``app.py``."""
