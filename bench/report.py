"""Medians, ratios against the targets of the performance issue, the table, JSON and plots."""

import json
import re
from statistics import median

#: (metric, label, better, target): ``target`` is the ratio sheppy/stock to reach,
#: or ("abs", limit) for a limit on sheppy's own median. Targets from the performance issue.
ROWS = [
    ("enqueue_rate", "enqueue rate, tasks/s", "higher", 2.0),
    ("drain_rate_prefork", "drain -P prefork -c 2, tasks/s", "higher", 1.8),
    ("drain_rate_threads", "drain -P threads -c 8, tasks/s", "higher", 1.8),
    ("rtt_p50_ms", "round trip p50, ms", "lower", 0.8),
    ("rtt_p99_ms", "round trip p99, ms", "lower", 0.8),
    ("group_s", "group of {canvas} (generator) .get(), s", "lower", 0.5),
    ("group_list_s", "group of {canvas} (list) .get(), s", "lower", 0.5),
    ("chord_s", "chord of {canvas}, s", "lower", 0.4),
    ("commands_per_task_prefork", "Redis commands/task (prefork run)", "lower", 0.5),
    ("commands_per_task_threads", "Redis commands/task (threads run)", "lower", 0.5),
    ("memory_per_result", "Redis memory/result: all keys, bytes", "lower", 1.2),
    ("result_key_bytes", "Redis memory/result: result key, bytes", "lower", None),
    ("used_memory_per_result", "Redis memory/result: used_memory, bytes", "lower", None),
    ("idle_per_s", "idle worker, Redis commands/s/queue", "lower", ("abs", 1.0)),
]

#: Scenarios where sheppy must also beat RabbitMQ, when one was measured.
AHEAD_OF_RABBITMQ = {"drain_rate_prefork", "drain_rate_threads"}


def summarize(samples, canvas):
    """Rows of the table: medians per side, ratio sheppy/stock, target, whether met."""
    rows = []
    for metric, label, better, target in ROWS:
        medians = {side: (median(values[metric]) if values.get(metric) else None)
                   for side, values in samples.items()}
        stock, sheppy = medians.get("stock"), medians.get("sheppy")
        ratio = sheppy / stock if stock and sheppy is not None else None
        met = None
        if isinstance(target, tuple):
            met = sheppy is not None and sheppy <= target[1]
            target_text = f"<= {target[1]:g}"
        elif target is not None:
            met = ratio is not None and (ratio >= target if better == "higher" else ratio <= target)
            target_text = f"{'>=' if better == 'higher' else '<='} {target:g}x"
            rabbit = medians.get("rabbitmq")
            if metric in AHEAD_OF_RABBITMQ and rabbit is not None:
                met = met and sheppy is not None and sheppy > rabbit
                target_text += ", > rabbitmq"
        else:
            target_text = ""
        rows.append({"metric": metric, "label": label.format(canvas=canvas), "medians": medians,
                     "ratio": ratio, "target": target_text, "met": met})
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


def table(rows, sides, checked=True):
    """The table as text; ``checked=False`` (smoke runs) leaves the verdicts out."""
    head = ["scenario", *sides, "sheppy/stock", "target", "met"]
    body = []
    for row in rows:
        met = "" if row["met"] is None else ("yes" if row["met"] else "NO")
        body.append([row["label"], *(fmt(row["medians"].get(side)) for side in sides),
                     "-" if row["ratio"] is None else f"{row['ratio']:.2f}x", row["target"],
                     met if checked else "(not checked)"])
    widths = [max(len(str(line[i])) for line in [head, *body]) for i in range(len(head))]

    def line(cells):
        return "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(head), line(["-" * w for w in widths]), *map(line, body)])


def markdown_table(rows, sides):
    """The same table for docs/performance.md."""
    lines = ["| scenario | " + " | ".join(sides) + " | sheppy/stock | target | met |",
             "|---|" + "---:|" * (len(sides) + 1) + "---|---|"]
    for row in rows:
        met = "" if row["met"] is None else ("yes" if row["met"] else "**no**")
        ratio = "-" if row["ratio"] is None else f"{row['ratio']:.2f}×"
        lines.append(f"| {row['label']} | " + " | ".join(fmt(row["medians"].get(s)) for s in sides)
                     + f" | {ratio} | {_typeset(row['target'])} | {met} |")
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
