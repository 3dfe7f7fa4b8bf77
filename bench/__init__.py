"""Benchmarks: `python -m bench` (make bench) and the modules bench_*.py, each runnable on its own."""


def peak_rss_mb() -> float:
    """This process's peak resident memory in MB: ``VmHWM`` of /proc/self/status, the high-water mark of the
    process's own address space (``getrusage``'s ``ru_maxrss`` keeps the parent's resident size at the fork of a
    subprocess, so a benchmark's child started from a large parent would report the parent's memory)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
