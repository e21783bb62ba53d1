"""Ahead-of-time compile of every Triton launch the host code can choose, for GPUs this machine may not have.

The interpreter (``TRITON_INTERPRET=1``) checks what a kernel computes, not whether a GPU compiler accepts it,
nor what it costs in registers, spills and shared memory. Triton compiles for a target it does not run on,
down to PTX and cubin with its bundled ``ptxas``; this module does that for every configuration the launchers
pick over a documented grid of shapes (:data:`GRID`), and reports each compiled variant's resources.

How the configurations are found (never a copied list): each op's Triton launcher runs as in production, on
``meta`` tensors, inside :func:`skillkern.ops.dispatch.capturing`, which makes the host code size its tiles
and grids for a GPU of the target's SM count and records the launches instead of running them. Each launch
is then bound with Triton's own binder (the argument specialisation a launch on a GPU does: integers equal to
1 or divisible by 16, 16-byte aligned pointers) and compiled for sm_80 and sm_90.

The gate (``python -m skillkern.ops.aot --check``, run by tests/test_compile_gate.py) fails on a compile
error, on shared memory above the per-block limit of the target, and on any register spill in a
configuration that ``schedule="auto"`` (or the op's only schedule) chooses. ``benchmarks/kernel_resources.py``
writes the table to ``benchmarks/results/kernel_resources.csv``.

Must run with compiled (not interpreted) kernels: unset ``TRITON_INTERPRET`` (the test does so in a child
process).
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch

from . import dispatch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GPU:
    """A compile target: compute capability, SM count (the host code sizes grids by it) and the largest
    dynamic shared memory one block may use (the opt-in limit, in bytes)."""

    name: str
    capability: int
    sms: int
    smem_limit: int


TARGETS = (GPU("A100", 80, 108, 166_912), GPU("H100", 90, 132, 232_448))

#: (hidden, FFN width) of real models; each is compiled plain and gated
SHAPES = {"bert-base": (768, 3072), "roberta-large": (1024, 4096), "llama-7b": (4096, 11008),
          "llama-70b": (8192, 28672)}
#: the grid: rows 1 to 16k (odd counts too: Triton specialises integers divisible by 16), kept neurons from one
#: to all, one and eight index sets, the three input dtypes, every activation and statistics mode
GRID = dict(
    rows=(1, 7, 16, 33, 64, 100, 512, 1024, 4096, 16384),
    kept=("1", "2%", "10%", "50%", "all"),
    sets=(1, 8),
    dtypes=(torch.float32, torch.float16, torch.bfloat16),
    gated=(False, True),
    acts=("gelu", "gelu_tanh", "relu", "silu"),
    modes=("none", "sums", "counts", "moments"),
    schedules=("auto", "fused", "two_pass"),
)


def _kept(spec: str, width: int) -> int:
    if spec == "all":
        return width
    if spec.endswith("%"):
        return max(1, int(width * float(spec[:-1]) / 100))
    return int(spec)


def _meta(*shape, dtype=torch.float32) -> torch.Tensor:
    return torch.empty(*shape, dtype=dtype, device="meta")


@dataclass
class Case:
    """One host-level call of an op over the grid, with the launches it issued."""

    op: str
    params: dict
    auto: bool  # the configuration the default schedule picks (spills fail the gate only there)
    launches: list = field(default_factory=list)


def cases(gpu: GPU, grid: dict = GRID, shapes: dict = SHAPES) -> Iterator[Case]:
    """Every grid point of every op, run through its Triton launcher in capture mode for ``gpu``.

    The activation reaches the kernels only as their ``ACT`` constexpr, so each launcher runs once per grid
    point with the first activation and the launches of the others are those with ``ACT`` replaced; at the
    first row count of the grid every activation is run for real and must agree (an AssertionError otherwise).
    """
    with dispatch.capturing(gpu.sms) as launches:
        for (name, (hidden, width)), gated, dtype, rows in itertools.product(
                shapes.items(), grid["gated"], grid["dtypes"], grid["rows"]):
            point = dict(shape=name, hidden=hidden, width=width, rows=rows, dtype=str(dtype).split(".")[-1],
                         gated=gated)
            yield from _ffn_cases(launches, grid, point, dtype)
        yield from _stats_update_cases(launches, grid, shapes)


def _captured(launches: list, fn, args, kwargs) -> list:
    """The launches ``fn(*args, **kwargs)`` issues (``launches``: the list :func:`dispatch.capturing` fills)."""
    launches.clear()
    fn(*args, **kwargs)
    return list(launches)


def _per_act(launches: list, acts: Sequence[str], op: str, params: dict, auto: bool, fn, args, kwargs,
             verify: bool) -> Iterator[Case]:
    """One case per activation of ``acts`` from one captured call (see :func:`cases`); ``verify`` runs every
    activation for real and checks that its launches are the derived ones."""
    from .activations import act_id

    first = _captured(launches, fn, args, dict(kwargs, act=acts[0]))
    for act in acts:
        derived = [dispatch.Launch(l.kernel, l.grid, l.args, dict(l.kwargs, ACT=act_id(act)) if "ACT" in
                                   l.kwargs else l.kwargs) for l in first]
        if verify and act != acts[0]:
            real = _captured(launches, fn, args, dict(kwargs, act=act))
            assert [(l.kernel, l.grid, l.kwargs) for l in real] == \
                [(l.kernel, l.grid, l.kwargs) for l in derived], f"{op} {params}: act {act} launches differ"
        yield Case(op, dict(params, act=act), auto, derived)


def _ffn_cases(launches: list, grid: dict, point: dict, dtype: torch.dtype) -> Iterator[Case]:
    """The ffn_stats and masked_ffn cases of one (shape, gated, dtype, rows) grid ``point``."""
    from .ffn_stats import ffn_stats_triton
    from .masked_ffn import masked_ffn_triton

    rows, hidden, width, gated = point["rows"], point["hidden"], point["width"], point["gated"]
    verify = rows == grid["rows"][0]
    x = _meta(rows, hidden, dtype=dtype)
    w1 = _meta(width, hidden, dtype=dtype)
    wg = _meta(width, hidden, dtype=dtype) if gated else None
    b1 = None if gated else _meta(width, dtype=dtype)  # gated MLPs (Llama) have no biases
    slot = label = _meta(rows, dtype=torch.int64)
    for mode in grid["modes"]:
        out = thr = None
        if mode == "moments":
            out = _meta(4, 3, width, dtype=torch.float64)
        elif mode != "none":
            out = _meta(4, 2, width, dtype=torch.float64 if mode == "sums" else torch.int64)
            thr = _meta(4, width, dtype=torch.float64) if mode == "counts" else None
        yield from _per_act(launches, grid["acts"], "ffn_stats", dict(point, mode=mode), True, ffn_stats_triton,
                            (x, w1, b1), dict(w_gate=wg, slot=slot, label=label, out=out, threshold=thr, mode=mode),
                            verify)
    w2 = _meta(width, hidden, dtype=dtype).t()  # stored transposed (the prune path's layout)
    b2 = None if gated else _meta(hidden, dtype=dtype)
    for kept_spec, sets, schedule in itertools.product(grid["kept"], grid["sets"], grid["schedules"]):
        kept = _kept(kept_spec, width)
        if sets == 1:
            keep = None if kept_spec == "all" else _meta(kept, dtype=torch.int64)
            row_set = None
        else:
            keep = _meta(sets, kept, dtype=torch.int64)
            row_set = _meta(rows, dtype=torch.int64)
        params = dict(point, kept=kept, sets=sets, schedule=schedule)
        yield from _per_act(launches, grid["acts"], "masked_ffn", params, schedule == "auto", masked_ffn_triton,
                            (x, w1, b1, w2, b2, keep), dict(w_gate=wg, row_set=row_set, schedule=schedule), verify)


def _stats_update_cases(launches: list, grid: dict, shapes: dict) -> Iterator[Case]:
    """stats_update (h of any float dtype, float64 too; both passes) and stats_moments (its kernel's moments mode)."""
    from .stats_moments import stats_moments_triton
    from .stats_update import stats_update_triton

    for rows, width, dtype, mode in itertools.product(
            grid["rows"], sorted({w for _, w in shapes.values()}),
            grid["dtypes"] + (torch.float64,), ("sums", "counts", "moments")):
        if mode not in grid["modes"]:
            continue
        h = _meta(rows, width, dtype=dtype)
        idx = _meta(rows, dtype=torch.int64)
        params = dict(rows=rows, width=width, dtype=str(dtype).split(".")[-1], mode=mode)
        if mode == "moments":
            out = _meta(4, 3, width, dtype=torch.float64)
            yield Case("stats_moments", params, True, _captured(launches, stats_moments_triton, (h, idx, out), {}))
            continue
        out = _meta(4, 2, width, dtype=torch.float64 if mode == "sums" else torch.int64)
        thr = _meta(4, width, dtype=torch.float64) if mode == "counts" else None
        yield Case("stats_update", params, True, _captured(launches, stats_update_triton, (h, idx, idx, out, thr), {}))


# ------------------------------------------------------------------------------------------------ binding
@dataclass(frozen=True)
class Variant:
    """One compiled kernel variant: what Triton's launch would compile for these arguments."""

    kernel: str  # module:qualname
    signature: str  # JSON
    constexprs: str  # JSON
    attrs: str  # JSON
    options: str  # JSON

    @property
    def key(self) -> str:
        blob = "|".join((self.kernel, self.signature, self.constexprs, self.attrs, self.options))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def config(self) -> str:
        """Short human-readable configuration: the constexprs and launch options."""
        cons = json.loads(self.constexprs)
        opts = json.loads(self.options)
        parts = [f"{k}={v}" for k, v in cons.items()]
        parts += [f"{k}={opts[k]}" for k in ("num_warps", "num_stages") if k in opts]
        return " ".join(parts)


def _jsonable(v):
    if isinstance(v, (bool, int, float, str)) or v is None:
        return v
    if hasattr(v, "value"):  # tl.constexpr
        return _jsonable(v.value)
    return str(v)


_BINDERS: dict = {}


def bind(launch: dispatch.Launch, gpu: GPU) -> Variant:
    """Triton's own argument specialisation of ``launch`` for ``gpu`` (as ``kernel[grid](...)`` would do)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    kernel = launch.kernel
    target = GPUTarget("cuda", gpu.capability, 32)
    key = (id(kernel), gpu.capability)
    if key not in _BINDERS:
        backend = make_backend(target)
        _BINDERS[key] = (backend, create_function_from_signature(kernel.signature, kernel.params, backend))
    backend, binder = _BINDERS[key]
    kwargs = dict(launch.kwargs)
    bound, specialization, options = binder(*launch.args, **kwargs)
    opts, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    names = list(bound)
    cons = {names[k[0]]: _jsonable(v) for k, v in constexprs.items() if len(k) == 1}
    attr = {names[k[0]]: v for k, v in attrs.items() if len(k) == 1 and v}
    launch_opts = {k: v for k, v in kwargs.items() if k not in names}
    return Variant(f"{kernel.fn.__module__}:{kernel.fn.__qualname__}", json.dumps(signature, sort_keys=True),
                   json.dumps(cons, sort_keys=True), json.dumps(attr, sort_keys=True),
                   json.dumps(launch_opts, sort_keys=True))


# ---------------------------------------------------------------------------------------------- compiling
def _kernel(path: str):
    import importlib

    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)


def _ptxas(capability: int) -> str:
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        return get_ptxas(capability).path
    except Exception:  # other triton layouts: the bundled binary
        import triton
        return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas")


def _arch(capability: int) -> str:
    try:
        from triton.backends.nvidia.compiler import sm_arch_from_capability
        return sm_arch_from_capability(capability)
    except Exception:
        return f"sm_{capability}a" if capability >= 90 else f"sm_{capability}"


_PTXAS_RE = {
    "registers": re.compile(r"Used (\d+) registers"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
    "stack": re.compile(r"(\d+) bytes stack frame"),
}


def ptxas_resources(ptx: str, capability: int) -> dict:
    """Registers, spill bytes and stack frame of ``ptx`` as ``ptxas -v`` reports them (Triton's ptxas, Triton
    3.9's flags); the fallback when Triton's own ptxas log cannot be read."""
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        cmd = [_ptxas(capability), "-v", "-lineinfo", "--regAllocOptLevel=2", f"--gpu-name={_arch(capability)}",
               str(src), "-o", str(Path(tmp) / "k.cubin")]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode and "regAllocOptLevel" in done.stderr:  # an older ptxas without the flag
            cmd.remove("--regAllocOptLevel=2")
            done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"ptxas -v failed: {done.stderr.strip()[-500:]}")
    return _parse_ptxas(done.stdout + done.stderr)


def tensor_core_family(ptx: str) -> str:
    if "wgmma.mma_async" in ptx:
        return "wgmma"
    if re.search(r"\bmma\.sync\b", ptx):
        return "mma"
    return "none"


def _triton_version() -> str:
    import triton
    return triton.__version__


def source_key(kernel_path: str) -> str:
    """Triton's hash of a kernel's source and of every jit function it calls (its own cache key), shortened."""
    return _kernel(kernel_path).cache_key[:16]


class _PtxasLog:
    """Stands in for the ``subprocess`` module inside Triton's NVIDIA compiler while one kernel compiles, to
    read the ``ptxas -v`` log Triton writes and deletes: the registers and spills of exactly the cubin Triton
    made, with that Triton version's own ptxas flags."""

    def __init__(self, real):
        self._real = real
        self.logs: list[str] = []

    def __getattr__(self, name):
        return getattr(self._real, name)

    def run(self, cmd, *args, **kwargs):
        done = self._real.run(cmd, *args, **kwargs)
        err = kwargs.get("stderr")
        if "ptxas" in Path(str(cmd[0])).name and hasattr(err, "name"):
            try:
                self.logs.append(Path(err.name).read_text())
            except OSError:
                pass
        return done


def _parse_ptxas(log: str) -> dict:
    return {k: int(m.group(1)) if (m := r.search(log)) else 0 for k, r in _PTXAS_RE.items()}


def compile_variant(item: tuple[Variant, int]) -> dict:
    """Compile one variant for one capability (no Triton cache: ptxas must run); returns its resources, or
    the compile error."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    variant, capability = item
    kernel = _kernel(variant.kernel)
    names = list(kernel.arg_names)
    constexprs = {(names.index(k),): v for k, v in json.loads(variant.constexprs).items()}
    attrs = {(names.index(k),): v for k, v in json.loads(variant.attrs).items()}
    result = dict(error="")
    try:
        import triton.backends.nvidia.compiler as nv
    except ImportError:  # pragma: no cover - a triton without the NVIDIA backend
        nv = None
    spy = _PtxasLog(subprocess)
    before = os.environ.get("TRITON_CACHE_DIR")
    with tempfile.TemporaryDirectory() as cache:
        os.environ["TRITON_CACHE_DIR"] = cache
        if nv is not None and getattr(nv, "subprocess", None) is subprocess:
            nv.subprocess = spy
        try:
            k = triton.compile(ASTSource(kernel, json.loads(variant.signature), constexprs, attrs),
                               target=GPUTarget("cuda", capability, 32), options=json.loads(variant.options))
            ptx = k.asm["ptx"]
            res = _parse_ptxas(spy.logs[-1]) if spy.logs else ptxas_resources(ptx, capability)
            result.update(registers=res["registers"], spill_bytes=res["spill_stores"] + res["spill_loads"],
                          shared_bytes=int(k.metadata.shared), tensor_cores=tensor_core_family(ptx))
        except Exception as err:  # a compile error is a result: the gate reports it
            result["error"] = f"{type(err).__name__}: {' '.join(str(err).split())[:400]}"
        finally:
            if nv is not None:
                nv.subprocess = subprocess
            if before is None:
                os.environ.pop("TRITON_CACHE_DIR", None)
            else:
                os.environ["TRITON_CACHE_DIR"] = before
    return result


#: the resource table's columns; (triton, target, source, variant) is the key
COLUMNS = ("triton", "target", "kernel", "source", "variant", "config", "registers", "spill_bytes",
           "shared_bytes", "smem_limit", "tensor_cores", "auto", "cases", "example", "error")
RESULT_COLUMNS = ("registers", "spill_bytes", "shared_bytes", "tensor_cores", "error")


def row_key(row: dict) -> tuple:
    return (row["triton"], row["target"], row["source"], row["variant"])


def enumerate_variants(grid: dict = GRID, shapes: dict = SHAPES, targets=TARGETS) -> dict[tuple, dict]:
    """Every variant the launchers choose over the grid, per target: ``{key: row without results}``."""
    version = _triton_version()
    found: dict[tuple, dict] = {}
    sources: dict[str, str] = {}
    for gpu in targets:
        for case in cases(gpu, grid, shapes):
            for launch in case.launches:
                v = bind(launch, gpu)
                src = sources.setdefault(v.kernel, source_key(v.kernel))
                row = dict(triton=version, target=f"sm_{gpu.capability}", kernel=v.kernel.split(":")[1],
                           source=src, variant=v.key, config=v.config(), smem_limit=gpu.smem_limit)
                info = found.setdefault(row_key(row), dict(row, auto=False, cases=0, example="",
                                                           _variant=v, _capability=gpu.capability))
                info["auto"] = info["auto"] or case.auto
                info["cases"] += 1
                if not info["example"] or (case.auto and not info["_example_auto"]):
                    info["example"] = json.dumps(dict(op=case.op, **case.params), sort_keys=True)
                info["_example_auto"] = info.get("_example_auto", False) or case.auto
    logger.info("%d variants (%d grid-point launches) for %s", len(found), sum(i["cases"] for i in found.values()),
                ", ".join(g.name for g in targets))
    return found


def compile_rows(rows: list[dict], jobs: Optional[int] = None) -> None:
    """Compile ``rows`` (from :func:`enumerate_variants`) in ``jobs`` processes, filling their results."""
    if not rows:
        return
    work = [(r["_variant"], r["_capability"]) for r in rows]
    jobs = max(1, min(len(work), jobs or os.cpu_count() or 1))
    logger.info("compiling %d variants in %d process(es)", len(work), jobs)
    if jobs > 1:
        with ProcessPoolExecutor(jobs) as pool:
            results = list(pool.map(compile_variant, work, chunksize=1))
    else:
        results = [compile_variant(w) for w in work]
    for row, res in zip(rows, results):
        row.update({k: res.get(k, "") for k in RESULT_COLUMNS})


def read_table(path: Path) -> dict[tuple, dict]:
    """The committed resource table (also the gate's cache), keyed by (triton, target, source, variant)."""
    import csv

    if not path.is_file():
        return {}
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        for k in ("registers", "spill_bytes", "shared_bytes", "smem_limit", "cases"):
            r[k] = int(r[k]) if r[k] not in ("", None) else -1
        r["auto"] = r["auto"] == "True"
    return {row_key(r): r for r in rows}


def write_table(path: Path, rows: list[dict]) -> None:
    import csv

    from ..files import atomic_write

    rows = sorted(rows, key=lambda r: (r["triton"], r["kernel"], r["target"], r["config"], r["variant"]))

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f, lineterminator="\n")
            w.writerow(COLUMNS)
            for r in rows:
                w.writerow([r.get(k, "") for k in COLUMNS])

    atomic_write(path, write)  # temporary file, fsync, rename (and the folder fsync'ed)


def failures(rows: list[dict]) -> list[str]:
    """What fails the gate: compile errors, shared memory above the block limit, spills where auto chooses."""
    bad = []
    for r in rows:
        where = f"{r['kernel']} [{r['config']}] on {r['target']} (e.g. {r['example']})"
        if r["error"]:
            bad.append(f"compile error: {where}: {r['error']}")
        elif int(r["shared_bytes"]) > int(r["smem_limit"]):
            bad.append(f"shared memory {r['shared_bytes']} B > {r['smem_limit']} B: {where}")
        elif r["auto"] and int(r["spill_bytes"]):
            bad.append(f"register spills ({r['spill_bytes']} B, {r['registers']} registers) in a configuration "
                       f"auto chooses: {where}")
    return bad


def spot_check_sample(rows: list[dict], n: int) -> list[dict]:
    """The cached rows to compile again: per (kernel, target) the auto row with the most registers, then
    a deterministic spread over the rest, ``n`` in all."""
    by = {}
    for r in rows:
        k = (r["kernel"], r["target"])
        if r["auto"] and (k not in by or r["registers"] > by[k]["registers"]):
            by[k] = r
    sample = list(by.values())[:n]
    rest = sorted((r for r in rows if r not in sample), key=lambda r: r["variant"])
    step = max(1, len(rest) // max(1, n - len(sample)))
    sample += rest[::step][:max(0, n - len(sample))]
    return sample


DEFAULT_TABLE = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "kernel_resources.csv"


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m skillkern.ops.aot", description=__doc__.split("\n\n")[0])
    p.add_argument("--table", default=str(DEFAULT_TABLE), help="the resource table (read as the cache; "
                   "rewritten with --write)")
    p.add_argument("--check", action="store_true",
                   help="the gate: compile what the table lacks and a sample of what it has; exit 1 on a failure")
    p.add_argument("--write", action="store_true", help="compile what the table lacks and rewrite it")
    p.add_argument("--spot-check", type=int, default=12, metavar="N",
                   help="--check: compile N cached variants again and require the table's numbers (default 12)")
    p.add_argument("--jobs", type=int, default=None, help="compile processes (default: one per CPU)")
    p.add_argument("--quick", action="store_true", help="one activation, the BERT-base and Llama-7B shapes")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    grid, shapes = GRID, SHAPES
    if args.quick:
        grid = dict(GRID, acts=("gelu",))
        shapes = {k: SHAPES[k] for k in ("bert-base", "llama-7b")}
    table_path = Path(args.table)
    table = read_table(table_path)
    current = enumerate_variants(grid, shapes)
    missing = [r for k, r in current.items() if k not in table]
    cached = [r for k, r in current.items() if k in table]
    for r in cached:
        r.update({k: table[row_key(r)][k] for k in RESULT_COLUMNS})
    print(f"triton {_triton_version()}: {len(current)} variants over the grid, {len(cached)} in {table_path.name}, "
          f"{len(missing)} to compile")
    compile_rows(missing, args.jobs)
    bad = []
    if args.check and args.spot_check and cached:
        sample = [dict(r) for r in spot_check_sample(cached, args.spot_check)]
        compile_rows(sample, args.jobs)
        for r in sample:
            want = table[row_key(r)]
            diff = {k: (want[k], r[k]) for k in RESULT_COLUMNS if str(want[k]) != str(r[k])}
            if diff:
                bad.append(f"{table_path.name} is out of date for {r['kernel']} [{r['config']}] on {r['target']}: "
                           f"(table, compiled) = {diff}; rerun benchmarks/kernel_resources.py")
        print(f"spot check: {len(sample)} cached variants compiled again, {len(bad)} differ from the table")
    rows = list(current.values())
    bad += failures(rows)
    if args.write:
        version = _triton_version()
        others = [r for r in table.values() if r["triton"] != version]
        write_table(table_path, others + rows)
        print(f"wrote {table_path} ({len(rows)} rows for triton {version}, {len(others)} for other versions)")
    spills = [r for r in rows if int(r["spill_bytes"] or 0)]
    print(f"{len(rows)} variants for {', '.join(f'sm_{g.capability}' for g in TARGETS)}: "
          f"{sum(not r['error'] for r in rows)} compile, {len(spills)} spill "
          f"({sum(1 for r in spills if r['auto'])} of them chosen by auto), "
          f"max shared memory {max((int(r['shared_bytes']) for r in rows), default=0)} B")
    for line in bad:
        print("FAIL " + line)
    return 1 if (args.check and bad) else 0


if __name__ == "__main__":
    sys.exit(main())
