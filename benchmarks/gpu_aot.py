"""The decode step's GPU program without a GPU: XLA:GPU compiles it for an H100 or H200 on this
CPU host (a deviceless compile), and the kernels one decode step launches are read off the
compiled HLO.

Why: a GPU is lent to a development session only now and then, for minutes. The compiled
program is the same one the GPU would run: on the 2026-12-04 H200 the profiled
``unrolled_cache`` step launched 348 kernels a step (347 fusions, a memset, a rare memcpy);
this host's compile of the same variant has 347 fusions in its loop body. What the compile does
not do here is autotune: gemm tilings, split-K and Triton against cuBLAS are XLA's defaults,
not what a GPU's autotuner picks, so kernel counts carry over, a gemm's partial sums (bytes)
may not, and times do not.

``--tpu v5e`` (``v4``, ``v5p``, ``v6e``; needs the ``tpu`` extra, libtpu) compiles the same
programs for the first chip of the generation's smallest slice with the TPU compiler, and the
reader applies the TPU's rules: arrays in the core's VMEM (``S(1)``) move no HBM bytes,
asynchronous copies and slices read their source once, nested fusions read what they slice,
trip counts come from the loops' conditions, dots written as convolutions count their FLOPs as
XLA's cost analysis does, a Pallas kernel moves what its cost estimate states (an in-place one
writes no result of its own); no launch floor (docs/scaleout.md).

What it reports, per decode variant (those of ``benchmarks/gpu.py``'s decode stage) and for
the sampler's own decode loops (``Sampler.generate``'s compiled rollout, plain decode; and one
step of each of its ingest loops, ``ingest_loops``: an observation chunk of every row):
  * kernels per decode step, by kind (gemm fusions, other fusions by XLA's name, copies,
    custom calls such as the Pallas kernel);
  * bytes per step the kernels move (each kernel's operands and result, counting only the
    slice a kernel reads of a buffer it slices and only the update it writes into a buffer
    it updates in place), and what the gemms write (float32 here: split-K partial sums,
    the gate/up product, the logits);
  * ``bound_ms``: every kernel at the chip's full HBM bandwidth (or its dense bf16 peak for
    dots, whichever is slower) but no faster than ``--floor-us`` (2.0 us: the smallest
    kernels of the H200 profile), summed: a floor for the step, not a prediction. Against it,
    the issue's goal: 60% of the HBM roofline (weights and the KV cache read once).

Needs a JAX with the CUDA plugin (no GPU, no driver): the ``gpu`` extra in its own environment,

    python3 -m venv .venv-gpu && .venv-gpu/bin/pip install -e '.[gpu]'
    .venv-gpu/bin/python benchmarks/gpu_aot.py --quick      # tiny model, < 1 minute
    .venv-gpu/bin/python benchmarks/gpu_aot.py --gpu h200   # the 0.5B decode at batch 256

The HLO reading (`loop_kernels`, `kernel_traffic`) is plain Python and tested on CPU
(tests/test_gpu_aot.py). The last output line is one JSON object.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import math
import os
import re
import sys
import time

GPUS = ("h100", "h200")  # dgpo_jax.launch.plan.GPU_KINDS (imported with JAX, in main)
TPUS = ("v4", "v5e", "v5p", "v6e")  # dgpo_jax.launch.plan.TPU_KINDS
# the smallest slice libtpu describes of each (its first chip is compiled for)
_TPU_SLICES = {"v4": "tpu:v4-8", "v5e": "tpu:v5e-4", "v5p": "tpu:v5p-8", "v6e": "tpu:v6e-4"}


# ------------------------------------------------------------------------ reading the HLO ---
_DTYPE_BYTES = {
    "pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1,
    "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
    "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16,
}  # fmt: skip
_ARRAY = re.compile(r"\b([a-z]+[0-9]*[a-z0-9]*)\[([0-9,]*)\]")
# an array with its layout, whose memory space (``S(1)``: a TPU's on-chip VMEM) says where it is
_ARRAY_LAYOUT = re.compile(r"\b([a-z]+[0-9]*[a-z0-9]*)\[([0-9,]*)\](\{[^}]*\})?")
_INSTR = re.compile(r"^(?:ROOT )?%(\S+) = (.+?) ([a-z][\w-]*)\((.*)$")
_NOT_KERNELS = {
    "parameter", "get-tuple-element", "tuple", "bitcast", "constant", "after-all",
    "partition-id", "replica-id", "opt-barrier", "add-dependency", "domain",
}  # fmt: skip


def shape_bytes(shape: str) -> int:
    """HBM bytes of an HLO shape: an array ``bf16[256,896]{1,0}`` or a tuple of them. An array
    in another memory space (its layout ends ``S(1)``: where the TPU compiler placed it in the
    core's VMEM; ``S(2)``: its semaphores) is on chip and counts nothing."""
    total = 0.0
    for dtype, dims, layout in _ARRAY_LAYOUT.findall(shape):
        if dtype in _DTYPE_BYTES and not re.search(r"S\([1-9]\d*\)\}$", layout):
            total += _DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
    return int(total)


@dataclasses.dataclass
class Instr:
    name: str
    shape: str
    op: str
    operands: list[str]
    attrs: str  # everything after the operand list

    def attr(self, key: str) -> str | None:
        match = re.search(rf"\b{key}=%?([\w.\-]+)", self.attrs)
        return match.group(1) if match else None


@dataclasses.dataclass
class Module:
    """A compiled module's text, read: computations (name -> instructions by name, in order),
    each computation's ROOT, and the entry computation's name."""

    comps: dict[str, dict[str, Instr]]
    roots: dict[str, str]
    entry: str | None


def _split_operands(rest: str) -> tuple[list[str], str]:
    """``%a, %b), calls=%c`` -> (["a", "b"], "calls=%c"): the operand names up to the list's
    closing parenthesis, then the attributes."""
    depth, end = 1, len(rest)
    for index, ch in enumerate(rest):
        depth += ch == "("
        depth -= ch == ")"
        if depth == 0:
            end = index
            break
    return re.findall(r"%([\w.\-]+)", rest[:end]), rest[end + 1 :]


def parse_hlo(text: str) -> Module:
    """Reads a compiled module's text (``compiled.as_text()``)."""
    module = Module({}, {}, None)
    current = None
    for line in text.splitlines():
        head = re.match(r"^(ENTRY )?%(\S+) .*\{$", line)
        if head:
            current = head.group(2)
            module.comps[current] = {}
            if head.group(1):
                module.entry = current
            continue
        if line.startswith("}"):
            current = None
            continue
        match = _INSTR.match(line.strip()) if current else None
        if match:
            operands, attrs = _split_operands(match.group(4))
            if match.group(3) in ("constant", "parameter"):  # the literal: ["24"], ["0"]
                operands = [match.group(4).split(")")[0].strip()]
            name = match.group(1)
            module.comps[current][name] = Instr(
                name, match.group(2), match.group(3), operands, attrs
            )
            if line.strip().startswith("ROOT "):
                module.roots[current] = name
    return module


def _trip_count(instr: Instr, module: Module | None = None, where: str = "") -> int | None:
    """A while loop's trip count: XLA:GPU's ``known_trip_count``, else (the TPU compiler
    states none) read off the loop ``instr`` of computation ``where`` of ``module``: ``i < N``
    in its condition, ``i`` a tuple element that starts at a constant and that the body adds
    a constant 1 to."""
    match = re.search(r'known_trip_count"?:\{"n":"(\d+)"', instr.attrs)
    if match:
        return int(match.group(1))
    if module is None or where not in module.comps:
        return None
    return _counted_trips(module, module.comps[where], instr)


def _const(comp: dict[str, Instr], name: str) -> int | None:
    """The integer constant ``name`` is, through copies and bitcasts (else None)."""
    instr = comp.get(name)
    while instr is not None and instr.op in ("copy", "bitcast") and instr.operands:
        instr = comp.get(instr.operands[0])
    if instr is None or instr.op != "constant" or not instr.operands:
        return None
    return int(instr.operands[0]) if re.fullmatch(r"-?\d+", instr.operands[0]) else None


def _element(comp: dict[str, Instr], name: str) -> int | None:
    """The tuple index ``name`` reads of the computation's parameter (through copies)."""
    instr = comp.get(name)
    while instr is not None and instr.op == "copy" and instr.operands:
        instr = comp.get(instr.operands[0])
    if instr is None or instr.op != "get-tuple-element":
        return None
    if comp.get(instr.operands[0]) is None or comp[instr.operands[0]].op != "parameter":
        return None
    index = re.search(r"\bindex=(\d+)", instr.attrs)
    return int(index.group(1)) if index else None


def _counted_trips(module: Module, where: dict[str, Instr], loop: Instr) -> int | None:
    cond_name, body_name = loop.attr("condition"), loop.attr("body")
    cond, body = module.comps.get(cond_name), module.comps.get(body_name)
    if cond is None or body is None:
        return None
    test = cond[module.roots[cond_name]]
    if test.op != "compare" or "direction=LT" not in test.attrs:
        return None
    index, bound = _element(cond, test.operands[0]), _const(cond, test.operands[1])
    init = where.get(loop.operands[0]) if loop.operands else None
    step = body[module.roots[body_name]]
    if index is None or bound is None or init is None or init.op != "tuple":
        return None
    start = _const(where, init.operands[index])
    if step.op != "tuple" or start is None:
        return None
    add = body.get(step.operands[index])
    if add is None or add.op != "add" or len(add.operands) != 2:
        return None
    counter, one = sorted(add.operands, key=lambda o: _const(body, o) is not None)
    if _element(body, counter) != index or _const(body, one) != 1:
        return None
    return max(bound - start, 0)


def _users(comp: dict[str, Instr]) -> dict[str, list[Instr]]:
    users = collections.defaultdict(list)
    for instr in comp.values():
        for operand in instr.operands:
            users[operand].append(instr)
    return users


# Ops through which a fused kernel reads of its input what it needs of the output: an element
# per element (a reduce reads its reduced dimensions whole for each element it produces).
_PASS_THROUGH = {"bitcast", "convert", "copy", "reshape", "negate", "reduce"}


def _read_share(comp: dict[str, Instr], users, name: str, module: Module | None = None) -> float:
    """The share of the fused value ``name`` a kernel reads: through element-for-element ops
    and reduces, only the slices a (dynamic-)slice or gather takes of it, nothing of the buffer
    a scatter or dynamic-update-slice updates in place, else all of it; through a fusion
    nested in the kernel (the TPU compiler's), what that one reads of it. (XLA:GPU fuses a
    split-K gemm's partial-sum reduce into consumers that slice its result, e.g. the K and V of
    a merged q/k/v gemm: they read their slice of the partial sums, not all of them.)"""
    if not users.get(name):
        return 1.0  # the fusion's result
    share = 0.0
    for user in users[name]:
        nested = module.comps.get(user.attr("calls")) if module and user.op == "fusion" else None
        if nested is not None:
            params = {i.operands[0]: i.name for i in nested.values() if i.op == "parameter"}
            inner = _users(nested)
            for position, operand in enumerate(user.operands):
                if operand == name:
                    share += _read_share(nested, inner, params[str(position)], module)
        elif user.op in _PASS_THROUGH and not user.shape.startswith("("):
            if user.op == "reduce" and name not in user.operands[: len(user.operands) // 2]:
                return 1.0  # the reduce's initial value
            share += _read_share(comp, users, user.name, module)
        elif user.op in ("slice", "dynamic-slice", "gather") and user.operands[0] == name:
            share += math.prod(_dims(user.shape)) / max(math.prod(_dims(comp[name].shape)), 1)
        elif user.op in ("scatter", "dynamic-update-slice") and user.operands[0] == name:
            continue
        else:
            return 1.0
        if share >= 1.0:
            return 1.0
    return share


def _read_bytes(comp: dict[str, Instr], users, name: str, module: Module | None = None) -> int:
    """Bytes a fused computation reads of its value ``name`` (see ``_read_share``)."""
    return int(round(_read_share(comp, users, name, module) * shape_bytes(comp[name].shape)))


def _written_bytes(comp: dict[str, Instr], root: Instr) -> int:
    """Bytes a fused computation writes: its result, or only the update of an in-place
    scatter / dynamic-update-slice (per element of a tuple result)."""
    if root.op == "tuple":
        return sum(_written_bytes(comp, comp[o]) for o in root.operands if o in comp)
    if root.op == "bitcast" and root.operands[0] in comp:
        return _written_bytes(comp, comp[root.operands[0]])
    if root.op == "dynamic-update-slice":
        return shape_bytes(comp[root.operands[1]].shape)
    if root.op == "scatter":  # operands: n buffers, the indices, n updates
        n = (len(root.operands) - 1) // 2
        return sum(shape_bytes(comp[u].shape) for u in root.operands[n + 1 :] if u in comp)
    return shape_bytes(root.shape)


def _dims(shape: str) -> list[int]:
    match = _ARRAY.search(shape)
    return [int(d) for d in match.group(2).split(",") if d] if match else []


def _window(attrs: str, key: str, count: int, default: int) -> list[int]:
    """One field of a convolution's ``window={size=1x14 pad=0_0x13_13 ...}``, per spatial dim."""
    window = re.search(r"window=\{([^}]*)\}", attrs)
    match = re.search(rf"\b{key}=([\d_x]+)", window.group(1)) if window else None
    if not match:
        return [default] * count
    if key == "pad":
        return [int(p.split("_")[0]) for p in match.group(1).split("x")]
    return [int(v) for v in match.group(1).split("x")]


def _conv_flops(comp: dict[str, Instr], instr: Instr) -> float:
    """2 x multiply-adds of a convolution of ``comp``, as XLA's cost analysis counts them: each
    result element's input features (the kernel's ``i`` dim) times the window positions that
    fall on a real input element (not padding nor a dilation hole). The TPU compiler writes
    every dot as one (a batch or head dim becomes a padded or dilated window), so this is how
    a TPU program's matmul FLOPs are read."""
    labels = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", instr.attrs)
    if not labels or len(instr.operands) < 2 or instr.operands[1] not in comp:
        return 0.0
    lhs_labels, rhs_labels, out_labels = labels.groups()
    lhs = _dims(comp[instr.operands[0]].shape) if instr.operands[0] in comp else []
    rhs, out = _dims(comp[instr.operands[1]].shape), _dims(instr.shape)
    spatial = sorted(c for c in out_labels if c.isdigit())
    if not lhs or len(lhs) != len(lhs_labels) or len(out) != len(out_labels):
        return 0.0
    n = len(spatial)
    size = _window(instr.attrs, "size", n, 1)
    stride = _window(instr.attrs, "stride", n, 1)
    pad = _window(instr.attrs, "pad", n, 0)
    lhs_dilate = _window(instr.attrs, "lhs_dilate", n, 1)
    rhs_dilate = _window(instr.attrs, "rhs_dilate", n, 1)
    macs = float(out[out_labels.index("b")] * out[out_labels.index("f")])
    macs *= rhs[rhs_labels.index("i")]
    for d, label in enumerate(spatial):
        width = (lhs[lhs_labels.index(label)] - 1) * lhs_dilate[d]  # last real input position
        hits = 0
        for o in range(out[out_labels.index(label)]):
            for k in range(size[d]):
                at = o * stride[d] + k * rhs_dilate[d] - pad[d]
                hits += 0 <= at <= width and at % lhs_dilate[d] == 0
        macs *= hits
    return 2.0 * macs


def _one_dot_flops(comp: dict[str, Instr], instr: Instr) -> float:
    """2 x result elements x contracted elements of ``instr`` (0 unless a dot or a convolution
    of ``comp``)."""
    if instr.op == "convolution":
        return _conv_flops(comp, instr)
    match = re.search(r"lhs_contracting_dims=\{([0-9,]*)\}", instr.attrs)
    if instr.op != "dot" or instr.operands[0] not in comp or not match:
        return 0.0
    lhs = _dims(comp[instr.operands[0]].shape)
    contracted = math.prod(lhs[int(i)] for i in match.group(1).split(",") if i)
    return 2.0 * math.prod(_dims(instr.shape)) * contracted


def _dot_flops(comp: dict[str, Instr]) -> float:
    """The FLOPs of every dot of a (fused) computation."""
    return sum(_one_dot_flops(comp, instr) for instr in comp.values())


@dataclasses.dataclass
class Kernel:
    name: str
    kind: str  # "gemm", "copy", "custom-call:<target>", else the fusion's name stem or the op
    bytes_read: int
    bytes_written: int
    flops: float
    times: int  # launches per iteration of the loop read (nested loops multiply)
    op_name: str = ""
    shape: str = ""  # the result's HLO shape
    config: str = ""  # a gemm's kernel: cuBLAS, or a Triton tiling (``gemm_config``)

    @property
    def bytes(self) -> int:
        return self.bytes_read + self.bytes_written


def kernel_traffic(module: Module, comp: str, instr: Instr) -> tuple[int, int, float]:
    """(bytes read, bytes written, dot FLOPs) of one kernel-launching instruction of ``comp``."""
    called = instr.attr("calls")
    if instr.op in ("fusion", "fusion-start") and called in module.comps:
        fused = module.comps[called]
        users = _users(fused)
        read = sum(
            _read_bytes(fused, users, i.name, module) for i in fused.values() if i.op == "parameter"
        )
        written = _written_bytes(fused, fused[module.roots[called]])
        flops = _dot_flops(fused)  # a gemm fusion's dot may sit one computation deeper
        for i in fused.values():
            if i.op == "fusion" and i.attr("calls") in module.comps:
                flops += _dot_flops(module.comps[i.attr("calls")])
        return read, written, flops
    where = module.comps[comp]
    if instr.op in ("copy-start", "slice-start"):  # the TPU's asynchronous copies
        # copy-start: (destination, source, context); slice-start: ((source), slice, context)
        arrays = _ARRAY_LAYOUT.findall(instr.shape)
        source, target = (arrays[1], arrays[0]) if instr.op == "copy-start" else arrays[:2]
        moved = shape_bytes("{}[{}]".format(*target[:2]))  # the elements copied
        hbm = [shape_bytes("{}[{}]{}".format(*array)) > 0 for array in (source, target)]
        return moved * hbm[0], moved * hbm[1], 0.0
    stated = _COST_BYTES.search(instr.attrs) if instr.op == "custom-call" else None
    if stated:  # a Pallas kernel's own cost estimate: what its blocks move, not its operands
        total = int(stated.group(1))
        flops = _COST_FLOPS.search(instr.attrs)
        flops = float(flops.group(1)) if flops else 0.0
        written = min(_own_output_bytes(instr), total)  # (an in-place one: its blocks only)
        return total - written, written, flops
    read = sum(shape_bytes(where[o].shape) for o in instr.operands if o in where)
    if _kind(instr) == "gemm":  # a cuBLAS call: (result, workspace); the workspace stays put
        result = _ARRAY.search(instr.shape)
        return read, shape_bytes(result.group(0)) if result else 0, _cublas_flops(where, instr)
    if instr.op in ("dynamic-update-slice", "scatter"):  # in place: the update in and out
        update = read - shape_bytes(where[instr.operands[0]].shape)
        return update, update, 0.0
    if instr.op == "custom-call":  # (a GPU Pallas kernel: no cost estimate reaches its config)
        return read, _own_output_bytes(instr), 0.0
    return read, shape_bytes(instr.shape), _one_dot_flops(where, instr)


# Outputs a custom call updates in place: ``output_to_operand_aliasing={{0}: (9, {}), ...}``
# (the output index of each aliased entry of a tuple result; ``{}`` for a single result).
_ALIASED_OUTPUTS = re.compile(r"\{(\d*)\}: \(\d+, \{\}\)")


def _own_output_bytes(instr: Instr) -> int:
    """The bytes a custom call writes as results of its own: its outputs less those it updates
    in place (aliased to an operand, whose writes are its blocks', not the whole array's)."""
    aliased = _ALIASED_OUTPUTS.findall(instr.attrs)
    outputs = [shape_bytes(m.group(0)) for m in _ARRAY.finditer(instr.shape)]
    return sum(b for i, b in enumerate(outputs) if str(i) not in aliased and "" not in aliased)


# A Pallas TPU kernel's backend config carries the cost estimate its author gave (`pallas_call`'s
# ``cost_estimate``): operands such as the whole stacked KV cache are not what it reads.
_COST_BYTES = re.compile(r'"cost_estimate":\{[^}]*"bytes_accessed":"?(\d+)')
_COST_FLOPS = re.compile(r'"cost_estimate":\{[^}]*"flops":"?(\d+)')


def _cublas_flops(comp: dict[str, Instr], instr: Instr) -> float:
    """2 x result elements x contracted elements of a cuBLAS gemm call (its backend config
    names the contracted dimensions of its first operand)."""
    match = re.search(r'"lhs_contracting_dimensions":\[([^\]]*)\]', instr.attrs)
    result = _ARRAY.search(instr.shape)
    if not match or not result or instr.operands[0] not in comp:
        return 0.0
    lhs = _dims(comp[instr.operands[0]].shape)
    contracted = math.prod(lhs[int(i)] for i in re.findall(r"\d+", match.group(1)))
    return 2.0 * math.prod(_dims(result.group(0))) * contracted


def _kind(instr: Instr) -> str:
    if instr.op == "custom-call":
        target = re.search(r'custom_call_target="([^"]+)"', instr.attrs)
        target = target.group(1) if target else "?"
        # cuBLAS gemms (__cublas$gemm, __cublas$lt$matmul) are gemms like XLA's gemm fusions
        return "gemm" if target.startswith("__cublas$") else f"custom-call:{target}"
    if instr.op == "fusion-start":  # an asynchronous fusion, by what it runs
        return "async_" + re.sub(r"([._]\d+|\.clone)+$", "", instr.attr("calls") or "fusion")
    if instr.op != "fusion":
        return instr.op
    stem = re.sub(r"[._]\d+$", "", instr.name)
    return "gemm" if stem.startswith(("gemm_fusion", "cublas")) else stem


def gemm_config(instr: Instr) -> str:
    """How a gemm runs, from its backend config: ``cublas``, or ``triton`` with its output
    tile (``triton 1x8x16 w2``: XLA:GPU's block-level config) or its block sizes and split-K
    (``triton 64x64x32 k4``: the older gemm config). What autotuning decides shows here."""
    if instr.op == "custom-call":
        return "cublas"
    tiles = re.search(r'"output_tiles":\[\{"sizes":\[([^\]]*)\]', instr.attrs)
    warps = re.search(r'"num_warps":"?(\d+)', instr.attrs)
    if tiles:
        sizes = "x".join(re.findall(r"\d+", tiles.group(1)))
        return f"triton {sizes}" + (f" w{warps.group(1)}" if warps else "")
    blocks = [re.search(rf'"{k}":"?(\d+)', instr.attrs) for k in ("block_m", "block_n", "block_k")]
    split = re.search(r'"split_k":"?(\d+)', instr.attrs)
    if all(blocks):
        return (
            "triton "
            + "x".join(b.group(1) for b in blocks)
            + (f" k{split.group(1)}" if split else "")
        )
    return "triton"


def loop_kernels(text: str | Module, body: str | None = None) -> tuple[list[Kernel], dict]:
    """The kernels one iteration of a loop launches: ``body`` (a while body's name; default:
    the body of the entry computation's first while) and, recursively, what it runs (nested
    while bodies and conditions times their known trip count (once when unknown), of a
    conditional the branch that moves the most bytes, called computations). Returns
    (kernels, info: the body, its trip count, the nested loops' trip counts)."""
    module = parse_hlo(text) if isinstance(text, str) else text
    info: dict = {}
    if body is None:
        whiles = [i for i in module.comps.get(module.entry, {}).values() if i.op == "while"]
        if not whiles:
            raise ValueError("no while loop in the entry computation")
        body = whiles[0].attr("body")
        info["trip_count"] = _trip_count(whiles[0], module, module.entry)
    kernels: list[Kernel] = []

    def walk(name: str, times: int, out: list[Kernel]):
        for instr in module.comps[name].values():
            if instr.op in _NOT_KERNELS or instr.op.endswith("-done"):  # a -start launched it
                continue
            if instr.op == "while":
                trips = _trip_count(instr, module, name)
                info.setdefault("nested_loops", []).append(trips)
                walk(instr.attr("body"), times * (trips or 1), out)
                walk(instr.attr("condition"), times * (trips or 1), out)
                continue
            if instr.op == "conditional":  # one branch runs: the one moving the most bytes
                branches = re.search(r"branch_computations=\{([^}]*)\}", instr.attrs)
                names = re.findall(r"%([\w.\-]+)", branches.group(1)) if branches else []
                names += [instr.attr(k) for k in ("true_computation", "false_computation")]
                taken: list[list[Kernel]] = []
                for branch in filter(None, names):
                    taken.append([])
                    walk(branch, times, taken[-1])
                out += max(taken, key=lambda ks: sum(k.times * k.bytes for k in ks), default=[])
                continue
            if instr.op == "call" and instr.attr("to_apply") in module.comps:
                walk(instr.attr("to_apply"), times, out)
                continue
            read, written, flops = kernel_traffic(module, name, instr)
            op_name = re.search(r'op_name="([^"]*)"', instr.attrs)
            op_name = op_name.group(1) if op_name else ""
            kernel = Kernel(instr.name, _kind(instr), read, written, flops, times, op_name)
            config = gemm_config(instr) if kernel.kind == "gemm" else ""
            out.append(dataclasses.replace(kernel, shape=instr.shape, config=config))

    walk(body, 1, kernels)
    info["body"] = body
    return kernels, info


def decode_loops(module: Module, tokens: str = "one") -> dict[str, str]:
    """The while loops (name -> body) that decode one token a row: every embedding in them
    (an instruction of the body or of what it calls, fused ones included, whose op name has
    ``Qwen2.embed``) is ``[B, 1, D]``. ``tokens="chunk"``: the ingest loops instead, which
    embed ``[M, C, D]`` with C > 1 (XLA:GPU also gathers their ``[M x C, 1, D]`` rows) and hold
    no decode loop (the rollout's loop around both does)."""
    found = {}  # loop -> (body, embedding shapes, computations it reaches)
    for comp in module.comps.values():
        for instr in comp.values():
            if instr.op != "while":
                continue
            seen, todo, shapes = set(), [instr.attr("body")], []
            while todo:
                name = todo.pop()
                if name in seen or name not in module.comps:
                    continue
                seen.add(name)
                for inner in module.comps[name].values():
                    todo += [inner.attr(k) for k in ("calls", "to_apply", "body", "condition")]
                    branches = re.search(r"branch_computations=\{([^}]*)\}", inner.attrs)
                    todo += re.findall(r"%([\w.\-]+)", branches.group(1)) if branches else []
                    if "Qwen2.embed" in inner.attrs and len(_dims(inner.shape)) == 3:
                        shapes.append(_dims(inner.shape))
            if shapes:
                found[instr.name] = (instr.attr("body"), shapes, seen)
    decode = {k: v[0] for k, v in found.items() if all(d[1] == 1 for d in v[1])}
    if tokens == "one":
        return decode
    return {
        k: body
        for k, (body, shapes, reach) in found.items()
        if any(d[1] > 1 for d in shapes) and not reach & set(decode.values())
    }


def summarize(
    kernels: list[Kernel], hbm_bytes_s: float, floor_us: float, peak_flops: float
) -> dict:
    """Per iteration: kernels (by kind), bytes moved, copies, and ``bound_ms``: each kernel
    at the HBM bandwidth or the bf16 peak (``peak_flops``), whichever is slower, and no faster
    than ``floor_us``, summed."""
    kinds = collections.Counter()
    configs = collections.Counter()  # launches of each gemm kernel configuration
    bound, at_floor = 0.0, 0
    for k in kernels:
        kinds[k.kind] += k.times
        if k.kind == "gemm":
            configs[k.config] += k.times
        t = max(floor_us * 1e-6, k.bytes / hbm_bytes_s, k.flops / peak_flops)
        at_floor += k.times * (t == floor_us * 1e-6)
        bound += k.times * t
    return {
        "kernels": sum(k.times for k in kernels),
        "by_kind": dict(kinds.most_common()),
        "bytes": sum(k.times * k.bytes for k in kernels),
        "gemm_bytes_written": sum(k.times * k.bytes_written for k in kernels if k.kind == "gemm"),
        "gemm_configs": dict(configs.most_common()),
        "copies": kinds.get("copy", 0),
        "copy_bytes": sum(k.times * k.bytes for k in kernels if k.kind == "copy"),
        "kernels_at_floor": at_floor,
        "bound_ms": round(1000 * bound, 4),
    }


def compile_only_devices(kind: str) -> list:
    """Compile-only devices of ``kind``: one GPU (``h100``/``h200``: XLA's deviceless compile,
    no GPU, no driver), as the memory plan's ``plan.target=gpu:KIND-1`` has it, or the chips
    of the smallest slice of a TPU generation (``v5e``...: libtpu's compiler, no TPU)."""
    from dgpo_jax.config import ConfigError  # noqa: PLC0415 (imports JAX)
    from dgpo_jax.launch.plan import parse_target, target_devices  # noqa: PLC0415

    try:
        return target_devices(parse_target(_TPU_SLICES.get(kind, f"gpu:{kind}-1")))
    except ConfigError as error:
        raise SystemExit(f"gpu_aot: {error}") from None


def chip(args):
    """The chip compiled for: a `GPU_KINDS` or `TPU_KINDS` entry (its HBM bandwidth, in
    ``hbm_bytes_s``, and its bf16 peak)."""
    from dgpo_jax.launch.plan import GPU_KINDS, TPU_KINDS  # noqa: PLC0415 (imports JAX)

    return TPU_KINDS[args.tpu] if args.tpu else GPU_KINDS[args.gpu]


def _summarize(kernels: list[Kernel], args) -> dict:
    """`summarize` at the chip's HBM bandwidth and bf16 peak (the memory plan's figures)."""
    kind = chip(args)
    return summarize(kernels, kind.hbm_bytes_s, args.floor_us, kind.peak_tflops * 1e12)


def _placed(tree, device):
    import jax  # noqa: PLC0415 (after JAX_PLATFORMS is set)

    sharding = jax.sharding.SingleDeviceSharding(device)
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), tree)


