"""ConfigurableResources: where Redis, the offline store, the models and the app database are, from the
environment, the deployment's timezone and partitions, and its A/B experiment, so the UI shows every one of them."""

import contextlib
import logging
import os
from collections.abc import Callable, Iterator, Mapping
from datetime import timedelta
from typing import Any, TypeVar

import dagster as dg
import pandas as pd
import psycopg2
import redis
from pydantic import Field
from redis.exceptions import RedisClusterException

from ..ml.experiment import parse_arms
from ..ml.features import (
    ENV_AD_CATEGORICAL,
    ENV_AD_LOG_SCALED,
    ENV_AD_NUMERIC,
    AdFeatureSpec,
    spec_from_env,
    spec_from_names,
)
from ..ml.model_store import LocalModelStore
from ..serving import Experiment, KeySchema, connect
from ..serving.acl import DATABASE_HINT, refused_select
from ..serving.connection import REDIS_ERRORS, cannot_persist, is_cluster, mode_problem
from ..serving.keys import clean_salt
from ..serving.replication import REPLICA_WAIT_S
from ..stack import ENV_APP_DB, ENV_LAKE, ENV_MODEL_STORE, ENV_REDIS, redact
from ..storage.campaigns import ENV_CAMPAIGN_MAX_ADS, MAX_ADS, CampaignRegistry, max_ads_from_env
from ..storage.documents import DocumentStore
from ..storage.lake import Lake, LakeReadError
from .partitions import Partitions
from .settings import DEFAULT_PARTITIONS_START, DEFAULT_TIMEZONE, SettingError, Settings, unset_error

ENV_EXPERIMENT = "PRECOMPUTE_EXPERIMENT"
ENV_EXPERIMENT_SALT = "PRECOMPUTE_EXPERIMENT_SALT"
DEFAULT_EXPERIMENT_SALT = "ab1"
SENSOR_CHECK_TIMEOUT_S = 2.0  # a sensor's look at Redis: seconds per command, no retries
T = TypeVar("T")


# Dagster takes a resource's description in the UI (launchpad, resource pages) from its class docstring, shown as
# plain text: the docstrings of the resources here are written for that reader, without reST markup.


