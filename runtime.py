"""
runtime.py -- where a run executes: the device, the numeric precision and the processes (DDP).

train.py asks for one Runtime at the start of pretrain() and finetune() and goes through it for everything
that depends on the machine, so the training loops read the same on a laptop CPU, one GPU or eight:

    rt = runtime.start(device="auto", precision="auto", timeout_s=300)
    model = runtime.wrap(raw_model, rt, compile=False)    # torch.compile and/or DDP; raw_model is kept
    with rt.autocast():                                    # bf16/fp16 on CUDA, a no-op in fp32
        ...
    if rt.is_main: save(...)                               # only rank 0 writes files and prints

What this file holds, in order:
  1. Devices and precision -- select_device (auto: cuda > mps > cpu), select_precision (bf16 autocast on
                              CUDA and on CPUs that compute bf16 natively, fp16 + a gradient scaler where
                              the GPU has no bf16, fp32 elsewhere), precision_note (the choice, in a line).
  2. Processes             -- start() reads the environment torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK,
                              MASTER_ADDR, MASTER_PORT) and joins the process group (gloo on CPU, nccl on
                              CUDA) with a timeout; the Runtime's collectives (barrier, sums, gathers);
                              start_run (a training run's threads, Runtime and batch check); Throughput.
  3. Sharing the work      -- split_batch: the rows of one global batch that this rank computes, in each
                              gradient-accumulation micro-step (training); share: the whole batches this
                              rank scores (evaluation).
  4. Wrapping the model    -- wrap (torch.compile where it can run, DistributedDataParallel), unwrap, no_sync.

Data parallelism in one paragraph. Every process (rank) holds the whole model and the same batch list.
Each optimizer step takes one global batch of --batch-size examples; it is cut into world_size x grad_accum
parts, rank r computes the loss and gradients of its parts, and DistributedDataParallel averages the
gradients over the ranks during the last backward pass (the earlier micro-steps run under no_sync, so they
only accumulate locally). Each part's loss is weighted so that the average is exactly the gradient of the
global batch's mean loss: the result does not depend on the number of processes or micro-steps, up to
floating-point rounding. After the all-reduce every rank holds the same gradients, so every rank takes the
same optimizer step and stays bit-identical to the others without further communication.
"""

import contextlib
import itertools
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel


class DistributedError(RuntimeError):
    """The processes of a distributed run could not reach each other; explained in one line."""


# ---------------------------------------------------------------------------------------------------------
# 1. Devices and precision
# ---------------------------------------------------------------------------------------------------------

DEVICES = ("auto", "cpu", "cuda", "mps")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def mps_available() -> bool:
    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


def select_device(name: str, local_rank: int = 0) -> torch.device:
    """The torch.device for --device: auto picks cuda, else mps, else cpu. Under torchrun each process of a
    machine takes its own GPU, cuda:LOCAL_RANK."""
    if name not in DEVICES:
        raise ValueError(f"--device {name!r} is not known; choose one of {list(DEVICES)}")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if mps_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
            raise ValueError(f"--device cuda: no CUDA GPU is available here (torch {torch.__version__}, {build}); "
                             f"use --device cpu (or auto), or install a CUDA build of torch on a GPU machine")
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPU(s) here; start at "
                             f"most {torch.cuda.device_count()} processes per machine (torchrun --nproc_per_node)")
        return torch.device("cuda", local_rank)
    if name == "mps" and not mps_available():
        raise ValueError("--device mps: Apple's Metal backend is not available here; use --device cpu (or auto)")
    return torch.device(name)


