"""Autoscaling: the pure policy (signals -> desired replicas + reason) and, beside it, the metric queries."""
