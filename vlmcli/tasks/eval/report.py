"""The report of an evaluation: a plain dict (JSON-ready) with a row per model setting, its speed,
the machine the speed was measured on, and with three or more best-of N the fitted scaling law."""

from __future__ import annotations

import os
import platform
import resource
import sys
from collections import OrderedDict
from typing import Any

from vlmcli.tasks.resume import Record
from vlmcli.tasks.runner import BatchSummary
from vlmcli.tasks.system import cpu_model


def machine_info() -> dict[str, Any]:
    """What the speed numbers were measured on."""
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "system": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
    }


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (every model of the run so far counts)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024, 1)


def speed(
    summary: BatchSummary, wall_s: float, load_s: float, items_run: int, records: list[Record], workers: int | None
) -> dict[str, Any]:
    """Wall time and rates of the run as this process saw it (over the whole cluster with Ray:
    `workers` actors); per-item model times from the records, wherever they ran."""
    model_ms = [
        sum(
            v
            for k, v in (r.get("timings") or {}).items()
            if k.endswith("_ms") and k not in ("load_ms",) and not k.endswith("per_s")
        )
        for r in records
        if not r.get("error")
    ]
    out: dict[str, Any] = {
        "images_run": summary.done,
        "items_run": items_run,
        "images_resumed": summary.skipped,
        "wall_s": round(wall_s, 3),
        "load_s": round(load_s, 3),
        "s_per_item": round(wall_s / items_run, 4) if items_run else None,
        "images_per_s": round(summary.done / wall_s, 4) if wall_s > 0 and summary.done else None,
        "record_ms_per_image": round(sum(model_ms) / len(model_ms), 2) if model_ms else None,
        "peak_rss_mb": peak_rss_mb(),
    }
    if workers is not None:  # the models' memory is the actors', not this driver's
        out["peak_rss_mb"] = None
        out["ray_workers"] = workers
    return out


def summary_fields(summary: BatchSummary) -> dict[str, Any]:
    return {
        "done": summary.done,
        "skipped": summary.skipped,
        "failed": summary.failed,
        "interrupted": summary.interrupted,
        "errors": [{"path": p, "error": e.message} for p, e in summary.errors],
    }


def report(name: str, dataset: str, runs: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {"eval": name, "dataset": dataset, **extra, "machine": machine_info(), "runs": runs}


def scaling(runs: list[dict[str, Any]], metric: str) -> list[dict[str, Any]]:
    """Per model setting with three or more N: Q(N) = Q_inf - A / N**gamma fitted to `metric`."""
    from vlmcli.metrics.scaling import fit_scaling_law

    groups: OrderedDict[tuple[Any, ...], list[tuple[int, float]]] = OrderedDict()
    for r in runs:
        q = (r.get("metrics") or {}).get(metric)
        if q is not None:
            key = (r.get("model"), r.get("quant"), r.get("detail"), r.get("max_tiles"))
            groups.setdefault(key, []).append((int(r.get("best_of") or 1), float(q)))
    out = []
    for (model, quant, detail, max_tiles), points in groups.items():
        fit = fit_scaling_law(points)
        if fit is not None:
            out.append(
                {
                    "model": model,
                    "quant": quant,
                    "detail": detail,
                    "max_tiles": max_tiles,
                    "metric": metric,
                    "points": points,
                    "q_inf": round(fit.q_inf, 4),
                    "a": round(fit.a, 4),
                    "gamma": round(fit.gamma, 4),
                    "rmse": round(fit.rmse, 5),
                }
            )
    return out