# The URL forms are parsed by serving.connection; replica_wait_s is serving.publish.flip_pointer's wait.
class RedisResource(dg.ConfigurableResource):
    """The serving Redis at PRECOMPUTE_REDIS_URL: AUTH in the URL, rediss:// for TLS, redis+sentinel:// for the
    primary of a Sentinel deployment. Redis Cluster: ?cluster=1 in the URL or cluster set to true; a URL saying
    cluster=0 with cluster true is refused, as is a cluster URL naming a database other than 0. replica_wait_s is how
    long a publish waits, before and after its pointer flip, until every replica holds what its primary holds."""

    url: str = Field(
        description="redis://[user:password@]host:port/db, rediss:// for TLS; ?cluster=1: Redis Cluster; "
        "redis+sentinel://[user:password@]sentinel:26379[,...]/service[/db]: the primary Redis Sentinel names."
    )
    namespace: str = Field("pc", description="Prefix of every key (the key schema's namespace).")
    cluster: bool = Field(False, description="Connect to a Redis Cluster (as ?cluster=1 in the URL).")
    socket_timeout_s: float = Field(10.0, description="Seconds a connect or command may take before it fails.")
    retries: int = Field(2, description="Retries of a command after a connection error or timeout.")
    replica_wait_s: float = Field(
        REPLICA_WAIT_S, description="Seconds a publish waits for the replicas around its pointer flip (0: no wait)."
    )

    def client(self) -> redis.Redis:
        """A client of the server, checked first (PING; ``INFO replication`` where the user may run it): a URL that is
        malformed, a login or database it refuses, or a read-only replica fail the step with one error that names
        ``PRECOMPUTE_REDIS_URL``, rather than with the first command's bare error. A server that does not answer may
        be restarting: that failure is retried by the step's retry policy."""
        where = f"{ENV_REDIS} ({redact(self.url)})"
        try:
            client = connect(self.url, socket_timeout=self.socket_timeout_s, cluster=self.cluster, retries=self.retries)
        except ValueError as error:
            raise dg.Failure(description=f"{where} is not a Redis URL: {error}", allow_retries=False) from None
        except RedisClusterException as error:  # ?cluster=1 on a single server, or no node of the cluster answers
            wrong = "cluster mode is not enabled" in str(error).lower()
            what = "is not a Redis Cluster (drop ?cluster=1)" if wrong else "does not answer"
            raise dg.Failure(description=f"{where} {what}: {error}", allow_retries=not wrong) from None
        try:
            client.ping()
            wrong = mode_problem(client)
            primary = None if is_cluster(client) or wrong else replica_of(client)
        except (redis.AuthenticationError, redis.ResponseError) as error:
            client.close()
            if cannot_persist(error):  # a full disk, not a login problem
                raise dg.Failure(description=f"{where} cannot write to its disk, and refuses writes until it can "
                                 f"(full?): {error}") from None  # fmt: skip  # retried: space may come back
            hint = f"; {DATABASE_HINT}" if refused_select(error) else ""
            raise dg.Failure(description=f"{where} refuses us: {error}{hint}", allow_retries=False) from None
        except REDIS_ERRORS as error:
            client.close()
            raise dg.Failure(description=f"{where} does not answer: {error}") from None
        if wrong is not None:
            client.close()
            raise dg.Failure(description=f"{where} is {wrong}", allow_retries=False)
        if primary is not None:
            client.close()
            message = f"{where} is a read-only replica of {primary}: point {ENV_REDIS} at the primary"
            raise dg.Failure(description=message, allow_retries=False)
        return client

    def schema(self) -> KeySchema:
        return KeySchema(self.namespace)

    def sensor_check(self, check: Callable[[redis.Redis, KeySchema], T], log: logging.Logger, what: str) -> T | None:
        """``check(client, schema)`` for a sensor's tick, on a client of at most ``SENSOR_CHECK_TIMEOUT_S`` per
        command and no retries (a tick that hangs on a stalled server past Dagster's limit fails, and launches nothing
        else either), closed after. None, with a warning that ``what`` was not checked, when the server does not answer
        or refuses us: the next tick looks again."""
        quick = self.model_copy(
            update={"socket_timeout_s": min(self.socket_timeout_s, SENSOR_CHECK_TIMEOUT_S), "retries": 0}
        )
        try:
            client = quick.client()
            try:
                return check(client, self.schema())
            finally:
                client.close()
        except (dg.Failure, *REDIS_ERRORS) as error:
            why = error.description if isinstance(error, dg.Failure) else f"{type(error).__name__}: {error}"
            log.warning(f"not checked {what}: {why}")
            return None


def replica_of(client: redis.Redis) -> str | None:
    """``host:port`` of the primary when the server of ``client`` is a replica; None for a primary, or when it does not
    say: its user may not run ``INFO``, or a proxy in front of it has no such command."""
    try:
        info = client.info("replication")
    except redis.ResponseError:
        return None
    if info.get("role") not in ("slave", "replica"):
        return None
    return f"{info.get('master_host', '?')}:{info.get('master_port', '?')}"


