"""Entry point: ``python -m bench [NAME ...] [--quick] [--write]``."""

from bench.run import main

raise SystemExit(main())
