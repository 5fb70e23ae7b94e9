"""Run the ``eventful-video`` demo from a checkout without installing: ``python python/eventful_video.py --help``."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from eventful_kernels.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
