"""precompute_assets: keep a Redis serving cache warm with ML predictions (Dagster assets).

Kept tiny on purpose: importing ``precompute_assets.serving`` must not import Dagster.
"""

__version__ = "0.1.0"
