"""`python -m megamem`: the console entry (megamem.entry), so that it ends every failure in one `error:` line."""

from .entry import main

main()
