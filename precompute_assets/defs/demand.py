"""Demand model: a PyTorch LSTM forecasting each key's requests for the next day, scored on a held-back day
against the frequency, seasonal-naive and smoothed-rate baselines, and approved only when it beats them."""

import math
from collections.abc import Callable
from dataclasses import asdict
from typing import TYPE_CHECKING

import dagster as dg
import pandas as pd
from pydantic import Field

from ..ml.demand import (
    METHODS,
    MIN_DAYS,
    DemandEvaluation,
    DemandHyperParams,
    HourlyCounts,
    approves,
    evaluate_demand,
    ewma_forecast,
    forecast_next_day,
    load_model,
    safety_stop_note,
    seasonal_forecast,
)
from ..ml.strategies import STRATEGIES
from .config_checks import at_least, refuse
from .models import approved_materializations, prune_model_versions, retention_field
from .partitions import DEFAULT_PARTITIONS, Partitions
from .records import newest_metadata
from .resources import LakeResource, ModelStoreResource
from .selection import AdDemandConfig, hourly_logs, key_counts

if TYPE_CHECKING:  # torch is imported where the LSTM is loaded (ml.demand), not when the code location loads
    import torch

DEMAND_MODEL = "demand_model"
BEATS_BASELINES = "beats_baselines"
DEMAND_LOOKBACK_DAYS = 14
_HP = DemandHyperParams()  # the defaults the config shows: one source, the model's


class DemandModelConfig(dg.Config):
    """Lookback, LSTM, training budget (epochs and steps; seconds only as a safety stop), the baselines' parameters
    and the approval margin."""

    lookback_days: int = Field(
        DEMAND_LOOKBACK_DAYS,
        description="Days of hourly query logs read (the last one held back for the evaluation); the declared "
        "query_logs dependency covers the default.",
    )
    window_days: int = Field(_HP.window_days, description="Days before a target day that its features summarise.")
    sequence_days: int = Field(
        _HP.sequence_days, description="The last days of the window the LSTM steps through hour by hour."
    )
    hidden_size: int = Field(_HP.hidden_size, description="LSTM hidden units.")
    max_epochs: int = Field(
        _HP.max_epochs, description="Training stops after this many epochs or max_steps, first reached."
    )
    max_steps: int = Field(
        _HP.max_steps,
        description="Training stops after this many optimizer steps (batches) or max_epochs, first reached: a budget "
        "of work, so the same logs train the same weights on any machine (2000: what 45 s reached on 2 shared cores; "
        "the default lookback's 30 epochs are fewer).",
    )
    max_seconds: float = Field(
        _HP.max_seconds,
        description="A safety stop only, feature building included: when it ends training before max_epochs or "
        "max_steps, the weights depend on the machine's speed, and the run log and metadata warn.",
    )
    learning_rate: float = Field(_HP.learning_rate, description="Adam learning rate.")
    batch_size: int = Field(_HP.batch_size, description="Training batch size.")
    max_train_keys: int = Field(
        _HP.max_train_keys, description="Keys sampled (by seed) for training; every key is forecast."
    )
    top_n: int = Field(_HP.top_n, description="Hit rates are measured for the top this many keys of each method.")
    ewma_half_life_hours: float = Field(
        _HP.ewma_half_life_hours, description="Half-life of the ewma baseline's hourly rate."
    )
    seed: int = Field(_HP.seed, description="Seed of sampling and training.")
    threads: int | None = Field(_HP.threads, description="torch CPU threads (null: torch's default).")
    margin: float = Field(
        0.005, description="The LSTM is approved only when its hit rate beats the best baseline's by more than this."
    )
    warm_start: bool = Field(True, description="Start from the weights of the previous approved version.")
    retention_days: int = retention_field()

    def hyper_params(self, half_life_days: float) -> DemandHyperParams:
        """The hyper-parameters, the frequency baseline's half-life ``ad_demand``'s (``frequency_half_life``)."""
        fields = DemandHyperParams.__dataclass_fields__
        configured = {k: v for k, v in self.model_dump().items() if k in fields}
        return DemandHyperParams(**configured, half_life_days=half_life_days)


def hyper_params_problem(config: DemandModelConfig) -> str | None:
    """Why ``config``'s hyper-parameters are refused (``DemandHyperParams``' own checks), or None."""
    try:
        config.hyper_params(AdDemandConfig().half_life_days)
    except ValueError as error:
        return str(error)
    return None


