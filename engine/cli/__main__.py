"""``python -m engine.cli``: the ``hl7bridge`` command (the tests run it this way)."""

from . import main

main()
