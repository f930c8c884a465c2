"""Benchmarks and evaluation: data loading, metrics, and the continual-learning harness.

The harness's own packages (plotting, the run folder's lock) are the megamem[bench] extra; the library and the
server never import them.
"""

from ..errors import MegamemError


def missing_extra(exc: ModuleNotFoundError) -> MegamemError:
    """The error for a package of the megamem[bench] extra that is not installed: what is missing, how to add it."""
    return MegamemError(f"megamem bench needs {exc.name}, which is not installed: pip install 'megamem[bench]'")