def frequency_half_life(instance: dg.DagsterInstance, partition: str) -> tuple[float, str]:
    """The half-life ``ad_demand`` of ``partition`` ranked by (what ``top_ads`` ranks by as ``frequency``), from its
    newest materialization, and where it came from; ``ad_demand``'s default when the day has none."""
    metadata = newest_metadata(instance, "ad_demand", partition)
    if "half_life_days" in metadata:
        return float(metadata["half_life_days"].value), f"ad_demand of {partition}"
    return AdDemandConfig().half_life_days, f"ad_demand's default: no ad_demand of {partition} records one"


def read_hourly_counts(lake, partitions: Partitions, days: list[str]) -> HourlyCounts:
    """Requests per key and hour of ``days``, read one hour file at a time; missing hours stay NaN."""

    def hours():
        for index, day in enumerate(days):
            for hour in partitions.hours_of(day):
                start = partitions.hourly.time_window_for_partition_key(hour).start
                _, table = next(hourly_logs(lake, [hour]))
                yield index, start, None if table is None else key_counts(table)

    return HourlyCounts.from_hours(hours())


def approved_version(instance: dg.DagsterInstance, partition: str, *, same_day: bool) -> str | None:
    """The newest approved ``demand_model`` version (its ``beats_baselines`` check passed) of ``partition`` or a day
    before it (``same_day``: what ``top_ads`` of the day ranks by), or of a day before it only (a training's warm
    start: each re-run of a day warm-started from the last then trained other weights from the same logs); None when
    there is none."""
    check = dg.AssetCheckKey(dg.AssetKey(DEMAND_MODEL), BEATS_BASELINES)
    approved = [
        ((day, storage_id), metadata["model_version"].value)
        for day, storage_id, _, metadata in approved_materializations(instance, check)
        if (day <= partition if same_day else day < partition)
        and "model_version" in metadata
        and metadata.get("approved") is not None
        and metadata["approved"].value
    ]
    return max(approved)[1] if approved else None


def demand_evaluation(instance: dg.DagsterInstance, partition: str) -> dict | None:
    """The metadata of the newest ``demand_model`` materialization of ``partition`` that evaluated the methods."""
    metadata = newest_metadata(instance, DEMAND_MODEL, partition)
    return {k: v.value for k, v in metadata.items()} if "strategy" in metadata else None


def resolve_strategy(evaluation: dict | None, partition: str, strategy: str) -> tuple[str, str]:
    """The strategy to use for ``partition`` and why: ``auto`` follows demand_model's held-back evaluation of the
    day (``demand_evaluation``; ``lstm`` only if its blocking check approved it), ``frequency`` when there is none."""
    if strategy not in STRATEGIES:
        raise dg.Failure(description=f"unknown strategy {strategy!r}: use one of {', '.join(STRATEGIES)}")
    if strategy != "auto":
        return strategy, "configured"
    if evaluation is None:
        return "frequency", f"auto: no demand_model evaluation of {partition}, frequency (today's default)"
    used = evaluation["strategy"]
    best = evaluation["best_baseline"]
    return used, (
        f"auto: best on the held-back day per demand_model {evaluation['model_version']}: lstm hit rate "
        f"{evaluation['hit_rate_lstm']:.4f}, best baseline {best} {evaluation[f'hit_rate_{best}']:.4f}"
        f"{'' if evaluation['approved'] else ' (lstm not approved by beats_baselines)'}"
    )


def evaluated_hyper_params(evaluation: dict | None) -> DemandHyperParams:
    """The hyper-parameters demand_model scored the baselines of the day's ``evaluation`` with (the defaults without
    one), so a baseline ranks tomorrow as it was scored on the held-back day."""
    stored = (evaluation or {}).get("hyper_params") or {}
    return DemandHyperParams(**{k: v for k, v in stored.items() if k in DemandHyperParams.__dataclass_fields__})


