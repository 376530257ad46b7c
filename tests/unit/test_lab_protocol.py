"""The lab's simulated engines speak the engines' P/D protocols, over real HTTP on loopback pod IPs, and
take the engine model's time (no cluster: pods are handed to the fleet server directly)."""

from __future__ import annotations

import asyncio
import copy
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from disagg.catalog.accelerators import load_catalog
from disagg.sim.engine import DecodePool, PrefillReplica
from disagg_lab.engines import DecodeEngine, FleetSim, LiveRequest, PrefillEngine
from disagg_lab.protocol import DECODE_POD_HEADER, KV_HEADER, PREFILL_POD_HEADER
from support.lab_engines import (
    PRODUCER,
    RECOMPUTE,
    SGLANG,
    VLLM,
    lab,
    pod,
    sse,
)


def test_the_engines_step_the_simulators_engine_model() -> None:
    sim = FleetSim(load_catalog(), seed=0)
    assert sim.upsert_service("ns", "a", VLLM["spec"]) is None
    prefill = sim.add_pod(pod("a", "prefill", "127.100.250.1")).engine
    decode = sim.add_pod(pod("a", "decode", "127.100.250.2")).engine
    assert isinstance(prefill, PrefillEngine) and isinstance(prefill.replica, PrefillReplica)
    assert isinstance(decode, DecodeEngine) and isinstance(decode.pool, DecodePool)


async def test_vllm_pd_hand_off_is_pulled_once_and_otherwise_recomputed(tmp_path: Path) -> None:
    model = VLLM["spec"]["model"]["name"]
    pods = [pod("a", "prefill", "127.100.250.1", args=("--kv-transfer-config", PRODUCER)),
            pod("a", "decode", "127.100.250.2", args=("--kv-transfer-config", RECOMPUTE)),
            pod("a", "decode", "127.100.250.3", args=("--kv-transfer-config", PRODUCER.replace("prod", "cons"))),
            pod("b", "decode", "127.100.250.4", args=("--kv-transfer-config", RECOMPUTE))]
    async with lab({"a": VLLM, "b": VLLM}, pods, tmp_path) as env:
        prompt = " ".join(["word"] * 2000)
        leg = {"model": model, "prompt": prompt, "max_tokens": 1, "stream": False,
               "kv_transfer_params": {"do_remote_decode": True, "do_remote_prefill": False}}
        prefill_engine = env.engine("a-prefill-1")
        expected = prefill_engine.service_seconds(2000)
        started = time.monotonic()
        async with env.http.post(env.url("127.100.250.1", "/v1/completions"), json=leg) as resp:
            assert resp.status == 200
            answer = await resp.json()
        took = time.monotonic() - started
        assert took >= expected * 0.9, (took, expected)  # answered when the prefill's batch ends
        params = answer["kv_transfer_params"]
        assert params["do_remote_prefill"] is True and params["remote_host"] == "127.100.250.1"
        assert params["remote_engine_id"] == prefill_engine.engine_id and params["remote_port"] == 5600
        assert answer["usage"]["prompt_tokens"] == 2000 and answer["usage"]["completion_tokens"] == 1

        decode = {"model": model, "prompt": prompt, "max_tokens": 40, "stream": True,
                  "stream_options": {"include_usage": True}, "kv_transfer_params": params}
        started = time.monotonic()
        async with env.http.post(env.url("127.100.250.2", "/v1/completions"), json=decode) as resp:
            assert resp.status == 200
            assert resp.headers[KV_HEADER] == "transferred"
            assert resp.headers[PREFILL_POD_HEADER] == "ns/a-prefill-1"
            assert resp.headers[DECODE_POD_HEADER] == "ns/a-decode-2"
            events, times = await sse(resp)
        tokens = [e for e in events if e["choices"]]
        assert len(tokens) == 40 and tokens[-1]["choices"][0]["finish_reason"] == "length"
        assert events[-1]["usage"]["completion_tokens"] == 40
        step = env.engine("a-decode-2").pool.cost.step_seconds(1.0, 2000.0)
        spread = times[len(tokens) - 1] - times[0]
        assert 39 * step * 0.8 <= spread <= 39 * step * 2.5 + 0.3, (spread, step)  # one token per step
        assert env.engine("a-prefill-1").stats.kv_sent == 1
        assert env.engine("a-decode-2").stats.kv_received == 1 and env.engine("a-decode-2").stats.recomputed == 0

        # the same parameters again: consumed; this pod recomputes (its policy), the other fails (vLLM's default)
        decode["stream"] = False
        async with env.http.post(env.url("127.100.250.2", "/v1/completions"), json=decode) as resp:
            assert resp.status == 200 and resp.headers[KV_HEADER] == "recomputed"
        async with env.http.post(env.url("127.100.250.3", "/v1/completions"), json=decode) as resp:
            assert resp.status == 500
            assert "KV cache load failed" in (await resp.json())["error"]["message"]
        # another service's decode cannot reach this prefill's KV port; a request without parameters is local
        fresh = dict(leg)
        async with env.http.post(env.url("127.100.250.1", "/v1/completions"), json=fresh) as resp:
            params2 = (await resp.json())["kv_transfer_params"]
        async with env.http.post(env.url("127.100.250.4", "/v1/completions"),
                                 json={**decode, "kv_transfer_params": params2}) as resp:
            assert resp.status == 200 and resp.headers[KV_HEADER] == "recomputed"
        async with env.http.post(env.url("127.100.250.3", "/v1/completions"),
                                 json={"model": model, "prompt": "hello", "max_tokens": 3}) as resp:
            assert resp.status == 200 and resp.headers[KV_HEADER] == "recomputed"
        assert env.engine("a-decode-2").stats.kv_failed == 1 and env.engine("a-decode-2").stats.recomputed == 1
        assert env.engine("a-decode-3").stats.kv_failed == 1 and env.engine("a-decode-3").stats.recomputed == 1
        assert env.engine("b-decode-4").stats.kv_failed == 1 and env.engine("a-prefill-1").stats.kv_sent == 1
        page = env.sim.pods["a-decode-2"].metrics_page()
        assert 'disagg_lab_kv_received_total{namespace="ns",pod="a-decode-2"' in page
        assert "disagg_lab_prompts_recomputed_total" in page and "disagg_lab_kv_load_failures_total" in page


