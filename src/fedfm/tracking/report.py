"""Plots and a markdown summary for a finished (or interrupted) run directory.

``make_report(run_dir)`` reads ``RUN_DIR/metrics.jsonl`` (one JSON object per round) and,
when present, ``RUN_DIR/partition.json``, and writes into ``RUN_DIR/report/``:

- ``accuracy.png``         eval accuracy and any other non-loss ``eval_*`` metric per round
- ``loss.png``             train loss, eval loss (and any other ``eval_*loss*``) per round
- ``bytes.png``            bytes sent up / down per round
- ``client_accuracy.png``  per-client accuracy spread per evaluated round
- ``partition.png``        label mix (or train-set size) per client
- ``summary.md``           final / best metrics, totals and the list of plots

Every key of a metrics line is optional: a metric with no values is left out, and a plot
with nothing to show is not drawn (it is then absent from the returned list).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.collections import PolyCollection  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
import numpy as np  # noqa: E402

from fedfm.errors import FedfmError  # noqa: E402
from fedfm.tracking import RunDir, atomic_write_text  # noqa: E402

__all__ = ["make_report"]

DPI = 110
REPORT_DIR = "report"

# A metric whose name contains one of these is "best" at its minimum, any other at its maximum.
_LOWER_IS_BETTER = ("loss", "perplexity", "ppl", "err")
_MAX_BOXES = 40  # box plots beyond this many rounds are subsampled
_MAX_LEGEND_LABELS = 20
_MAX_TICK_LABELS = 60  # beyond this many clients, ticks are not named one by one

_STYLE = {
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "axes.axisbelow": True,
    "grid.alpha": 0.3,
    "grid.linestyle": "-",
    "axes.titlesize": 11,
    "axes.labelsize": 10,
    "legend.fontsize": 8,
    "legend.frameon": False,
    "xtick.labelsize": 8,
    "ytick.labelsize": 8,
}


# --------------------------------------------------------------------------- loading


def _load_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise FedfmError(f"metrics file not found: {path}")
    records: list[dict[str, Any]] = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise FedfmError(f"cannot read metrics file {path}: {e}") from e
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise FedfmError(f"{path}: line {lineno} is not valid JSON ({e.msg})") from e
        if not isinstance(obj, dict):
            raise FedfmError(f"{path}: line {lineno} is not a JSON object")
        records.append(obj)
    if not records:
        raise FedfmError(f"metrics file {path} has no records")
    # Give lines without a usable round number the next one, then order by round.
    last = -1
    for rec in records:
        r = rec.get("round")
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not math.isfinite(r):
            rec["round"] = last + 1
        else:
            rec["round"] = int(r)
        last = rec["round"]
    records.sort(key=lambda rec: rec["round"])
    return records


def _load_partition(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise FedfmError(f"cannot read partition file {path}: {e}") from e
    except json.JSONDecodeError as e:
        raise FedfmError(f"{path}: not valid JSON ({e.msg}, line {e.lineno})") from e
    if not isinstance(obj, dict):
        raise FedfmError(f"{path}: expected a JSON object")
    return obj


# --------------------------------------------------------------------------- helpers


def _num(v: Any) -> float | None:
    """The value as a finite float, or None for anything else (null, bool, str, nan)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    f = float(v)
    return f if math.isfinite(f) else None


def _series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for rec in records:
        v = _num(rec.get(key))
        if v is not None:
            xs.append(rec["round"])
            ys.append(v)
    return xs, ys


def _eval_keys(records: list[dict[str, Any]]) -> list[str]:
    """Every key starting with ``eval_`` (the server's held-out set) or ``fed_`` (federated evaluation, without the
    client and example counts) that holds a number on at least one line."""
    keys: list[str] = []
    for rec in records:
        for k, v in rec.items():
            if (k.startswith("eval_") or (k.startswith("fed_") and k not in ("fed_clients", "fed_examples"))) \
                    and k not in keys and _num(v) is not None:
                keys.append(k)
    return keys


