"""The `disagg` command: run the operator, render/validate services, print the CRD, plan, simulate."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from disagg import KIND
from disagg.settings import OperatorSettings
from disagg.yamlio import dump_all


def _catalog(path: str | None) -> Any:
    from disagg.catalog.accelerators import CatalogError, load_catalog

    try:
        return load_catalog(path)
    except CatalogError as error:
        raise SystemExit(f"error: {error}") from None


@contextlib.contextmanager
def _manifest_stream(path: str) -> Iterator[BinaryIO]:
    """The file (or stdin, kept in a temporary file so it can be read twice) as bytes."""
    if path == "-":
        with tempfile.TemporaryFile() as spool:
            shutil.copyfileobj(sys.stdin.buffer, spool)
            spool.seek(0)
            yield spool
        return
    if Path(path).is_dir():
        raise SystemExit(f"error: {path} is a directory: give a YAML file, or - for stdin")
    try:
        stream = open(path, "rb")  # noqa: SIM115 - closed by the with below
    except OSError as error:
        raise SystemExit(f"error: cannot read {path}: {error.strerror}") from None
    with stream:
        yield stream


@dataclass
class _Checked:
    """One InferenceService of a manifest stream, and every problem with it."""

    label: str
    body: dict[str, Any] | None
    errors: list[str]


def _checked_services(stream: BinaryIO, path: str, catalog: Any) -> Iterator[_Checked]:
    """Each document of the stream as `disagg validate` judges it, one at a time (a file of any size
    is read in bounded memory): what the API server refuses in the document, then what the operator
    refuses in the spec. A `v1` `List` (kubectl get -o yaml) gives its items."""
    from disagg.api.manifest import check_document
    from disagg.api.validate import InvalidSpec, validate_service
    from disagg.yamlio import read_documents

    for document in read_documents(stream):
        where = f"{path}: document {document.number} (line {document.line})"
        if document.error is not None:
            located = document.error.startswith("line ")  # the error says where already
            yield _Checked(path if located else where, None, [document.error])
            continue
        value = document.value
        items: list[tuple[str, Any]] = [(where, value)]
        if isinstance(value, dict) and (value.get("apiVersion"), value.get("kind")) == ("v1", "List"):
            listed = value.get("items")
            if not isinstance(listed, list):
                yield _Checked(where, None, ["items: a List needs a list of items"])
                continue
            items = [(f"{where} item {index}", item) for index, item in enumerate(listed)]
        for label, body in items:
            errors = [str(e) for e in check_document(body)]
            if isinstance(body, dict):
                meta = body.get("metadata")
                name = meta.get("name") if isinstance(meta, dict) else None
                if isinstance(name, str) and name:
                    label = f"{KIND} {name}"
                try:
                    validate_service(body, catalog)
                except InvalidSpec as error:
                    errors += [str(e) for e in error.errors]
            yield _Checked(label, body if isinstance(body, dict) else None, errors)


def _report(checked: _Checked) -> bool:
    """Prints the verdict on one service; True when it is valid."""
    for problem in checked.errors:
        print(f"error: {checked.label}: {problem}", file=sys.stderr)
    return not checked.errors


def _scrapers(text: str | None) -> Any:
    from disagg.render import parse_scrapers
    from disagg.render.context import DEFAULT_METRICS_SCRAPERS

    if text is None:
        return DEFAULT_METRICS_SCRAPERS
    try:
        return parse_scrapers(text)
    except ValueError as error:
        raise SystemExit(f"error: --metrics-scrapers: {error}") from None


def cmd_render(args: argparse.Namespace) -> int:
    from disagg.render import render_service

    catalog = _catalog(args.accelerator_catalog)
    scrapers = _scrapers(args.metrics_scrapers)
    with _manifest_stream(args.file) as stream:
        # all or nothing: the output is only written when every service is valid (a first pass checks
        # them, a second renders them, one at a time: a file of any size in bounded memory)
        found, failed = 0, False
        for checked in _checked_services(stream, args.file, catalog):
            found += 1
            meta = (checked.body or {}).get("metadata")
            if not checked.errors and not (isinstance(meta, dict) and meta.get("name")):
                # the children's names come from it; the API server makes one up only when it creates
                checked.errors.append("metadata.name: render needs a name (generateName is filled in on create)")
            failed |= not _report(checked)
        if not found:
            raise SystemExit(f"error: {args.file} holds no {KIND}")
        if failed:
            return 1
        stream.seek(0)
        first = True
        for checked in _checked_services(stream, args.file, catalog):
            body = checked.body
            assert body is not None  # every one was valid on the first pass
            metadata = body.setdefault("metadata", {})
            if args.namespace:
                metadata["namespace"] = args.namespace
            metadata.setdefault("namespace", "default")
            sys.stdout.write(("" if first else "---\n") + dump_all(render_service(body, catalog, scrapers)))
            first = False
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    catalog = _catalog(args.accelerator_catalog)
    found, failed = 0, False
    with _manifest_stream(args.file) as stream:
        for checked in _checked_services(stream, args.file, catalog):
            found += 1
            if _report(checked):
                print(f"{checked.label}: valid")
            else:
                failed = True
    if not found:
        raise SystemExit(f"error: {args.file} holds no {KIND}")
    return 1 if failed else 0


def cmd_crd(args: argparse.Namespace) -> int:
    from disagg.api.crd import crd_yaml

    sys.stdout.write(crd_yaml())
    return 0


def cmd_reference(args: argparse.Namespace) -> int:
    from disagg.api.reference import field_reference, update_readme

    if args.update:
        update_readme(args.update)
    else:
        sys.stdout.write(field_reference())
    return 0


def cmd_rbac(args: argparse.Namespace) -> int:
    from disagg.rbac import rbac_manifests

    sys.stdout.write(dump_all(rbac_manifests(args.namespace, args.service_account)))
    return 0


def _fewer_malloc_arenas(arenas: int = 2) -> None:
    """glibc gives each new thread its own malloc arena (up to 8 per core); with the reconcile pool's
    threads the freed memory of one arena is not reused by another and the RSS only grows. Same as
    MALLOC_ARENA_MAX=2, set before the first threads start (a no-op without glibc)."""
    import contextlib
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name or "MALLOC_ARENA_MAX" in os.environ:
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(name).mallopt(-8, arenas)  # -8: M_ARENA_MAX


def cmd_run(args: argparse.Namespace) -> int:
    _fewer_malloc_arenas()
    from disagg.kube.peering import own_identity
    from disagg.metrics import OperatorMetrics
    from disagg.runtime.handlers import run

    if not args.all_namespaces and not args.namespace:
        raise SystemExit("error: give --all-namespaces or at least one --namespace")
    from disagg.scaling.signals import prometheus_duration_seconds

    try:
        window_s = prometheus_duration_seconds(args.prometheus_rate_window)
    except ValueError as error:
        raise SystemExit(f"error: --prometheus-rate-window: {error}") from None
    _scrapers(args.metrics_scrapers)  # refused here, before anything starts
    if args.scrape_interval <= 0:
        raise SystemExit(f"error: --scrape-interval {args.scrape_interval:g}: give the seconds between scrapes")
    if window_s < 2 * args.scrape_interval:
        raise SystemExit(f"error: --prometheus-rate-window {args.prometheus_rate_window} must hold at least two "
                         f"--scrape-interval ({args.scrape_interval:g}s) intervals: Prometheus rates span the "
                         "samples inside the window")
    import random

    # each replica needs its own priority: kopf pauses every peer that sees an equal or higher one
    priority = args.priority if args.priority is not None else random.randint(1, 1_000_000)
    settings = OperatorSettings(
        priority=priority,
        identity=own_identity(),
        namespaces=tuple(args.namespace or ()),
        accelerator_catalog=args.accelerator_catalog,
        resync_seconds=args.resync_seconds,
        status_delay_s=args.status_delay_seconds,
        listen_host=args.listen_host,
        liveness_port=args.liveness_port,
        metrics_port=args.metrics_port,
        workers=args.workers,
        peering=args.peering,
        kubeconfig=args.kubeconfig,
        prometheus_url=args.prometheus_url,
        prometheus_token_file=args.prometheus_token_file,
        prometheus_ca_file=args.prometheus_ca_file,
        prometheus_timeout_s=args.prometheus_timeout,
        autoscale_tick_s=args.autoscale_tick,
        scale_down_window_s=args.scale_down_window,
        metrics_staleness_s=args.metrics_staleness,
        prometheus_rate_window=args.prometheus_rate_window,
        scrape_interval_s=args.scrape_interval,
        metrics_scrapers=args.metrics_scrapers,
        versioned_rollouts=args.rollouts == "versioned",
    )
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.kubeconfig:
        os.environ["KUBECONFIG"] = args.kubeconfig
    metrics = OperatorMetrics()
    if settings.metrics_port:
        metrics.serve(settings.listen_host, settings.metrics_port)
    run(settings, metrics)
    return 0


def cmd_forward(args: argparse.Namespace, rest: list[str]) -> int:
    if args.command == "plan":
        from disagg.capacity.plan_cli import plan_main

        return int(plan_main(rest))
    from disagg.sim.cli import simulate_main

    return int(simulate_main(rest))


SCRAPERS_HELP = ("JSON list of NetworkPolicy peers that may reach the engines' HTTP port to scrape /metrics, for "
                 "services whose spec.networkPolicy.metricsScrapers is unset (default: pods labelled "
                 "app.kubernetes.io/name=prometheus in the namespace monitoring)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="disagg", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the operator")
    _add_run_arguments(run)
    _add_autoscaling_arguments(run)
    run.add_argument("-v", "--verbose", action="store_true")
    run.set_defaults(func=cmd_run)
    _add_manifest_commands(sub)
    _add_generator_commands(sub)
    sub.add_parser("plan", help="size pools for a model, workload and SLO (see disagg plan --help)", add_help=False)
    sub.add_parser("simulate", help="replay a trace against autoscaling policies (see disagg simulate --help)",
                   add_help=False)
    return parser


def _add_run_arguments(run: argparse.ArgumentParser) -> None:
    """`disagg run`: what it watches, how it reaches the API server, its ports, workers and peering."""
    run.add_argument("-A", "--all-namespaces", action="store_true", help="watch every namespace")
    run.add_argument("-n", "--namespace", action="append", help="watch this namespace (repeatable)")
    run.add_argument("--kubeconfig", default=os.environ.get("KUBECONFIG"))
    run.add_argument("--accelerator-catalog", default=os.environ.get("DISAGG_ACCELERATOR_CATALOG"),
                     help="YAML file with accelerator entries to add or override")
    run.add_argument("--resync-seconds", type=float, default=float(os.environ.get("DISAGG_RESYNC_SECONDS", 300)))
    run.add_argument("--rollouts", choices=("versioned", "in-place"), default=os.environ.get("DISAGG_ROLLOUTS",
                                                                                          "versioned"),
                     help="versioned: a new engine revision comes up beside the serving one and the routers switch "
                          "when it is ready; in-place: every change rolls the pools in place (requests meet "
                          "workers of both revisions meanwhile)")
    run.add_argument("--status-delay-seconds", type=float,
                     default=float(os.environ.get("DISAGG_STATUS_DELAY_SECONDS", 3.0)),
                     help="status-only work (child events, resync) waits this long, folding the triggers meanwhile")
    run.add_argument("--listen-host", default=os.environ.get("DISAGG_LISTEN_HOST", "0.0.0.0"))
    run.add_argument("--liveness-port", type=int, default=int(os.environ.get("DISAGG_LIVENESS_PORT", 8080)))
    run.add_argument("--metrics-port", type=int, default=int(os.environ.get("DISAGG_METRICS_PORT", 9100)))
    run.add_argument("--workers", type=int, default=int(os.environ.get("DISAGG_WORKERS", 16)),
                     help="reconcile threads (default 16), plus a quarter as many for spec changes only")
    run.add_argument("--peering", default=os.environ.get("DISAGG_PEERING") or None,
                     help="kopf peering name: run several replicas, only one acts")
    run.add_argument("--priority", type=int, default=None,
                     help="peering priority (default: random, so replicas never tie)")


def _add_autoscaling_arguments(run: argparse.ArgumentParser) -> None:
    """`disagg run`: the Prometheus the autoscaler reads, its timing, and who may scrape the engines."""
    run.add_argument("--prometheus-url", default=os.environ.get("DISAGG_PROMETHEUS_URL") or None)
    run.add_argument("--prometheus-token-file", default=os.environ.get("DISAGG_PROMETHEUS_TOKEN_FILE") or None)
    run.add_argument("--prometheus-ca-file", default=os.environ.get("DISAGG_PROMETHEUS_CA_FILE") or None)
    run.add_argument("--prometheus-timeout", type=float, default=float(os.environ.get("DISAGG_PROMETHEUS_TIMEOUT", 5)))
    defaults = OperatorSettings()
    run.add_argument("--autoscale-tick", type=float,
                     default=float(os.environ.get("DISAGG_AUTOSCALE_TICK", defaults.autoscale_tick_s)),
                     help="seconds between autoscaling decisions")
    run.add_argument("--scale-down-window", type=float,
                     default=float(os.environ.get("DISAGG_SCALE_DOWN_WINDOW", defaults.scale_down_window_s)),
                     help="seconds of lower recommendations before a pool scales down")
    run.add_argument("--metrics-staleness", type=float,
                     default=float(os.environ.get("DISAGG_METRICS_STALENESS", defaults.metrics_staleness_s)),
                     help="signals older than this many seconds count as missing (hold replicas)")
    run.add_argument("--prometheus-rate-window",
                     default=os.environ.get("DISAGG_PROMETHEUS_RATE_WINDOW", defaults.prometheus_rate_window),
                     help="rate() window of the PromQL queries: the span the policy averages over plus one "
                          "scrape interval")
    run.add_argument("--scrape-interval", type=float,
                     default=float(os.environ.get("DISAGG_SCRAPE_INTERVAL", defaults.scrape_interval_s)),
                     help="seconds between Prometheus' scrapes of the engine pods")
    run.add_argument("--metrics-scrapers", default=os.environ.get("DISAGG_METRICS_SCRAPERS") or None,
                     help=SCRAPERS_HELP)


def _add_manifest_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`disagg render` and `disagg validate`: InferenceServices from a file, no cluster."""
    for name, func, text in (("render", cmd_render, "print the child objects an InferenceService becomes"),
                             ("validate", cmd_validate, "check InferenceServices without a cluster")):
        p = sub.add_parser(name, help=text)
        p.add_argument("-f", "--file", required=True, help="YAML file with InferenceServices ('-' for stdin)")
        p.add_argument("--accelerator-catalog", default=os.environ.get("DISAGG_ACCELERATOR_CATALOG"))
        if name == "render":
            p.add_argument("-n", "--namespace", help="namespace to render into (default: the object's)")
            p.add_argument("--metrics-scrapers", default=None, help=SCRAPERS_HELP)
        p.set_defaults(func=func)


