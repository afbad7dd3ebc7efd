"""``python -m diskcache_ocr.cli``."""

import sys

from diskcache_ocr.cli import main

sys.exit(main())
