"""``python -m tests.fakeapi`` (from the repository) or ``python -m fakeapi`` (from tests/)."""

from .cli import main

main()
