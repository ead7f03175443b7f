"""The number of examples of a property test, scaled by the loaded hypothesis profile."""
from hypothesis import settings

DEFAULT_EXAMPLES = 100    # what the "dev" profile (tests/conftest.py) draws


def examples(n):
    """Settings for a test that draws ``n`` examples in the dev profile, more under CI."""
    return settings(max_examples=max(1, n * settings.default.max_examples // DEFAULT_EXAMPLES))