def _is_loss(key: str) -> bool:
    return "loss" in key.lower()


def _lower_is_better(key: str) -> bool:
    k = key.lower()
    return any(tok in k for tok in _LOWER_IS_BETTER)


def _pretty(key: str) -> str:
    name = key[5:] if key.startswith("eval_") else key
    return name.replace("_", " ")


def _fmt(v: float) -> str:
    if float(v).is_integer() and abs(v) < 1e15:
        return str(int(v))
    if abs(v) >= 1000:
        return f"{v:,.1f}"
    return f"{v:.4f}"


def _byte_unit(max_bytes: float) -> tuple[float, str]:
    for scale, unit in ((1e9, "GB"), (1e6, "MB"), (1e3, "KB")):
        if max_bytes >= scale:
            return scale, unit
    return 1.0, "B"


def _human_bytes(n: float) -> str:
    scale, unit = _byte_unit(n)
    return f"{n:.0f} B" if unit == "B" else f"{n / scale:.2f} {unit}"


def _writing(path: Path):
    """A full disk while writing a file of ``RUN_DIR/report/``: one line naming it (the partial file removed)."""
    run_dir = path.parent.parent
    return RunDir(run_dir).writing(path, then=f"the run's checkpoints and adapter are intact: free some space, then "
                                              f"draw the report with `fedfm report {run_dir}`")


def _save(fig: Any, path: Path) -> Path:
    try:
        fig.tight_layout()
        with _writing(path):
            try:
                fig.savefig(path, dpi=DPI)
            except OSError:
                path.unlink(missing_ok=True)
                raise
    finally:
        plt.close(fig)
    return path


def _int_xaxis(ax: Any) -> None:
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


# --------------------------------------------------------------------------- plots


def _plot_accuracy(records: list[dict[str, Any]], out: Path) -> Path | None:
    keys = [k for k in _eval_keys(records) if not _is_loss(k)]
    # Accuracy first, then the rest in first-seen order.
    keys.sort(key=lambda k: (k != "eval_accuracy",))
    series = [(k, *_series(records, k)) for k in keys]
    series = [s for s in series if s[1]]
    if not series:
        return None
    # Metrics on a 0..1 scale share one panel; every other metric gets its own.
    unit = [s for s in series if all(0.0 <= y <= 1.0 for y in s[2])]
    other = [s for s in series if s not in unit]
    panels = ([unit] if unit else []) + [[s] for s in other]
    fig, axes = plt.subplots(
        len(panels), 1, figsize=(7, 3.2 * len(panels)), sharex=True, squeeze=False
    )
    for ax, panel in zip(axes[:, 0], panels):
        for key, xs, ys in panel:
            ax.plot(xs, ys, marker="o", markersize=3, label=_pretty(key))
        if panel is unit:
            ax.set_ylabel("accuracy" if len(panel) == 1 and panel[0][0] == "eval_accuracy"
                          else "value")
            lo = min(min(ys) for _, _, ys in panel)
            ax.set_ylim(max(0.0, lo - 0.05), 1.0 + 0.02)
        else:
            ax.set_ylabel(_pretty(panel[0][0]))
        ax.set_title("Eval " + ", ".join(_pretty(k) for k, _, _ in panel) + " per round")
        if len(panel) > 1:
            ax.legend()
        _int_xaxis(ax)
    axes[-1, 0].set_xlabel("round")
    return _save(fig, out / "accuracy.png")


def _plot_loss(records: list[dict[str, Any]], out: Path) -> Path | None:
    keys = ["train_loss"] + [k for k in _eval_keys(records) if _is_loss(k)]
    series = [(k, *_series(records, k)) for k in keys]
    series = [s for s in series if s[1]]
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, xs, ys in series:
        label = "train loss" if key == "train_loss" else "eval " + _pretty(key)
        ax.plot(xs, ys, marker="o", markersize=3, label=label)
    ax.set_title("Loss per round")
    ax.set_xlabel("round")
    ax.set_ylabel("loss")
    ax.legend()
    _int_xaxis(ax)
    return _save(fig, out / "loss.png")


