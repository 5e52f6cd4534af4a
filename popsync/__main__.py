"""``python -m popsync`` runs the command line."""

from popsync.cli import main

raise SystemExit(main())