def out_of_memory(
    client: redis.Redis,
    error: BaseException,
    outcome: str = "nothing published",
    readers: str = "Readers stay on the current version.",
) -> str:
    """Why a write was refused at ``maxmemory``, with the server's memory and policy where it tells them (``INFO``),
    and what to change: its ``maxmemory``, or the ``volatile-lru`` policy this project's keys are laid out for.
    ``outcome``: what the refused write left undone; ``readers``: what readers see meanwhile."""
    memory: dict = {}
    with contextlib.suppress(*REDIS_ERRORS, IndexError):  # on a cluster, a primary's (they share one configuration)
        memory = client.info("memory", target_nodes=client.get_primaries()[0]) if is_cluster(client) else (
            client.info("memory"))  # fmt: skip
    policy = memory.get("maxmemory_policy")
    seen = ""
    if memory:
        seen = (f" ({memory.get('used_memory')} of maxmemory {memory.get('maxmemory')} bytes used, "
                f"maxmemory-policy {policy})")  # fmt: skip
    if policy is None or policy == "noeviction":  # a policy not read: the advice for the default one, said as such
        which = " (if it has noeviction)" if policy is None else ""
        advice = (f" Give that server a larger maxmemory, or{which} the policy volatile-lru, which evicts versions and"
                  " live values (they have a TTL) before refusing a write (README: Security and limits)")  # fmt: skip
    elif policy.startswith("volatile"):  # it found nothing it may evict: keys without a TTL fill it
        advice = (f" Nothing is left that {policy} may evict: keys without a TTL fill it (another application's, the"
                  " query-log and event streams). Give that server a larger maxmemory, or publish fewer keys"
                  " (README: Security and limits)")  # fmt: skip
    else:  # allkeys-*: it could evict nothing for this write (one value larger than what it can free)
        advice = (f" Under {policy} it could free no room for this write. Give that server a larger maxmemory"
                  " (README: Security and limits)")  # fmt: skip
    refused = " ".join(str(error).split())
    return f"{outcome}: the Redis of {ENV_REDIS} is out of memory{seen}: {refused}. {readers}{advice}"


@contextlib.contextmanager
def failing_clearly_when_full(client: redis.Redis, outcome: str, readers: str) -> Iterator[None]:
    """Turn redis-py's bare ``OutOfMemoryError`` (``OOM command not allowed when used memory > 'maxmemory'``, with a
    traceback through redis-py) of the writes inside into a ``dg.Failure`` of one line (``out_of_memory``); still
    retried: memory may be freed by then (expiring versions and live values)."""
    try:
        yield
    except redis.exceptions.OutOfMemoryError as error:
        raise dg.Failure(description=out_of_memory(client, error, outcome, readers)) from None


# The ad feature set of the lake's `ads` table, as comma-separated column names.
AD_FEATURE_FIELDS = {
    "ad_numeric": ENV_AD_NUMERIC,
    "ad_categorical": ENV_AD_CATEGORICAL,
    "ad_log_scaled": ENV_AD_LOG_SCALED,
}


class LakeResource(dg.ConfigurableResource):
    """The offline Parquet store at PRECOMPUTE_LAKE_URI (a folder, s3://bucket/prefix or gs://...), which the IO
    manager writes through too, and which columns of its ads table are the CTR model's features (comma-separated
    names from PRECOMPUTE_AD_NUMERIC, PRECOMPUTE_AD_CATEGORICAL and PRECOMPUTE_AD_LOG_SCALED; the defaults are the
    synthetic workload's, and unset log-scaling means the default log-scaled columns that are numeric features)."""

    base_uri: str | None = Field(None, description="A folder, s3://bucket/prefix or gs://... (PRECOMPUTE_LAKE_URI).")
    ad_numeric: str = Field(
        ",".join(AdFeatureSpec().numeric), description="Numeric feature columns of ads, comma-separated."
    )
    ad_categorical: str = Field(
        ",".join(AdFeatureSpec().categorical), description="Categorical feature columns of ads, comma-separated."
    )
    ad_log_scaled: str | None = Field(
        None,
        description="Numeric columns scaled with log1p, comma-separated; null: the default ones that are numeric, "
        '"": none.',
    )

    def lake(self) -> Lake:
        if not self.base_uri:
            raise unset_error(ENV_LAKE, "the offline Parquet store (a folder or an object-store URI)")
        return Lake(self.base_uri)

    def ad_feature_spec(self) -> AdFeatureSpec:
        """The ad feature set the CTR model trains on (``ValueError`` naming the problem if it is malformed)."""
        return spec_from_names(self.ad_numeric, self.ad_categorical, self.ad_log_scaled)