def _measure(compiled, args, text_dir: str, name: str, steps: int | None = None) -> dict:
    text = compiled.as_text()
    if text_dir:
        os.makedirs(text_dir, exist_ok=True)
        with open(os.path.join(text_dir, f"{name}.hlo.txt"), "w") as f:
            f.write(text)
    kernels, info = loop_kernels(text)
    if steps is not None and info.get("trip_count") != steps:
        raise RuntimeError(
            f"{name}: the first loop runs {info.get('trip_count')} times, not {steps}"
        )
    out = _summarize(kernels, args)
    out["temp_bytes"] = compiled.memory_analysis().temp_size_in_bytes
    return out


def _shape(args) -> tuple[int, int, int]:
    """(batch, prompt tokens, decoded tokens): the benchmark's (the tiny model's with
    ``--quick``), each overridable (``--batch``, ``--prompt``, ``--steps``)."""
    default = (8, 64, 32) if args.quick else (256, 512, 256)
    given = (args.batch, args.prompt, args.steps)
    return tuple(g or d for g, d in zip(given, default, strict=True))


def stage_decode(args, device) -> dict:
    """The decode stage's variants (`gpu.decode_variants`), compiled for ``args.gpu``."""
    import gpu  # noqa: PLC0415 (benchmarks/gpu.py, beside this file; imports JAX)
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    from dgpo_jax.models import (  # noqa: PLC0415
        cast_params,
        get_preset,
        init_cache,
        init_params,
        qwen2,
    )
    from dgpo_jax.parallel.sharding import ShardingPlan  # noqa: PLC0415

    config = gpu.TINY if args.quick else get_preset("qwen2.5-0.5b")
    batch, prompt, steps = _shape(args)
    cache_len, dtype = prompt + steps, jnp.bfloat16
    params = jax.eval_shape(lambda: cast_params(init_params(config, jax.random.key(0)), dtype))
    cache = jax.eval_shape(lambda: init_cache(config, batch, cache_len, dtype))
    split = jax.eval_shape(qwen2.split_layers, params)
    per_layer = jax.eval_shape(qwen2.split_cache, cache)
    variants = gpu.decode_variants(params, cache, cache_len, split, per_layer)
    names = [v for v in args.variants.split(",") if v]
    unknown = set(names) - set(variants)
    if unknown:
        raise SystemExit(f"--variants: {sorted(unknown)} unknown; known: {sorted(variants)}")
    token = jax.ShapeDtypeStruct((batch,), jnp.int32)
    # A one-device plan of the compile-only GPU: the model picks its GPU forms (the Pallas
    # kernel compiled by Triton, not interpreted) by the plan's platform.
    plan = ShardingPlan(jax.sharding.Mesh(np.array([device]).reshape(1, 1), ("data", "fsdp")))
    results = {}
    for name in names:
        p, c, window, form, options, kernel, blocks = variants[name]
        if c is None:  # the same context in a cache 4/3 as wide
            wide = cache_len + cache_len // 3
            c = jax.eval_shape(lambda: qwen2.split_cache(init_cache(config, batch, wide, dtype)))
        qwen2.DECODE_ATTENTION_FORM, qwen2.RAGGED_BLOCKS = form, blocks
        try:
            t0 = time.perf_counter()
            decode = gpu.make_decode(config, steps, window, kernel, plan)
            with jax.default_device(device):  # Pallas' Triton lowering asks it for the GPU
                lowered = decode.lower(*_placed((p, token, c), device))
            compiled = lowered.compile(compiler_options=options)
            results[name] = _measure(compiled, args, args.out, f"decode_{name}", steps)
            results[name]["compile_s"] = round(time.perf_counter() - t0, 1)
        finally:
            qwen2.DECODE_ATTENTION_FORM, qwen2.RAGGED_BLOCKS = None, None
        print(f"[gpu_aot] decode {name}: {json.dumps(results[name])}", flush=True)
    weights, _ = gpu._decode_roofline(config, params, batch, prompt + steps / 2)
    roofline_ms = 1000 * weights / chip(args).hbm_bytes_s
    return {
        "model": "tiny" if args.quick else "qwen2.5-0.5b",
        "batch": batch,
        "context": f"{prompt} prompt + {steps} decoded",
        "roofline_bytes": weights,
        "roofline_ms": round(roofline_ms, 4),
        "goal_ms": round(roofline_ms / 0.6, 4),
        "variants": results,
    }


