"""``mmfp filter``: the spec's quality filters applied again to everything the store holds.

A build filters only what it reads. When thresholds change, ``plan_filter``
evaluates the stored stats (the ``quality`` table, latest row per sample)
against the spec's filters, on the driver and from small columns only:

- kept samples that now fail a filter **move out**: their rows leave
  ``samples``, ``views`` and every feature set in the run's commits, and they
  get a ``Filtered:<name>`` quarantine row and ledger outcome, exactly as if a
  build had refused them;
- inputs a filter refused that now pass every filter **come back**: the run
  reads them again (``plan_inputs(retry=...)``), so their bytes come from the
  source as in any build, and their stale quarantine rows go;
- inputs refused that another filter refuses first now get that filter's
  quarantine row and ledger outcome (**relabel**), as a fresh build would;
- stored samples that have no stats yet (a store built before it had a
  ``quality`` section) get them first, from their stored bytes (**backfill**);
- inputs the ledger says are stored whose sample is not (a filter run killed
  between its ``samples`` and ledger commits) are finished as a move out when
  their stats fail (their views and feature rows go too) and read again
  otherwise (**lost**): a rerun ends where an uninterrupted run would.

A dry run stops after the plan and prints it per filter.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from features.duck import connect
from features.keys import anti_join, key_mask, rows_where
from features.metadata import feature_table
from features.schema import QUALITY, conform
from features.stats import LATEST_STATS
from features.tables import TableStore
from pipelines.build.run import Run, dependent_tables
from pipelines.decode import decode_audio, decode_image
from pipelines.errors import InputError, SpecError
from pipelines.filters import FILTERED, QualitySpec, StatFilter, is_filtered, stat_table
from pipelines.identity import short_hash
from pipelines.ledger import read_state
from pipelines.quality import CROSS_MODAL_STATS, sample_stats
from pipelines.spec import DecodeLimits, PipelineSpec

STAMP = pa.timestamp("us", tz="UTC")
BACKFILL_BATCH = 256  # stored samples decoded at a time (their media is in memory)
MEDIA_COLUMNS = ["sample_id", "split", "source_uri", "text", "image", "audio", "audio_format"]


@dataclass
class FilterPlan:
    """What ``mmfp filter`` would do, per filter and in total."""

    filters: list[dict[str, Any]]  # name, rule, kept samples failing it, inputs it refuses now
    move_out: pa.Table  # sample_id, source_uri, split, name, reason
    bring_back: pa.Table  # input_key, sample_id, was (the filter that refused it)
    relabel: pa.Table  # refused inputs another filter refuses now: input_key, sample_id, was,
    # name, reason (their quarantine row and ledger outcome change; nothing is read)
    lost: pa.Array  # inputs the ledger says are stored whose sample is not: read again
    orphaned: pa.Table  # such inputs whose stats fail: input_key, sample_id, name, reason
    backfill: int  # stored samples without stats (computed before evaluating)
    evaluated: int  # samples whose stats were evaluated
    ledger: pa.Table = field(repr=False)  # the ledger state the plan was made on

    def as_dict(self) -> dict[str, Any]:
        return {
            "filters": self.filters,
            "move_out": self.move_out.num_rows,
            "bring_back": self.bring_back.num_rows,
            "relabel": self.relabel.num_rows,
            "lost": len(self.lost),
            "orphaned": self.orphaned.num_rows,
            "backfill": self.backfill,
            "evaluated": self.evaluated,
        }


def latest_stats(store: TableStore, version: int | None) -> pa.Table:
    """One ``quality`` row per sample (rows of one sample agree: stats depend on content)."""
    if version is None:
        return QUALITY.empty_table()
    con = connect({"q": store.dataset("quality", version)})
    rows = con.sql(f"SELECT * FROM q QUALIFY {LATEST_STATS}").to_arrow_table()
    return conform(rows, QUALITY)


def stored_without_stats(store: TableStore, version: int, stats: pa.Table) -> pa.Table:
    """The ids of stored samples that have no stats row."""
    ids = store.to_arrow("samples", version, columns=["sample_id"])
    return anti_join(ids, stats.select(["sample_id"]), ["sample_id"])


def backfill_rows(
    store: TableStore, version: int, todo: pa.Table, limits: DecodeLimits, run_id: str
) -> Iterator[pa.Table]:
    """Stats rows for the stored samples in ``todo``, decoded from their stored bytes a batch
    at a time. Stored bytes passed decode once; one that fails now keeps null stats for
    that modality rather than stopping the run."""
    if todo.num_rows == 0:
        return
    dataset = store.dataset("samples", version)
    wanted = pc.field("sample_id").isin(todo.column("sample_id"))
    for batch in dataset.to_batches(
        columns=MEDIA_COLUMNS, filter=wanted, batch_size=BACKFILL_BATCH
    ):
        rows = [_stats_row(row, limits) for row in batch.to_pylist()]
        now = datetime.now(UTC)
        table = pa.Table.from_pylist(
            [r | {"computed_at": now, "run_id": run_id} for r in rows], schema=QUALITY
        )
        yield table


def _stats_row(row: dict[str, Any], limits: DecodeLimits) -> dict[str, Any]:
    pixels = audio = rate = None
    if row["image"]:
        try:
            pixels = decode_image(row["image"], max_pixels=limits.max_image_pixels).pixels
        except InputError:
            pixels = None
    if row["audio"]:
        try:
            decoded = decode_audio(
                row["audio"], max_seconds=limits.max_audio_seconds, ext=row["audio_format"] or ""
            )
            audio, rate = decoded.samples, decoded.sample_rate
        except InputError:
            audio = None
    keys = {k: row[k] for k in ("sample_id", "split", "source_uri")}
    return keys | sample_stats(row["text"], pixels, audio, rate)


def agreement_rows(
    store: TableStore, feature_set: str, stats: pa.Table, kept: pa.Table, run_id: str
) -> pa.Table:
    """New stats rows for the kept samples whose cross-modal similarity in ``feature_set``
    (``features.crossmodal``) is not the one their latest row records: that row with the
    similarities set. A refused sample keeps the value it was refused on."""
    from features.crossmodal import similarities

    if not store.exists(feature_table(feature_set)):
        raise SpecError(
            f"quality.cross_modal: no feature set {feature_set!r} in {store.uri} "
            "(encode it first, or fix the name)"
        )
    sims = similarities(store, feature_set)
    names = [c for c in sims.column_names if c in CROSS_MODAL_STATS]
    if not names:
        raise SpecError(
            f"quality.cross_modal: feature set {feature_set!r} has no two embedding columns "
            "from one encoder (a joint encoder such as clip or clap)"
        )
    sims = sims.filter(
        pc.is_in(sims.column("sample_id"), value_set=kept.column("sample_id").combine_chunks())
    )
    measured = {r["sample_id"]: r for r in sims.select(["sample_id", *names]).to_pylist()}
    now = datetime.now(UTC)
    rows = []
    for row in stats.filter(
        pc.is_in(stats.column("sample_id"), value_set=sims.column("sample_id").combine_chunks())
    ).to_pylist():
        new = measured[row["sample_id"]]
        if all(_same(row[n], new[n]) for n in names):
            continue
        rows.append(row | {n: new[n] for n in names} | {"computed_at": now, "run_id": run_id})
    return pa.Table.from_pylist(rows, schema=QUALITY)


def _same(old: float | None, new: float | None) -> bool:
    if old is None or new is None:
        return old is new
    return abs(old - new) <= 1e-6


def evaluate(
    store: TableStore, spec: PipelineSpec, base: dict[str, int | None], run_id: str
) -> tuple[FilterPlan, pa.Table]:
    """The plan for the tables at versions ``base``, and the backfilled stats rows."""
    quality = spec.quality
    if quality is None:
        raise SpecError("the spec has no `quality` section: add `quality: {filters: [...]}`")
    if base.get("samples") is None:
        raise SpecError(f"no samples in {store.uri} yet: run `mmfp build` first")
    stats = latest_stats(store, base.get("quality"))
    todo = stored_without_stats(store, base.get("samples"), stats)
    filled = pa.concat_tables(
        [
            QUALITY.empty_table(),
            *backfill_rows(store, base.get("samples"), todo, spec.decode, run_id),
        ]
    )
    stats = pa.concat_tables([stats, filled])
    kept_ids = store.to_arrow("samples", base["samples"], columns=["sample_id"])
    if quality.cross_modal is not None:
        agreed = agreement_rows(store, quality.cross_modal, stats, kept_ids, run_id)
        stats = pa.concat_tables(
            [anti_join(stats, agreed.select(["sample_id"]), ["sample_id"]), agreed]
        )
        filled = pa.concat_tables(
            [anti_join(filled, agreed.select(["sample_id"]), ["sample_id"]), agreed]
        )
    ledger = read_state(store, base.get("_inputs"))
    return plan_filter(quality, stats, kept_ids, ledger, backfill=filled.num_rows), filled


def plan_filter(
    quality: QualitySpec,
    stats: pa.Table,
    kept_ids: pa.Table,
    ledger: pa.Table,
    *,
    backfill: int = 0,
) -> FilterPlan:
    """Evaluate ``quality``'s filters on ``stats`` (latest per sample, backfill included);
    ``kept_ids``: the samples the store holds; ``ledger``: each input's latest state."""
    kept = rows_where(stats, pa.array(key_mask(stats, kept_ids, ["sample_id"])))
    refused = ledger.filter(is_filtered(ledger.column("outcome")))
    refused_stats = refused.select(["input_key", "sample_id", "outcome"]).join(
        stats, "sample_id", join_type="inner"
    )
    kept_verdicts = quality.verdicts(stat_table(kept))
    summary = []
    for spec_filter in quality.filters:
        name = spec_filter.label
        outcome = FILTERED + name
        summary.append(
            {
                "filter": name,
                "rule": rule_text(spec_filter),
                "kept_failing": sum(r is not None for r in kept_verdicts[name]),
                "refused_now": int(
                    pc.sum(pc.equal(refused.column("outcome"), outcome)).as_py() or 0
                ),
            }
        )
    failures = quality.first_failure(stat_table(kept))
    out = [i for i, f in enumerate(failures) if f is not None]
    move_out = kept.take(pa.array(out, pa.int64())).select(["sample_id", "source_uri", "split"])
    move_out = move_out.append_column(
        "name",
        pa.array([failures[i][0] for i in out], pa.string()),  # type: ignore[index]
    ).append_column("reason", pa.array([failures[i][1] for i in out], pa.string()))  # type: ignore[index]
    current = quality.first_failure(stat_table(refused_stats))
    was = pc.utf8_slice_codeunits(refused_stats.column("outcome"), len(FILTERED)).to_pylist()
    back = [i for i, f in enumerate(current) if f is None]
    other = [i for i, f in enumerate(current) if f is not None and f[0] != was[i]]
    bring_back = pa.table(
        {
            "input_key": refused_stats.column("input_key").take(pa.array(back, pa.int64())),
            "sample_id": refused_stats.column("sample_id").take(pa.array(back, pa.int64())),
            "was": pa.array([was[i] for i in back], pa.string()),
        }
    )
    relabel = pa.table(
        {
            "input_key": refused_stats.column("input_key").take(pa.array(other, pa.int64())),
            "sample_id": refused_stats.column("sample_id").take(pa.array(other, pa.int64())),
            "was": pa.array([was[i] for i in other], pa.string()),
            "name": pa.array([current[i][0] for i in other], pa.string()),  # type: ignore[index]
            "reason": pa.array([current[i][1] for i in other], pa.string()),  # type: ignore[index]
        }
    )
    # a run killed between its samples and ledger commits left inputs the ledger calls
    # stored whose sample is gone: those their stats fail are finished as a move out (their
    # views and feature rows may still be there), the others are read again
    settled = ledger.filter(pc.is_in(ledger.column("outcome"), pa.array(["sample", "stored"])))
    missing = anti_join(settled, kept_ids, ["sample_id"]).select(["input_key", "sample_id"])
    missing = missing.join(stats, "sample_id", join_type="left outer")
    verdicts = quality.first_failure(stat_table(missing))
    failing = [i for i, f in enumerate(verdicts) if f is not None]
    lost = missing.column("input_key").filter(pa.array([f is None for f in verdicts], pa.bool_()))
    orphaned = pa.table(
        {
            "input_key": missing.column("input_key").take(pa.array(failing, pa.int64())),
            "sample_id": missing.column("sample_id").take(pa.array(failing, pa.int64())),
            "name": pa.array([verdicts[i][0] for i in failing], pa.string()),  # type: ignore[index]
            "reason": pa.array([verdicts[i][1] for i in failing], pa.string()),  # type: ignore[index]
        }
    )
    return FilterPlan(
        summary,
        move_out,
        bring_back,
        relabel,
        lost.combine_chunks(),
        orphaned,
        backfill,
        stats.num_rows,
        ledger,
    )


