"""`disagg-lab`: the local cluster's lab (simulated engines, the real routers, a real OpenAI client)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

from disagg.catalog.accelerators import CatalogError, load_catalog
from disagg.scaling.signals import prometheus_duration_seconds
from disagg_lab.kube import is_loopback
from disagg_lab.offered import (
    DEFAULT_BASE_SHARE,
    DEFAULT_OUTPUT_TOKENS,
    DEFAULT_PROMPT_TOKENS,
    LoadError,
    parse_load_arg,
    parse_load_spec,
)
from disagg_lab.targets import default_targets_file


def _logging(verbose: bool, name: str) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format=f"%(asctime)s %(levelname)s {name}: %(message)s", stream=sys.stderr)
    if not verbose:
        for noisy in ("aiohttp", "kubernetes", "httpx", "httpx2", "openai"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
        # sglang-router first tries each worker over gRPC: aiohttp logs the HTTP/2 preface it refuses as an error
        logging.getLogger("aiohttp.server").setLevel(logging.CRITICAL)


def fleet_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="disagg-lab fleet",
        description="Simulated vLLM/SGLang engines for every Ready prefill/decode pod of the local cluster, on "
                    "each pod's own loopback IP: the engines' HTTP API and P/D protocol, their /metrics, and "
                    "disagg simulate's engine model stepped live. Optional injected load (without HTTP) for "
                    "large benchmarks.",
        epilog="Load SPEC: 8 (requests/s) | 4x (times the base load) | steps:0s@2,60s@8,120s@2 | "
               "trace:PATH[:time-scale] (Azure CSV or Mooncake JSONL; relative paths also looked up in "
               "the shared traces directory).",
    )
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument("-A", "--all-namespaces", action="store_true", help="watch every namespace (default)")
    scope.add_argument("-n", "--namespace", action="append", default=[], help="watch this namespace (repeatable)")
    parser.add_argument("--kubeconfig", default=None, help="default: $KUBECONFIG or ~/.kube/config")
    parser.add_argument("--accelerator-catalog", default=None, help="accelerator catalogue overrides (YAML)")
    parser.add_argument("--load", action="append", default=[], metavar="NS/NAME=SPEC",
                        help="injected load of one service (repeatable)")
    parser.add_argument("--default-load", default="0", metavar="SPEC",
                        help="injected load of services without --load (default: 0, none; real requests come "
                             "through `disagg-lab load`)")
    parser.add_argument("--prompt-tokens", type=int, default=DEFAULT_PROMPT_TOKENS,
                        help=f"injected prompt tokens per request (default {DEFAULT_PROMPT_TOKENS})")
    parser.add_argument("--output-tokens", type=int, default=DEFAULT_OUTPUT_TOKENS,
                        help=f"injected output tokens per request (default {DEFAULT_OUTPUT_TOKENS})")
    parser.add_argument("--base-share", type=float, default=DEFAULT_BASE_SHARE,
                        help="base load as a share of one prefill + one decode replica's SLO capacity (default 0.6)")
    parser.add_argument("--arrivals", choices=("poisson", "uniform"), default="poisson")
    parser.add_argument("--kv-link", choices=("rdma", "tcp"), default="rdma",
                        help="prefill-to-decode KV link of the transfer-time model (default rdma, as the autoscaler)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--control-host", default="127.0.0.1")
    parser.add_argument("--control-port", type=int, default=18090)
    parser.add_argument("--targets-file", default=None,
                        help="Prometheus file_sd file (default $DISAGG_CLUSTER_DIR/prometheus/engines.json, "
                             "cluster dir /tmp/disagg-cluster); 'none' to write none")
    parser.add_argument("--scrape-interval", default=None, metavar="DURATION",
                        help="ask Prometheus to scrape these engines this often (e.g. 1s; default: the job's)")
    parser.add_argument("--traces-dir", default=None, help="where relative trace paths are looked up")
    parser.add_argument("--duration", type=float, default=0.0, help="stop after this many seconds (0: on signal)")
    parser.add_argument("--allow-remote-apiserver", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser


def fleet_main(argv: list[str]) -> int:
    """`disagg-lab fleet`: run the simulated engines until SIGINT/SIGTERM (or --duration)."""
    from disagg_lab.engines import FleetSim
    from disagg_lab.server import FleetServer

    args = fleet_parser().parse_args(argv)
    _logging(args.verbose, "fleet")
    if not is_loopback(args.control_host):
        print(f"error: --control-host {args.control_host} is not a loopback address", file=sys.stderr)
        return 2
    try:
        if args.prompt_tokens < 1 or args.output_tokens < 1:
            raise LoadError("--prompt-tokens and --output-tokens must be >= 1")
        if not 0 < args.base_share <= 1:
            raise LoadError("--base-share must be in (0, 1]")
        if args.scrape_interval is not None:
            prometheus_duration_seconds(args.scrape_interval)
        loads = dict(parse_load_arg(text) for text in args.load)
        sim = FleetSim(
            load_catalog(args.accelerator_catalog), seed=args.seed, prompt_tokens=args.prompt_tokens,
            output_tokens=args.output_tokens, base_share=args.base_share, arrivals=args.arrivals,
            kv_over_rdma=args.kv_link == "rdma", default_load=parse_load_spec(args.default_load), loads=loads,
            traces_dir=Path(args.traces_dir) if args.traces_dir else None,
        )
    except (LoadError, CatalogError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    targets = None if args.targets_file == "none" else Path(args.targets_file or default_targets_file())
    server = FleetServer(
        sim, namespaces=args.namespace or None, kubeconfig=args.kubeconfig, targets_file=targets,
        scrape_interval=args.scrape_interval, control_host=args.control_host, control_port=args.control_port,
        allow_remote_apiserver=args.allow_remote_apiserver,
    )
    try:
        asyncio.run(server.run(args.duration or None))
    except OSError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    return 0


def routers_main(argv: list[str]) -> int:
    from disagg_lab.routers import routers_main as main_

    return main_(argv)


def load_main(argv: list[str]) -> int:
    from disagg_lab.load import load_main as main_

    return main_(argv)


def ask_main(argv: list[str]) -> int:
    from disagg_lab.load import ask_main as main_

    return main_(argv)


COMMANDS = {"fleet": fleet_main, "routers": routers_main, "load": load_main, "ask": ask_main}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print("usage: disagg-lab {fleet,routers,load,ask} ...\n\n"
              "  fleet    simulated engines for the Ready prefill/decode pods (disagg-lab fleet --help)\n"
              "  routers  the real router binaries for the Ready router pods (disagg-lab routers --help)\n"
              "  load     real OpenAI requests to a service's endpoint (disagg-lab load --help)\n"
              "  ask      one streamed chat answer from a service's endpoint (disagg-lab ask --help)",
              file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    return COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