def stage_sampler(args, device, layers: str = "auto") -> dict:
    """``Sampler.generate``'s compiled rollout (plain decode: search off, the shapes of
    ``benchmarks/gpu.py``'s sampler stage) for the chip, with `SamplerConfig.decode_layers`
    ``layers``: the kernels of each of its decode loops per iteration (one embedding a row)."""
    import gpu  # noqa: PLC0415 (benchmarks/gpu.py)
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    from dgpo_jax.launch.plan import host_calls_stubbed, rollout_inputs  # noqa: PLC0415
    from dgpo_jax.models import cast_params, get_preset, init_params  # noqa: PLC0415
    from dgpo_jax.parallel.sharding import ShardingPlan  # noqa: PLC0415
    from dgpo_jax.sampler.loop import (  # noqa: PLC0415
        resolve_decode_layers,
        resolve_decode_path,
        rollout_program,
    )

    config = gpu.TINY if args.quick else get_preset("qwen2.5-0.5b")
    batch, prompt, steps = _shape(args)
    cfg = gpu.plain_decode_config(config, prompt, steps, layers)
    if args.ingest_chunk:
        cfg = dataclasses.replace(cfg, ingest_chunk=args.ingest_chunk)
    if args.chunk_attention:
        cfg = dataclasses.replace(cfg, chunk_attention=args.chunk_attention)
    if args.decode_attention:
        cfg = dataclasses.replace(cfg, decode_attention=args.decode_attention)
    cfg = cfg.compiled()
    plan = ShardingPlan(jax.sharding.Mesh(np.array([device]).reshape(1, 1), ("data", "fsdp")))
    params = jax.eval_shape(
        lambda: cast_params(init_params(config, jax.random.key(0)), jnp.bfloat16)
    )
    inputs = rollout_inputs(plan, cfg, batch, prompt)
    t0 = time.perf_counter()
    with host_calls_stubbed(plan):  # as the memory plan compiles a rollout for GPUs
        lowered = rollout_program.lower(
            config, cfg, plan, None, _placed(params, device), None, *inputs
        )
    compiled = lowered.compile()
    text = compiled.as_text()
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        name = "sampler_rollout" + ("" if layers == "auto" else f"_{layers}")
        with open(os.path.join(args.out, f"{name}.hlo.txt"), "w") as f:
            f.write(text)
    module = parse_hlo(text)
    loops = {
        name: _summarize(loop_kernels(module, body)[0], args)
        for name, body in decode_loops(module).items()
    }
    if not loops:
        raise RuntimeError("no decode loop (one embedding [B, 1, D]) in the compiled rollout")
    # One decode loop per key window, in the program's order (narrow to wide): the last is the
    # whole-cache loop, the one the `decode` stage's variants compare with. (Not the one that
    # moves the most: on a TPU with split layers the narrower windows copy the caches.)
    last = list(loops)[-1]
    ingest = {
        name: _summarize(loop_kernels(module, body)[0], args)
        for name, body in decode_loops(module, "chunk").items()
    }
    return {
        "batch": batch,
        "context": f"{prompt} prompt + {steps} decoded",
        "decode_layers": resolve_decode_layers(cfg, resolve_decode_path(cfg, plan), plan),
        "compile_s": round(time.perf_counter() - t0, 1),
        "decode_loops": len(loops),
        "whole_cache_loop": {"name": last, **loops[last]},
        "loops": {
            k: {"kernels": v["kernels"], "bound_ms": v["bound_ms"]} for k, v in loops.items()
        },
        # one step of each ingest loop (an observation chunk of every row; one loop per window)
        "ingest_chunk": cfg.ingest_chunk,
        "ingest_loops": {
            k: {key: v[key] for key in ("kernels", "bytes", "copy_bytes", "bound_ms")}
            for k, v in ingest.items()
        },
    }


