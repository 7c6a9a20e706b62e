"""``celery sheppy scheduled list``, ``stuck`` and ``revoked list``: bounded listings."""

import click

from ..ops import listings
from ..ops.tables import Column, duration, render
from .base import (EXIT_STUCK, count_option, echo_lines, json_option, open_broker, print_json,
                   queue_option, sheppy)

# -- scheduled, stuck, revoked ------------------------------------------------------------


@sheppy.group()
def scheduled():
    """Messages waiting for their ETA in sheppy:scheduled:<queue>."""


@scheduled.command(name="list")
@queue_option
@count_option(20)
@json_option
@click.pass_context
def scheduled_list(ctx, queues, count, as_json):
    """The next scheduled messages of each queue, soonest first."""
    with open_broker(ctx) as view:
        items = [item for queue in view.queues(queues, known=True)
                 for item in listings.scheduled(view, queue, count)]
    if as_json:
        return print_json(items)
    echo_lines(render(
        [Column("QUEUE", flex=True, least=8), Column("DUE IN", right=True),
         Column("TASK", flex=True, least=10), Column("TASK ID")],
        [[i["queue"], duration(i["due_in"]),
          ("(revoked) " if i["revoked"] else "") + (i["task"] or "(not a task)"),
          i["task_id"] or i["id"]] for i in items]) if items else ["nothing scheduled"])


@sheppy.command()
@queue_option
@count_option(100)
@json_option
@click.pass_context
def stuck(ctx, queues, count, as_json):
    """Messages in flight past the lease (their consumer stopped renewing). Exit code 1
    when there are any: a live worker on the queue takes them over within half a lease."""
    with open_broker(ctx) as view:
        names = view.queues(queues, known=True)
        states = {s.queue: {c.name: c.state for c in s.consumers} for s in view.stats(names)}
        items = [item for queue in names
                 for item in listings.stuck(view, queue, count, states[queue])]
    if as_json:
        print_json(items)
    elif items:
        echo_lines(render(
            [Column("QUEUE", flex=True, least=8), Column("ID"),
             Column("CONSUMER", flex=True, least=20), Column("IDLE", right=True),
             Column("DELIV", right=True), Column("TASK", flex=True, least=10)],
            [[i["queue"], i["id"], i["consumer"], duration(i["idle"]), i["deliveries"],
              i["task"] or "(not a task)"] for i in items]))
    else:
        click.echo("nothing stuck")
    if items:
        ctx.exit(EXIT_STUCK)


@sheppy.group()
def revoked():
    """Revoked task ids kept in sheppy:celery::revoked for workers that were away."""


@revoked.command(name="list")
@count_option(20)
@json_option
@click.pass_context
def revoked_list(ctx, count, as_json):
    """The most recently revoked task ids."""
    with open_broker(ctx) as view:
        total, items = listings.revoked(view, count)
    if as_json:
        return print_json({"total": total, "revoked": items})
    if not items:
        return click.echo("no revoked tasks")
    echo_lines(render([Column("TASK ID"), Column("REVOKED", right=True)],
                       [[i["task_id"], duration(i["age"]) + " ago"] for i in items])
                + [f"{len(items)} of {total} shown"])