def strategy_demand(
    context: dg.AssetExecutionContext,
    strategy: str,
    lake,
    model_store: ModelStoreResource,
    evaluation: dict | None,
) -> tuple[pd.Series | None, str]:
    """Tomorrow's expected requests per key under ``ewma`` or ``seasonal`` (with the hyper-parameters demand_model
    scored them with in the day's ``evaluation``) or ``lstm`` (from the approved demand_model version of this day or
    before), and a note; ``None`` when the lstm has no approved version, or its stored model cannot be used: deleted
    by the model store's retention, weights that fail their integrity check or are not a plain state_dict, metadata
    that does not parse, weights of other shapes than its hyper-parameters say."""
    partitions = Partitions.of(context)
    hp = evaluated_hyper_params(evaluation)
    note = ""
    model = None
    if strategy == "lstm":
        version = approved_version(context.instance, context.partition_key, same_day=True)
        if version is None:
            return None, "no approved demand_model version"
        try:
            hp, model = _stored_lstm(model_store.store(), version)
        except KeyError:  # deleted by the model store's retention (a backfill of an old day): selection goes on
            context.log.warning(f"demand_model {version} is no longer in the model store")
            return None, f"demand_model {version} is no longer in the model store"
        except (ValueError, TypeError, AttributeError, RuntimeError) as error:  # the day's selection goes on
            context.log.warning(f"demand_model {version} refused: {error}")
            return None, f"demand_model {version} refused ({error})"
        note = f"demand_model {version}"
    days = partitions.days_ending(context.partition_key, max(7, hp.window_days))
    data = read_hourly_counts(lake, partitions, days)
    if len(data.keys) == 0:
        return pd.Series(dtype=float), note
    if strategy == "seasonal":
        values = seasonal_forecast(data.daily(), data.n_days, data.logged_days())
    elif strategy == "ewma":
        values = ewma_forecast(data, data.n_days, hp)
    else:
        return forecast_next_day(model, data, hp), note
    return pd.Series(values, index=pd.Index(data.keys)), note


def _stored_lstm(store, version: str) -> tuple[DemandHyperParams, "torch.nn.Module"]:
    """The hyper-parameters and the LSTM of demand_model ``version``. ``KeyError`` when the store has none of it;
    ``ValueError`` (integrity, not a plain state_dict, metadata that does not parse), ``TypeError`` or
    ``AttributeError`` (metadata of other types) or ``RuntimeError`` (weights of other shapes) when what it has cannot
    be used."""
    stored = store.metadata(DEMAND_MODEL, version)["hyper_params"]
    hp = DemandHyperParams(**{k: v for k, v in stored.items() if k in DemandHyperParams.__dataclass_fields__})
    return hp, load_model(store.load_state_dict(DEMAND_MODEL, version), hp.hidden_size)


def beats_baselines_check(evaluation: DemandEvaluation | None, margin: float, error: str | None = None):
    """Passes only when the LSTM's held-back hit rate beats the best baseline's by more than ``margin``, and its
    training ended by its budget of work (epochs or steps), not by the ``max_seconds`` safety stop.

    A fail is a warning, not an error: it keeps the LSTM's ranking out of ``top_ads`` (which then ranks by the best
    baseline), and must not stop the day's selection and publish, which wait for this verdict in the daily job."""
    if evaluation is None:
        return dg.AssetCheckResult(
            check_name=BEATS_BASELINES, passed=False, severity=dg.AssetCheckSeverity.WARN, description=error
        )
    hit = evaluation.hit_rate
    best = evaluation.best_baseline
    lift = hit["lstm"] - hit[best]
    cut = evaluation.stopped_by == "seconds"
    passed = approves(evaluation, margin)
    used = "lstm" if passed else best
    why = "; training was cut short by the max_seconds safety stop, so never approved" if cut else ""
    return dg.AssetCheckResult(
        check_name=BEATS_BASELINES,
        passed=passed,
        severity=dg.AssetCheckSeverity.WARN,
        description=(
            f"held-back hit rate: lstm {hit['lstm']:.4f} vs best baseline {best} {hit[best]:.4f} "
            f"(lift {lift:+.4f}, margin {margin}){why}: use {used}"
        ),
        metadata={
            "winner": evaluation.winner,
            "best_baseline": best,
            "use": used,
            "hit_rate_lstm": hit["lstm"],
            "hit_rate_best_baseline": hit[best],
            "lift": lift,
            "margin": margin,
        },
    )


def _finite_or_none(value: float) -> float | None:
    return None if math.isnan(value) else value


TRAINING_LOG_EVERY_S = 10.0


