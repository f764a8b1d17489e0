"""The results of ``speedrun bench kernels`` (one Row per op / variant / mode / shape) and their reports: the
terminal table, the CSV, one PNG per op."""

from __future__ import annotations

import csv
import io
from dataclasses import asdict, dataclass, fields

from speedrun.bench import kernel_cases as kc
from speedrun.data.shards import atomic_write_bytes


@dataclass
class Row:
    """One line of the CSV: one op / variant / mode / shape."""

    op: str
    variant: str
    mode: str
    shape: str
    size: int
    size_name: str
    recipe: bool
    dtype: str
    status: str  # ok | wrong | error | skipped
    detail: str
    max_error: float | None
    tolerance: float | None
    median_ms: float | None
    p20_ms: float | None
    p80_ms: float | None
    tflops: float | None
    gbps: float | None
    pct_peak_flops: float | None
    pct_peak_bw: float | None
    speedup_vs_torch: float | None
    speedup_vs_compile: float | None
    peak_mem_mib: float | None
    device: str
    torch: str
    triton: str | None
    timestamp: str


def fmt(x, spec) -> str:
    """``x`` formatted with ``spec``, or "-" for a missing value."""
    return "-" if x is None else format(x, spec)


def table(rows: list[Row]) -> str:
    """The terminal table: one line per row."""
    head = (f"{'op':14s} {'shape':18s} {'variant':14s} {'mode':8s} {'status':7s} {'median ms':>10s} "
            f"{'p20-p80 ms':>19s} {'TFLOP/s':>8s} {'GB/s':>8s} {'%peak':>6s} {'x torch':>7s} {'x compile':>9s} "
            f"{'mem MiB':>8s}")
    lines = [head, "-" * len(head)]
    for r in rows:
        pct = r.pct_peak_flops if r.pct_peak_flops is not None else r.pct_peak_bw
        spread = "-" if r.p20_ms is None else f"{r.p20_ms:.3f}-{r.p80_ms:.3f}"
        lines.append(f"{r.op:14s} {r.shape:18s} {r.variant:14s} {r.mode:8s} {r.status:7s} "
                     f"{fmt(r.median_ms, '10.3f')} {spread:>19s} {fmt(r.tflops, '8.1f')} {fmt(r.gbps, '8.1f')} "
                     f"{fmt(pct, '6.1f')} {fmt(r.speedup_vs_torch, '7.2f')} {fmt(r.speedup_vs_compile, '9.2f')} "
                     f"{fmt(r.peak_mem_mib, '8.0f')}")
        if r.detail:
            lines.append(f"{'':14s}   -> {r.detail}")
    return "\n".join(lines)


def to_csv(rows: list[Row]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=[f.name for f in fields(Row)], lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: ("" if v is None else v) for k, v in asdict(r).items()})
    return buf.getvalue()


def plot(rows: list[Row], op: str, path, cpu: bool) -> None:
    """One PNG per op: median time against the main size, one panel per mode, one line per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r.op == op and r.status == "ok" and r.median_ms]
    modes = [m for m in kc.op_modes(op) if any(r.mode == m for r in ok)] or ["fwd"]
    fig, axes = plt.subplots(1, len(modes), figsize=(5 * len(modes), 4), squeeze=False)
    for ax, mode in zip(axes[0], modes, strict=True):
        for variant in dict.fromkeys(r.variant for r in ok):
            pts = sorted((r.size, r.median_ms) for r in ok if r.variant == variant and r.mode == mode)
            if pts:
                ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=variant)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(ok[0].size_name if ok else "size")
        ax.set_ylabel("median time (ms)")
        ax.set_title(f"{op} {mode}")
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    device = rows[0].device if rows else "?"
    note = " (CPU, Triton interpreter: times mean nothing)" if cpu else ""
    fig.suptitle(f"{op} on {device}{note}", fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
