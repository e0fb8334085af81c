"""A/B experiments between selection strategies: what ``top_ads`` records, what ``ctr_cache`` publishes, and the
daily ``selection_experiment`` report of per-arm hit rates from the serving client's query logs.

The experiment a day runs is the one its ``top_ads`` selected with: its frame names it in the ``experiment`` column
(and its materialization in ``experiment_metadata``), ``ctr_predictions`` carries the column on, and ``ctr_cache``
publishes that one with the version. So the arms the client logs always match the split that chose the precomputed
keys, even if ``PRECOMPUTE_EXPERIMENT`` changed, or ``top_ads`` ran again, in between. ``selection_experiment``
credits each logged query to the experiment its version was published with (``ctr_cache``'s metadata).
"""

from collections.abc import Callable, Mapping
from typing import Any

import dagster as dg
import pandas as pd
import pyarrow as pa
from pydantic import Field

from ..ml.experiment import SRM_ALPHA, arm_report, arms_of
from ..serving import Experiment
from ..storage.lake import Lake
from .config_checks import at_least, at_most, fraction, refuse
from .partitions import DEFAULT_PARTITIONS, Partitions
from .records import metadata_of, newest_metadata
from .resources import ExperimentResource, LakeResource

EXPERIMENT_KIND = "ctr"  # the kind whose selection is split (top_ads) and whose queries carry arms
SELECTION_ASSET = "top_ads"
PUBLISHER_ASSET = "ctr_cache"  # its materializations record each version's experiment
# Metadata keys of top_ads that name the experiment it selected with ("" when none).
ARMS_KEY, SALT_KEY, NAME_KEY = "experiment", "experiment_salt", "experiment_name"


def experiment_metadata(experiment: Experiment | None) -> dict[str, str]:
    """What ``top_ads`` adds to its metadata: the experiment's arms (``A,B``), salt and name; nothing for none (the UI
    showed three blank values on every day without an experiment)."""
    if experiment is None:
        return {}
    return {ARMS_KEY: ",".join(experiment.arms), SALT_KEY: experiment.salt, NAME_KEY: experiment.name}


EXPERIMENT_COLUMN = "experiment"  # of top_ads and ctr_predictions: the experiment's JSON, "" for none


def experiment_column(experiment: Experiment | None) -> str:
    """The ``EXPERIMENT_COLUMN`` value of rows selected under ``experiment``."""
    return "" if experiment is None else experiment.encode().decode()


def carried_experiment(frame: pd.DataFrame, recorded: Callable[[], Experiment | None]) -> Experiment | None:
    """The experiment ``frame``'s rows (``top_ads``, ``ctr_predictions``) were selected under, from their
    ``EXPERIMENT_COLUMN``; ``recorded()`` for a frame written before the column was (the newest ``top_ads``
    materialization's). ``ValueError`` when its rows name more than one, or one that is malformed."""
    if EXPERIMENT_COLUMN not in frame.columns:
        return recorded()
    named = frame[EXPERIMENT_COLUMN].dropna().unique().tolist()
    if len(named) > 1:
        raise ValueError(f"its rows were selected under {len(named)} different experiments: {named[:2]}")
    return Experiment.decode(named[0]) if named and named[0] else None


def experiment_from_metadata(metadata: Mapping[str, Any]) -> Experiment | None:
    """The experiment ``experiment_metadata`` recorded (values or ``MetadataValue``s), or None."""

    def text(key: str) -> str:
        value = metadata.get(key, "")
        return str(getattr(value, "value", value) or "")

    arms = text(ARMS_KEY)
    if not arms:
        return None
    return Experiment(text(NAME_KEY), text(SALT_KEY), tuple(arms.split(",")))


def selected_experiment(instance: dg.DagsterInstance, partition: str) -> Experiment | None:
    """The experiment the newest ``top_ads`` of ``partition`` selected with (None: none, or no top_ads yet)."""
    return experiment_from_metadata(newest_metadata(instance, SELECTION_ASSET, partition))


