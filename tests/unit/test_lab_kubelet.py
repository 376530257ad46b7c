"""The lab's engine kubelet and what the engines do at the edges of their lives: termination (preStop hook,
SIGTERM as the engine handles it, SIGKILL at the grace end), a killed engine restarted in place with a new
identity, the peers such a restart crashes (vllm#49238, smg#2503), and hand-offs between revisions refused
and counted. Real HTTP on loopback pod IPs; no cluster (a recording stand-in for the pod writes)."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from disagg_lab.engines import DecodeEngine, LiveRequest
from disagg_lab.kube import Event, PodObservation
from disagg_lab.kubelet import FINALIZER
from disagg_lab.podspec import Hook
from disagg_lab.protocol import KV_HEADER
from support.lab_engines import PRODUCER, RECOMPUTE, SGLANG, VLLM, lab, sse


class RecordingPodApi:
    """What the kubelet writes to the API server, recorded."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def add_finalizer(self, namespace: str, name: str) -> bool:
        self.calls.append(("add", name))
        return True

    def remove_finalizer(self, namespace: str, name: str) -> bool:
        self.calls.append(("remove", name))
        return True

    def set_ready(self, namespace: str, name: str, ready: bool, restarts: int, reason: str, message: str) -> bool:
        self.calls.append(("ready", name, ready, restarts))
        return True


def engine_pod(service: str, role: str, ip: str, *, kind: str = "vllm", args: tuple[str, ...] = (),
               image: str = "img:1") -> PodObservation:
    if kind == "vllm":
        config = PRODUCER if role == "prefill" else RECOMPUTE
        args = ("vllm", "serve", "meta-llama/Llama-3.1-70B-Instruct", "--kv-transfer-config", config, *args)
    else:
        args = ("python3", "-m", "sglang.launch_server", "--model-path", "m", *args)
    name = f"{service}-{role}-{ip.rsplit('.', 1)[1]}"
    return PodObservation(uid=name, namespace="ns", name=name, service=service, role=role,  # type: ignore[arg-type]
                          ip=ip, ready=True, args=args, image=image, finalizers=(FINALIZER,))


async def delete(env: Any, pod: PodObservation, grace_s: float, hook: Hook | None) -> None:
    deleting = replace(pod, deleting=True, deadline=time.time() + grace_s, grace_s=grace_s, prestop=hook)
    env.server.apply(Event("pods", "MODIFIED", None, (deleting,)))
    await env.server.reconcile()


async def stream(env: Any, ip: str, tokens: int) -> tuple[int, list[dict[str, Any]]]:
    body = {"model": VLLM["spec"]["model"]["name"], "prompt": "hello " * 50, "max_tokens": tokens, "stream": True}
    async with env.http.post(env.url(ip, "/v1/completions"), json=body) as resp:
        if resp.status != 200:
            return resp.status, []
        events, _ = await sse(resp)
        return resp.status, events


def text_tokens(events: list[dict[str, Any]]) -> int:
    return sum(1 for e in events if e.get("choices") and e["choices"][0].get("text"))


async def test_a_deleted_vllm_decode_runs_its_hook_then_finishes_its_requests(tmp_path: Path) -> None:
    decode = engine_pod("a", "decode", "127.100.251.2", args=("--shutdown-timeout", "30"))
    async with lab({"a": VLLM}, [engine_pod("a", "prefill", "127.100.251.1"), decode], tmp_path) as env:
        api = env.server.pod_api = RecordingPodApi()  # type: ignore[assignment]
        long = asyncio.create_task(stream(env, "127.100.251.2", 150))
        await asyncio.sleep(0.5)
        await delete(env, decode, 20.0, Hook(sleep_s=1.0))
        status, _ = await stream(env, "127.100.251.2", 2)
        assert status == 200  # during the preStop hook the engine still serves
        await asyncio.sleep(1.2)
        status, _ = await stream(env, "127.100.251.2", 2)
        assert status == 503  # after SIGTERM: new requests refused, in-flight ones go on
        status, events = await long
        assert status == 200 and text_tokens(events) == 150
        await asyncio.sleep(0.3)
        with pytest.raises(aiohttp.ClientConnectionError):
            await stream(env, "127.100.251.2", 1)  # exited: nothing listens
        assert ("remove", decode.name) in api.calls  # kwok may remove the pod now


async def test_vllm_without_a_shutdown_timeout_aborts_at_sigterm(tmp_path: Path) -> None:
    decode = engine_pod("a", "decode", "127.100.251.12")
    async with lab({"a": VLLM}, [engine_pod("a", "prefill", "127.100.251.11"), decode], tmp_path) as env:
        long = asyncio.create_task(stream(env, "127.100.251.12", 150))
        await asyncio.sleep(0.5)
        await delete(env, decode, 20.0, None)
        _, events = await long
        assert text_tokens(events) < 150  # vLLM's default --shutdown-timeout 0: in-flight requests are aborted


async def test_sglang_drains_until_the_grace_period_ends(tmp_path: Path) -> None:
    decode = engine_pod("s", "decode", "127.100.251.22", kind="sglang")
    pods = [engine_pod("s", "prefill", "127.100.251.21", kind="sglang"), decode]
    async with lab({"s": SGLANG}, pods, tmp_path) as env:
        served = env.sim.pods[decode.uid]
        started = time.monotonic()
        env.server.apply(Event("pods", "MODIFIED", None, (replace(decode, deleting=True, deadline=time.time() + 1.0,
                                                                  grace_s=1.0),)))
        # a request in flight that outlives the grace period: SGLang waits for it, the kubelet kills it at 1 s
        assert isinstance(served.engine, DecodeEngine)
        served.engine.submit(LiveRequest(env.sim.next_id(), 100, 100, received=env.sim.time))
        await env.server.reconcile()
        while decode.uid in env.sim.pods and time.monotonic() - started < 5:
            await asyncio.sleep(0.05)
        assert 0.9 <= time.monotonic() - started <= 2.0


