"""Medians, ratios against the targets of the performance issue, the table, JSON and plots."""

import json
import re
from statistics import median

#: (metric, label, better, target, ceiling): ``target`` is the ratio sheppy/stock to
#: reach, ("abs", limit) for a limit on sheppy's own median, or ("ceiling", fraction) for
#: the least fraction of the row's ceiling; ``ceiling`` names the measurement of
#: ceilings.py that bounds the row (shown as sheppy's fraction of it). Targets from the
#: performance issues.
ROWS = [
    ("enqueue_rate", "enqueue rate, tasks/s", "higher", ("ceiling", 0.75), "enqueue_ceiling"),
    ("drain_rate_prefork", "drain -P prefork -c 2, tasks/s", "higher", 1.8, "pipeline_ceiling"),
    ("drain_rate_threads", "drain -P threads -c 8, tasks/s", "higher", 1.8, "pipeline_ceiling"),
    ("rtt_p50_ms", "round trip p50, ms", "lower", 0.8, None),
    ("rtt_p99_ms", "round trip p99, ms", "lower", 0.8, None),
    ("group_s", "group of {canvas} (generator) .get(), s", "lower", 0.5, None),
    ("group_list_s", "group of {canvas} (list) .get(), s", "lower", 0.5, None),
    ("chord_s", "chord of {canvas}, s", "lower", 0.4, None),
    ("commands_per_task_prefork", "Redis commands/task (prefork run)", "lower", 0.5, None),
    ("commands_per_task_threads", "Redis commands/task (threads run)", "lower", 0.5, None),
    ("memory_per_result_window", "Redis memory/result, steady state: all keys, bytes", "lower",
     1.2, None),
    ("memory_per_result", "Redis memory/result, right after a burst: all keys, bytes", "lower",
     None, None),
    ("result_key_bytes", "Redis memory/result: result key, bytes", "lower", None, None),
    ("used_memory_per_result", "Redis memory/result: used_memory, bytes", "lower", None, None),
    ("idle_per_s", "idle worker, Redis commands/s/queue", "lower", ("abs", 1.0), None),
]

#: The ceilings table: (metric of ceilings.py, label).
CEILINGS = [
    ("memory_enqueue_rate", "enqueue through memory:// (same result backend), tasks/s"),
    ("memory_enqueue_us", "  = Celery + kombu + result backend per call, µs"),
    ("xadd_rtt_us", "one XADD round trip (redis-py, sheppy:// connection settings), µs"),
    ("enqueue_ceiling", "enqueue ceiling 1 / (memory:// per call + XADD), tasks/s"),
    ("pipeline_xadd_rate", "Redis pipeline: XADD, messages/s"),
    ("pipeline_read_rate", "Redis pipeline: XREADGROUP COUNT 100, messages/s"),
    ("pipeline_ack_rate", "Redis pipeline: XACK + XDEL, messages/s"),
    ("pipeline_ceiling", "Redis pipeline ceiling, XADD + XREADGROUP + XACK, messages/s"),
]

#: Scenarios where sheppy must also beat RabbitMQ, when one was measured.
AHEAD_OF_RABBITMQ = {"drain_rate_prefork"}

#: Side name of the ceilings' samples.
CEILING = "ceiling"


def _median(samples, side, metric):
    values = samples.get(side, {}).get(metric)
    return median(values) if values else None


