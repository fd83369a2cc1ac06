"""``wsilocal bench accuracy --confirm N``: every finished run scored again on a fresh, independent test cohort.

A test split of ~70 slides decides a difference of ~0.05 in balanced accuracy only when it is far from 0. Where a
claim stays undecided, scoring more of the *same* test split's kind is the honest next step only if the new slides
are a new sample — never seen by any run, any pretraining or any choice — and if the claim is decided on them
alone, not pooled with the slides that left it undecided. This module does that:

- the confirmation cohort of a task is generated with the task's settings but another generator seed (the task's
  seed + :data:`SEED_OFFSET`), ``N`` slides per class, all in the test split, into
  ``OUT/cohorts/<task>-confirm-<N>`` (its own cache, and tile features made with the task's weights);
- each finished run of the task (ours, StreamingCNN, MIL rows; every seed) is evaluated on it as it is
  (``wsilocal evaluate RUN --cohort CSV --out RUN/confirm-<N>``: no training, no choice), reused when run again;
- the rows' seed means, their 95 % bootstrap intervals and the paired differences behind the paper's claims are
  computed on the confirmation slides only, the same way as on the test split, and reported beside it
  (``OUT/accuracy.md`` section "Confirmation", ``OUT/accuracy_confirmation.png``).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from wsilocal.atomic import write_text_atomic
from wsilocal.bench import log_progress
from wsilocal.bench.accuracy import (
    METRICS,
    CohortSettings,
    PreparedCohort,
    aggregate,
    chance_levels,
    format_accuracy_tables,
    paired_comparisons,
    plot_accuracy,
    prepare_benchmark_cohort,
    read_test_predictions,
)
from wsilocal.errors import ConfigError, WsilocalError
from wsilocal.synth import class_names

SEED_OFFSET = 1000  # the confirmation cohort's generator seed is the task's + this: slides no run has seen
MARKER = "confirm.json"  # written last into RUN/confirm-<N>: the evaluation finished, on this cohort CSV


def confirmation_settings(cohort_settings: CohortSettings, slides_per_class: int) -> CohortSettings:
    """The task's cohort settings for its confirmation cohort: another seed, ``slides_per_class``, all test."""
    if slides_per_class < 1:
        raise ConfigError(f"bench accuracy: --confirm must be at least 1 slide per class, got {slides_per_class}")
    return replace(cohort_settings, slides_per_class=slides_per_class, seed=cohort_settings.seed + SEED_OFFSET,
                   splits=(0.0, 0.0, 1.0))


def confirmation_folder(run_dir: str | Path, slides_per_class: int) -> Path:
    """Where a run's evaluation on a confirmation cohort of ``slides_per_class`` slides per class lies."""
    return Path(run_dir) / f"confirm-{slides_per_class}"


def _csv_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def confirm_run(record: dict[str, Any], cohort: PreparedCohort, slides_per_class: int,
                progress: bool = False) -> dict[str, Any]:
    """Evaluate one finished run (a benchmark record) on the confirmation cohort, or reuse that evaluation.

    Returns a record like the benchmark's — task, row, seed, the metrics, ``n_test``, ``seconds`` (of the
    evaluation) and ``test_predictions`` (the confirmation slides') — with ``error`` instead where it failed.
    """
    from wsilocal.run.directory import RunDirectory
    from wsilocal.train.evaluate import evaluate_run

    result: dict[str, Any] = {k: record[k] for k in ("task", "row", "seed", "run_dir")}
    folder = confirmation_folder(record["run_dir"], slides_per_class)
    marker, digest = folder / MARKER, _csv_digest(cohort.csv)
    if marker.is_file():
        saved = json.loads(marker.read_text())
        if saved.get("cohort_sha256") == digest:
            predictions = read_test_predictions(folder)
            if predictions is not None:
                return {**result, **saved["result"], "test_predictions": predictions, "reused": True}
    start = time.perf_counter()
    try:
        baseline = RunDirectory(record["run_dir"]).is_baseline
        metrics = evaluate_run(record["run_dir"], "test", cohort=cohort.csv, out=folder, cache=cohort.cache,
                               features=cohort.features if baseline else None, progress=progress)
    except WsilocalError as exc:  # one failing run does not stop the others
        return {**result, "error": str(exc)}
    saved_result = {**{m: metrics[m] for m in METRICS}, "n_test": metrics["n"],
                    "seconds": round(time.perf_counter() - start, 1), "skipped": metrics.get("skipped") or {}}
    write_text_atomic(marker, json.dumps({"cohort": str(cohort.csv), "cohort_sha256": digest,
                                          "result": saved_result}, indent=1))
    return {**result, **saved_result, "test_predictions": read_test_predictions(folder), "reused": False}