def _add_generator_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`disagg crd`, `reference` and `rbac`: what the repository and the chart are generated from."""
    crd = sub.add_parser("crd", help="print the CustomResourceDefinition")
    crd.set_defaults(func=cmd_crd)
    reference = sub.add_parser("reference", help="print the spec field reference (markdown)")
    reference.add_argument("--update", metavar="FILE",
                           help="rewrite the generated section of this file (docs/reference.md) instead")
    reference.set_defaults(func=cmd_reference)
    rbac = sub.add_parser("rbac", help="print the operator's ServiceAccount, ClusterRole and binding")
    rbac.add_argument("-n", "--namespace", default="disagg-system")
    rbac.add_argument("--service-account", default="disagg-operator")
    rbac.set_defaults(func=cmd_rbac)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        return _main(argv)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # the reader went away (| head): nothing more to say
        with contextlib.suppress(OSError):
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - so the interpreter's flush at exit is quiet
        return 1
    except Exception as error:  # a bug: say so in one line; the traceback on request
        if os.environ.get("DISAGG_DEBUG"):
            raise
        print(f"error: internal error: {type(error).__name__}: {error} (DISAGG_DEBUG=1 shows where)",
              file=sys.stderr)
        return 2


def _main(argv: list[str]) -> int:
    parser = build_parser()
    if argv and argv[0] in ("plan", "simulate"):
        return cmd_forward(argparse.Namespace(command=argv[0]), argv[1:])
    args = parser.parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