MAX_BOOT = 100_000  # draws: a 95 % interval needs a few thousand; 10^12 asked numpy for terabytes


class ExperimentReportConfig(dg.Config):
    """Bootstrap draws, their seed and the interval's ``alpha`` (0.05: 95 % intervals)."""

    n_boot: int = Field(1000, description=f"Bootstrap draws over keys (at most {MAX_BOOT:,}).")
    seed: int = Field(0, description="Seed of the bootstrap.")
    alpha: float = Field(0.05, description="1 - the intervals' confidence (0.05: 95 % intervals).")


def experiment_rows(
    lake: Lake, hours: list[str], *, kind: str = EXPERIMENT_KIND
) -> tuple[pd.DataFrame, dict[str, int]]:
    """The day's queries of ``kind`` that carry an arm (``key``, ``hit``, ``arm``, and the ``version`` that served
    them, None in files older than that column), and how many hours are ``missing`` and how many were written
    before query logs had an ``arm`` column (``without_arm``: none of their rows belongs to an experiment)."""
    parts, counts = [], {"missing_hours": 0, "hours_without_arm": 0}
    columns = ["key", "hit", "arm", "version"]
    for hour in hours:
        if not lake.exists("query_logs", hour):
            counts["missing_hours"] += 1
            continue
        frame = None
        for wanted in (["kind", *columns], ["kind", *columns[:-1]]):
            try:
                frame = lake.read("query_logs", hour, columns=wanted)
                break
            except (KeyError, pa.ArrowInvalid):  # no such column in an older file
                continue
        if frame is None:
            counts["hours_without_arm"] += 1
            continue
        frame = frame[(frame["kind"] == kind) & frame["arm"].notna()]
        if len(frame):
            parts.append(frame.reindex(columns=columns))
    if not parts:
        return pd.DataFrame({column: [] for column in columns}), counts
    return pd.concat(parts, ignore_index=True), counts


MAX_VERSION_DAYS = 8  # days of ctr_cache materializations looked up for the versions of one day's queries


def published_experiments(instance: dg.DagsterInstance, versions: list[str]) -> dict[str, Experiment | None]:
    """The experiment each of the ctr ``versions`` was published with, as ``ctr_cache`` recorded it (None: none).
    Versions no materialization records whole (published by other means, or before the salt was recorded) are left
    out. A version names its day first (``content_version``): the materializations of those days are read."""
    wanted, out = set(versions), {}
    days = sorted({version.split(".", 1)[0] for version in wanted})[-MAX_VERSION_DAYS:]
    for day in days:
        records = instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=dg.AssetKey(PUBLISHER_ASSET), asset_partitions=[day]), limit=100
        ).records
        for record in records:  # newest first
            metadata = metadata_of(record)
            version, published = (getattr(metadata.get(k), "value", None) for k in ("version", "published"))
            if version not in wanted or version in out or published is not True:
                continue
            try:
                out[version] = experiment_from_metadata(metadata)
            except ValueError:  # arms without a salt: recorded before ctr_cache recorded it
                continue
    return out


def served_rows(frame: pd.DataFrame, published: Mapping[str, Experiment | None]) -> tuple[Experiment | None, pd.Series]:
    """The experiment that served most of ``frame``'s queries (``experiment_rows``), by the experiment each one's
    version was published with (``published``), and which rows it served; None, and no rows, when no query's
    version is known."""
    served = frame["version"].map(lambda version: published.get(version)) if len(frame) else frame["version"]
    known = served.notna()
    if not known.any():
        return None, known
    encoded = served[known].map(lambda experiment: experiment.encode())
    top = encoded.value_counts(sort=True).index[0]
    return Experiment.decode(top), known & served.map(lambda e: e is not None and e.encode() == top)


