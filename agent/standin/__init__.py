"""Stand-ins for the outside world, used by tests, system tests and ``tillsync demo``.

``agent.standin.cloud`` is an idempotent commerce API on 127.0.0.1 with injectable faults.
Import from the submodule (``from agent.standin.cloud import StandinCloud, Fault``): this
package does not re-export it, so ``python -m agent.standin.cloud`` runs without runpy's
"found in sys.modules" warning.
"""
