"""How many examples Hypothesis tries, by profile (``HYPOTHESIS_PROFILE``; tests/README.md).

Tests carry no example counts of their own: a property test runs the profile's count, a
fuzzer (a parser or decoder fed arbitrary input) runs its ``fuzz`` count through ``fuzz()``.
"""

from __future__ import annotations

import os

from hypothesis import settings

# profile -> (examples of a property test, examples of a fuzzer)
PROFILES = {
    "ci": (60, 300),    # CI (.ci/run): the counts the suite has always run
    "dev": (30, 100),   # ./dev.sh test on a workstation (the default)
    "quick": (10, 25),  # ./dev.sh test --quick
}
DEFAULT = "dev"

_fuzz_examples = PROFILES[DEFAULT][1]


def load() -> str:
    """Register every profile and load ``$HYPOTHESIS_PROFILE`` (else ``dev``); its name."""
    global _fuzz_examples
    for name, (examples, _) in PROFILES.items():
        settings.register_profile(name, max_examples=examples, deadline=None)
    name = os.environ.get("HYPOTHESIS_PROFILE") or DEFAULT
    if name not in PROFILES:
        raise ValueError(f"HYPOTHESIS_PROFILE={name!r}: not one of {', '.join(PROFILES)}")
    settings.load_profile(name)
    _fuzz_examples = PROFILES[name][1]
    return name


def fuzz(**options) -> settings:
    """The settings of a fuzzer under the loaded profile (``options`` as ``settings`` takes)."""
    return settings(max_examples=_fuzz_examples, **options)