def report_arms(
    configured: Experiment | None,
    counts: pd.Series,
    *,
    source: str = "the configured experiment",
    recorded: bool = False,
) -> tuple[list[str] | None, str]:
    """The two arms to compare (first: the baseline of the difference) and why: ``configured``'s (the experiment
    that served the day, ``source`` says how it is known) when its arms are in the logs, else the two arms with most
    rows (alphabetical order); None with one arm only. An experiment ``recorded`` as the day's (by its version, or by
    the day before's top_ads) is compared when one of its arms is logged: an arm without requests is a sample-ratio
    mismatch to report. One only configured now may have changed since the day was served: it needs both, unless
    its arm is the only one logged (the other's rows lost: then a mismatch to report too)."""
    seen = counts.index.tolist()
    logged = set(configured.arms) & set(seen) if configured is not None else set()
    if configured is not None and (logged == set(configured.arms) or ((recorded or len(seen) == 1) and logged)):
        return list(configured.arms), f"{source} {configured.name}"
    if len(seen) < 2:
        return None, f"only arm {seen[0]!r} in the logs and no configured experiment names the other"
    top = sorted(counts.sort_values(ascending=False, kind="stable").index[:2].tolist())
    return top, "the two arms with the most rows in the logs (no configured experiment matches them)"


def report_metadata(report: dict) -> dict[str, Any]:
    """The report as plain numbers the UI charts (undefined values left out), plus the whole report as JSON."""
    out: dict[str, Any] = {"experiment_rows": int(report["rows"]), "arms": ",".join(report["arms"])}
    for arm, stats in report["per_arm"].items():
        out[f"{arm}_requests"] = int(stats["requests"])
        out[f"{arm}_keys"] = int(stats["keys"])
        if stats["hit_rate"] is not None:
            out[f"{arm}_hit_rate"] = float(stats["hit_rate"])
        if stats["ci"][0] is not None:
            out[f"{arm}_hit_rate_ci_low"], out[f"{arm}_hit_rate_ci_high"] = map(float, stats["ci"])
    difference = report["difference"]
    if difference["value"] is not None:
        out["difference"] = float(difference["value"])
    if difference["ci"][0] is not None:
        out["difference_ci_low"], out["difference_ci_high"] = map(float, difference["ci"])
    if difference.get("p_value") is not None:
        out["difference_p_value"] = float(difference["p_value"])
    if report["srm"]["p_value"] is not None:
        out["srm_p_value"] = float(report["srm"]["p_value"])
    out["report"] = dg.MetadataValue.json(report)
    return out


def sample_ratio_check(report: dict | None, why: str = "no experiment rows on this day") -> dg.AssetCheckResult:
    """Fails (WARN) on a sample-ratio mismatch: the arms then differ by more than the strategies. Without a report,
    passes saying ``why`` there was nothing to check."""
    if report is None or report["srm"]["p_value"] is None:
        return dg.AssetCheckResult(
            check_name="sample_ratio",
            passed=True,
            severity=dg.AssetCheckSeverity.WARN,
            description=f"{why}: nothing to check",
        )
    srm = report["srm"]
    keys = ", ".join(f"{arm} {n}" for arm, n in srm["keys"].items())
    return dg.AssetCheckResult(
        check_name="sample_ratio",
        passed=not srm["mismatch"],
        severity=dg.AssetCheckSeverity.WARN,
        description=(
            f"sample-ratio mismatch: keys per arm {keys} (p={srm['p_value']:.2g}); the arms are not comparable"
            if srm["mismatch"]
            else f"keys per arm {keys} (p={srm['p_value']:.3g})"
        ),
        metadata={"srm_p_value": float(srm["p_value"]), **{f"{arm}_keys": int(n) for arm, n in srm["keys"].items()}},
    )