_GPU_VARIANTS = "window,unrolled_cache,unrolled_cache_pallas,unrolled_cache_fused"
_TPU_VARIANTS = "window,switch,unrolled,unrolled_cache"  # the Pallas kernel is the GPU's


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gpu", default="h200", choices=GPUS)
    p.add_argument(
        "--tpu", default="", choices=("", *TPUS), help="a TPU generation instead (needs libtpu)"
    )
    p.add_argument("--quick", action="store_true", help="the tiny model at batch 8")
    p.add_argument(
        "--variants",
        default="",
        help="decode variants of benchmarks/gpu.py, comma-separated (default: "
        f"{_GPU_VARIANTS} on a GPU, {_TPU_VARIANTS} on a TPU)",
    )
    p.add_argument("--stages", default="decode,sampler", help="decode, sampler or both")
    p.add_argument("--batch", type=int, default=0, help="rows (default 256; 8 with --quick)")
    p.add_argument("--prompt", type=int, default=0, help="prompt tokens (512; 64)")
    p.add_argument("--steps", type=int, default=0, help="decoded tokens (256; 32)")
    p.add_argument(
        "--key-chunk",
        type=int,
        default=None,
        help="one-query attention's key chunk in slots (0: none; default: the model's rule, "
        "qwen2._key_chunk: on TPUs what fits 32 MiB of keys a layer)",
    )
    p.add_argument(
        "--ingest-chunk",
        type=int,
        default=0,
        help="observation tokens a row per ingest step (default: SamplerConfig's)",
    )
    p.add_argument(
        "--chunk-attention",
        default="",
        choices=("", "xla", "pallas"),
        help="SamplerConfig.chunk_attention: prefill and ingest steps' attention (default "
        "auto: the Pallas chunk kernel on TPUs)",
    )
    p.add_argument(
        "--decode-attention",
        default="",
        choices=("", "xla", "pallas", "fused"),
        help="SamplerConfig.decode_attention: the sampler's one-token steps (default xla; pallas "
        "and fused need split layers: the GPU's)",
    )
    p.add_argument(
        "--sampler-layers",
        default="",
        help="the sampler's decode_layers, comma-separated (default: auto on a GPU, "
        "scan,split on a TPU)",
    )
    p.add_argument(
        "--floor-us",
        type=float,
        default=None,
        help="the shortest a kernel takes (default 2.0 on a GPU, 0 on a TPU, which runs its "
        "fusions back to back without launches)",
    )
    p.add_argument("--out", default="", help="keep each compiled program's HLO text here")
    p.add_argument(
        "--autotune",
        default="",
        help="a GPU's autotuning results (bench/autotune.textproto of a gpu_run.sh bench.tgz): "
        "gemms compile as that GPU chose, not with XLA's untuned defaults",
    )
    args = p.parse_args(argv)
    if args.floor_us is None:
        args.floor_us = 0.0 if args.tpu else 2.0
    args.variants = args.variants or (_TPU_VARIANTS if args.tpu else _GPU_VARIANTS)
    layers = [v for v in (args.sampler_layers or ("scan,split" if args.tpu else "auto")).split(",")]
    if args.autotune and args.tpu:
        raise SystemExit("--autotune: XLA:GPU's autotuning results; not for --tpu")
    if args.autotune:
        if not os.path.isfile(args.autotune):
            raise SystemExit(f"--autotune {args.autotune}: no such file")
        # Read when XLA:GPU compiles; a fusion the file lacks keeps XLA's default (so do all
        # when the file came from another XLA version: compare `gemm_configs` with and without)
        flag = f"--xla_gpu_load_autotune_results_from={os.path.abspath(args.autotune)}"
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip()
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:0] = [here, os.path.dirname(here)]  # benchmarks/ and the repository root
    # This host only compiles: JAX computes on its CPU, and the CUDA plugin, asked for no
    # GPU, skips its driver checks (it still compiles for the described one).
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax  # noqa: PLC0415 (after JAX_PLATFORMS is set)

    from dgpo_jax.models import qwen2  # noqa: PLC0415 (imports JAX)

    if args.key_chunk is not None:
        qwen2.KEY_CHUNK_SLOTS = args.key_chunk
    device = compile_only_devices(args.tpu or args.gpu)[0]
    print(f"[gpu_aot] compiling for {device.device_kind} on this host, jax {jax.__version__}")
    import attention  # noqa: PLC0415 (benchmarks/attention.py: the host's name)

    out = {
        "chip": device.device_kind,
        "compiled_on": attention.machine(),
        "jax": jax.__version__,
        "floor_us": args.floor_us,
        "autotune": args.autotune or None,
        "key_chunk": "rule" if args.key_chunk is None else args.key_chunk,
        "chunk_attention": args.chunk_attention or "auto",
        "decode_attention": args.decode_attention or "xla",
    }
    stages = [v for v in args.stages.split(",") if v]
    if set(stages) - {"decode", "sampler"}:
        raise SystemExit(f"--stages: {args.stages!r}: known stages are decode and sampler")
    if "decode" in stages:
        out["decode"] = stage_decode(args, device)
    if "sampler" in stages:
        runs = {}
        for layer_choice in layers:
            runs[layer_choice] = stage_sampler(args, device, layer_choice)
            print(f"[gpu_aot] sampler {layer_choice}: {json.dumps(runs[layer_choice])}", flush=True)
        out["sampler"] = runs[layers[0]] if len(layers) == 1 else runs
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