def rule_text(spec_filter: Any) -> str:
    """A filter as one line: ``image_blur >= 50``, ``text_lang in [en]``, ``pkg.mod:fn``."""
    if not isinstance(spec_filter, StatFilter):
        return spec_filter.predicate
    if spec_filter.allowed is not None:
        return f"{spec_filter.stat} in [{', '.join(spec_filter.allowed)}]"
    bounds = []
    if spec_filter.min is not None:
        bounds.append(f">= {spec_filter.min:g}")
    if spec_filter.max is not None:
        bounds.append(f"<= {spec_filter.max:g}")
    return f"{spec_filter.stat} " + " and ".join(bounds)


def quarantine_rows(
    uris: pa.Array, names: pa.Array, reasons: pa.Array, run_id: str, now: datetime
) -> pa.Table:
    """``Filtered:<name>`` quarantine rows with the ``quarantine_id`` (input, stage, type) a
    build that refused the same inputs writes."""
    kinds = [FILTERED + n for n in names.to_pylist()]
    keys = uris.to_pylist()
    return pa.table(
        {
            "quarantine_id": pa.array(
                [short_hash(u, "quality", k) for u, k in zip(keys, kinds, strict=True)],
                pa.string(),
            ),
            "uri": pa.array(keys, pa.string()),
            "stage": pa.repeat(pa.scalar("quality"), len(keys)),
            "error_type": pa.array(kinds, pa.string()),
            "message": pa.array(reasons.to_pylist(), pa.string()),
            "run_id": pa.repeat(pa.scalar(run_id), len(keys)),
            "quarantined_at": pa.repeat(pa.scalar(now, STAMP), len(keys)),
        }
    )