class ModelStoreResource(dg.ConfigurableResource):
    """Where trained models live (PRECOMPUTE_MODEL_STORE, a folder); models are loaded only from here."""

    root: str | None = Field(None, description="The folder of trained models (PRECOMPUTE_MODEL_STORE).")

    def store(self) -> LocalModelStore:
        if not self.root:
            raise unset_error(ENV_MODEL_STORE, "the folder of trained models")
        return LocalModelStore(self.root)

    def load(self, name: str, version: str) -> Any:
        """``store().load``; a version Dagster recorded (approved, or the day's) that the store lacks is one failure
        that says so and is not retried (the store was restored from an older backup, or wiped): a KeyError's
        traceback said only that it was not found."""
        try:
            return self.store().load(name, version)
        except KeyError as error:
            raise dg.Failure(description=missing_model(error, name), allow_retries=False) from None


def missing_model(error: KeyError, name: str) -> str:
    """What to do about a model version Dagster's storage records and the model store lacks (``error``)."""
    return (
        f"{error.args[0] if error.args else error}, though Dagster's storage records it: restore the model store "
        f"({ENV_MODEL_STORE}) from a backup taken after that version was trained, or materialize {name} again"
    )


class DeploymentResource(dg.ConfigurableResource):
    """The timezone of partitions and schedules and the first daily partition (PRECOMPUTE_TIMEZONE,
    PRECOMPUTE_PARTITIONS_START), as the definitions were built with them."""

    timezone: str = Field(DEFAULT_TIMEZONE, description="IANA timezone of partitions and schedules.")
    partitions_start: str = Field(DEFAULT_PARTITIONS_START, description="First daily partition, YYYY-MM-DD.")

    def partitions(self) -> Partitions:
        return Partitions.of_settings(Settings(self.timezone, self.partitions_start))


class ExperimentResource(dg.ConfigurableResource):
    """An A/B experiment between two selection strategies (PRECOMPUTE_EXPERIMENT, such as frequency,lstm; blank:
    none): keys are split between the arms by a hash salted with salt (PRECOMPUTE_EXPERIMENT_SALT; a new salt
    reshuffles every key), each arm's half of top_ads' top_n is chosen by its own strategy, and the serving client
    logs each query's arm."""

    arms: str = Field("", description='Two selection strategies, "A,B" (e.g. frequency,lstm); "": no experiment.')
    salt: str = Field(DEFAULT_EXPERIMENT_SALT, description="Salt of the key split: a new salt reshuffles every key.")
    name: str = Field("", description='Name of the experiment; "": "A-vs-B".')

    def experiment(self) -> Experiment | None:
        """The experiment, or None when it is off; ``SettingError`` naming the variable when it is malformed."""
        if not self.arms.strip():
            return None
        try:
            first, second = parse_arms(self.arms)
        except ValueError as error:
            raise SettingError(f"{ENV_EXPERIMENT}={self.arms!r}: {error}") from None
        try:
            salt = clean_salt(self.salt)
        except ValueError as error:
            raise SettingError(f"{ENV_EXPERIMENT_SALT}={error}") from None
        return Experiment(self.name.strip() or f"{first}-vs-{second}", salt, (first, second))


def experiment_fields(environ: Mapping[str, str] | None = None) -> dict[str, dg.EnvVar]:
    """``ExperimentResource``'s fields whose variable is set and not blank, as ``EnvVar``; a malformed experiment
    fails loading the Definitions with a ``SettingError`` naming its variable, as a bad setting does."""
    env = os.environ if environ is None else environ
    fields = {
        field: variable
        for field, variable in (("arms", ENV_EXPERIMENT), ("salt", ENV_EXPERIMENT_SALT))
        if (env.get(variable) or "").strip()
    }
    ExperimentResource(**{field: env[variable] for field, variable in fields.items()}).experiment()
    return {field: dg.EnvVar(variable) for field, variable in fields.items()}


@contextlib.contextmanager
def app_db_setting(url: str) -> Iterator[None]:
    """The first use of the application database: an error of its URL, login, database, privileges or a read-only
    standby fails the step or tick with one error naming ``PRECOMPUTE_APP_DB_URL``, not psycopg2's alone. Only a
    server that does not answer (it may be restarting) is left to the step's retry policy."""
    try:
        yield
    except psycopg2.Error as error:
        reason = " ".join(str(error).split()) or type(error).__name__
        unreachable = isinstance(error, psycopg2.OperationalError) and error.pgcode is None and "FATAL" not in reason
        verdict = "does not answer" if unreachable else "refuses us"
        description = f"{ENV_APP_DB} ({redact(url)}) {verdict}: {redact(reason)}"
        raise dg.Failure(description=description, allow_retries=unreachable) from None


