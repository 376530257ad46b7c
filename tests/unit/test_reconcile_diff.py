"""When is a live object already what we would apply? (No write then.)"""

from __future__ import annotations

from disagg.reconcile.diff import contains


def test_server_defaults_and_other_managers_fields_do_not_count_as_drift() -> None:
    desired = {"spec": {"ports": [{"name": "http", "port": 8000}], "selector": {"a": "b"}}}
    live = {"spec": {"ports": [{"name": "http", "port": 8000, "protocol": "TCP", "targetPort": 8000},
                               {"name": "added-by-someone", "port": 9}],
                     "selector": {"a": "b"}, "clusterIP": "None", "type": "ClusterIP"}}
    assert contains(desired, live)


def test_omitempty_fields_the_server_drops_are_equal_to_absent() -> None:
    assert contains({"spec": {"publishNotReadyAddresses": False, "tolerations": []}}, {"spec": {}})
    assert not contains({"spec": {"replicas": 0}}, {"spec": {}})  # 0 replicas is a real value


def test_hand_edits_are_drift() -> None:
    desired = {"spec": {"containers": [{"name": "engine", "image": "a:1", "args": ["--x", "1"]}]}}
    assert not contains(desired, {"spec": {"containers": [{"name": "engine", "image": "a:2", "args": ["--x", "1"]}]}})
    assert not contains(desired, {"spec": {"containers": [{"name": "engine", "image": "a:1", "args": ["--x", "2"]}]}})
    assert not contains(desired, {"spec": {"containers": [{"name": "sidecar", "image": "a:1"}]}})


def test_numbers_compare_with_their_canonical_text() -> None:
    assert contains({"limits": {"nvidia.com/gpu": "2"}}, {"limits": {"nvidia.com/gpu": "2"}})
    assert contains({"port": 8000}, {"port": 8000})
    assert not contains({"port": 8000}, {"port": 8001})