def _plot_bytes(records: list[dict[str, Any]], out: Path) -> Path | None:
    up_x, up_y = _series(records, "bytes_up")
    dn_x, dn_y = _series(records, "bytes_down")
    if not up_x and not dn_x:
        return None
    scale, unit = _byte_unit(max(up_y + dn_y, default=0.0))
    fig, ax = plt.subplots(figsize=(7, 4))
    n_rounds = len(set(up_x) | set(dn_x))
    if n_rounds <= 60:
        both = bool(up_x) and bool(dn_x)
        w = 0.4 if both else 0.7
        if up_x:
            ax.bar([x - w / 2 if both else x for x in up_x], [y / scale for y in up_y],
                   width=w, label="up (clients → server)")
        if dn_x:
            ax.bar([x + w / 2 if both else x for x in dn_x], [y / scale for y in dn_y],
                   width=w, label="down (server → clients)")
        ax.grid(axis="x", visible=False)
    else:
        if up_x:
            ax.plot(up_x, [y / scale for y in up_y], label="up (clients → server)")
        if dn_x:
            ax.plot(dn_x, [y / scale for y in dn_y], label="down (server → clients)")
    top = max(up_y + dn_y) / scale
    if top > 0:
        ax.set_ylim(0, top * 1.25)  # headroom for the legend
    total = f"total up {_human_bytes(sum(up_y))}, down {_human_bytes(sum(dn_y))}"
    ax.set_title(f"Communication per round ({total})")
    ax.set_xlabel("round")
    ax.set_ylabel(unit)
    ax.legend()
    _int_xaxis(ax)
    return _save(fig, out / "bytes.png")


def _client_acc(rec: dict[str, Any]) -> dict[str, float]:
    ca = rec.get("client_acc")
    if not isinstance(ca, dict):
        return {}
    vals = {str(k): _num(v) for k, v in ca.items()}
    return {k: v for k, v in vals.items() if v is not None}


def _client_sort_key(cid: str) -> tuple[int, Any]:
    try:
        return (0, int(cid))
    except ValueError:
        return (1, cid)


def _plot_client_accuracy(records: list[dict[str, Any]], out: Path) -> Path | None:
    per_round = [(rec["round"], _client_acc(rec)) for rec in records]
    per_round = [(r, ca) for r, ca in per_round if ca]
    mean_x, mean_y = _series(records, "client_acc_mean")
    worst_x, worst_y = _series(records, "client_acc_worst10")
    if not per_round and not mean_x and not worst_x:
        return None

    ncols = 2 if per_round else 1
    fig, axes = plt.subplots(1, ncols, figsize=(6.5 * ncols, 4.2), squeeze=False)
    ax = axes[0, 0]
    if per_round:
        shown = per_round
        if len(shown) > _MAX_BOXES:  # evenly spaced subset, always keeping the last round
            step = math.ceil(len(shown) / _MAX_BOXES)
            shown = shown[::-1][::step][::-1]
        positions = [r for r, _ in shown]
        gap = min((b - a for a, b in zip(positions, positions[1:])), default=1) or 1
        ax.boxplot(
            [list(ca.values()) for _, ca in shown],
            positions=positions,
            widths=0.6 * gap,
            manage_ticks=False,
            showfliers=True,
            flierprops={"markersize": 3},
            medianprops={"color": "tab:blue"},
        )
    if mean_x:
        ax.plot(mean_x, mean_y, color="tab:green", marker="o", markersize=3, label="mean")
    if worst_x:
        ax.plot(worst_x, worst_y, color="tab:red", marker="v", markersize=3,
                label="worst 10% of clients")
    if mean_x or worst_x:
        ax.legend()
    ax.set_title("Per-client accuracy per round" if per_round else "Client accuracy per round")
    ax.set_xlabel("round")
    ax.set_ylabel("accuracy")
    _int_xaxis(ax)

    if per_round:
        last_round, last = per_round[-1]
        ids = sorted(last, key=_client_sort_key)
        vals = [last[c] for c in ids]
        ax2 = axes[0, 1]
        ax2.bar(range(len(ids)), vals, color="tab:blue", alpha=0.8)
        mean = sum(vals) / len(vals)
        ax2.axhline(mean, color="tab:green", linestyle="--", label=f"mean {mean:.3f}")
        if len(ids) <= _MAX_TICK_LABELS:
            ax2.set_xticks(range(len(ids)))
            ax2.set_xticklabels(ids, rotation=90 if len(ids) > 20 else 0,
                                fontsize=8 if len(ids) <= 40 else 5)
            ax2.set_xlabel("client")
        else:
            ax2.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax2.set_xlabel("client (position in id order)")
        ax2.set_ylim(0, max(1.0, max(vals) * 1.05))
        ax2.set_title(f"Per-client accuracy, round {last_round}")
        ax2.set_ylabel("accuracy")
        ax2.grid(axis="x", visible=False)
        ax2.legend()
    return _save(fig, out / "client_accuracy.png")


