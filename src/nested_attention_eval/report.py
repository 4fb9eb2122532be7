"""What an evaluation writes besides its records: ``summary.csv``, ``tradeoff.png`` (identity against prompt
alignment, one curve per setting through its lambda values) and ``index.html`` (every image with its scores)."""

from __future__ import annotations

import csv
import html
from pathlib import Path

from .harness import summarize

PROMPT_COLUMNS = ("prompt_accuracy", "clip_t")


def write_summary(records: list[dict], path: Path) -> list[dict]:
    rows = summarize(records)
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with path.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if v is None else round(v, 5) if isinstance(v, float) else v) for k, v in row.items()})
    return rows


def identity_column(rows: list[dict]) -> str | None:
    return next((k for row in rows for k in row if k.endswith("_similarity") and row[k] is not None), None)


def knob_value(row: dict) -> float:
    """Where a summary row sits along its curve: its strength where one was set, else its lambda."""
    return row["scale"] if row.get("scale") is not None else row.get("lam") or 0.0


def knob_label(row: dict) -> str:
    """A summary row's point on its curve: its strength where one was set, else its lambda ("" for the base model)."""
    if row.get("scale") is not None:
        return f"s={row['scale']:g}"
    return f"λ={row['lam']:g}" if row.get("lam") else ""


def write_plot(rows: list[dict], path: Path, y_column: str | None = None) -> bool:
    """One panel per prompt score; x: that score, y: ``y_column`` (default: the identity similarity); a curve per
    setting, points labelled with lambda (or the strength). Returns False (and writes nothing) when the records have
    no identity or no prompt score."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    y_column = y_column or identity_column(rows)
    x_columns = [c for c in PROMPT_COLUMNS if any(row.get(c) is not None for row in rows)]
    if y_column is None or not x_columns:
        return False
    figure, axes = plt.subplots(1, len(x_columns), figsize=(5.2 * len(x_columns), 4.2), squeeze=False)
    for ax, x_column in zip(axes[0], x_columns):
        for setting in dict.fromkeys(row["setting"] for row in rows):
            points = sorted((knob_value(r), r[x_column], r[y_column], knob_label(r)) for r in rows
                            if r["setting"] == setting and r.get(x_column) is not None and r.get(y_column) is not None)
            if not points:
                continue
            _, xs, ys, _ = zip(*points)
            ax.plot(xs, ys, marker="o", label=setting)
            for _, x, y, knob in points:
                if knob:
                    ax.annotate(knob, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xlabel(f"prompt alignment ({x_column})")
        ax.set_ylabel(f"identity ({y_column})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    figure.suptitle("identity vs prompt alignment")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True


def write_html(records: list[dict], rows: list[dict], path: Path, title: str = "nested attention evaluation") -> None:
    """A page per run: the summary table, then per subject a table of images (rows: setting and lambda, columns:
    prompt and seed), each image titled with its scores."""
    scores = [k for k in (rows[0] if rows else {}) if k not in ("setting", "lam", "scale", "images")]
    fmt = lambda v: "" if v is None else f"{v:.3f}" if isinstance(v, float) else html.escape(str(v))  # noqa: E731
    parts = [f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title>",
             "<style>body{font-family:sans-serif}table{border-collapse:collapse}td,th{border:1px solid #ccc;"
             "padding:3px;font-size:12px;vertical-align:top}img{image-rendering:pixelated;width:128px}</style>",
             f"<h1>{html.escape(title)}</h1>"]
    if (path.parent / "tradeoff.png").is_file():
        parts.append("<img src='tradeoff.png' style='width:auto;max-width:100%'>")
    parts.append("<h2>summary</h2><table><tr><th>setting</th><th>lambda</th><th>images</th>"
                 + "".join(f"<th>{html.escape(s)}</th>" for s in scores) + "</tr>")
    for row in rows:
        strength = "" if row.get("scale") is None else f", scale {fmt(row['scale'])}"
        parts.append(f"<tr><td>{html.escape(row['setting'])}</td><td>{fmt(row['lam'])}{strength}</td>"
                     f"<td>{row['images']}</td>"
                     + "".join(f"<td>{fmt(row.get(s))}</td>" for s in scores) + "</tr>")
    parts.append("</table>")
    for identity in dict.fromkeys(r["identity"] for r in records):
        mine = [r for r in records if r["identity"] == identity]
        columns = list(dict.fromkeys((r["prompt"], r["seed"]) for r in mine))
        lines = list(dict.fromkeys((r["setting"], r["lam"], r.get("scale")) for r in mine))
        cell = {(r["setting"], r["lam"], r.get("scale"), r["prompt"], r["seed"]): r for r in mine}
        parts.append(f"<h2>subject {html.escape(identity)}</h2><table><tr><th></th>"
                     + "".join(f"<th>{html.escape(p)}<br>seed {s}</th>" for p, s in columns) + "</tr>")
        for setting, lam, scale in lines:
            strength = "" if scale is None else f"<br>scale {fmt(scale)}"
            parts.append(f"<tr><th>{html.escape(setting)}<br>λ {fmt(lam)}{strength}</th>")
            for prompt, seed in columns:
                record = cell.get((setting, lam, scale, prompt, seed))
                if record is None:
                    parts.append("<td></td>")
                    continue
                tip = ", ".join(f"{s} {fmt(record.get(s))}" for s in scores if record.get(s) is not None)
                parts.append(f"<td><img src='{html.escape(record['image'])}' title='{html.escape(tip)}'><br>{html.escape(tip)}</td>")
            parts.append("</tr>")
        parts.append("</table>")
    path.write_text("\n".join(parts) + "\n")


def card_metrics(records: list[dict], setting: str, subjects: str) -> dict[str, float]:
    """A setting's summary as model-card rows (`nested_attention.card.add_metrics`), the base model's beside it."""
    metrics = {}
    for row in summarize(records):
        if row["setting"] not in (setting, "base model"):
            continue
        who = "" if row["setting"] == setting else "base model, "
        lam = "" if row["setting"] != setting else f"lambda {row['lam']:g}, "
        if row["setting"] == setting and row.get("scale") is not None:
            lam += f"scale {row['scale']:g}, "
        for column, value in row.items():
            if column not in ("setting", "lam", "scale", "images") and value is not None:
                metrics[f"{column} ({who}{lam}{row['images']} images of {subjects})"] = round(value, 4)
    return metrics


def write_reports(records: list[dict], out: Path, title: str = "nested attention evaluation") -> dict[str, Path]:
    """summary.csv, tradeoff.png (when there are identity and prompt scores) and index.html in ``out``."""
    out = Path(out)
    rows = write_summary(records, out / "summary.csv")
    written = {"records": out / "records.jsonl", "summary": out / "summary.csv"}
    if write_plot(rows, out / "tradeoff.png"):
        written["plot"] = out / "tradeoff.png"
    write_html(records, rows, out / "index.html", title)
    written["html"] = out / "index.html"
    return written
