"""``celery sheppy dead list|show|replay|purge``: the dead-letter streams ``sheppy:dead:<q>``.

Replay and purge go through the transport's dead-letter API (``replay_dead_letters``,
``purge_dead_letters``), which owns the format of a dead letter.
"""

import click

from .. import keys
from ..ops import listings
from ..ops.tables import Column, duration, render
from ..transport import purge_dead_letters, replay_dead_letters
from .base import (EXIT_NOT_FOUND, Failure, count_option, echo_lines, entry_ids, json_option,
                   open_broker, print_json, queue_option, sheppy, yes_option)

# -- dead letters --------------------------------------------------------------------


@sheppy.group()
def dead():
    """Dead letters (sheppy:dead:<queue>): list, show, replay, purge."""


def _letter_rows(letters):
    return render(
        [Column("QUEUE", flex=True, least=8), Column("ID"), Column("AGE", right=True),
         Column("DELIV", right=True), Column("REASON", flex=True, least=10),
         Column("TASK", flex=True, least=10)],
        [[letter["queue"], letter["id"], duration(letter["age"]), letter["deliveries"],
          letter["reason"], letter["task"] or "(not a task)"] for letter in letters])


@dead.command(name="list")
@queue_option
@count_option(20)
@json_option
@click.pass_context
def dead_list(ctx, queues, count, as_json):
    """The oldest dead letters of each queue."""
    with open_broker(ctx) as view:
        letters = [letter for queue in view.queues(queues, known=True)
                   for letter in listings.dead_letters(view, queue, count)]
    if as_json:
        return print_json(letters)
    echo_lines(_letter_rows(letters) if letters else ["no dead letters"])


@dead.command(name="show")
@click.argument("ids", nargs=-1, required=True, callback=entry_ids)
@queue_option
@click.pass_context
def dead_show(ctx, ids, queues):
    """Every field of the dead letters IDS, and the original message."""
    with open_broker(ctx) as view:
        names = view.queues(queues, known=True)
        found = listings.find_dead_letters(view, names, ids)
    for entry_id in ids:
        letter = found.get(entry_id)
        if letter is None:
            continue
        for name in ("queue", "id", "reason", "deliveries", "stream", "entry", "task",
                     "task_id", "args"):
            click.echo(f"{name + ':':12}{'-' if letter[name] is None else letter[name]}")
        click.echo(f"{'age:':12}{duration(letter['age'])}")
        for name, value in sorted(letter["other_fields"].items()):
            click.echo(f"{name + ':':12}{value}")
        click.echo("data:" if letter["data"] else "data:       (none: the entry has no data)")
        if letter["data"]:
            click.echo(listings.pretty_data(letter["data"]))
        click.echo()
    _missing(ids, found, names)


def _missing(ids, found, names):
    missing = [entry_id for entry_id in ids if entry_id not in found]
    if missing:
        raise Failure(f"no dead letter {', '.join(missing)} in queue(s) {', '.join(names)}",
                      EXIT_NOT_FOUND)


def _dead_action(ctx, ids, queues, yes, verb, done_verb, act):
    """Replay or purge: the letters ``ids`` (found in any queue), or all of ``queues``."""
    with open_broker(ctx) as view:
        names = view.queues(queues, known=True)
        if ids:
            found = listings.find_dead_letters(view, names, ids)
            by_queue = {}
            for entry_id, letter in found.items():
                by_queue.setdefault(letter["queue"], []).append(entry_id)
            plan = {queue: len(chosen) for queue, chosen in by_queue.items()}
        else:
            with view.client.pipeline(transaction=False) as pipe:
                for queue in names:
                    pipe.xlen(keys.dead_letter_stream(queue))
                plan = {q: n for q, n in zip(names, pipe.execute()) if n}
            by_queue = {queue: None for queue in plan}
        if plan and not yes:
            what = ", ".join(f"{queue}: {n}" for queue, n in plan.items())
            click.confirm(f"{verb} {sum(plan.values())} dead letter(s) ({what})?", abort=True)
        done = {queue: act(view.connection, queue, ids=chosen)
                for queue, chosen in by_queue.items()}
    click.echo(f"{done_verb} {sum(done.values())} dead letter(s)"
               + "".join(f"; {queue}: {n}" for queue, n in done.items()))
    if ids:
        _missing(ids, found, names)


@dead.command(name="replay")
@click.argument("ids", nargs=-1, callback=entry_ids)
@queue_option
@yes_option("Replay")
@click.pass_context
def dead_replay(ctx, ids, queues, yes):
    """Put dead letters back in their streams, delivery count cleared: the letters IDS,
    or every letter of the queues."""
    _dead_action(ctx, ids, queues, yes, "Replay", "replayed", replay_dead_letters)


@dead.command(name="purge")
@click.argument("ids", nargs=-1, callback=entry_ids)
@queue_option
@yes_option("Purge")
@click.pass_context
def dead_purge(ctx, ids, queues, yes):
    """Delete dead letters: the letters IDS, or every letter of the queues."""
    _dead_action(ctx, ids, queues, yes, "Purge", "purged", purge_dead_letters)