def ledger_rows(
    ledger: pa.Table, key: str, verdicts: pa.Table, run_id: str, now: datetime
) -> pa.Table:
    """New ledger rows (outcome ``Filtered:<name>``) for the inputs whose ``key`` column
    (``sample_id``: every input of a sample; ``input_key``: one input) is in ``verdicts``."""
    outcomes = pa.table(
        {
            key: verdicts.column(key),
            "new_outcome": pc.binary_join_element_wise(FILTERED, verdicts.column("name"), ""),
        }
    )
    inputs = ledger.join(outcomes, key, join_type="inner")
    return pa.table(
        {
            "input_key": inputs.column("input_key"),
            "source": inputs.column("source"),
            "container": inputs.column("container"),
            "fingerprint": inputs.column("fingerprint"),
            "outcome": inputs.column("new_outcome"),
            "sample_id": inputs.column("sample_id"),
            "run_id": pa.repeat(pa.scalar(run_id), inputs.num_rows),
            "seen_at": pa.repeat(pa.scalar(now, STAMP), inputs.num_rows),
        }
    )


def stale_quarantine_ids(plan: FilterPlan) -> pa.Array:
    """The quarantine rows a build wrote for inputs that now come back or are refused by
    another filter: they leave in the run that changes them."""
    changed = pa.concat_tables(
        [plan.bring_back.select(["input_key", "was"]), plan.relabel.select(["input_key", "was"])]
    )
    keys, was = changed.column("input_key").to_pylist(), changed.column("was").to_pylist()
    return pa.array(
        [short_hash(k, "quality", FILTERED + w) for k, w in zip(keys, was, strict=True)],
        pa.string(),
    )


