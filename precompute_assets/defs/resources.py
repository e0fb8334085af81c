"""ConfigurableResources: where Redis, the offline store and the app database are, from the environment."""

import dagster as dg
import pandas as pd
import redis

from ..docstore import DocumentStore
from ..lake import Lake, default_lake_uri
from ..ml.model_store import LocalModelStore
from ..serving import KeySchema, connect
from ..stack import ENV_APP_DB, ENV_REDIS


class RedisResource(dg.ConfigurableResource):
    """The serving Redis (``PRECOMPUTE_REDIS_URL``: AUTH, ``rediss://`` TLS; ``cluster`` for Redis Cluster)."""

    url: str
    namespace: str = "pc"
    cluster: bool = False
    socket_timeout_s: float = 10.0
    retries: int = 2

    def client(self) -> redis.Redis:
        return connect(self.url, socket_timeout=self.socket_timeout_s, cluster=self.cluster, retries=self.retries)

    def schema(self) -> KeySchema:
        return KeySchema(self.namespace)


class LakeResource(dg.ConfigurableResource):
    """The offline Parquet store for assets that read partitions themselves (a week of hours, say)."""

    base_uri: str | None = None

    def lake(self) -> Lake:
        return Lake(self.base_uri or default_lake_uri())


class ModelStoreResource(dg.ConfigurableResource):
    """Where trained models live (a local folder by default); models are loaded only from here."""

    root: str | None = None

    def store(self) -> LocalModelStore:
        from ..stack import default_home

        return LocalModelStore(self.root or default_home() / "models")


class AppDatabaseResource(dg.ConfigurableResource):
    """Our own tables (``PRECOMPUTE_APP_DB_URL``), beside Dagster's database."""

    url: str


class DocumentStoreResource(dg.ConfigurableResource):
    """The documents table of the application database."""

    url: str
    table: str = "documents"

    def store(self) -> DocumentStore:
        store = DocumentStore(self.url, table=self.table)
        store.ensure_schema()
        return store


class ParquetIOManager(dg.ConfigurableIOManager):
    """One Parquet file per asset partition in the lake (local folder, or an object-store URI)."""

    base_uri: str | None = None

    def _lake(self) -> Lake:
        return Lake(self.base_uri or default_lake_uri())

    @staticmethod
    def _name(key: dg.AssetKey) -> str:
        return "/".join(key.path)

    def handle_output(self, context: dg.OutputContext, obj: pd.DataFrame) -> None:
        partition = context.partition_key if context.has_partition_key else None
        path = self._lake().write(self._name(context.asset_key), partition, obj)
        context.add_output_metadata({"path": dg.MetadataValue.path(path)})

    def load_input(self, context: dg.InputContext) -> pd.DataFrame:
        lake, name = self._lake(), self._name(context.asset_key)
        if not context.has_asset_partitions:
            return lake.read(name)
        frames = [lake.read(name, key) for key in context.asset_partition_keys if lake.exists(name, key)]
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def build_resources() -> dict[str, object]:
    """The resources of the Definitions: everything points where the environment says."""
    return {
        "redis": RedisResource(url=dg.EnvVar(ENV_REDIS)),
        "lake": LakeResource(),
        "model_store": ModelStoreResource(),
        "app_db": AppDatabaseResource(url=dg.EnvVar(ENV_APP_DB)),
        "documents": DocumentStoreResource(url=dg.EnvVar(ENV_APP_DB)),
        "io_manager": ParquetIOManager(),
    }