@dg.asset(
    partitions_def=DEFAULT_PARTITIONS.daily,
    deps=[dg.AssetDep("query_logs", partition_mapping=dg.TimeWindowPartitionMapping())],
    kinds={"pandas"},
    group_name="selection",
    check_specs=[
        dg.AssetCheckSpec(
            "sample_ratio",
            asset="selection_experiment",
            description=f"Warns on a sample-ratio mismatch: keys per arm against an even split, p < {SRM_ALPHA:g}.",
        )
    ],
    description="The day's A/B experiment between two selection strategies: per-arm hit rates of ctr queries with "
    "95% intervals from a bootstrap over keys, the difference (second arm minus first) and a sample-ratio check.",
)
def selection_experiment(
    context: dg.AssetExecutionContext,
    config: ExperimentReportConfig,
    lake: LakeResource,
    experiment: ExperimentResource,
) -> dg.MaterializeResult:
    refuse("selection_experiment", at_least(config, 1, "n_boot"), at_most(config, MAX_BOOT, "n_boot"),
           at_least(config, 0, "seed"), fraction(config, "alpha"))  # fmt: skip
    partitions = Partitions.of(context)
    frame, hours = experiment_rows(lake.lake(), partitions.hours_of(context.partition_key))
    if frame.empty:
        context.log.info(f"no ctr queries with an experiment arm on {context.partition_key}: nothing to compare")
        return dg.MaterializeResult(metadata={"experiment_rows": 0, **hours}, check_results=[sample_ratio_check(None)])
    # Each query is credited to the experiment its version was published with: the day's first hours are often
    # served by the version of two days before (the night's publish has not run yet), or all of them when it failed.
    versions = frame["version"].dropna().unique().tolist()
    served, rows = served_rows(frame, published_experiments(context.instance, versions))
    other = {}
    recorded = True
    if served is not None:
        named, source = served, "the experiment their version was published with:"
        other = {"other_experiment_rows": int((~rows).sum())}
        if other["other_experiment_rows"]:
            context.log.warning(
                f"{other['other_experiment_rows']} of {len(frame)} experiment rows were served by versions of "
                f"another experiment (or of none recorded): left out of the report on {served.name} (salt "
                f"{served.salt!r})"
            )
        frame = frame[rows]
    else:  # no version recorded: day D was served by the version D-1 published, whose top_ads recorded it
        previous = partitions.days_ending(context.partition_key, 2)[0]
        named = selected_experiment(context.instance, previous) if previous != context.partition_key else None
        if named is None:
            named, source, recorded = experiment.experiment(), "the configured experiment", False
        else:
            source = f"the experiment top_ads of {previous} ran"
    hours = {**hours, **other}
    arms, why = report_arms(named, frame["arm"].value_counts(), source=source, recorded=recorded)
    if arms is None:
        context.log.warning(f"{len(frame)} experiment rows, but {why}")
        return dg.MaterializeResult(
            metadata={"experiment_rows": len(frame), **hours, "note": why},
            check_results=[sample_ratio_check(None, f"{len(frame)} experiment rows, but {why}")],
        )
    split: dict[str, Any] = {}
    if named is not None and arms == list(named.arms):  # its salt tells each key's arm: another split's rows leave
        split = {NAME_KEY: named.name, SALT_KEY: named.salt}
        logged = frame["arm"].isin(arms)
        elsewhere = logged & (frame["arm"].to_numpy() != arms_of(named.salt, frame["key"].to_numpy(), arms))
        if elsewhere.any():
            split["other_split_rows"] = int(elsewhere.sum())
            context.log.warning(
                f"{split['other_split_rows']} of {int(logged.sum())} rows of arms {', '.join(arms)} logged an arm that "
                f"is not their key's under {named.name}'s salt {named.salt!r}: another split's (a salt changed while "
                "no version was recorded), left out of the report"
            )
            frame = frame[~elsewhere]
    report = arm_report(frame, arms=arms, n_boot=config.n_boot, seed=config.seed, alpha=config.alpha)
    for note in report["notes"]:
        context.log.warning(note)
    difference = report["difference"]
    context.log.info(
        f"arms {arms} ({why}): hit rates "
        + ", ".join(f"{arm} {stats['hit_rate']}" for arm, stats in report["per_arm"].items())
        + f"; difference {difference['of']} = {difference['value']} (CI {difference['ci']})"
    )
    return dg.MaterializeResult(
        metadata={**report_metadata(report), **split, **hours},
        check_results=[sample_ratio_check(report)],
    )