def _plot_partition(part: dict[str, Any] | None, out: Path) -> Path | None:
    if not part:
        return None
    clients = [c for c in part.get("clients") or [] if isinstance(c, dict)]
    if not clients:
        return None
    clients.sort(key=lambda c: _client_sort_key(str(c.get("id"))))
    ids = [str(c.get("id", i)) for i, c in enumerate(clients)]
    counts = [c.get("label_counts") for c in clients]
    use_labels = all(
        isinstance(lc, list) and lc and all(_num(v) is not None for v in lc) for lc in counts
    )
    method = part.get("method") or "unknown"
    n = len(clients)
    fig, ax = plt.subplots(figsize=(8, min(max(2.5, 0.3 * n + 1.5), 16)))
    ys = list(range(n))
    if use_labels:
        n_labels = max(len(lc) for lc in counts)
        names = part.get("label_names")
        if not isinstance(names, list) or len(names) < n_labels:
            names = list(names or []) if isinstance(names, list) else []
            names += [f"label {i}" for i in range(len(names), n_labels)]
        cmap = plt.get_cmap("tab10" if n_labels <= 10 else "tab20" if n_labels <= 20
                            else "viridis")
        colors = [cmap(j) if n_labels <= 20 else cmap(j / max(1, n_labels - 1))
                  for j in range(n_labels)]
        # One collection of rectangles instead of a barh per label: 100 clients x 100 labels
        # as separate bar patches take tens of seconds to lay out and draw.
        verts, facecolors = [], []
        total = 0.0
        for y, lc in zip(ys, counts):
            left = 0.0
            for j, v in enumerate(lc):
                w = max(0.0, float(v))
                if w > 0:
                    y0, y1 = y - 0.4, y + 0.4
                    verts.append([(left, y0), (left + w, y0), (left + w, y1), (left, y1)])
                    facecolors.append(colors[j])
                left += w
            total = max(total, left)
        ax.add_collection(PolyCollection(verts, facecolors=facecolors, edgecolors="none"))
        ax.set_xlim(0, (total or 1.0) * 1.03)
        ax.set_ylim(-0.6, n - 0.4)
        if n_labels <= _MAX_LEGEND_LABELS:
            handles = [Patch(color=colors[j], label=str(names[j])) for j in range(n_labels)]
            ax.legend(handles=handles, title="label", loc="center left",
                      bbox_to_anchor=(1.01, 0.5))
        ax.set_xlabel("training examples, stacked by label"
                      + ("" if n_labels <= _MAX_LEGEND_LABELS else f" ({n_labels} labels)"))
        ax.set_title(f"Label mix per client ({method}, {n} clients)")
    else:
        n_train = [_num(c.get("n_train")) or 0.0 for c in clients]
        ax.barh(ys, n_train, color="tab:blue", height=0.8)
        ax.set_xlabel("training examples")
        ax.set_title(f"Training examples per client ({method}, {n} clients)")
    if n <= _MAX_TICK_LABELS:
        ax.set_yticks(ys)
        ax.set_yticklabels(ids, fontsize=8 if n <= 40 else 5)
    else:  # too many to name: positions in client order
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("client (position in id order)")
    ax.invert_yaxis()
    if n <= _MAX_TICK_LABELS:
        ax.set_ylabel("client")
    ax.grid(axis="y", visible=False)
    return _save(fig, out / "partition.png")


