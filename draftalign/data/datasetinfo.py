"""`draftalign inspect PATH [--rows N] [--plot FILE.png]`: what a Parquet data set holds, for a terminal.

PATH is a Parquet file or a folder of them, where each directory holding Parquet files is its own data
set (a stage output's ``data/`` and ``errors/`` are reported apart) except Hive ``key=value`` folders,
which belong to the set above them; a top-level ``manifest.json`` is shown briefly. No column is
mandatory. Statistics come from pyarrow.compute over a projected scan, so only token lengths and label
columns are held in memory, never the text. Percentiles interpolate linearly between the closest ranks
(``numpy.percentile``'s default, ``method="linear"``).
"""

from __future__ import annotations

import json
import re
import sys
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from draftalign.errors import DraftalignError

CLIP = 200  # characters shown of a sample string
IDS_SHOWN = 8  # token ids shown of a sample list
TOP_VALUES = 10  # values listed per count column; the rest are summed up
MANIFEST_KEYS = 15  # manifest keys shown; it is a reminder of the run, not the point
# Label columns whose value counts are worth a glance; `source`/`stage` help read error sets.
# kept, kind: self-instructed requests (instructions/): how many were kept, and the mix asked for.
COUNT_COLUMNS = ("schema_version", "finish_reason", "sampling_name", "reason", "stage", "source",
                 "task", "drafter", "engine", "kept", "kind")
_NUM_TOKENS = re.compile(r"^num_(\w+_)?tokens$")


class InspectError(DraftalignError, ValueError):
    """PATH cannot be inspected (missing, no Parquet, not Parquet); the message names it."""


def _find_sets(path: Path) -> dict[str, list[Path]]:
    """Group the Parquet files under PATH into data sets, keyed by folder relative to PATH."""
    if not path.exists():
        raise InspectError(f"{path}: no such file or directory")
    if path.is_file():
        return {path.name: [path]}
    sets: dict[str, list[Path]] = {}
    for f in sorted(path.rglob("*.parquet")):
        # Writers leave _temporary/ and .crc side files around; they are not data.
        if not f.is_file() or any(p.startswith((".", "_")) for p in f.relative_to(path).parts):
            continue
        d = f.parent
        while d != path and "=" in d.name:
            d = d.parent
        sets.setdefault(d.relative_to(path).as_posix(), []).append(f)
    if not sets:
        raise InspectError(f"{path}: no Parquet files in this folder")
    return sets


def _open(files: list[Path], base: Path) -> ds.Dataset:
    """One dataset over FILES whose schema covers every file (writers may add columns over time)."""
    schemas = []
    for f in files:
        try:
            schemas.append(pq.read_schema(f))
        except (pa.ArrowException, OSError) as e:
            raise InspectError(f"{f}: not a Parquet file ({str(e).splitlines()[0]})") from None
    names = [str(f) for f in files]
    found = ds.dataset(names, format="parquet", partitioning="hive", partition_base_dir=str(base))
    try:
        schema = pa.unify_schemas([found.schema, *schemas])
    except pa.ArrowException as e:
        raise InspectError(f"{base}: files disagree on the schema ({str(e).splitlines()[0]})") from None
    return ds.dataset(names, schema=schema, format="parquet", partitioning=found.partitioning,
                      partition_base_dir=str(base))


def _is_label(dtype: pa.DataType) -> bool:
    """Whether value counts of a column of this type make sense (not lists, structs, floats, text blobs)."""
    return any(f(dtype) for f in (pa.types.is_string, pa.types.is_large_string, pa.types.is_integer,
                              pa.types.is_boolean, pa.types.is_dictionary))


def _projection(schema: pa.Schema) -> tuple[dict[str, ds.Expression], dict[str, ds.Expression]]:
    """Expressions for the token-length columns and the label columns to count."""
    lengths, labels = {}, {}
    for f in schema:
        if (f.name.endswith("token_ids") and isinstance(f.type, pa.ListType | pa.LargeListType | pa.FixedSizeListType)
                and pa.types.is_integer(f.type.value_type)):
            lengths[f.name] = pc.list_value_length(pc.field(f.name))
        elif _NUM_TOKENS.match(f.name) and pa.types.is_integer(f.type):
            lengths[f.name] = pc.field(f.name)
        elif f.name in COUNT_COLUMNS and _is_label(f.type):
            labels[f.name] = pc.field(f.name)
        elif (f.name == "sampling" and pa.types.is_struct(f.type)
              and f.type.get_field_index("name") >= 0 and _is_label(f.type.field("name").type)):
            labels["sampling.name"] = pc.field("sampling", "name")
    return lengths, labels


