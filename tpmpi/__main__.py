"""``python -m tpmpi``: see :mod:`tpmpi.cli`."""
from .cli import run

run()