def refilter_stage(run: Run) -> pa.Array:
    """Backfill stats, move out the kept samples that fail, drop the stale quarantine rows of
    the inputs that come back; returns those inputs' keys for the run to read again."""
    plan, filled = evaluate(run.store, run.spec, run.commits.base, run.result.run_id)
    commits, result = run.commits, run.result
    commits.write("quality", filled)
    moving = pa.concat_arrays(
        [c.combine_chunks() for c in (plan.move_out["sample_id"], plan.orphaned["sample_id"])]
    )
    for name in dependent_tables(run.store):
        if name != "quality":  # a sample's stats stay: they are what brings it back
            commits.remove_rows(name, "sample_id", moving)
    now, run_id, out = datetime.now(UTC), result.run_id, plan.move_out
    by_input = pa.concat_tables(
        [plan.relabel.select(["input_key", "sample_id", "name", "reason"]), plan.orphaned]
    )
    quarantine = pa.concat_tables(
        [
            quarantine_rows(out["source_uri"], out["name"], out["reason"], run_id, now),
            quarantine_rows(
                by_input["input_key"], by_input["name"], by_input["reason"], run_id, now
            ),
        ]
    )
    stale = stale_quarantine_ids(plan)
    known = anti_join(run.known_quarantine, pa.table({"quarantine_id": stale}), ["quarantine_id"])
    run.known_quarantine = known
    commits.write("quarantine", anti_join(quarantine, known, ["quarantine_id"]))
    commits.remove_rows("quarantine", "quarantine_id", stale)
    commits.write("_inputs", ledger_rows(plan.ledger, "sample_id", out, run_id, now))
    commits.write("_inputs", ledger_rows(plan.ledger, "input_key", by_input, run_id, now))
    result.counts["filtered"] += plan.move_out.num_rows + plan.orphaned.num_rows
    if plan.move_out.num_rows:
        result.removed["samples"] = plan.move_out.num_rows
    result.filter_plan = plan.as_dict()
    return pa.concat_arrays([plan.bring_back.column("input_key").combine_chunks(), plan.lost])
