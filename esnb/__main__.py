"""``python -m esnb run ...`` / ``python -m esnb execute ...``: see esnb/suite.py."""
import sys

from .suite import main

if __name__ == "__main__":
    sys.exit(main())
