"""The ``vmcluster`` command: one module per noun."""
