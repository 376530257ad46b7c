"""Trace-driven simulation of prefill and decode pools with an autoscaling policy in the loop."""
