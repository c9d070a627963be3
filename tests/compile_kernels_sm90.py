"""Compile every Triton kernel in fastdp.kernels ahead of time for H100 (sm_90), down to cubin.

CPU tests only ever run the kernels in triton's interpreter, which accepts code that the
GPU compiler rejects (layouts, tl.dot shapes and dtypes) and never runs ptxas (register
and shared-memory limits). This script runs the real compiler for an sm_90 target, which
needs no GPU: triton ships ptxas.

Kernels are found by scanning the modules of fastdp.kernels for ``@triton.jit`` functions.
Those called from another jit function (helpers such as ``dot_fp32``) are compiled inside
their callers; every other one is a launched kernel and needs an entry in ``KERNELS``
below, or the run fails naming it. Each kernel is compiled as its GPU wrapper launches it
with contiguous inputs: the largest tiles its wrapper picks (or every autotune config of
its ``Launcher``), unit inner strides as compile-time 1 (the JIT specialises them), and
fp32, bf16 and fp16 data (only fp32 when no pointer takes the input dtype).

Usage: python tests/compile_kernels_sm90.py [--jobs N] [--only KERNEL]
Exit status 0: all compiled and fit an H100; 1: failures (listed); 77: cannot compile
here (no CUDA backend or no ptxas), with the reason on the last line.
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile

# Before triton is imported: the interpreter must be off (kernels/_triton_utils.py patches
# it when on), every compile must run ptxas (a fresh cache) and log its resource usage.
os.environ.pop("TRITON_INTERPRET", None)
_OWN_CACHE_DIR = not os.environ.get("FASTDP_SM90_CACHE_DIR")  # worker processes inherit the parent's
if _OWN_CACHE_DIR:
    os.environ["FASTDP_SM90_CACHE_DIR"] = tempfile.mkdtemp(prefix="fastdp-sm90-")
    atexit.register(shutil.rmtree, os.environ["FASTDP_SM90_CACHE_DIR"], ignore_errors=True)
os.environ["TRITON_CACHE_DIR"] = os.environ["FASTDP_SM90_CACHE_DIR"]
os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9's default; silences its warning

import argparse  # noqa: E402
import ast  # noqa: E402
import contextlib  # noqa: E402
import importlib  # noqa: E402
import io  # noqa: E402
import itertools  # noqa: E402
import pkgutil  # noqa: E402
import re  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from concurrent.futures import ProcessPoolExecutor  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from multiprocessing import get_context  # noqa: E402
from typing import Callable  # noqa: E402

SKIP_STATUS = 77
#: H100 limits a launch is checked against: opt-in shared memory per block, registers per block.
H100_MAX_SHARED_BYTES = 232448
H100_REGISTERS_PER_BLOCK = 65536
FLOAT_DTYPES = ("fp32", "bf16", "fp16")
DATA = "data"  # a pointer to the input dtype being compiled


@dataclass(frozen=True)
class Spec:
    """How a kernel's GPU wrapper launches it.

    ``variants(module)``: one dict of constexpr values per launch variant, read from the
    module's own constants where they exist (the largest tiles the wrapper can choose).
    A kernel run through a ``Launcher`` is compiled for each variant × autotune config.
    Pointer args are those named ``*_ptr`` (the kernels' convention) or listed in ``pointers``;
    they point to the input dtype unless ``pointers`` says otherwise.
    ``pointers``: pointer args not in the input dtype (``*fp32``, ``*i64``), or a function of
    the variant's constexprs giving that type. ``scalars``: non-pointer args that are not
    ``i32``. ``ones``: args that are 1 for contiguous inputs (inner strides).
    """

    variants: Callable[[object], list[dict[str, object]]]
    pointers: dict[str, object] = field(default_factory=dict)
    scalars: dict[str, str] = field(default_factory=dict)
    ones: tuple[str, ...] = ()


def _conv_shape(m):
    """A 3×3 2d conv on 32×32 outputs, with the largest tiles the wrappers pick."""
    return dict(OUT_H=32, OUT_W=32, KD=1, KH=3, KW=3,
                BLOCK_P=m.MAX_BLOCK_PK, BLOCK_K=m.MAX_BLOCK_PK, BLOCK_T=m.MAX_BLOCK_T)


KERNELS: dict[str, Spec] = {
    "_conv_direct_kernel": Spec(
        variants=lambda m: [dict(_conv_shape(m), STORE_GRAD=store) for store in (False, True)],
        pointers={"out_ptr": lambda c: DATA if c["STORE_GRAD"] else "*fp32"}, ones=("sxw", "sgt")),
    "_conv_ghost_kernel": Spec(variants=lambda m: [_conv_shape(m)], pointers={"out_ptr": "*fp32"}, ones=("sxw", "sgt")),
    "_segment_rows_kernel": Spec(
        variants=lambda m: [dict(STORE_ROWS=rows, SCALED=scaled, BLOCK_N=m.BLOCK_TOKENS, BLOCK_D=m.MAX_BLOCK_D)
                            for rows, scaled in ((False, False), (True, False), (True, True))],
        pointers={"order_ptr": "*i64", "seg_offsets_ptr": "*i64", "seg_keys_ptr": "*i64", "factors_ptr": "*fp32",
                  "sample_ptr": "*i64", "out_ptr": "*fp32"}),
    "_range_sums_kernel": Spec(variants=lambda m: [dict(BLOCK=m.BLOCK_TOKENS)],
                               pointers={"values_ptr": "*fp32", "offsets_ptr": "*i64", "out_ptr": "*fp32"}),
    "_linear_clipped_grad_kernel": Spec(variants=lambda m: [{}], ones=("stride_ad", "stride_gp")),
    "_linear_bias_clipped_grad_kernel": Spec(variants=lambda m: [dict(m._BIAS_BLOCKS)],
                                             pointers={"partials_ptr": "*fp32"}, ones=("stride_gp",)),
    "_linear_direct_norm_kernel": Spec(variants=lambda m: [{}], pointers={"partials_ptr": "*fp32"},
                                       ones=("stride_ad", "stride_gp")),
    "_linear_bias_norm_kernel": Spec(variants=lambda m: [dict(m._BIAS_BLOCKS)], pointers={"partials_ptr": "*fp32"},
                                     ones=("stride_gp",)),
    "_linear_ghost_norm_kernel": Spec(variants=lambda m: [dict(BLOCK_T=m.ghost_block_t(1 << 20))],
                                      pointers={"partials_ptr": "*fp32"}, ones=("stride_ad", "stride_gp")),
    "_goodfellow_norm_kernel": Spec(variants=lambda m: [dict(BLOCK=m._GOODFELLOW_BLOCK)],
                                    pointers={"out_ptr": "*fp32"}, ones=("stride_ad", "stride_gp")),
    "_linear_grad_sample_kernel": Spec(variants=lambda m: [{}], ones=("stride_ad", "stride_gp")),
    "_add_noise_and_scale_kernel": Spec(variants=lambda m: [dict(QUARTER=m._QUARTER)], pointers={"seed_ptr": "*i64"},
                                        scalars={"std": "fp32", "scale": "fp32"}),
    "_scale_kernel": Spec(variants=lambda m: [dict(BLOCK=4 * m._QUARTER)], scalars={"scale": "fp32"}),
    "_norm_stats_kernel": Spec(variants=lambda m: [dict(RMS=rms, BLOCK=m.BLOCK_STATS) for rms in (False, True)],
                               pointers={"mean_ptr": "*fp32", "rstd_ptr": "*fp32"}, scalars={"eps": "fp32"},
                               ones=("sxs",)),
    "_norm_weight_grad_kernel": Spec(variants=lambda m: [dict(BLOCK_R=m.BLOCK_ROWS, BLOCK_C=m.MAX_BLOCK_C)],
                                     pointers={"mean_ptr": "*fp32", "rstd_ptr": "*fp32", "partial_ptr": "*fp32"},
                                     ones=("sxs", "sgs")),
}


@dataclass
class Kernel:
    name: str
    module: object
    fn: object  # the triton JITFunction
    configs: list  # autotune configs of its Launcher, or [None]


def discover():
    """(launched kernels by name, helper names): every jit function defined in fastdp.kernels."""
    import triton

    import fastdp.kernels as package
    from fastdp.kernels._triton_utils import Launcher

    jit_functions = {}
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        for value in vars(module).values():
            if isinstance(value, triton.runtime.JITFunction) and value.fn.__module__ == module.__name__:
                jit_functions[value.fn.__name__] = (module, value)
    called = set()
    for module, fn in jit_functions.values():
        for node in ast.walk(ast.parse(fn.src)):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                    and isinstance(fn.fn.__globals__.get(node.func.id), triton.runtime.JITFunction)):
                called.add(node.func.id)
    kernels = {}
    for name, (module, fn) in jit_functions.items():
        if name in called:
            continue
        launchers = [v for v in vars(module).values() if isinstance(v, Launcher) and getattr(v.kernel, "fn", None) is fn]
        kernels[name] = Kernel(name, module, fn, launchers[0].configs if launchers else [None])
    return kernels, sorted(called & set(jit_functions))


def jobs_for(kernel: Kernel) -> list[tuple[str, int, str]]:
    """(kernel, variant index, dtype) for every compile the kernel needs."""
    spec = KERNELS[kernel.name]
    variants = list(itertools.product(spec.variants(kernel.module), kernel.configs))
    return [(kernel.name, index, dtype) for index, (constexprs, _) in enumerate(variants)
            for dtype in (FLOAT_DTYPES if _takes_float_data(kernel, spec, constexprs) else ("fp32",))]


def _pointer_type(spec: Spec, name: str, constexprs, dtype: str) -> str:
    kind = spec.pointers.get(name, DATA)
    kind = kind(constexprs) if callable(kind) else kind
    return "*" + dtype if kind == DATA else kind


def _takes_float_data(kernel: Kernel, spec: Spec, constexprs) -> bool:
    return any(_pointer_type(spec, n, constexprs, "fp16") == "*fp16" for n in kernel.fn.arg_names
               if n.endswith("_ptr") or n in spec.pointers)


_KERNELS = None


def _load():
    global _KERNELS
    _KERNELS, _ = discover()


def compile_one(job):
    """Compile one (kernel, variant, dtype) for sm_90; returns a result dict (never raises)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    name, index, dtype = job
    kernel = _KERNELS[name]
    spec = KERNELS[name]
    constexprs, config = list(itertools.product(spec.variants(kernel.module), kernel.configs))[index]
    constexprs = dict(constexprs, **(config.kwargs if config else {}))
    options = dict(num_warps=config.num_warps, num_stages=config.num_stages) if config else {}
    result = dict(kernel=name, dtype=dtype, constexprs=constexprs, warps=options.get("num_warps", 4),
                  stages=options.get("num_stages", 3))
    try:
        signature, values, attrs = {}, {}, {}
        for position, param in enumerate(kernel.fn.params):
            arg = param.name
            if param.is_constexpr:
                signature[arg], values[arg] = "constexpr", constexprs[arg]
            elif arg in spec.ones:
                signature[arg], values[arg] = "constexpr", 1
            elif arg.endswith("_ptr") or arg in spec.pointers:
                signature[arg] = _pointer_type(spec, arg, constexprs, dtype)
                attrs[(position,)] = [["tt.divisibility", 16]]  # torch allocations are 16-byte aligned
            else:
                signature[arg] = spec.scalars.get(arg, "i32")
        unknown = set(constexprs) - set(kernel.fn.arg_names)
        if unknown:
            raise ValueError(f"the table gives values for {sorted(unknown)}, which {name} does not take")
        start = time.perf_counter()
        log = io.StringIO()
        with contextlib.redirect_stdout(log):  # TRITON_DUMP_PTXAS_LOG prints ptxas -v here
            compiled = triton.compile(ASTSource(kernel.fn, signature, values, attrs),
                                      target=GPUTarget("cuda", 90, 32), options=options)
        result["seconds"] = time.perf_counter() - start
        if not compiled.asm.get("cubin"):
            raise RuntimeError("no cubin produced")
        result["shared"] = compiled.metadata.shared
        registers = re.search(r"Used (\d+) registers", log.getvalue())
        spills = re.search(r"(\d+) bytes spill stores", log.getvalue())
        result["regs"] = int(registers.group(1)) if registers else None
        result["spills"] = int(spills.group(1)) if spills else None
        problems = []
        if result["shared"] > H100_MAX_SHARED_BYTES:
            problems.append(f"needs {result['shared']} bytes of shared memory, H100 has {H100_MAX_SHARED_BYTES}")
        if result["regs"] and result["regs"] * result["warps"] * 32 > H100_REGISTERS_PER_BLOCK:
            problems.append(f"{result['regs']} registers × {result['warps'] * 32} threads exceed {H100_REGISTERS_PER_BLOCK}")
        if problems:
            result["error"] = "; ".join(problems)
    except Exception:  # noqa: BLE001 - reported, the run fails
        result["error"] = traceback.format_exc()
    return result


def cannot_compile_reason():
    """Why sm_90 cubins cannot be built here (None when they can)."""
    try:
        from triton.backends import backends
    except Exception as error:  # noqa: BLE001
        return f"triton has no backends ({error})"
    if "nvidia" not in backends:
        return "triton has no CUDA backend"
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        try:
            ptxas = get_ptxas(90).path
        except TypeError:  # older triton: get_ptxas() takes no arch
            ptxas = get_ptxas().path
    except Exception as error:  # noqa: BLE001
        return f"triton finds no ptxas ({error})"
    if not ptxas or not os.path.exists(ptxas):
        return "triton finds no ptxas"
    return None


def _describe(result) -> str:
    tiles = ",".join(f"{k}={v}" for k, v in result["constexprs"].items() if k.startswith("BLOCK") or k == "QUARTER")
    flags = ",".join(f"{k}={v}" for k, v in result["constexprs"].items() if isinstance(v, bool))
    return (f"{result['kernel']:34s} {result['dtype']:5s} {tiles + (' ' + flags if flags else ''):56s} "
            f"w{result['warps']} s{result['stages']}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="parallel compile processes")
    parser.add_argument("--only", action="append", help="compile only this kernel (repeatable)")
    args = parser.parse_args(argv)

    reason = cannot_compile_reason()
    if reason:
        print(f"SKIP: {reason}")
        return SKIP_STATUS
    kernels, helpers = discover()
    missing = sorted(set(kernels) - set(KERNELS))
    if missing:
        print(f"FAIL: no entry in KERNELS (tests/compile_kernels_sm90.py) for the triton kernel(s) {missing}: "
              "add how their wrapper launches them (constexpr values, non-data pointer types)")
        return 1
    stale = sorted(set(KERNELS) - set(kernels))
    if stale:
        print(f"FAIL: KERNELS names {stale}, which are no kernels in fastdp.kernels any more: remove them")
        return 1
    selected = [kernels[name] for name in sorted(kernels) if not args.only or name in args.only]
    jobs = [job for kernel in selected for job in jobs_for(kernel)]
    print(f"compiling {len(jobs)} variants of {len(selected)} kernels for sm_90 "
          f"(helpers compiled inside them: {', '.join(helpers)})", flush=True)
    start = time.perf_counter()
    if args.jobs > 1:
        with ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn"), initializer=_load) as pool:
            results = list(pool.map(compile_one, jobs))
    else:
        _load()
        results = [compile_one(job) for job in jobs]
    failures = [r for r in results if "error" in r]
    print(f"{'kernel':34s} {'dtype':5s} {'tiles / flags':56s} {'':5s}  regs spill  shared  seconds")
    for r in results:
        if "error" in r:
            print(f"{_describe(r)}  FAILED")
        else:
            print(f"{_describe(r)}  {r['regs']!s:>4} {r['spills']!s:>5} {r['shared']:7d}  {r['seconds']:6.2f}")
    for r in failures:
        print(f"\nFAILED {_describe(r)}:\n{r['error']}")
    print(f"\n{len(results) - len(failures)}/{len(results)} compiled in {time.perf_counter() - start:.1f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