async def test_a_killed_engine_restarts_in_place_with_a_new_identity(tmp_path: Path) -> None:
    decode = engine_pod("a", "decode", "127.100.251.32")
    async with lab({"a": VLLM}, [engine_pod("a", "prefill", "127.100.251.31"), decode], tmp_path) as env:
        api = env.server.pod_api = RecordingPodApi()  # type: ignore[assignment]
        env.server.restart_s = 0.5
        before = env.sim.pods[decode.uid].engine.engine_id
        async with env.http.put(f"http://127.0.0.1:{env.control}/fault/ns/{decode.name}", json={"fault": "kill"}):
            pass
        with pytest.raises(aiohttp.ClientConnectionError):
            await stream(env, "127.100.251.32", 1)
        assert ("ready", decode.name, False, 1) in api.calls
        await asyncio.sleep(1.0)
        status, events = await stream(env, "127.100.251.32", 3)
        assert status == 200 and text_tokens(events) == 3
        assert env.sim.pods[decode.uid].engine.engine_id != before
        assert ("ready", decode.name, True, 1) in api.calls


async def _pd(env: Any, prefill_ip: str, decode_ip: str) -> tuple[int, str]:
    model = VLLM["spec"]["model"]["name"]
    leg = {"model": model, "prompt": "hello " * 300, "max_tokens": 1, "stream": False,
           "kv_transfer_params": {"do_remote_decode": True, "do_remote_prefill": False}}
    async with env.http.post(env.url(prefill_ip, "/v1/completions"), json=leg) as resp:
        params = (await resp.json())["kv_transfer_params"]
    body = {"model": model, "prompt": "hello " * 300, "max_tokens": 4, "kv_transfer_params": params}
    async with env.http.post(env.url(decode_ip, "/v1/completions"), json=body) as resp:
        return resp.status, resp.headers.get(KV_HEADER, "")


async def test_a_vllm_prefill_restarted_in_place_crashes_the_decode_that_knew_it(tmp_path: Path) -> None:
    prefill, decode = engine_pod("a", "prefill", "127.100.251.41"), engine_pod("a", "decode", "127.100.251.42")
    async with lab({"a": VLLM}, [prefill, decode], tmp_path) as env:
        env.server.restart_s = 0.3
        assert await _pd(env, "127.100.251.41", "127.100.251.42") == (200, "transferred")
        await env.server.kill(prefill.uid, "test")
        await asyncio.sleep(0.6)  # back at the same address, a new engine id
        status, _ = await _pd(env, "127.100.251.41", "127.100.251.42")
        assert status == 500  # vllm#49238: the decode segfaults handshaking with the new engine
        await asyncio.sleep(0.1)
        assert decode.uid not in env.sim.pods and env.server.containers[decode.uid].restarts == 1
        await asyncio.sleep(0.5)
        assert await _pd(env, "127.100.251.41", "127.100.251.42") == (200, "transferred")  # a fresh decode


async def test_a_mixed_revision_hand_off_is_refused_and_counted(tmp_path: Path) -> None:
    pods = [engine_pod("a", "prefill", "127.100.251.51", image="vllm:old"),
            engine_pod("a", "decode", "127.100.251.52", image="vllm:new")]
    async with lab({"a": VLLM}, pods, tmp_path) as env:
        assert await _pd(env, "127.100.251.51", "127.100.251.52") == (200, "refused")  # recomputed, not hidden
        engine = env.sim.pods[pods[1].uid].engine
        assert engine.stats.kv_refused == 1 and engine.stats.kv_received == 0
        page = env.sim.pods[pods[1].uid].metrics_page()
        assert 'disagg_lab_kv_refused_total{namespace="ns",pod="a-decode-52"' in page
        assert "vllm:nixl_num_failed_transfers_total" in page


async def test_sglang_refuses_a_mixed_hand_off_and_fails_the_request(tmp_path: Path) -> None:
    pods = [engine_pod("s", "prefill", "127.100.251.61", kind="sglang", image="sglang:old",
                       args=("--disaggregation-bootstrap-port", "8998")),
            engine_pod("s", "decode", "127.100.251.62", kind="sglang", image="sglang:new")]
    async with lab({"s": SGLANG}, pods, tmp_path) as env:
        body = {"model": SGLANG["spec"]["model"]["name"], "messages": [{"role": "user", "content": "hi " * 50}],
                "max_tokens": 4, "bootstrap_host": "127.100.251.61", "bootstrap_port": 8998, "bootstrap_room": 7}

        async def leg(ip: str) -> tuple[int, str]:
            async with env.http.post(env.url(ip, "/v1/chat/completions"), json=body) as resp:
                return resp.status, resp.headers.get(KV_HEADER, "")

        (_, _), (status, kv) = await asyncio.gather(leg("127.100.251.61"), leg("127.100.251.62"))
        assert (status, kv) == (500, "refused")
        assert env.sim.pods[pods[1].uid].engine.stats.kv_refused == 1
        page = env.sim.pods[pods[1].uid].metrics_page()
        assert "sglang:num_transfer_failed_reqs_total" in page and json.dumps(1) in page