def summarize(samples, canvas, rabbitmq_note=None):
    """Rows of the table: medians per side, ratio sheppy/stock, ceiling and sheppy's
    fraction of it, target, whether met."""
    sides = [side for side in samples if side != CEILING]
    rows = []
    for metric, label, better, target, ceiling_metric in ROWS:
        medians = {side: _median(samples, side, metric) for side in sides}
        stock, sheppy = medians.get("stock"), medians.get("sheppy")
        ratio = sheppy / stock if stock and sheppy is not None else None
        ceiling = _median(samples, CEILING, ceiling_metric) if ceiling_metric else None
        fraction = sheppy / ceiling if ceiling and sheppy is not None else None
        met = None
        if isinstance(target, tuple) and target[0] == "abs":
            met = sheppy is not None and sheppy <= target[1]
            target_text = f"<= {target[1]:g}"
        elif isinstance(target, tuple):  # ("ceiling", fraction)
            met = fraction is not None and fraction >= target[1]
            target_text = f">= {target[1]:g} of ceiling"
        elif target is not None:
            met = ratio is not None and (ratio >= target if better == "higher" else ratio <= target)
            target_text = f"{'>=' if better == 'higher' else '<='} {target:g}x"
            if metric in AHEAD_OF_RABBITMQ:
                rabbit = medians.get("rabbitmq")
                if rabbit is not None:
                    met = met and sheppy is not None and sheppy >= rabbit
                    target_text += ", >= rabbitmq"
                else:
                    target_text += ", rabbitmq not measured"
        else:
            target_text = ""
        rows.append({"metric": metric, "label": label.format(canvas=canvas), "medians": medians,
                     "ratio": ratio, "ceiling": ceiling, "fraction": fraction,
                     "target": target_text, "met": met})
    return rows


def side_table(rows, side, bases):
    """The medians of ``side`` as ratios to each of ``bases``' (cluster/sheppy, ...)."""
    head = ["scenario", side, *(f"{side}/{base}" for base in bases)]
    body = []
    for row in rows:
        value = row["medians"].get(side)
        if value is None:
            continue
        ratios = [row["medians"].get(base) for base in bases]
        body.append([row["label"], fmt(value),
                     *("-" if not base else f"{value / base:.2f}x" for base in ratios)])
    return _columns(head, body)


def ceiling_rows(samples, rabbitmq=None):
    """``[(label, value or text)]``: medians of the ceilings, then RabbitMQ's drain."""
    rows = []
    for metric, label in CEILINGS:
        if metric == "memory_enqueue_us":
            rate = _median(samples, CEILING, "memory_enqueue_rate")
            value = 1e6 / rate if rate else None
        else:
            value = _median(samples, CEILING, metric)
        rows.append((label, value))
    rabbit = _median(samples, "rabbitmq", "drain_rate_prefork")
    rows.append(("RabbitMQ amqp:// + rpc://, drain -P prefork -c 2, tasks/s",
                 rabbit if rabbit is not None else f"not measured ({rabbitmq or 'no server'})"))
    return rows


def commands_by_name(samples, side, key):
    """Median calls per task (or per second) of each Redis command, biggest first."""
    runs = samples.get(side, {}).get(key) or []
    names = {name for run in runs for name in run}
    by_name = {name: median(run.get(name, 0.0) for run in runs) for name in names}
    return dict(sorted(by_name.items(), key=lambda item: -item[1]))


def fmt(value):
    if value is None:
        return "-"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.2f}"


def _cells(row, sides, typeset=lambda text: text, times="x"):
    fraction = "-" if row["fraction"] is None else f"{row['fraction']:.2f}"
    return [*(fmt(row["medians"].get(side)) for side in sides),
            "-" if row["ratio"] is None else f"{row['ratio']:.2f}{times}",
            fmt(row["ceiling"]), fraction, typeset(row["target"])]


def table(rows, sides, checked=True):
    """The table as text; ``checked=False`` (smoke runs) leaves the verdicts out."""
    head = ["scenario", *sides, "sheppy/stock", "ceiling", "sheppy/ceiling", "target", "met"]
    body = []
    for row in rows:
        met = "" if row["met"] is None else ("met" if row["met"] else "NOT MET")
        body.append([row["label"], *_cells(row, sides), met if checked else "(not checked)"])
    return _columns(head, body)


def ceilings_table(rows):
    return _columns(["ceiling (same run)", "median"],
                    [[label, value if isinstance(value, str) else fmt(value)]
                     for label, value in rows])


def _columns(head, body):
    widths = [max(len(str(line[i])) for line in [head, *body]) for i in range(len(head))]

    def line(cells):
        return "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(head), line(["-" * w for w in widths]), *map(line, body)])