def _stats(values: pa.ChunkedArray) -> dict:
    """count/nulls/mean/p50/p95/min/max of integer values; nulls (missing lists) are left out."""
    present = pc.drop_null(values)
    out = {"count": len(present), "nulls": values.null_count}
    if len(present):
        p50, p95 = pc.quantile(present, q=[0.5, 0.95], interpolation="linear").to_pylist()
        out.update(mean=pc.mean(present).as_py(), p50=p50, p95=p95,
                   min=pc.min(present).as_py(), max=pc.max(present).as_py())
    return out


def _n(count: int, word: str) -> str:
    return f"{count} {word}{'s' * (count != 1)}"


def _clip(text: str, limit: int = CLIP) -> str:
    text = text.replace("\r\n", "⏎").replace("\n", "⏎").replace("\r", "⏎")
    return text if len(text) <= limit else f"{text[:limit]}… (+{len(text) - limit} chars)"


def render(value: object, limit: int = CLIP) -> str:
    """One line for a sample value: clipped strings, id lists as length + first ids, structs as k=v."""
    if value is None:
        return "null"
    if isinstance(value, str):
        return _clip(value, limit) if value else '""'
    if isinstance(value, bytes):
        return _clip(f"<{len(value)} bytes> {value[:limit].decode('utf-8', 'replace')}", limit)
    if isinstance(value, dict):
        return _clip(", ".join(f"{k}={render(v, limit)}" for k, v in value.items()), limit)
    if isinstance(value, list):
        if value and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            more = ", …" if len(value) > IDS_SHOWN else ""
            return f"{len(value)} ids [{', '.join(map(str, value[:IDS_SHOWN]))}{more}]"
        items = " ".join("{" + render(v, limit) + "}" if isinstance(v, dict) else render(v, limit)
                         for v in value)
        return _clip(f"{_n(len(value), 'item')}: {items}" if value else "[] (empty)", limit)
    if isinstance(value, float):
        return f"{value:g}"
    return _clip(str(value), limit)


def _summarize_set(dset: ds.Dataset, files: list[Path], rows: int) -> tuple[dict, dict]:
    """The summary of one data set, plus its raw token lengths (kept out of it) for plotting."""
    length_exprs, label_exprs = _projection(dset.schema)
    chunks: dict[str, list[pa.Array]] = {c: [] for c in length_exprs}
    counts: dict[str, Counter] = {c: Counter() for c in label_exprs}
    exprs = {**length_exprs, **label_exprs}
    # One file at a time: token-id row groups are large, and reading four ahead multiplies peak memory.
    for batch in dset.to_batches(columns=exprs, fragment_readahead=1) if exprs else []:
        for c in chunks:
            chunks[c].append(batch.column(c))
        for c in counts:
            counts[c].update({r["values"]: r["counts"] for r in pc.value_counts(batch.column(c)).to_pylist()})
    # int64 throughout so list lengths (int32) and num_* columns (any int width) plot and sum alike.
    lengths = {c: pa.chunked_array([x.cast(pa.int64()) for x in a], pa.int64()) for c, a in chunks.items()}
    # Samples come file by file, not from Dataset.head(), which reads whole row groups of every file ahead.
    samples: list[dict] = []
    batches = (b for f in files for b in pq.ParquetFile(f).iter_batches(batch_size=max(rows, 1)))
    for batch in batches if rows > 0 else ():
        samples += [{k: render(v) for k, v in r.items()} for r in batch.to_pylist()[: rows - len(samples)]]
        if len(samples) >= rows:
            break
    return {
        "files": len(files), "rows": dset.count_rows(),  # from the footers, no scan
        "schema": [(f.name, str(f.type)) for f in dset.schema],
        "lengths": {c: _stats(v) for c, v in lengths.items()},
        "counts": {c: dict(sorted(n.items(), key=lambda kv: (-kv[1], str(kv[0])))) for c, n in counts.items()},
        "samples": samples,
    }, lengths


def _collect(path: Path, rows: int) -> tuple[dict, dict[str, dict[str, pa.ChunkedArray]]]:
    """summarize()'s result, plus every set's token lengths for plotting."""
    summary: dict = {"path": str(path), "manifest": None, "datasets": {}}
    all_lengths = {}
    for name, files in _find_sets(path).items():
        base = path / name if path.is_dir() else path.parent
        summary["datasets"][name], all_lengths[name] = _summarize_set(_open(files, base), files, rows)
    if path.is_dir() and (path / "manifest.json").is_file():
        try:
            summary["manifest"] = json.loads((path / "manifest.json").read_text())
        except (OSError, ValueError) as e:
            summary["manifest"] = {"error": f"unreadable manifest.json ({e})"}
    return summary, all_lengths


