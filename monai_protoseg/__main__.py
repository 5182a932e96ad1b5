"""``python -m monai_protoseg``: the ``monai-protoseg`` command line (see :mod:`monai_protoseg.cli`)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