def training_log(log, max_epochs: int, *, every_s: float = TRAINING_LOG_EVERY_S) -> Callable[[int, float, float], None]:
    """A ``train_lstm`` progress callback: a log line with the epoch, its training loss and the seconds so far, for
    the first and the last epoch and at most every ``every_s`` seconds between."""
    last = -math.inf

    def progress(epoch: int, loss: float, seconds: float) -> None:
        nonlocal last
        if seconds - last >= every_s or epoch == max_epochs:
            last = seconds
            log.info(f"LSTM epoch {epoch}/{max_epochs}: training loss {loss:.4f} after {seconds:.1f} s")

    return progress


@dg.asset(
    partitions_def=DEFAULT_PARTITIONS.daily,
    deps=[
        dg.AssetDep(
            "query_logs", partition_mapping=dg.TimeWindowPartitionMapping(start_offset=-(DEMAND_LOOKBACK_DAYS - 1))
        ),
        "ad_demand",  # its half-life is the frequency baseline's: it runs first in the daily job
    ],
    kinds={"pytorch"},
    group_name="models",
    check_specs=[
        dg.AssetCheckSpec(
            BEATS_BASELINES,
            asset=DEMAND_MODEL,
            blocking=True,
            description="The LSTM's held-back hit rate beats the best baseline's (frequency, seasonal naive, ewma) "
            "by the configured margin; otherwise (a warning) selection keeps the best baseline. top_ads waits for "
            "this verdict.",
        )
    ],
    description=f"PyTorch LSTM forecasting each key's requests for the next day from {DEMAND_LOOKBACK_DAYS} days "
    "of hourly query logs (read one hour at a time), scored with the baselines on the held-back last day.",
)
def demand_model(
    context: dg.AssetExecutionContext,
    config: DemandModelConfig,
    lake: LakeResource,
    model_store: ModelStoreResource,
) -> dg.MaterializeResult:
    """Train (warm-started from the previous approved version), evaluate every method on the held-back day, and
    store the weights as a plain state_dict; the version is this materialization (partition + run id)."""
    # A negative margin approved an LSTM that lost to a baseline: the learned ranking is used only where it wins.
    margin = None if math.isfinite(config.margin) and config.margin >= 0 else (
        f"margin must be a finite number of at least 0, got {config.margin}")  # fmt: skip
    refuse(DEMAND_MODEL, at_least(config, MIN_DAYS, "lookback_days"), hyper_params_problem(config), margin,
           at_least(config, 0, "retention_days"))  # fmt: skip
    partitions = Partitions.of(context)
    days = partitions.days_ending(context.partition_key, config.lookback_days)
    data = read_hourly_counts(lake.lake(), partitions, days)
    read = {
        "days": len(days),
        "days_short_of_lookback": config.lookback_days - len(days),
        "days_without_logs": int((~data.logged_days()).sum()),  # within the partitions read: not a day of no requests
        "keys": len(data.keys),
        "missing_hours": data.missing_hours,
    }
    # Training may take the whole budget: say what it works on before it starts.
    context.log.info(
        f"read {len(days)} days of hourly query logs: {len(data.keys):,} keys, {data.missing_hours} hours missing; "
        f"training the LSTM for at most {config.max_epochs} epochs or {config.max_steps} steps "
        f"(safety stop {config.max_seconds:g} s)"
    )
    store = model_store.store()
    previous = approved_version(context.instance, context.partition_key, same_day=False)
    init_state = None
    if config.warm_start and previous is not None:
        try:
            init_state = store.load_state_dict(DEMAND_MODEL, previous)
        except (KeyError, ValueError, OSError) as error:  # gone, refused, or unreadable now: train from scratch
            context.log.warning(f"not warm-starting from {previous}: {error}")
            previous = None
    half_life, source = frequency_half_life(context.instance, context.partition_key)
    context.log.info(f"frequency baseline: half-life {half_life:g} days ({source})")
    try:
        hp = config.hyper_params(half_life)
        result = evaluate_demand(data, hp, init_state=init_state, progress=training_log(context.log, hp.max_epochs))
    except Exception as error:  # the LSTM is optional: its failure must not stop the day's publish
        # ValueError: the data cannot train a model (no traffic); anything else is a fault, logged with its trace.
        fault = not isinstance(error, ValueError)
        problem = f"{type(error).__name__}: {error}" if fault else str(error)
        (context.log.exception if fault else context.log.error)(
            f"no demand model trained: {problem}; top_ads keeps the best baseline"
        )
        return dg.MaterializeResult(
            metadata={"error": problem, **read},
            check_results=[beats_baselines_check(None, config.margin, f"no demand model trained: {problem}")],
        )
    evaluation = result.evaluation
    check = beats_baselines_check(evaluation, config.margin)
    version = f"{context.partition_key}.{context.run_id[:8]}"
    scores = {
        **{f"hit_rate_{name}": evaluation.hit_rate[name] for name in METHODS},
        **{f"mase_{name}": evaluation.mase[name] for name in METHODS},
    }
    # An unmeasured MASE is left out of the metadata: the UI shows a NaN as an empty value and charts nothing for it.
    shown_scores = {name: value for name, value in scores.items() if not math.isnan(value)}
    mase_note = {} if evaluation.mase_note is None else {"mase_note": evaluation.mase_note}
    safety_stop = {}  # the weights depend on the machine's speed: a warning beside the one in the run log
    if evaluation.stopped_by == "seconds":
        fired = safety_stop_note(hp, evaluation.train_steps, evaluation.epochs, evaluation.train_seconds)
        safety_stop = {"safety_stop": fired}
    try:
        # overwrite: a step retry in the same run retrains and replaces the weights of this unfinished version
        uri = store.save_state_dict(
            DEMAND_MODEL,
            version,
            result.state_dict(),
            {
                "hyper_params": asdict(result.hyper_params),  # as trained: what top_ads forecasts with
                "scores": {k: _finite_or_none(v) for k, v in scores.items()},
                "winner": evaluation.winner,
                "approved": check.passed,
                "warm_started_from": previous if evaluation.warm_started else None,
            },
            overwrite=True,
        )
    except OSError as error:  # the model store is full or read-only: the day's publish goes on without the LSTM
        problem = f"the weights could not be saved: {error}"
        context.log.error(f"{problem}; top_ads keeps the best baseline")
        check, uri = beats_baselines_check(None, config.margin, f"{problem} ({check.description})"), ""
    check_key = dg.AssetCheckKey(dg.AssetKey(DEMAND_MODEL), BEATS_BASELINES)
    pruned = prune_model_versions(context, store, DEMAND_MODEL, check_key, config.retention_days, version)
    if evaluation.stopped_by == "steps":  # the progress log's last line may be an earlier epoch's
        context.log.info(
            f"LSTM training stopped by its budget of {hp.max_steps} steps in epoch {evaluation.epochs} of "
            f"{hp.max_epochs} ({evaluation.train_seconds:.1f} s, feature building included)"
        )
    for note in evaluation.notes:  # the safety stop's among them
        context.log.warning(note)
    context.log.info(f"trained {version}: {check.description}")
    return dg.MaterializeResult(
        metadata={
            "model_version": version,
            "approved": check.passed,
            "model_uri": uri,
            **shown_scores,
            **mase_note,
            "winner": evaluation.winner,
            "best_baseline": evaluation.best_baseline,
            "strategy": "lstm" if check.passed else evaluation.best_baseline,
            "top_n": hp.top_n,
            "hyper_params": dg.MetadataValue.json(asdict(result.hyper_params)),  # what top_ads ranks with
            "train_seconds": evaluation.train_seconds,
            "epochs": evaluation.epochs,
            "train_steps": evaluation.train_steps,
            "max_steps": hp.max_steps,
            "stopped_by": evaluation.stopped_by,  # epochs or steps; seconds: the safety stop fired (safety_stop)
            **safety_stop,
            "train_samples": evaluation.train_samples,
            "train_days": evaluation.train_days,  # days with logs it learned to forecast (trained_days)
            # trained from scratch: left out, not shown as a blank value
            **({"warm_started_from": previous} if evaluation.warm_started and previous else {}),
            "versions_pruned": pruned,
            **read,
            "requests_held_back_day": int(pd.Series(data.daily()[:, -1]).sum()),
            # keys first requested on the held-back day: in its requests (hit rates), outside the scored keys (MASE)
            "new_keys_held_back_day": evaluation.new_keys,
            "requests_new_keys_held_back_day": int(evaluation.new_key_requests),
        },
        check_results=[check],
    )
