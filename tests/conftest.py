"""Suite-wide setup. Service fixtures live in their own plugin modules listed below."""

import os

# Ray: no usage stats, loopback only, no token prompts in tests (see docs/architecture.md).
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DISABLE_IMPORT_WARNING", "1")
# Tests never read the developer's own ~/.charforge or .env.
os.environ.pop("CHARFORGE_HOME", None)
os.environ.pop("RAY_ADDRESS", None)

pytest_plugins: list[str] = ["tests.services", "tests.gitserver"]
