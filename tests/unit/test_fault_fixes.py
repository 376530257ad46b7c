"""Regressions of the operator bugs the fault tests (tests/e2e/test_faults.py) found."""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import threading
from pathlib import Path
from typing import Any, cast

import pytest
import yaml
from kmock_support import ApplyingEmulator
from test_reconcile_kmock import DEPLOYMENTS, ISVC, NAME, NAMESPACE, Harness, harness, managers_of_replicas

from disagg.api.validate import InvalidSpec, validate_service
from disagg.catalog.accelerators import DEFAULT_CATALOG
from disagg.kube.client import AUTOSCALER_FIELD_MANAGER, Kube
from disagg.reconcile import stamp
from disagg.reconcile.diff import contains
from disagg.render import render_service
from disagg.scaling import loop as autoscale_module
from disagg.scaling.loop import Autoscaler, Index
from disagg.scaling.policy import PolicySettings
from disagg.yamlio import yaml_flow

__all__ = ["harness"]  # the kmock harness fixture, shared with test_reconcile_kmock

EXAMPLE = Path(__file__).parents[2] / "examples" / "01-vllm-nixl-llama70b.yaml"
EVERY_CHARACTER = "".join(chr(c) for c in range(0x110000) if not 0xD800 <= c < 0xE000)


def example(name: str = "svc") -> dict[str, Any]:
    body: dict[str, Any] = yaml.safe_load(EXAMPLE.read_text())
    body["metadata"].update(name=name, namespace="ns", uid=f"uid-{name}", generation=1)
    return body


# --- children stored in another form than applied are not drift (no re-apply on every resync)


def test_quantities_the_api_server_rewrites_are_not_drift() -> None:
    for desired, live in [(".5", "500m"), ("0.5", "500m"), ("1.5G", "1500M"), ("1e3", "1k"), ("+4", "4"),
                          ("1Gi", "1024Mi"), ("1e12", "1T")]:
        assert contains({"requests": {"memory": desired}}, {"requests": {"memory": live}}), (desired, live)
    assert not contains({"requests": {"memory": "1Gi"}}, {"requests": {"memory": "1G"}})
    assert not contains({"image": "a:1e3"}, {"image": "a:1k"})
    assert not contains({"x": "1e99999999999"}, {"x": "1"})  # too large to compare: drift, no crash


# --- user strings reach the API server and the renderer's YAML intact


def test_yaml_flow_reads_back_every_character() -> None:
    value = {"every": EVERY_CHARACTER, "emoji": "\U0001f600", "c1": "\x85\x9b", "separators": "\u2028\u2029"}
    text = yaml_flow(value)
    assert yaml.safe_load(text) == value
    assert all(ch == "\n" or 0x20 <= ord(ch) < 0x7F or 0xA0 <= ord(ch) <= 0xFFFD for ch in text)


def test_render_keeps_unicode_of_the_spec() -> None:
    body = example()
    values = ["\U0001f600 \U00074514", "\x9b\x85\x7f", "\u2028 \ufeff", EVERY_CHARACTER[:4000]]
    body["spec"]["engine"]["env"] = [{"name": f"USR_{i}", "value": v} for i, v in enumerate(values)]
    body["spec"]["engine"]["extraArgs"] = values
    (prefill,) = [m for m in render_service(body, DEFAULT_CATALOG)
                  if (m["kind"], m["metadata"]["name"]) == ("Deployment", "svc-prefill")]
    container = prefill["spec"]["template"]["spec"]["containers"][0]
    assert [e["value"] for e in container["env"] if e["name"].startswith("USR_")] == values
    assert container["args"][-len(values):] == values


# --- validation: a budget the fixed pools alone exceed


def test_budget_below_what_the_fixed_pools_hold_is_invalid() -> None:
    body = example()
    del body["spec"]["decode"]["autoscaling"]  # decode fixed: 2 replicas x 2 accelerators
    body["spec"]["acceleratorBudget"] = 5  # + prefill's floor 1 x 2 = 6
    with pytest.raises(InvalidSpec, match=r"spec\.acceleratorBudget: 5 is less than the 6 accelerators"):
        validate_service(body, DEFAULT_CATALOG)
    body["spec"]["acceleratorBudget"] = 6
    validate_service(body, DEFAULT_CATALOG)


# --- the autoscaler: one service's failure never stops the others; invalid or uncreated pools are skipped


