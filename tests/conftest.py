"""Hypothesis profiles: under CI=true (what .ci/run sets) the property tests are
derandomized (a red CI run is reproducible, and a green one is not luck) and draw twice
as many examples; elsewhere they are random, so that each run explores new cases.

Every property test asks for ``examples(n)`` (tests/budget.py), scaled by the profile.
"""
import os

from hypothesis import settings

settings.register_profile("ci", max_examples=200, derandomize=True, deadline=None,
                          database=None, print_blob=True)
settings.register_profile("dev", max_examples=100, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE")
                      or ("ci" if os.environ.get("CI", "").lower() == "true" else "dev"))