# --------------------------------------------------------------------------- summary


def _summary(records: list[dict[str, Any]], pngs: list[Path], run_dir: Path) -> str:
    rows = []
    keys = _eval_keys(records) + ["train_loss", "client_acc_mean", "client_acc_worst10"]
    for key in keys:
        xs, ys = _series(records, key)
        if not xs:
            continue
        pick = min if _lower_is_better(key) else max
        best = pick(ys)
        best_round = xs[ys.index(best)]
        rows.append(f"| {key} | {_fmt(ys[-1])} (round {xs[-1]}) | {_fmt(best)} "
                    f"(round {best_round}) |")

    trained = [rec for rec in records if rec["round"] >= 1]
    up = sum(v for v in (_num(r.get("bytes_up")) for r in records) if v is not None)
    down = sum(v for v in (_num(r.get("bytes_down")) for r in records) if v is not None)
    wall = sum(v for v in (_num(r.get("wall_s")) for r in records) if v is not None)
    dropped = sum(len(r["dropped"]) for r in records if isinstance(r.get("dropped"), list))

    lines = [f"# Run report: {run_dir.name}", ""]
    lines += ["## Metrics", ""]
    if rows:
        lines += ["| metric | final | best |", "|---|---|---|", *rows]
    else:
        lines.append("No evaluation metrics recorded.")
    lines += [
        "",
        "## Totals",
        "",
        "| quantity | value |",
        "|---|---|",
        f"| rounds | {len(trained)} |",
        f"| bytes up | {int(up)} ({_human_bytes(up)}) |",
        f"| bytes down | {int(down)} ({_human_bytes(down)}) |",
        f"| wall seconds | {wall:.1f} |",
        f"| dropped client updates | {dropped} |",
        "",
    ]
    audit_path = run_dir / "privacy_audit.json"
    if audit_path.exists():
        import json

        a = json.loads(audit_path.read_text())
        lines += ["## Privacy audit", "",
                  f"Membership inference by {a['attack']} on the final global model: ROC AUC **{a['mia_auc']:.3f}** "
                  f"({a['mia_members']} clients' training examples vs {a['mia_nonmembers']} held-out; mean loss "
                  f"{a['mia_member_loss']:.4g} vs {a['mia_nonmember_loss']:.4g}). 0.5 is chance.", ""]
    lines += [
        "## Plots",
        "",
    ]
    lines += [f"- [{p.name}]({p.name})" for p in pngs] or ["No plots drawn."]
    lines += generations_section(run_dir)
    return "\n".join(lines) + "\n"


def _cell(text: str, limit: int = 160) -> str:
    text = " ".join(str(text).split())
    text = text if len(text) <= limit else text[: limit - 1] + "…"
    return text.replace("|", "\\|")


def generation_changes(run_dir: Path) -> tuple[list[int], list[dict[str, Any]]]:
    """The fixed held-out prompts with the answer at the first and the last eval (from generations_round_*.jsonl)."""
    gens = RunDir(run_dir).read_generations()
    if not gens:
        return [], []
    rounds = sorted(gens)
    first, last = gens[rounds[0]], gens[rounds[-1]]
    by_example = {g["example"]: g for g in last}
    rows = []
    for g in first:
        end = by_example.get(g["example"], {})
        rows.append({"question": g.get("question") or g["prompt"], "reference": g["reference"],
                     "before": g["generation"], "after": end.get("generation", ""),
                     "rougeL_before": g.get("rougeL"), "rougeL_after": end.get("rougeL")})
    return [rounds[0], rounds[-1]], rows