class FakeKube:
    def __init__(self) -> None:
        self.scaled: list[tuple[str, str, int]] = []

    def scale(self, namespace: str, name: str, replicas: int, field_manager: str, kind: object = None,
              uid: str | None = None) -> dict[str, Any]:
        self.scaled.append((namespace, name, replicas))
        return {}

    def patch_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        pass


def autoscaler(index: Index, kube: FakeKube) -> Autoscaler:
    return Autoscaler(
        kube=cast(Kube, kube), catalog=DEFAULT_CATALOG, source=None,
        settings=PolicySettings(tick_s=5, scale_down_window_s=300, staleness_s=60),
        record_event=lambda obj, kind, reason, message: None, index=index,
        lock_for=lambda ns, name: threading.Lock(), clock=lambda: 1_800_000_000.0,
    )


def indexed(*bodies: dict[str, Any], deployments: bool = True) -> Index:
    index = Index()
    for body in bodies:
        name = body["metadata"]["name"]
        index.services[("ns", name)] = body
        if deployments:
            for role in ("prefill", "decode"):
                index.deployments[("ns", f"{name}-{role}")] = {
                    "metadata": {"uid": f"uid-{name}-{role}", "owners": [body["metadata"]["uid"]]},
                    "spec": {"replicas": 20}, "status": {}}
    return index


def test_a_service_the_policy_fails_on_does_not_stop_the_tick(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    real = autoscale_module.decide

    def decide(picture: Any, spec: Any, *args: Any) -> Any:
        if spec.model.name == "broken":
            raise ZeroDivisionError("division by zero")
        return real(picture, spec, *args)

    monkeypatch.setattr(autoscale_module, "decide", decide)
    broken, fine = example("a-broken"), example("b-fine")
    broken["spec"]["model"]["name"] = "broken"
    kube = FakeKube()
    scaler = autoscaler(indexed(broken, fine), kube)
    with caplog.at_level(logging.ERROR):
        for _ in range(3):
            report = scaler.tick()
    assert ("ns", "b-fine") in report.decisions and ("ns", "a-broken") not in report.decisions
    # the other service is still autoscaled: 20 replicas clamped into prefill's max 8 (no metrics)
    assert ("ns", "b-fine-prefill", 8) in kube.scaled
    assert sum("a-broken" in r.getMessage() for r in caplog.records) == 1  # logged once, not every tick


def test_invalid_specs_and_pools_not_created_yet_are_not_scaled() -> None:
    invalid = example("invalid")
    invalid["spec"]["decode"]["accelerator"]["type"] = "nvidia-h999"  # InvalidSpec: reconcile reports it
    kube = FakeKube()
    report = autoscaler(indexed(invalid), kube).tick()
    assert report.decisions == {} and kube.scaled == []

    fresh = example("fresh")
    fresh["spec"]["prefill"]["replicas"] = 0  # clamped to minReplicas 1: a change, but nothing to scale yet
    report = autoscaler(indexed(fresh, deployments=False), kube).tick()
    assert report.decisions[("ns", "fresh")]["prefill"].desired == 1
    assert kube.scaled == []


# --- killed between creating an autoscaled pool and setting its initial replicas


@pytest.mark.kmock(cls=ApplyingEmulator)
async def test_pool_created_but_never_scaled_gets_its_initial_replicas(harness: Harness) -> None:
    manifest: dict[str, Any] = yaml.safe_load(EXAMPLE.read_text())
    stored = harness.api.put_object(ISVC, manifest)
    body = copy.deepcopy(stored)
    (prefill,) = [stamp(m) for m in render_service(body, DEFAULT_CATALOG)
                  if (m["kind"], m["metadata"]["name"]) == ("Deployment", f"{NAME}-prefill")]
    assert "replicas" not in prefill["spec"]
    assert prefill["metadata"]["annotations"]["disagg.dev/initial-replicas"] == "2"
    await asyncio.to_thread(harness.kube.apply, prefill)  # the create, then the operator died
    live = harness.api.get_object(DEPLOYMENTS, NAMESPACE, f"{NAME}-prefill")
    assert live is not None and managers_of_replicas(live) == set()

    await harness.reconcile()
    live = harness.api.get_object(DEPLOYMENTS, NAMESPACE, f"{NAME}-prefill")
    assert live is not None and live["spec"]["replicas"] == 2
    assert managers_of_replicas(live) == {AUTOSCALER_FIELD_MANAGER}
    _, again = await harness.reconcile()
    assert [w for w in again if "deployments/" in w.name] == [], json.dumps([w.name for w in again])
