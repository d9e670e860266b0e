import os

from hypothesis import HealthCheck, settings

# Property tests: enough examples to find real bugs, bounded so the suite stays fast.
settings.register_profile(
    "surgeon", max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "surgeon"))