def markdown_table(rows, sides):
    """The same table for docs/performance.md and the README."""
    lines = ["| scenario | " + " | ".join(sides) + " | sheppy/stock | ceiling | sheppy/ceiling "
             "| target | met |",
             "|---|" + "---:|" * (len(sides) + 3) + "---|---|"]
    for row in rows:
        met = "" if row["met"] is None else ("met" if row["met"] else "**not met**")
        lines.append(f"| {row['label']} | "
                     + " | ".join(_cells(row, sides, _typeset, "×")) + f" | {met} |")
    return "\n".join(lines)


def markdown_ceilings(rows):
    lines = ["| ceiling (same run) | median |", "|---|---:|"]
    for label, value in rows:
        lines.append(f"| {label.strip()} | {value if isinstance(value, str) else fmt(value)} |")
    return "\n".join(lines)


def _typeset(target):
    """">= 2x" as "≥ 2×" for the docs (the terminal table stays ASCII)."""
    return re.sub(r"(\d)x\b", r"\1×", target.replace(">=", "≥").replace("<=", "≤"))


def write_json(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, default=str) + "\n")


def plots(directory, samples, canvas):
    """throughput.png, latency.png, commands.png; returns their paths, none without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        return []
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    directory.mkdir(parents=True, exist_ok=True)
    sides = list(samples)
    paths = [directory / name for name in ("throughput.png", "latency.png", "commands.png")]

    fig, (rates, walls) = plt.subplots(1, 2, figsize=(11, 4))
    _bars(rates, samples, sides, ["enqueue_rate", "drain_rate_prefork", "drain_rate_threads"],
          ["enqueue", "drain prefork -c 2", "drain threads -c 8"], "tasks/s (higher is better)")
    _bars(walls, samples, sides, ["group_s", "group_list_s", "chord_s"],
          [f"group of {canvas}\n(generator)", f"group of {canvas}\n(list)", f"chord of {canvas}"],
          "wall time, s (lower is better)")
    fig.tight_layout()
    fig.savefig(paths[0], dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    for side in sides:
        values = sorted(v for run in samples[side].get("round_trip_ms", []) for v in run)
        if values:
            ax.plot(values, [(i + 1) / len(values) for i in range(len(values))], label=side)
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.xaxis.set_minor_formatter(matplotlib.ticker.ScalarFormatter())
    ax.set_xlabel("delay().get() round trip, ms (log scale)")
    ax.set_ylabel("fraction of calls")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(paths[1], dpi=100)
    plt.close(fig)

    redis_sides = [side for side in sides if samples[side].get("commands_prefork")]
    per_side = {side: commands_by_name(samples, side, "commands_prefork") for side in redis_sides}
    names = sorted({name for by in per_side.values() for name, n in by.items() if n >= 0.05},
                   key=lambda name: max(by.get(name, 0.0) for by in per_side.values()))
    fig, ax = plt.subplots(figsize=(8, 1.5 + 0.3 * len(names)))
    height = 0.8 / max(len(redis_sides), 1)
    for i, side in enumerate(redis_sides):
        total = sum(per_side[side].values())
        ax.barh([y + i * height for y in range(len(names))],
                [per_side[side].get(name, 0.0) for name in names], height,
                label=f"{side} (total {total:.1f})")
    ax.set_yticks([y + height * (len(redis_sides) - 1) / 2 for y in range(len(names))], names)
    ax.set_xlabel("Redis calls per task: enqueue, drain (prefork -c 2), get")
    ax.grid(True, axis="x", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(paths[2], dpi=100)
    plt.close(fig)
    return paths


def _bars(ax, samples, sides, metrics, labels, ylabel):
    """Median bars per side, whiskers from the lowest to the highest repetition."""
    width = 0.8 / len(sides)
    for i, side in enumerate(sides):
        values = [samples[side].get(m) or [0.0] for m in metrics]
        mids = [median(v) for v in values]
        err = [[m - min(v) for m, v in zip(mids, values)], [max(v) - m for m, v in zip(mids, values)]]
        ax.bar([x + i * width for x in range(len(metrics))], mids, width, yerr=err, capsize=3,
               label=side)
    ax.set_xticks([x + width * (len(sides) - 1) / 2 for x in range(len(metrics))], labels)
    ax.set_ylabel(ylabel)
    ax.legend()