class AppDatabaseResource(dg.ConfigurableResource):
    """Our own tables (PRECOMPUTE_APP_DB_URL), beside Dagster's database."""

    url: str = Field(description="PostgreSQL URL of the application database (PRECOMPUTE_APP_DB_URL).")


class DocumentStoreResource(dg.ConfigurableResource):
    """The documents table of the application database."""

    url: str = Field(description="PostgreSQL URL of the application database (PRECOMPUTE_APP_DB_URL).")
    table: str = Field("documents", description="The documents table.")

    def store(self) -> DocumentStore:
        store = DocumentStore(self.url, table=self.table)
        with app_db_setting(self.url):
            store.ensure_schema()
        return store


class CampaignRegistryResource(dg.ConfigurableResource):
    """The campaign registry of the application database; campaigns launching within warming_horizon_hours are
    warmed (campaign_launch_sensor and its backstop schedule look that far ahead)."""

    url: str | None = Field(None, description="PostgreSQL URL of the application database (PRECOMPUTE_APP_DB_URL).")
    warming_horizon_hours: float = Field(24.0, description="Campaigns launching within this many hours are warmed.")
    max_ads: int = Field(
        MAX_ADS,
        description=f"The most ads a campaign may have ({ENV_CAMPAIGN_MAX_ADS}; at least 1): its CTRs are written in "
        "one Redis transaction, which holds Redis for every other client while it runs (about 15-50 ms at 10,000 "
        "ads, 200-600 ms at 100,000). Registration refuses more, and so does warming a campaign registered before.",
    )
    max_rewarms_per_tick: int = Field(
        100,
        ge=1,
        description="The most warm campaigns whose values Redis lost that one campaign_launch_sensor tick warms again "
        "(those launched earliest first; the rest on the next ticks, 30 s apart): a flush of a Redis holding "
        "thousands of campaigns asks for a run each, and one tick's thousands of run requests hold the sensor "
        "daemon for minutes.",
    )

    rescore_on_new_model: bool = Field(
        True,
        description="Score warm campaigns again when a new ctr_model is approved (campaign_launch_sensor, within "
        "max_rewarms_per_tick a tick, after the campaigns whose values Redis lost): one warming run per campaign and "
        "model, so their CTRs and budget split come from the current model, not from the one approved when they "
        "were warmed, for as long as they run. Off: each keeps its model until it is warmed again.",
    )

    max_lost_checks_per_tick: int = Field(
        20_000,
        ge=1,
        description="The most warm campaigns whose values in Redis one campaign_launch_sensor tick checks (in turns: "
        "the next tick goes on from the last one checked). About 0.4 s of Redis at 10,000 campaigns of 20 ads on one "
        "server, more on Redis Cluster: a tick over every warm campaign would outgrow the sensor's time.",
    )

    @property
    def warming_horizon(self) -> timedelta:
        return timedelta(hours=self.warming_horizon_hours)

    def registry(self, spec: AdFeatureSpec | None = None) -> CampaignRegistry:
        """The registry; ``spec`` is the ad feature set its ``ads`` returns (the CTR model's, ``LakeResource``'s). No
        URL (the variable unset where the Definitions loaded) fails its user, not every run that has the resource: a
        task run of a kind that never reads the registry needs none."""
        if not self.url:
            raise dg.Failure(description=str(unset_error(ENV_APP_DB, "the application database")), allow_retries=False)
        try:
            registry = CampaignRegistry(self.url, spec=spec, warming_horizon=self.warming_horizon, max_ads=self.max_ads)
        except ValueError as error:  # a setting out of range: a retry would not change it
            raise dg.Failure(description=f"campaign_registry: {error}", allow_retries=False) from None
        with app_db_setting(self.url):
            registry.ensure_schema()
        return registry


