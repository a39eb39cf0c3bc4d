"""What a GPU can do, decided from its compute capability, before any training step runs.

Three decisions the trainer takes once per run, all from `torch.cuda` queries that neither create
tensors nor allocate GPU memory (so `--dry_run` can take them too, and tests can simulate any GPU
by monkeypatching those queries):

- whether the installed torch build has kernels for the GPU (`check_cuda_arch`): a wheel built
  without the device's `sm_XY` fails with "no kernel image" in the middle of the first step;
  `build_to_install` names the build that has them (`python -m bml.doctor` reports the same);
- which autocast precision a `--amp` request gets (`resolve_amp`): bf16 is native from compute
  capability 8.0 (Ampere) on; `torch.cuda.is_bf16_supported()` also answers True on older GPUs,
  where bf16 is emulated and slow, so the capability decides;
- whether TF32 applies (`configure_tf32`): PyTorch lets cuDNN convolutions use TF32 on Ampere and
  newer GPUs by default; `--tf32 off` keeps every fp32 operation in full fp32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bml.utils.distributed import DeviceError

AMP_DTYPES = {"off": None, "fp16": torch.float16, "bf16": torch.bfloat16}
"""The dtype autocast runs in for each `--amp` choice (None: full fp32, autocast off)."""
AMP_CHOICES = tuple(AMP_DTYPES)
BF16_MIN_CAPABILITY = (8, 0)
TF32_MIN_CAPABILITY = (8, 0)
APEX_LEVELS = {"O0": "off", "O1": "fp16", "O2": "fp16"}
INSTALL_HELP = "https://pytorch.org/get-started/locally/"


@dataclass(frozen=True)
class GpuInfo:
    name: str
    capability: tuple[int, int]

    @property
    def arch(self) -> str:
        return f"sm_{self.capability[0]}{self.capability[1]}"

    def as_dict(self) -> dict:
        return {"name": self.name, "capability": f"{self.capability[0]}.{self.capability[1]}"}


def gpu_info(device: torch.device) -> GpuInfo | None:
    """Name and compute capability of a CUDA device; None for any other device."""
    if device.type != "cuda":
        return None
    index = device.index if device.index is not None else 0
    return GpuInfo(torch.cuda.get_device_name(index), tuple(torch.cuda.get_device_capability(index)))


def _arch_number(arch: str) -> tuple[int, int] | None:
    """'sm_86' / 'compute_90' / 'sm_90a' -> (8, 6) / (9, 0) / (9, 0); None for anything else."""
    digits = "".join(ch for ch in arch.split("_", 1)[-1] if ch.isdigit())
    return (int(digits[:-1]), int(digits[-1])) if len(digits) >= 2 else None


def build_runs_on(capability: tuple[int, int], arch_list: list[str]) -> bool:
    """Whether a build with `arch_list` (torch.cuda.get_arch_list()) has kernels for `capability`.

    A cubin for sm_XY runs on devices of the same major version and a minor version >= Y; PTX
    (compute_XY) is compiled on the fly for any device of capability >= X.Y.
    """
    for arch in arch_list:
        number = _arch_number(arch)
        if number is None:
            continue
        if arch.startswith("sm_") and number[0] == capability[0] and number[1] <= capability[1]:
            return True
        if arch.startswith("compute_") and number <= capability:
            return True
    return False


LEGACY_CUDA_INDEX = "https://download.pytorch.org/whl/cu126"
"""PyTorch's CUDA 12.6 wheels: the newest build with kernels for GPUs below compute capability 7.5 (Maxwell,
Pascal, Volta: GTX 9xx/10xx, P100, V100), which CUDA 13 builds (PyPI's default wheel) no longer have."""
LEGACY_BELOW = (7, 5)


def build_to_install(capability: tuple[int, int]) -> str:
    """Which torch build has kernels for a GPU of `capability`, and the command that installs it."""
    if tuple(capability) < LEGACY_BELOW:
        return (f"PyTorch's CUDA 12.6 build, the last with kernels below compute capability 7.5: "
                f"make install TORCH_INDEX={LEGACY_CUDA_INDEX} (README, Install)")
    return (f"a build for a newer CUDA whose torch.cuda.get_arch_list() includes sm_{capability[0]}{capability[1]}: "
            f"PyPI's default wheel (make install TORCH_INDEX=) or one from {INSTALL_HELP}")


def missing_kernels(gpu: GpuInfo) -> str | None:
    """Why this torch build cannot run on `gpu` and what to install instead; None when it has kernels for it."""
    arch_list = list(torch.cuda.get_arch_list())
    if build_runs_on(gpu.capability, arch_list):
        return None
    built = ", ".join(arch_list) or "none"
    return (f"this torch build ({torch.__version__}, CUDA {torch.version.cuda}) has no kernels for the GPU {gpu.name} "
            f"(compute capability {gpu.capability[0]}.{gpu.capability[1]}, {gpu.arch}); it was built for: {built}. "
            f"Install {build_to_install(gpu.capability)}")


def check_cuda_arch(device: torch.device) -> None:
    """Raise DeviceError, before any step runs, when this torch build has no kernels for `device`."""
    gpu = gpu_info(device)
    problem = None if gpu is None else missing_kernels(gpu)
    if problem:
        raise DeviceError(f"{problem}; or train with --device cpu")


def bf16_native(device: torch.device) -> bool:
    """bf16 autocast without emulation: every CPU torch supports, GPUs of compute capability 8.0 and above."""
    gpu = gpu_info(device)
    return gpu is None or gpu.capability >= BF16_MIN_CAPABILITY


def resolve_amp(amp: str | None, amp_opt_level: str | None, device: torch.device) -> tuple[str, list[str]]:
    """(precision, warnings) of a run: --amp, else the original's --amp_opt_level, else fp32 ('off').

    fp32 is the published recipe; mixed precision is only ever an explicit choice. bf16 asked for on a
    GPU without native bf16 (compute capability below 8.0: V100, T4, 2080 Ti) becomes fp16 with the
    gradient scaler, with one warning.
    """
    warnings = []
    if amp is None and amp_opt_level is not None:
        amp = APEX_LEVELS[amp_opt_level]
        if amp_opt_level == "O2":
            warnings.append("--amp_opt_level O2 (Apex's fp16 model with fp32 master weights) has no torch.amp "
                            "equivalent: training with fp16 autocast and fp32 weights (--amp fp16) instead")
    amp = amp or "off"
    if amp == "bf16" and not bf16_native(device):
        gpu = gpu_info(device)
        warnings.append(f"{gpu.name} (compute capability {gpu.capability[0]}.{gpu.capability[1]}) has no native "
                        f"bf16 (it needs 8.0 or newer): training with fp16 autocast and a gradient scaler instead")
        amp = "fp16"
    return amp, warnings


def tf32_active(tf32: str, device: torch.device) -> bool:
    """Whether cuDNN convolutions run in TF32: --tf32 on (PyTorch's default) on a GPU of capability 8.0+."""
    gpu = gpu_info(device)
    return tf32 == "on" and gpu is not None and gpu.capability >= TF32_MIN_CAPABILITY


def configure_tf32(tf32: str) -> None:
    """--tf32 on: PyTorch's default (cuDNN may use TF32, matrix products stay fp32); off: every fp32 operation in fp32.

    Set through the boolean flags: they set cuDNN's convolutions and RNNs together, and the `fp32_precision`
    settings of torch 2.9+ follow them. Setting only the convolutions' fp32_precision leaves cuDNN
    half-configured: reading `torch.backends.cudnn.allow_tf32` (torch.compile's convolution templates do) raises.
    """
    torch.backends.cudnn.allow_tf32 = tf32 == "on"
    torch.backends.cuda.matmul.allow_tf32 = False
