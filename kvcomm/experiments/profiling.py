"""torch.profiler around one call, as text: the kernel table (sorted by device time on CUDA) and the CPU and
device time of the engine's labelled phases (`record_function` ranges named `kvcomm.*`: reuse's match,
assemble and forward; relay's past, choose and forward; the static path's copy-in, forward and append)."""

from __future__ import annotations

ROWS = 40


def call_profiler(device):
    """A torch.profiler context for `device`'s activities (CPU, and CUDA where the model runs on it)."""
    from torch.profiler import ProfilerActivity, profile

    return profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else []))


def phase_lines(prof) -> str:
    """CPU and device time inside the labelled phases of the profiled call."""
    lines = ["phases of the call (ms): CPU total / device total, calls"]
    for e in prof.key_averages():
        if e.key.startswith("kvcomm."):
            device = getattr(e, "device_time_total", getattr(e, "cuda_time_total", 0.0))
            lines.append(f"  {e.key:<26} {e.cpu_time_total / 1e3:8.2f} / {device / 1e3:8.2f}  x{e.count}")
    return "\n".join(lines)


def profile_text(prof, device, title: str) -> str:
    """`title`, the kernel table and the phases."""
    sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    table = prof.key_averages().table(sort_by=sort, row_limit=ROWS, max_name_column_width=60)
    return "\n".join([title, table, phase_lines(prof)])
