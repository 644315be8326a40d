"""Read back what the trackers wrote: TensorBoard event files and an MLflow file store."""

import struct
from pathlib import Path


def tensorboard_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} from every event file under `folder` (TFRecord framing:
    length u64, its CRC u32, the Event proto, its CRC u32)."""
    from tensorboardX.proto import event_pb2

    out: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(Path(folder).rglob("events.out.tfevents.*")):
        data, i = path.read_bytes(), 0
        while i < len(data):
            (n,) = struct.unpack("<Q", data[i:i + 8])
            event = event_pb2.Event()
            event.ParseFromString(data[i + 12:i + 12 + n])
            i += 12 + n + 4
            for v in event.summary.value:
                if v.HasField("simple_value"):
                    out.setdefault(v.tag, []).append((event.step, v.simple_value))
    return out


def mlflow_runs(uri: str, experiment: str) -> dict[str, dict]:
    """{run name: {"params": {...}, "metrics": {key: [(step, value), ...]}}} of one experiment."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    runs = {}
    for run in client.search_runs([exp.experiment_id]):
        history = {key: sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
                   for key in run.data.metrics}
        runs[run.info.run_name] = {"params": run.data.params, "metrics": history}
    return runs
