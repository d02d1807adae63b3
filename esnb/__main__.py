"""``python -m esnb run ...`` / ``python -m esnb execute ...``: see esnb/run.py."""
import sys

from .run import main

if __name__ == "__main__":
    sys.exit(main())
