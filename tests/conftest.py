import atexit
import os
import shutil
import tempfile

from hypothesis import HealthCheck, settings

# Property tests: enough examples to find real bugs, bounded so the suite stays fast.
settings.register_profile(
    "surgeon", max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "surgeon"))

# Captures are cached on disk (surgeon/capture/cache.py): the suite keeps its own cache, new each run,
# never the user's ~/.cache/surgeon.
_CACHE = tempfile.mkdtemp(prefix="surgeon-test-cache-")
os.environ["SURGEON_CACHE_DIR"] = _CACHE
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
