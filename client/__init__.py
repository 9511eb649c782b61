"""fedmerge.client: the client side of the protocol (:mod:`fedmerge.client.protocol`, for your own model)
and the built-in ClientApp (:mod:`fedmerge.client.app`, the model zoo and data sets of the run config)."""
from .protocol import (
                       cross_reply,
                       cross_stats_records,
                       make_client_app,
                       own_stats_records,
                       statistics_probe,
                       train_reply,
)

__all__ = ["make_client_app", "train_reply", "cross_reply", "own_stats_records", "cross_stats_records",
           "statistics_probe"]
