"""``celery sheppy status`` and ``celery sheppy metrics``: the counts of every queue."""

import json
import sys
import time
from datetime import datetime, timezone

import click

from ..ops import metrics
from ..ops.tables import Column, duration, render
from .base import (EXIT_UNAVAILABLE, Failure, echo_lines, json_option, open_broker,
                   queue_option, sheppy)

# -- status ----------------------------------------------------------------------------


@sheppy.command()
@queue_option
@json_option
@click.option("--watch", type=click.FloatRange(min=0.1), metavar="SECONDS",
              help="Refresh every SECONDS until interrupted (Ctrl-C).")
@click.pass_context
def status(ctx, queues, as_json, watch):
    """Per queue: ready, in flight, oldest ready age, scheduled, dead letters, results,
    and each consumer's messages and state."""
    with open_broker(ctx) as view:
        try:
            while True:
                stats = view.stats(view.queues(queues, known=True))
                if as_json:
                    document = {"broker": view.url, "time": view.now(),
                                "lease": view.settings.lease,
                                "queues": [s.as_dict() for s in stats]}
                    # watching: one document per line (JSON Lines), so a reader can split them
                    click.echo(json.dumps(document, sort_keys=True) if watch
                               else json.dumps(document, indent=2, sort_keys=True))
                else:
                    if watch and sys.stdout.isatty():
                        click.clear()
                    echo_lines(status_lines(view, stats))
                if not watch:
                    return
                sys.stdout.flush()
                time.sleep(watch)
                if not as_json:
                    click.echo()
        except KeyboardInterrupt:
            return


def status_lines(view, stats):
    now = datetime.fromtimestamp(view.now(), timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    lines = [f"{view.url}  {now}  lease {duration(view.settings.lease)}", ""]
    lines += render(
        [Column("QUEUE", flex=True, least=10), Column("READY", right=True),
         Column("IN FLIGHT", right=True), Column("OLDEST", right=True),
         Column("SCHEDULED", right=True), Column("DEAD", right=True),
         Column("DONE", right=True), Column("FAILED", right=True)],
        [[s.queue, s.ready, s.in_flight, duration(s.oldest_ready_age), s.scheduled,
          s.dead_letters, s.completed, s.failed] for s in stats])
    counted = view.results_queue
    if counted is not None and any(s.completed is not None for s in stats):
        lines.append(f"DONE, FAILED: the results of every queue's tasks, counted under {counted}")
    consumers = [(s, c) for s in stats for c in s.consumers]
    lines.append("")
    if not consumers:
        return lines + ["no consumers"]
    lines += render(
        [Column("QUEUE", flex=True, least=10), Column("CONSUMER", flex=True, least=24),
         Column("IN FLIGHT", right=True), Column("IDLE", right=True), Column("STATE")],
        [[s.queue, c.name, c.in_flight, duration(c.idle), c.state] for s, c in consumers])
    alive = sum(s.count("alive") for s in stats)
    dead = sum(s.count("dead") for s in stats)
    stuck = sum(s.stuck for s in stats)
    lines.append(f"consumers: {alive} alive, {dead} dead; {stuck} message(s) stuck "
                 "past the lease")
    return lines


# -- metrics -------------------------------------------------------------------------


@sheppy.command(name="metrics")
@queue_option
@click.option("--serve", "port", type=click.IntRange(0, 65535), metavar="PORT",
              help="Serve GET /metrics on PORT (0: any free port) instead of printing.")
@click.option("--bind", default="", metavar="ADDRESS",
              help="Address --serve listens on (default: all).")
@click.pass_context
def metrics_command(ctx, queues, port, bind):
    """Prometheus text exposition of the queue counts (print once, or --serve)."""
    if port is None:
        with open_broker(ctx) as view:
            stats = view.stats(view.queues(queues, known=True))
        return click.echo(metrics.exposition(stats), nl=False)
    try:
        with open_broker(ctx) as view:
            view.stats(view.queues(queues, known=True))  # not sheppy://, a typo: stop
    except Failure as exc:
        if exc.exit_code != EXIT_UNAVAILABLE:
            raise
        # down now: serve all the same (scrapes answer 503 until it is back), as during
        # an outage later
        click.echo(f"warning: {exc.format_message()}; serving 503 until it answers",
                   err=True)

    def ready(server):
        host, bound = server.server_address[:2]
        click.echo(f"serving metrics on http://{host or '0.0.0.0'}:{bound}/metrics")
        sys.stdout.flush()

    try:
        metrics.serve(ctx.find_root().obj.app, port, bind, queues or None, ready=ready)
    except KeyboardInterrupt:
        pass
    except OSError as exc:
        raise click.BadParameter(f"cannot listen on {bind or '*'}:{port}: {exc}",
                                 param_hint="--serve") from None