def cpu_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware: AVX512-BF16 (AMD Zen 4 and later, Intel Cooper
    Lake and later) or AMX tiles (Intel Sapphire Rapids and later), as PyTorch's own CPU feature checks see it.

    There oneDNN's bf16 matmuls can run at about twice the fp32 rate (half the bytes per number, twice the
    numbers per vector instruction). Elsewhere (AVX2-only or plain AVX-512 CPUs) oneDNN has to emulate bf16,
    converting to fp32 and back, which gains nothing over fp32 and can be far slower (RESULTS.md says what
    was measured) -- so bf16 is chosen only where the hardware has it.
    """
    cpu = getattr(torch, "cpu", None)
    checks = [getattr(cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(bool(check()) for check in checks if check is not None)


def select_precision(name: str, device: torch.device) -> str:
    """fp32, bf16 or fp16 for --precision on this device.

    auto: bf16 autocast on CUDA GPUs that support it (Ampere and later), else fp16 with a gradient scaler
    (fp16's narrow exponent range lets small gradients underflow to zero unless the loss is scaled up
    first); bf16 autocast on a CPU that computes bf16 natively (cpu_native_bf16); fp32 on other CPUs and on
    MPS. An explicit value is obeyed where it can run at all: bf16 on a CPU without native bf16 runs,
    emulated and slowly (precision_note says so). In every case the weights, the gradients, the optimizer
    state, the adapters' A and B, the gates' parameters and the allocator's scores stay fp32: autocast runs
    the matmuls (and convolutions) in the lower precision and keeps reductions such as softmax, the norms and
    the loss in fp32; the metrics are computed from fp32 copies of the outputs.
    """
    if name not in PRECISIONS:
        raise ValueError(f"--precision {name!r} is not known; choose one of {list(PRECISIONS)}")
    on_cuda = device.type == "cuda"
    if name == "auto":
        if on_cuda:
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "bf16" if device.type == "cpu" and cpu_native_bf16() else "fp32"
    if name == "fp16" and not on_cuda:
        raise ValueError(f"--precision fp16 needs a CUDA device (this run is on {device.type}); "
                         f"use --precision fp32 (or auto)")
    if name == "bf16" and device.type == "mps":
        raise ValueError("--precision bf16 is not supported on mps here; use --precision fp32 (or auto)")
    if name == "bf16" and on_cuda and not torch.cuda.is_bf16_supported():
        raise ValueError("--precision bf16: this GPU has no bf16 support; use --precision fp16 (or auto)")
    return name


def precision_note(asked: str, chosen: str, device: torch.device) -> str:
    """One line saying which precision a run uses and why, printed at the start of every run."""
    how = {"fp32": "fp32", "bf16": "bf16 autocast", "fp16": "fp16 autocast + gradient scaler"}[chosen]
    if device.type != "cpu":
        return f"precision {how} (--precision {asked} on {device.type})"
    isa = torch.backends.cpu.get_cpu_capability()
    native = cpu_native_bf16()
    if chosen == "bf16" and not native:
        return (f"precision bf16 autocast, EMULATED: this CPU ({isa}) has no native bf16 matmul, so bf16 runs many "
                f"times slower than fp32 here; use --precision auto (fp32 on this CPU)")
    why = "this CPU computes bf16 natively" if native else "this CPU has no native bf16"
    return f"precision {how} (--precision {asked}; {why}, {isa})"


# ---------------------------------------------------------------------------------------------------------
# 2. Processes
# ---------------------------------------------------------------------------------------------------------

@dataclass
class Runtime:
    """The device, the precision, and this process's place among the processes of the run."""
    device: torch.device
    precision: str             # fp32 | bf16 | fp16
    rank: int = 0              # this process, 0 .. world_size - 1
    world_size: int = 1        # number of processes (1 = no DDP)

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that writes files and prints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def autocast(self):
        """Mixed-precision context for forward passes (and the loss): a no-op in fp32."""
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def grad_scaler(self) -> torch.amp.GradScaler:
        """A gradient scaler, active only in fp16 (disabled, every call passes straight through)."""
        return torch.amp.GradScaler("cuda", enabled=self.precision == "fp16")

    def print(self, *args, **kwargs):
        if self.is_main:
            print(*args, **kwargs, flush=True)

    # -- collectives: every rank must call them, in the same order -------------------------------------

    def barrier(self):
        if self.distributed:
            dist.barrier()

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum of a list of numbers over the ranks (float64)."""
        if not self.distributed:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self._collective_device())
        dist.all_reduce(t)
        return t.tolist()

    def sum_tensor_(self, t: torch.Tensor) -> torch.Tensor:
        """Sum a tensor over the ranks, in place (e.g. gate statistics counts)."""
        if self.distributed:
            moved = t.to(self._collective_device())
            dist.all_reduce(moved)
            t.copy_(moved)
        return t

    def gather(self, obj) -> list:
        """[obj of rank 0, obj of rank 1, ...] on every rank (any picklable object)."""
        if not self.distributed:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def _collective_device(self) -> torch.device:
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")

    @contextlib.contextmanager
    def main_first(self):
        """Rank 0 runs the block first (e.g. downloads, tokenizes and caches the data); the other ranks run it
        once rank 0 is done, and then find its files in place instead of writing the same files at once."""
        if not self.is_main:
            self.barrier()
        yield
        if self.is_main:
            self.barrier()


def start(device: str = "auto", precision: str = "auto", timeout_s: float = 300) -> Runtime:
    """The Runtime of this process; joins the process group when started by torchrun (WORLD_SIZE > 1).

    The timeout bounds the wait for the other processes, at start-up and in every collective afterwards: a
    process whose peers never come (a wrong MASTER_ADDR, a forgotten node) stops after timeout_s seconds
    with a DistributedError saying so, instead of waiting forever; a peer that dies later makes the next
    collective fail with torch's own timeout error (torchrun also stops the other processes when one
    fails). Calling start() again in the same process (pretrain, then finetune in the main job) reuses the
    process group.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if timeout_s <= 0:
        raise ValueError(f"--dist-timeout must be > 0 seconds, got {timeout_s}")
    dev = select_device(device, local_rank)
    rt = Runtime(dev, select_precision(precision, dev), rank, world_size)
    if world_size > 1 and not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        backend = "nccl" if dev.type == "cuda" else "gloo"
        where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
        try:
            dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
            dist.barrier()                      # every rank is here: the group works
        except (RuntimeError, ValueError) as err:
            detail = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise DistributedError(
                f"rank {rank} of {world_size} could not reach the other processes at {where} within "
                f"--dist-timeout {timeout_s:g} s ({detail}); start all {world_size} processes together "
                f"(torchrun --nproc_per_node={world_size} cli.py ...) and check MASTER_ADDR/MASTER_PORT") from None
    return rt