def generations_section(run_dir: Path) -> list[str]:
    rounds, rows = generation_changes(run_dir)
    if not rows:
        return []
    a, b = rounds
    lines = ["", f"## Generations (held-out prompts, greedy): round {a} → round {b}", "",
             "Every eval's answers are in `generations_round_<k>.jsonl`.", "",
             f"| question | reference | round {a} | round {b} | ROUGE-L {a} → {b} |", "|---|---|---|---|---|"]
    for r in rows:
        score = "" if r["rougeL_before"] is None else f"{r['rougeL_before']:.2f} → {r['rougeL_after'] or 0:.2f}"
        lines.append(f"| {_cell(r['question'])} | {_cell(r['reference'])} | {_cell(r['before'])} | "
                     f"{_cell(r['after'])} | {score} |")
    return lines


# --------------------------------------------------------------------------- entry point


def plot_matrix(R: Sequence[Sequence[float]], names: list[str], metric: str, path: Path) -> Path:
    """A heatmap of the accuracy matrix: row i after training stage i, column j the held-out examples of stage j;
    written to a temporary file and renamed, so a half-written plot is never left."""
    R = np.asarray(R, dtype=np.float64)
    higher = "loss" not in metric
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * R.shape[1], 1.0 + 0.9 * R.shape[0]))
    try:
        im = ax.imshow(R, cmap="viridis" if higher else "viridis_r", aspect="auto")
        span = float(np.nanmax(R) - np.nanmin(R)) or 1.0
        for i in range(R.shape[0]):
            for j in range(R.shape[1]):
                frac = (R[i, j] - np.nanmin(R)) / span
                dark = frac < 0.5 if higher else frac > 0.5  # viridis is dark at its low end
                colour = "white" if dark else "black"
                ax.text(j, i, f"{R[i, j]:.3f}", ha="center", va="center", fontsize=8, color=colour)
        ax.set_xticks(range(R.shape[1]), [names[j] for j in range(R.shape[1])], rotation=30, ha="right")
        ax.set_yticks(range(R.shape[0]), [names[i] for i in range(R.shape[0])])
        ax.set_xlabel("held-out examples of stage j")
        ax.set_ylabel("after training stage i")
        ax.set_title(f"held-out {metric} R[i, j]")
        fig.colorbar(im, ax=ax, shrink=0.8)
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp.png")
        fig.savefig(tmp, dpi=110)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
    return path


def _plot_continual(path: Path, out: Path) -> Path | None:
    """A lifelong federation's accuracy matrix (``continual.jsonl``, its last stage's row), as the run drew it."""
    if not path.is_file():
        return None
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise FedfmError(f"{path}: line {n} is not valid JSON ({e.msg})") from None
    if not rows or "R" not in rows[-1]:
        return None
    last = rows[-1]
    return plot_matrix(last["R"], list(last["scores"]), last["metric"], out / "accuracy_matrix.png")


def make_report(run_dir: str | Path) -> list[Path]:
    """Draw PNG plots into RUN_DIR/report/ and return their paths.

    Also writes ``RUN_DIR/report/summary.md``. Raises FedfmError when RUN_DIR or its
    metrics.jsonl is missing, or a metrics line is not valid JSON.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FedfmError(f"run directory not found: {run_dir}")
    records = _load_metrics(run_dir / "metrics.jsonl")
    partition = _load_partition(run_dir / "partition.json")

    out = run_dir / REPORT_DIR
    out.mkdir(parents=True, exist_ok=True)
    pngs: list[Path] = []
    with plt.rc_context(_STYLE):
        for draw in (_plot_accuracy, _plot_loss, _plot_bytes, _plot_client_accuracy):
            p = draw(records, out)
            if p is not None:
                pngs.append(p)
        p = _plot_partition(partition, out)
        if p is not None:
            pngs.append(p)
    p = _plot_continual(run_dir / "continual.jsonl", out)
    if p is not None:
        pngs.append(p)
    with _writing(out / "summary.md"):
        atomic_write_text(out / "summary.md", _summary(records, pngs, run_dir))
    return pngs