async def test_sglang_decode_waits_for_its_prefill_and_fails_when_it_never_comes(tmp_path: Path) -> None:
    model = SGLANG["spec"]["model"]["name"]
    pods = [pod("s", "prefill", "127.100.250.11", args=("--disaggregation-bootstrap-port", "8998")),
            pod("s", "decode", "127.100.250.12"),
            pod("s", "decode", "127.100.250.13", env=(("SGLANG_DISAGGREGATION_WAITING_TIMEOUT", "0.5"),))]
    async with lab({"s": SGLANG}, pods, tmp_path) as env:
        body = {"model": model, "messages": [{"role": "user", "content": "hello " * 500}], "max_tokens": 8,
                "stream": True, "bootstrap_host": "127.100.250.11", "bootstrap_port": 8998, "bootstrap_room": 42}

        async def leg(ip: str) -> tuple[int, dict[str, str], list[dict[str, Any]]]:
            async with env.http.post(env.url(ip, "/v1/chat/completions"), json=body) as resp:
                events, _ = await sse(resp)
                return resp.status, dict(resp.headers), events

        (p_status, _, _), (d_status, headers, events) = await asyncio.gather(leg("127.100.250.11"),
                                                                              leg("127.100.250.12"))
        assert p_status == 200 and d_status == 200
        assert headers[KV_HEADER] == "transferred" and headers[PREFILL_POD_HEADER] == "ns/s-prefill-11"
        assert events[0]["choices"][0]["delta"]["role"] == "assistant"
        assert "".join(e["choices"][0]["delta"].get("content", "") for e in events).split() == [
            "the", "model", "answers", "with", "a", "simulated", "reply", "from"]
        # a decode whose prefill never comes fails after the pod's waiting timeout, as SGLang's does
        started = time.monotonic()
        async with env.http.post(env.url("127.100.250.13", "/v1/chat/completions"),
                                 json={**body, "bootstrap_room": 43}) as resp:
            assert resp.status == 500
            assert "prefill never came" in (await resp.json())["message"]
        assert time.monotonic() - started >= 0.5
        assert env.engine("s-decode-13").stats.kv_failed == 1
        assert env.engine("s-prefill-11").stats.kv_sent == 1 and env.engine("s-decode-12").stats.kv_received == 1


