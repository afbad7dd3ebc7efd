#!/usr/bin/env python3
"""The origin project's cache manager habits, on a diskcache-ocr cache.

    python scripts/cache_manager.py status
    python scripts/cache_manager.py health
    python scripts/cache_manager.py clear --all
    python scripts/cache_manager.py clear --type tensors
    python scripts/cache_manager.py validate
    python scripts/cache_manager.py validate --config configs/data/base.yaml
    python scripts/cache_manager.py export --output stats.json   (or: export stats.json)
    python scripts/cache_manager.py prebuild --config-name train \
        data/performance_preset=validation_optimized --workers 8

The cache directory comes from --cache (before or after the command), else $DISKCACHE_OCR_DIR,
else ~/.cache/diskcache-ocr. Every other command and flag of `diskcache-ocr` works here too.
Run from a checkout without installing, it uses the package beside it.
"""

import sys
from pathlib import Path

try:
    from diskcache_ocr.cli import main
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from diskcache_ocr.cli import main

if __name__ == "__main__":
    sys.exit(main())