def finish():
    """Leave the process group (at the end of cli.py's main)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def start_run(system, batch_size: int, threads: int) -> Runtime:
    """A training run's Runtime (system: train.SystemConfig, checked by the caller): its CPU threads (0 =
    PyTorch's default), device, precision and processes, which must be able to share a global batch of
    batch_size rows (world_size x grad_accum parts, at least one row each)."""
    if threads > 0:
        torch.set_num_threads(threads)
    rt = start(system.device, system.precision, system.dist_timeout)
    rt.print(precision_note(system.precision, rt.precision, rt.device))
    parts = rt.world_size * system.grad_accum
    if batch_size < parts:
        raise ValueError(f"--batch-size {batch_size} is the global batch, shared by {rt.world_size} process(es) x "
                         f"--grad-accum {system.grad_accum}; it must be at least {parts}")
    return rt


class Throughput:
    """Tokens per second since the start, for the progress bar."""

    def __init__(self):
        self.t0, self.tokens = time.perf_counter(), 0

    def add(self, n: int) -> float:
        self.tokens += n
        return self.tokens / max(1e-9, time.perf_counter() - self.t0)


# ---------------------------------------------------------------------------------------------------------
# 3. Sharing the work
#
# Every rank builds the same batches (the batchers are deterministic functions of seed and epoch). Training
# cuts each global batch into rows per rank and micro-step (split_batch), so that every rank takes the same
# optimizer steps; evaluation hands out whole batches, every world_size-th one to each rank (share), and the
# results are gathered. These are the only two ways work is divided between processes.
# ---------------------------------------------------------------------------------------------------------

def share(batches: Iterable, rt: "Runtime") -> Iterator:
    """This rank's share of an evaluation pass: batches rt.rank, rt.rank + W, rt.rank + 2W, ... (W processes).
    Together the ranks cover every batch exactly once."""
    return itertools.islice(batches, rt.rank, None, rt.world_size)


def split_batch(n_rows: int, rank: int, world_size: int, grad_accum: int) -> list[tuple[torch.Tensor, float]]:
    """This rank's micro-batches of a global batch of n_rows rows: [(row indices, loss weight)] x grad_accum.

    The rows are cut into world_size x grad_accum contiguous parts; micro-step m of rank r gets part
    m * world_size + r. Part i has n_i rows and a loss that is a mean over them, L_i, so the global batch's
    mean loss is sum_i (n_i / N) L_i. DDP averages the ranks' gradients (it divides their sum by
    world_size), so each part's loss is weighted by w_i = world_size * n_i / N:

        (1 / world_size) * sum over ranks and micro-steps of w_i grad L_i = sum_i (n_i / N) grad L_i.

    A part with no rows (a global batch smaller than world_size x grad_accum, e.g. the last of an epoch)
    gets row 0 with weight 0: the rank still runs a forward and backward pass, because DDP's gradient
    all-reduce needs every rank, but the part adds nothing.
    """
    parts = torch.arange(n_rows).tensor_split(world_size * grad_accum)
    out = []
    for m in range(grad_accum):
        rows = parts[m * world_size + rank]
        if len(rows) == 0:
            out.append((torch.zeros(1, dtype=torch.long), 0.0))
        else:
            out.append((rows, world_size * len(rows) / n_rows))
    return out


# ---------------------------------------------------------------------------------------------------------
# 4. Wrapping the model
# ---------------------------------------------------------------------------------------------------------

def wrap(model: nn.Module, rt: Runtime, compile: bool = False) -> nn.Module:
    """The module the training step calls: DistributedDataParallel around the model when there are several
    processes, then torch.compile around that when asked (the order PyTorch recommends: compiling the DDP
    module lets the compiler split its graphs at DDP's gradient buckets).

    Keep the raw model: it is what gets saved (its state_dict keys carry no 'module.' or '_orig_mod.'
    prefix), evaluated and read by the rank allocator. The wrappers share its parameters.

    forward_sync_buffers=False: DDP would otherwise copy rank 0's buffers (the allocation masks) to every
    rank before each forward pass, which would hide a rank whose masks had diverged. The masks are instead
    computed identically on every rank, from the all-reduced gradients (DDP still copies rank 0's
    parameters and buffers once, when it wraps the model; they are equal then anyway).
    """
    out = model
    if rt.distributed:
        ids = [rt.device.index] if rt.device.type == "cuda" else None
        out = DistributedDataParallel(out, device_ids=ids, forward_sync_buffers=False)
    if compile:
        why_not = compile_unavailable(rt.device)
        if why_not:
            rt.print(f"--compile: torch.compile cannot run here ({why_not}); training eagerly instead")
        else:
            out = torch.compile(out)
    return out


_COMPILE_PROBES: dict = {}


def compile_unavailable(device: torch.device) -> str:
    """'' where torch.compile works on this device, else why not, in a few words.

    torch.compile is lazy: a missing C++ compiler (inductor builds its CPU kernels with one) or an unsupported
    platform shows up only at the first call, in the middle of the first training step. So a tiny function
    with a backward pass is compiled first, once per process and device, and a failure means eager mode.
    """
    key = str(device)
    if key not in _COMPILE_PROBES:
        try:
            x = torch.ones(4, device=device, requires_grad=True)
            torch.compile(lambda t: (t * t).sum())(x).backward()
            _COMPILE_PROBES[key] = ""
        except Exception as err:               # dynamo / inductor errors have no common public base class
            first = (str(err).strip().splitlines() or [""])[0][:120]
            _COMPILE_PROBES[key] = f"{type(err).__name__}: {first}" if first else type(err).__name__
    return _COMPILE_PROBES[key]


def compile_stats() -> dict:
    """torch.compile's work so far in this process: graphs compiled (a new input shape that the compiled code's
    guards reject costs one more, until dynamo marks the varying length dynamic) and the seconds spent
    compiling them. Take the difference of two calls to see one run's share."""
    from torch._dynamo.utils import compilation_time_metrics, counters
    return {"graphs": int(counters["stats"]["unique_graphs"]),
            "compile_s": float(sum(compilation_time_metrics.get("_compile.compile_inner", [])))}


def unwrap(model: nn.Module) -> nn.Module:
    """The raw model inside torch.compile's and DDP's wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):                 # torch.compile's OptimizedModule
            model = model._orig_mod
        elif isinstance(model, DistributedDataParallel):
            model = model.module
        else:
            return model


def no_sync(model: nn.Module):
    """Context in which backward() accumulates gradients without DDP's all-reduce (a no-op without DDP)."""
    inner = model._orig_mod if hasattr(model, "_orig_mod") else model
    return inner.no_sync() if isinstance(inner, DistributedDataParallel) else contextlib.nullcontext()