async def test_faults_make_an_engine_unhealthy_or_take_it_down(tmp_path: Path) -> None:
    async with lab({"a": VLLM}, [pod("a", "prefill", "127.100.250.21"), pod("a", "decode", "127.100.250.22")],
                   tmp_path) as env:
        control = f"http://127.0.0.1:{env.control}/fault/ns/a-decode-22"
        async with env.http.put(control, json={"fault": "unhealthy"}) as resp:
            assert resp.status == 200
        async with env.http.get(env.url("127.100.250.22", "/health")) as resp:
            assert resp.status == 503
        async with env.http.put(control, json={"fault": "down"}) as resp:
            assert resp.status == 200
        with pytest.raises(aiohttp.ClientConnectionError):
            async with env.http.get(env.url("127.100.250.22", "/health"), timeout=aiohttp.ClientTimeout(total=2)):
                pass
        async with env.http.put(control, json={"fault": None}) as resp:
            assert resp.status == 200
        async with env.http.get(env.url("127.100.250.22", "/health")) as resp:
            assert resp.status == 200
        async with env.http.put(control, json={"fault": "melted"}) as resp:
            assert resp.status == 400


def test_an_edit_that_leaves_the_engines_as_they_are_keeps_them_running() -> None:
    sim = FleetSim(load_catalog(), seed=0)
    assert sim.upsert_service("ns", "a", VLLM["spec"]) is None
    decode = sim.add_pod(pod("a", "decode", "127.100.250.2"))
    resized = copy.deepcopy(VLLM["spec"])
    resized["decode"]["replicas"] = 7
    resized["decode"]["image"] = "vllm/vllm-openai:v0.33.0"
    resized["router"] = {"replicas": 3}
    # what a rollout changes on the pods (the model revision, the engine image) or their placement
    resized["model"]["revision"] = "v2"
    resized["engine"]["image"] = "vllm/vllm-openai:v0.34.0"
    resized["decode"]["resources"] = {"requests": {"cpu": "12"}}
    resized["decode"]["tolerations"] = [{"key": "example.com/spot", "operator": "Exists"}]
    assert sim.upsert_service("ns", "a", resized) is None
    assert sim.pods.get(decode.pod.uid) is decode  # a real engine does not see the InferenceService
    other_model = copy.deepcopy(resized)
    other_model["model"]["name"] = "another/model"
    assert sim.upsert_service("ns", "a", other_model) is None
    assert decode.pod.uid not in sim.pods  # the engines are made again from the new spec


def test_a_decode_request_whose_kv_is_still_coming_holds_up_no_other() -> None:
    sim = FleetSim(load_catalog(), seed=0)
    assert sim.upsert_service("ns", "a", VLLM["spec"]) is None
    decode = sim.add_pod(pod("a", "decode", "127.100.250.2")).engine
    assert isinstance(decode, DecodeEngine)
    stuck = LiveRequest(id=1, prompt=100, output=10, received=0.0)  # its KV never comes
    ready = LiveRequest(id=2, prompt=100, output=10, received=0.0, ready_at=0.0)
    decode.submit(stuck)
    decode.submit(ready)
    decode.admit(1.0)
    assert list(decode.running) == [2], "the request whose KV is in place is decoded"
    assert list(decode.waiting) == [stuck], "the other waits aside"


def test_sglang_decode_gives_up_a_lost_prefill_after_its_heartbeat() -> None:
    sim = FleetSim(load_catalog(), seed=0)
    assert sim.upsert_service("ns", "s", SGLANG["spec"]) is None
    sim.add_pod(pod("s", "prefill", "127.100.250.11"))
    heartbeat = (("SGLANG_DISAGGREGATION_HEARTBEAT_INTERVAL", "3"),
                 ("SGLANG_DISAGGREGATION_HEARTBEAT_MAX_FAILURE", "2"))
    decode = sim.add_pod(pod("s", "decode", "127.100.250.12", env=heartbeat))
    assert isinstance(decode.engine, DecodeEngine) and decode.engine.prefill_lost_s == 6.0
    waiting = LiveRequest(id=1, prompt=100, output=10, received=0.0, room=("127.100.250.11", 8998, 1))
    sim.join_room(decode, waiting, 0.0)
    assert waiting.deadline == decode.engine.waiting_timeout_s, "its prefill answers: the waiting timeout holds"
    sim.time = 4.0
    sim.remove_pod("s-prefill-11")  # the prefill engine dies before it prefilled the room
    assert waiting.deadline == 4.0 + 6.0
    nowhere = LiveRequest(id=2, prompt=100, output=10, received=5.0, room=("127.100.250.99", 8998, 2))
    sim.join_room(decode, nowhere, 5.0)
    assert nowhere.deadline == 5.0 + 6.0, "no bootstrap server answers at its address"