class ParquetIOManager(dg.ConfigurableIOManager):
    """One Parquet file per asset partition, in the lake of the lake resource."""

    lake: LakeResource

    @staticmethod
    def _name(key: dg.AssetKey) -> str:
        return "/".join(key.path)

    def handle_output(self, context: dg.OutputContext, obj: pd.DataFrame) -> None:
        partition = context.partition_key if context.has_partition_key else None
        path = self.lake.lake().write(self._name(context.asset_key), partition, obj)
        context.add_output_metadata({"path": dg.MetadataValue.path(path)})

    def load_input(self, context: dg.InputContext) -> pd.DataFrame:
        """The asset's file, or its partitions' files that exist (a window may lack some); none at all, or a file
        that cannot be read, fails the step without retries: running it again would not change the lake."""
        lake, name = self.lake.lake(), self._name(context.asset_key)
        try:
            if not context.has_asset_partitions:
                return lake.read(name)
            keys = context.asset_partition_keys
            frames = [lake.read(name, key) for key in keys if lake.exists(name, key)]
        except (FileNotFoundError, LakeReadError) as error:
            raise dg.Failure(description=str(error), allow_retries=False) from None
        if not frames and keys:
            shown = keys[0] if len(keys) == 1 else f"{keys[0]} to {keys[-1]}"
            raise dg.Failure(
                description=f"the lake has no {name} partition {shown}: materialize {name} for it first",
                allow_retries=False,
            )
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def from_env(variable: str) -> dg.EnvVar | None:
    """``EnvVar(variable)`` when it is set, so the UI shows where the value comes from; otherwise None, and the
    resource raises a clear error when it is used, rather than guessing a location."""
    return dg.EnvVar(variable) if os.environ.get(variable) else None


def ad_feature_fields(environ: dict[str, str] | None = None) -> dict[str, dg.EnvVar]:
    """``LakeResource``'s ad feature fields whose variable is set (blank included: no log-scaling), as ``EnvVar``."""
    env = os.environ if environ is None else environ
    return {field: dg.EnvVar(variable) for field, variable in AD_FEATURE_FIELDS.items() if variable in env}


# The ad feature set the Definitions use in this environment, for code outside Dagster: ``spec_from_env`` of
# ``ml.features`` (no Dagster), under its old name here.
ad_feature_spec_from_env = spec_from_env


def campaign_registry_fields(environ: Mapping[str, str] | None = None) -> dict[str, dg.EnvVar]:
    """``CampaignRegistryResource``'s ``max_ads`` as ``EnvVar`` when its variable is set and not blank, so services
    that register (``max_ads_from_env``) and the Definitions that warm read one cap; a malformed one fails loading
    the Definitions with a ``SettingError`` naming its variable, as a bad setting does."""
    env = os.environ if environ is None else environ
    if not (env.get(ENV_CAMPAIGN_MAX_ADS) or "").strip():
        return {}
    try:
        max_ads_from_env(env)
    except ValueError as error:
        raise SettingError(str(error)) from None
    return {"max_ads": dg.EnvVar.int(ENV_CAMPAIGN_MAX_ADS)}


def build_resources(settings: Settings) -> dict[str, object]:
    """The resources of the Definitions: everything points where the environment says."""
    lake = LakeResource(base_uri=from_env(ENV_LAKE), **ad_feature_fields())
    return {
        "redis": RedisResource(url=dg.EnvVar(ENV_REDIS)),
        "lake": lake,
        "io_manager": ParquetIOManager(lake=lake),
        "model_store": ModelStoreResource(root=from_env(ENV_MODEL_STORE)),
        "app_db": AppDatabaseResource(url=dg.EnvVar(ENV_APP_DB)),
        "documents": DocumentStoreResource(url=dg.EnvVar(ENV_APP_DB)),
        "campaign_registry": CampaignRegistryResource(url=from_env(ENV_APP_DB), **campaign_registry_fields()),
        "deployment": DeploymentResource(timezone=settings.timezone, partitions_start=settings.partitions_start),
        "experiment": ExperimentResource(**experiment_fields()),
    }