def summarize(path: str | Path, rows: int = 3) -> dict:
    """Everything `inspect` shows, as plain data: {path, manifest, datasets: {name: {...}}}.

    Each data set has files, rows, schema [(column, type)], lengths {column: stats},
    counts {column: {value: rows}} (most frequent first) and samples (rendered strings).
    Raises InspectError when PATH is missing, holds no Parquet, or a file is not Parquet.
    """
    return _collect(Path(path), rows)[0]


def format_summary(summary: dict) -> str:
    """The terminal text for a summary()."""
    lines = [f"draftalign inspect: {summary['path']}"]
    if summary["manifest"] is not None:
        lines.append("manifest.json:")
        items = list(m.items()) if isinstance(m := summary["manifest"], dict) else [("(not an object)", m)]
        lines += [f"  {k}: {v if isinstance(v, str | int | float) else json.dumps(v, default=str)}"[:120]
                  for k, v in items[:MANIFEST_KEYS]]
        lines += [f"  … {len(items) - MANIFEST_KEYS} more keys"] * (len(items) > MANIFEST_KEYS)
    for name, s in summary["datasets"].items():
        lines += ["", f"== {name}: {_n(s['rows'], 'row')} in {_n(s['files'], 'file')} =="]
        width = max(len(c) for c, _ in s["schema"]) if s["schema"] else 0
        lines += ["schema:"] + [f"  {c:<{width}}  {t}" for c, t in s["schema"]]
        versions = s["counts"].get("schema_version", {})
        if versions:
            lines.append("schema_version: " + ", ".join(f"{render(v)} ({_n(n, 'row')})" for v, n in versions.items()))
        if s["rows"] == 0:
            lines.append("0 rows (empty data set)")
            continue
        if s["lengths"]:
            w = max(len(c) for c in s["lengths"])
            lines.append(f"token lengths:\n  {'':<{w}}  {'count':>8} {'mean':>9} {'p50':>9} {'p95':>9} {'max':>8}")
            for c, st in s["lengths"].items():
                nums = (f"{st['mean']:>9.1f} {st['p50']:>9.1f} {st['p95']:>9.1f} {st['max']:>8}"
                        if st["count"] else "       (no values)")
                lines.append(f"  {c:<{w}}  {st['count']:>8} {nums}" + (f"  ({st['nulls']} null)" * bool(st["nulls"])))
        for c, counts in ((c, n) for c, n in s["counts"].items() if c != "schema_version"):
            lines.append(f"{c}:")
            lines += [f"  {n:>8}  {render(v, 100)}" for v, n in list(counts.items())[:TOP_VALUES]]
            rest = list(counts.values())[TOP_VALUES:]
            if rest:
                lines.append(f"  {sum(rest):>8}  … {len(rest)} more values")
        for i, row in enumerate(s["samples"]):
            lines.append(f"sample row {i}:")
            lines += [f"  {c:<{width}}  {v}" for c, v in row.items()]
    return "\n".join(lines) + "\n"


def _plot(all_lengths: dict[str, dict[str, pa.ChunkedArray]], file: str) -> int:
    """Histograms of every non-empty token-length column; returns how many were drawn."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    panels = [(f"{name}: {c}" if name != "." else c, pc.drop_null(v).to_numpy())
              for name, cols in all_lengths.items() for c, v in cols.items() if len(v) - v.null_count]
    if not panels:
        return 0
    ncols, nrows = min(2, len(panels)), -(-len(panels) // 2)
    fig = Figure(figsize=(6 * ncols, 3.5 * nrows), layout="constrained")
    FigureCanvasAgg(fig)  # Agg explicitly, without switching pyplot's global backend
    for i, (title, values) in enumerate(panels):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        ax.hist(values, bins=min(50, int(values.max() - values.min()) + 1))  # no bins finer than 1 token
        ax.set(title=title, xlabel="tokens", ylabel="rows")
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    try:
        fig.savefig(file, format="png")
    except OSError as e:
        raise InspectError(f"{file}: cannot write the plot ({e})") from None
    return len(panels)


def inspect_main(path: str, rows: int = 3, plot: str | None = None, out=sys.stdout) -> int:
    """Print what PATH holds (and plot token lengths to PLOT); 0 on success, 2 on bad input."""
    try:
        summary, all_lengths = _collect(Path(path), rows)
        out.write(format_summary(summary))
        if plot:
            drawn = _plot(all_lengths, plot)
            out.write(f"plot: {_n(drawn, 'histogram')} written to {plot}\n" if drawn
                      else "plot: no token lengths to plot; nothing written\n")
    except (InspectError, pa.ArrowException, OSError) as e:
        # A file that breaks mid-scan (truncated, corrupt pages) is bad input too, not a bug to trace.
        why = str(e) if isinstance(e, InspectError) else f"{path}: cannot read ({str(e).splitlines()[0]})"
        print(f"draftalign inspect: {why}", file=sys.stderr)
        return 2
    return 0
