"""The code location test_dagster_yaml's sensor-daemon test loads in process: a sensor whose tick waits until the
test releases it (a slow tick, as a database or a long scan makes one) and a quick one that counts its ticks."""

import threading

import dagster as dg

RELEASE = threading.Event()  # set by the test: the slow tick ends
QUICK_TICKS: list[int] = []  # one entry per tick of quick


@dg.sensor(job_name="nothing", minimum_interval_seconds=1, default_status=dg.DefaultSensorStatus.RUNNING)
def slow(context: dg.SensorEvaluationContext):
    RELEASE.wait(timeout=120)
    return dg.SkipReason("released")


@dg.sensor(job_name="nothing", minimum_interval_seconds=1, default_status=dg.DefaultSensorStatus.RUNNING)
def quick(context: dg.SensorEvaluationContext):
    QUICK_TICKS.append(len(QUICK_TICKS))
    return dg.SkipReason("quick")


@dg.op
def noop() -> None:
    pass


@dg.job
def nothing() -> None:
    noop()


defs = dg.Definitions(jobs=[nothing], sensors=[slow, quick])
