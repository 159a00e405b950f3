"""TensorBoard hook for fusedopt statistics.

`log_stats` takes any writer with `add_scalar(tag, value, step)`, so
`torch.utils.tensorboard.SummaryWriter` works and tensorboard itself stays optional.
"""
from __future__ import annotations


def log_stats(writer, stats, step: int, prefix: str = "") -> None:
    """Write one step's statistics as scalars.

    stats: a `fusedopt.StepStats` (converted with one sync through `to_dict()`) or the dict that
    `to_dict()` returns. Tags are `global/<name>` and `<field>/<tensor name>`: TensorBoard groups
    by the part before the first slash, so each field gets one section comparing all tensors.
    prefix, if given, is put in front of every tag (e.g. "adamc/") to keep runs apart in one
    writer.
    """
    record = stats.to_dict() if hasattr(stats, "to_dict") else stats
    for name, value in record["global"].items():
        writer.add_scalar(f"{prefix}global/{name}", float(value), step)
    for tensor, fields in record["tensors"].items():
        for name, value in fields.items():
            writer.add_scalar(f"{prefix}{name}/{tensor}", float(value), step)
