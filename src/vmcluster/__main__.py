"""``python -m vmcluster`` runs the CLI (the lab starts agents this way)."""

from vmcluster.cli.main import main

main()
