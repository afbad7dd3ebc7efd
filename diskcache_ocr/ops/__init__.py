"""Operations on a built cache: status, health, clear, verify, copy.

Each returns plain data (dicts and lists) for the command line to print as a table or JSON;
findings are values, never prints.

- :mod:`.status`: what a cache holds (status, pipelines, build completeness, the report);
- :mod:`.health`: findings about a cache;
- :mod:`.clear`: removing from a cache, and copying it;
- :mod:`.verify`: checking records, and recomputing some to compare.
"""

from diskcache_ocr.ops.clear import clear, copy
from diskcache_ocr.ops.health import HEALTH_CODES, Finding, health, read_kinds
from diskcache_ocr.ops.status import (
    STAGES_VERSION,
    completeness,
    empty_status,
    incomplete_build,
    pipeline_of,
    pipelines_of,
    report,
    stage_summary,
    status,
    stored_pipeline,
)
from diskcache_ocr.ops.verify import verify, verify_config_dataset
from diskcache_ocr.paths import default_cache_dir  # its home before paths.py

__all__ = ["HEALTH_CODES", "STAGES_VERSION", "Finding", "clear", "completeness", "copy",
           "default_cache_dir", "empty_status", "health", "incomplete_build", "pipeline_of",
           "pipelines_of", "read_kinds", "report", "stage_summary", "status", "stored_pipeline",
           "verify", "verify_config_dataset"]
