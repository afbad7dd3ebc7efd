#!/usr/bin/env python3
"""The origin project's cache manager habits, on a diskcache-ocr cache.

    python scripts/cache_manager.py status
    python scripts/cache_manager.py health
    python scripts/cache_manager.py clear --all

The cache directory comes from --cache, else $DISKCACHE_OCR_DIR, else ~/.cache/diskcache-ocr.
Every other command and flag of `diskcache-ocr` works here too.
"""

import sys

from diskcache_ocr.cli import main

if __name__ == "__main__":
    sys.exit(main())
