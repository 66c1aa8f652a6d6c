"""NVIDIA's management library (NVML) through nvidia-ml-py (`pynvml`): the driver's view of the
GPUs, without torch. Everything here answers "nothing" where there is no NVIDIA driver (CI, a
CPU machine), never an error."""

from __future__ import annotations


def driver():
    """The initialised `pynvml` module, or None without the package or an NVIDIA driver.
    Initialising twice is harmless: NVML counts its users."""
    try:
        import pynvml  # optional: pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return None
    return pynvml


def gpus() -> tuple[list[tuple[str, int | None]], str | None]:
    """([(name, memory MiB) per GPU], driver version); ([], None) without a driver."""
    nvml = driver()
    if nvml is None:
        return [], None
    try:
        version = _text(nvml.nvmlSystemGetDriverVersion())
        found = []
        for index in range(nvml.nvmlDeviceGetCount()):
            try:
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                name = _text(nvml.nvmlDeviceGetName(handle))
            except nvml.NVMLError:
                continue
            try:
                memory = nvml.nvmlDeviceGetMemoryInfo(handle).total // 2**20
            except nvml.NVMLError:
                memory = None
            found.append((name, memory))
        return found, version
    except nvml.NVMLError:
        return [], None
    finally:
        nvml.nvmlShutdown()


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
