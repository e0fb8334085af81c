"""How fresh the assets that serving depends on must stay: Dagster freshness policies, which the daemon evaluates
(every 30 s) and the UI shows as each asset's freshness, pass, warn or fail. They never block a run.

Each is a time window since the asset's newest materialization of any partition: Dagster evaluates freshness per
asset, so a backfill of an old partition also counts as fresh.
"""

from datetime import timedelta

import dagster as dg

from .selection import OFFPEAK_WINDOW_HOURS

# The hourly drain runs 5 minutes past every hour: warn when one drain was missed, fail after several (the night's
# precompute waits for every hour of its day).
QUERY_LOGS_FRESHNESS = dg.FreshnessPolicy.time_window(warn_window=timedelta(hours=2), fail_window=timedelta(hours=6))

# The nightly publish runs somewhere in the learned off-peak window, so two publishes can be a day and a window apart:
# warn past that, fail once a whole night was missed (the published keys' TTL is what serving has left).
CTR_CACHE_FRESHNESS = dg.FreshnessPolicy.time_window(
    warn_window=timedelta(hours=24 + OFFPEAK_WINDOW_HOURS), fail_window=timedelta(hours=48)
)

# The embedding sync runs at 04:00 every day (and when documents change): warn when a daily sync is 2 hours late,
# fail once a whole day was missed.
EMBEDDINGS_FRESHNESS = dg.FreshnessPolicy.time_window(warn_window=timedelta(hours=26), fail_window=timedelta(hours=48))
