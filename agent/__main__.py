"""``python -m agent``: the same as the ``tillsync`` command."""

from agent.cli import main

raise SystemExit(main())