def run_confirmation(report: dict[str, Any], out: Path, cohorts: dict[str, CohortSettings],
                     weights: dict[str, str | None], slides_per_class: int, *, arch: str, workers: int,
                     progress: bool = True) -> dict[str, Any]:
    """Score every finished run of ``report`` on its task's confirmation cohort; returns the report's
    ``confirmation`` section: per task the cohort and its chance levels, then records, aggregates and the paired
    differences (as the benchmark's own, on the confirmation slides only)."""
    from wsilocal.slide.cohort import load_cohort  # torch and the slide readers: only when confirming

    section: dict[str, Any] = {"slides_per_class": slides_per_class, "seed_offset": SEED_OFFSET, "tasks": {},
                               "records": [], "aggregates": []}
    for task, cohort_settings in cohorts.items():
        settings = confirmation_settings(cohort_settings, slides_per_class)
        folder = out / "cohorts" / f"{task}-confirm-{slides_per_class}"
        cohort = prepare_benchmark_cohort(settings, folder, workers=workers, weights=weights[task], arch=arch,
                                          progress=progress)
        classes = class_names(cohort_settings.classes, task)
        labels = [classes.index(s.label) for s in load_cohort(cohort.csv).split("test")]
        info = report["tasks"][task]
        section["tasks"][task] = {"classes": classes, "slides": {"test": len(labels)}, "csv": str(cohort.csv),
                                  "seed": settings.seed, "paper_dataset": info["paper_dataset"],
                                  "feature_skipped": cohort.feature_skipped, "seconds": cohort.seconds,
                                  "synth_params": asdict(settings.synth_params()),
                                  "chance_95": chance_levels(labels, len(classes))}
        finished = [r for r in report["records"] if r["task"] == task and not r.get("error")]
        for record in finished:
            confirmed = confirm_run(record, cohort, slides_per_class)
            section["records"].append(confirmed)
            line = (f"FAILED: {confirmed['error']}" if "error" in confirmed else
                    " ".join(f"{m} {confirmed[m]:.3f}" for m in METRICS if confirmed[m] is not None)
                    + (" (reused)" if confirmed["reused"] else f" ({confirmed['seconds']:.0f} s)"))
            log_progress(progress, f"[{task} confirmation] {record['row']} seed {record['seed']}: {line}")
        for agg in (a for a in report["aggregates"] if a["task"] == task):
            records = [r for r in section["records"] if r["task"] == task and r["row"] == agg["row"]]
            if records:
                failed = [r for r in records if r.get("error")]
                status = f"failed ({len(failed)} of {len(records)} seeds): {failed[0]['error']}" if failed else "done"
                section["aggregates"].append({"task": task, "row": agg["row"], "label": agg["label"],
                                              "status": status, **aggregate(records)})
    section["paired"] = paired_comparisons(section)
    return section


def format_confirmation(report: dict[str, Any]) -> str:
    """Markdown: the confirmation section (:func:`run_confirmation`) as the benchmark's own tables; "" if none."""
    section = report.get("confirmation")
    if not section:
        return ""
    n = section["slides_per_class"]
    return (f"## Confirmation: every finished run scored on {n} fresh test slides per class\n\n"
            f"A second, independent test cohort per task (generator seed + {section['seed_offset']}, never seen by "
            "any run, pretraining or choice): the runs above, as they are, scored on it alone. A claim the test "
            "split left undecided is decided here, on these slides only.\n\n" + format_accuracy_tables(section))


def write_confirmation_plot(report: dict[str, Any], out: Path) -> None:
    """``accuracy_confirmation.png``: the confirmation rows as :func:`plot_accuracy` draws the benchmark's."""
    if report.get("confirmation"):
        section = report["confirmation"]
        plot_accuracy(section, out / "accuracy_confirmation.png",
                      slides=f"{section['slides_per_class']} fresh confirmation slides per class")
