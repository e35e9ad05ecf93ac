"""benchmarks/gpu_aot.py reads kernels off a compiled module's text: checked on a small
hand-written module (the shape of XLA:GPU's output) whose kernels, bytes and bound are counted
by hand below. The compile itself needs a JAX with the CUDA plugin and is not run here."""

import importlib.util
import os
import sys

import pytest

_PATH = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "gpu_aot.py")
_SPEC = importlib.util.spec_from_file_location("gpu_aot", _PATH)
gpu_aot = importlib.util.module_from_spec(_SPEC)
sys.modules["gpu_aot"] = gpu_aot  # its dataclasses look their module up
_SPEC.loader.exec_module(gpu_aot)

# A decode loop (trip count 4) whose body runs: a gemm fusion (bf16[8,64] x bf16[64,32] ->
# f32[8,32]), an in-place cache update (a dynamic-update-slice of bf16[1,32] into a
# bf16[16,32] buffer), a fusion reading a 4-row slice of a f32[100,32] table, a copy, a
# conditional with two branches (one kernel each, or a kernel and a wider one), and a nested
# loop (trip count 3) of one fusion plus its condition's compare; tuples, bitcasts,
# parameters and constants launch nothing.
MODULE = """HloModule jit_decode, entry_computation_layout={()}

%gemm_fusion_dot.1_computation (parameter_0: bf16[8,64], parameter_1: bf16[64,32]) -> f32[8,32] {
  %parameter_0 = bf16[8,64]{1,0} parameter(0)
  %parameter_1 = bf16[64,32]{1,0} parameter(1)
  ROOT %dot.0 = f32[8,32]{1,0} dot(%parameter_0, %parameter_1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%fused_dus (param_0: bf16[16,32], param_1: bf16[1,32], param_2: s32[]) -> bf16[16,32] {
  %param_0 = bf16[16,32]{1,0} parameter(0)
  %param_1 = bf16[1,32]{1,0} parameter(1)
  %param_2 = s32[] parameter(2)
  %zero = s32[] constant(0)
  ROOT %dus = bf16[16,32]{1,0} dynamic-update-slice(%param_0, %param_1, %param_2, %zero)
}

%fused_slice_add (param_0.1: f32[100,32], param_1.1: f32[4,32]) -> f32[4,32] {
  %param_0.1 = f32[100,32]{1,0} parameter(0)
  %param_1.1 = f32[4,32]{1,0} parameter(1)
  %bc = f32[100,32]{1,0} bitcast(%param_0.1)
  %slice.1 = f32[4,32]{1,0} slice(%bc), slice={[0:4], [0:32]}
  ROOT %add.1 = f32[4,32]{1,0} add(%slice.1, %param_1.1)
}

%fused_neg (param_0.2: f32[4,32]) -> f32[4,32] {
  %param_0.2 = f32[4,32]{1,0} parameter(0)
  ROOT %neg.1 = f32[4,32]{1,0} negate(%param_0.2)
}

%branch_a (p.a: f32[4,32]) -> f32[4,32] {
  %p.a = f32[4,32]{1,0} parameter(0)
  ROOT %loop_negate_fusion = f32[4,32]{1,0} fusion(%p.a), kind=kLoop, calls=%fused_neg
}

%branch_b (p.b: f32[4,32]) -> f32[4,32] {
  %p.b = f32[4,32]{1,0} parameter(0)
  %copy.9 = f32[4,32]{1,0} copy(%p.b)
  ROOT %copy.10 = f32[4,32]{1,0} copy(%copy.9)
}

%inner_body (p.i: (s32[], f32[4,32])) -> (s32[], f32[4,32]) {
  %p.i = (s32[], f32[4,32]{1,0}) parameter(0)
  %gte.i = f32[4,32]{1,0} get-tuple-element(%p.i), index=1
  %n.i = s32[] get-tuple-element(%p.i), index=0
  %loop_negate_fusion.2 = f32[4,32]{1,0} fusion(%gte.i), kind=kLoop, calls=%fused_neg
  ROOT %t.i = (s32[], f32[4,32]{1,0}) tuple(%n.i, %loop_negate_fusion.2)
}

%inner_cond (p.c: (s32[], f32[4,32])) -> pred[] {
  %p.c = (s32[], f32[4,32]{1,0}) parameter(0)
  %n.c = s32[] get-tuple-element(%p.c), index=0
  %three = s32[] constant(3)
  ROOT %lt = pred[] compare(%n.c, %three), direction=LT
}

%body (p: STATE_TYPE) -> (s32[], bf16[16,32]) {
  %p = STATE parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %x = bf16[8,64]{1,0} get-tuple-element(%p), index=1
  %w = bf16[64,32]{1,0} get-tuple-element(%p), index=2
  %cache = bf16[16,32]{1,0} get-tuple-element(%p), index=3
  %table = f32[100,32]{1,0} get-tuple-element(%p), index=4
  %y = f32[4,32]{1,0} get-tuple-element(%p), index=5
  %gemm_fusion_dot.1 = f32[8,32]{1,0} fusion(%x, %w), kind=kCustom, calls=%GEMM, metadata={op_name="dot"}
  %new = bf16[1,32]{1,0} bitcast(%x)
  %input_dus_fusion = bf16[16,32]{1,0} fusion(%cache, %new, %i), kind=kInput, calls=%fused_dus
  %loop_add_fusion.3 = f32[4,32]{1,0} fusion(%table, %y), kind=kLoop, calls=%fused_slice_add
  %copy.1 = f32[4,32]{1,0} copy(%loop_add_fusion.3)
  %conditional.1 = f32[4,32]{1,0} conditional(%i, %copy.1, %copy.1), BRANCHES
  %start = (s32[], f32[4,32]{1,0}) tuple(%i, %conditional.1)
  %while.2 = (s32[], f32[4,32]{1,0}) while(%start), condition=%inner_cond, body=%inner_body, backend_config=TRIPS3
  ROOT %out = (s32[], bf16[16,32]{1,0}) tuple(%i, %input_dus_fusion)
}

%cond (p.o: STATE_TYPE) -> pred[] {
  %p.o = STATE parameter(0)
  %n.o = s32[] get-tuple-element(%p.o), index=0
  %four = s32[] constant(4)
  ROOT %lt.o = pred[] compare(%n.o, %four), direction=LT
}

ENTRY %main (a: STATE_TYPE) -> (s32[], bf16[16,32]) {
  %a = STATE parameter(0)
  ROOT %while.1 = (s32[], bf16[16,32]{1,0}) while(%a), condition=%cond, body=%body, backend_config=TRIPS4
}
"""
MODULE = (
    MODULE.replace(
        "STATE_TYPE", "(s32[], bf16[8,64], bf16[64,32], bf16[16,32], f32[100,32], f32[4,32])"
    )
    .replace(
        "STATE",
        "(s32[], bf16[8,64]{1,0}, bf16[64,32]{1,0}, bf16[16,32]{1,0}, f32[100,32]{1,0}, f32[4,32]{1,0})",
    )
    .replace("%GEMM", "%gemm_fusion_dot.1_computation")
    .replace("BRANCHES", "branch_computations={%branch_a, %branch_b}")
    .replace("TRIPS3", '{"known_trip_count":{"n":"3"}}')
    .replace("TRIPS4", '{"known_trip_count":{"n":"4"}}')
)


def test_shape_bytes_of_arrays_and_tuples():
    assert gpu_aot.shape_bytes("bf16[256,896]{1,0}") == 256 * 896 * 2
    assert gpu_aot.shape_bytes("(s32[], f32[4,32]{1,0}, pred[7])") == 4 + 4 * 32 * 4 + 7
    assert gpu_aot.shape_bytes("f32[]") == 4


def test_loop_kernels_counts_what_one_iteration_launches():
    kernels, info = gpu_aot.loop_kernels(MODULE)
    assert info["body"] == "body" and info["trip_count"] == 4 and info["nested_loops"] == [3]
    by_name = {k.name: k for k in kernels}
    # gemm, cache update, sliced add, copy, the branch moving more bytes (branch_b: two copies
    # of 512 bytes, against branch_a's one fusion), the inner fusion (x3) and the inner
    # condition's compare (x3): 4 + 2 + 3 + 3 = 12 launches
    assert sorted(by_name) == sorted(
        [
            "gemm_fusion_dot.1",
            "input_dus_fusion",
            "loop_add_fusion.3",
            "copy.1",
            "copy.9",
            "copy.10",
            "loop_negate_fusion.2",
            "lt",
        ]
    )
    assert by_name["loop_negate_fusion.2"].times == 3 and by_name["lt"].times == 3
    summary = gpu_aot.summarize(kernels, hbm_bytes_s=1e12, floor_us=2.0, peak_flops=989e12)
    assert summary["kernels"] == 12
    assert summary["by_kind"]["gemm"] == 1 and summary["copies"] == 3


def test_kernel_traffic_counts_slices_and_in_place_updates():
    kernels, _ = gpu_aot.loop_kernels(MODULE)
    k = {k.name: k for k in kernels}
    # the gemm reads both operands whole and writes f32[8,32]; 2 * 8 * 32 * 64 FLOPs
    assert (k["gemm_fusion_dot.1"].bytes_read, k["gemm_fusion_dot.1"].bytes_written) == (
        8 * 64 * 2 + 64 * 32 * 2,
        8 * 32 * 4,
    )
    assert k["gemm_fusion_dot.1"].flops == 2 * 8 * 32 * 64
    # the cache update reads the new row and the index, writes the row: not the 16-row buffer
    assert (k["input_dus_fusion"].bytes_read, k["input_dus_fusion"].bytes_written) == (
        1 * 32 * 2 + 4,
        1 * 32 * 2,
    )
    # the sliced add reads 4 of the table's 100 rows (through a bitcast) and y
    assert k["loop_add_fusion.3"].bytes_read == 4 * 32 * 4 + 4 * 32 * 4
    assert k["loop_add_fusion.3"].bytes_written == 4 * 32 * 4
    assert (k["copy.1"].bytes_read, k["copy.1"].bytes_written) == (512, 512)


def test_bound_is_each_kernel_at_bandwidth_or_floor():
    kernels, _ = gpu_aot.loop_kernels(MODULE)
    # at 1 GB/s every kernel here takes bytes / 1e9 s; at the floor of 2 us, max of the two
    slow = gpu_aot.summarize(kernels, hbm_bytes_s=1e9, floor_us=0.0, peak_flops=989e12)
    total_bytes = sum(k.times * k.bytes for k in kernels)
    assert slow["bytes"] == total_bytes
    assert slow["bound_ms"] == pytest.approx(1000 * total_bytes / 1e9, abs=1e-4)  # 4 decimals
    fast = gpu_aot.summarize(kernels, hbm_bytes_s=1e15, floor_us=2.0, peak_flops=989e12)
    assert fast["bound_ms"] == pytest.approx(12 * 2e-3)
    assert fast["kernels_at_floor"] == 12
    # at 1 MFLOP/s the gemm's 2 * 8 * 32 * 64 FLOPs (32.768 ms) outweigh everything else
    slow_dots = gpu_aot.summarize(kernels, hbm_bytes_s=1e15, floor_us=0.0, peak_flops=1e6)
    assert slow_dots["bound_ms"] == pytest.approx(32.768, abs=1e-3)


def test_no_loop_is_a_clear_error():
    with pytest.raises(ValueError, match="no while loop"):
        gpu_aot.loop_kernels(
            "HloModule m\n\nENTRY %main (a: f32[]) -> f32[] {\n  ROOT %a = f32[] parameter(0)\n}\n"
        )


def test_unfused_dots_count_their_own_flops():
    """Two plain dots in one loop body: each gets its own 2 x M x N x K, not the body's sum."""
    text = """HloModule m

%b (p: (f32[4,8], f32[8,16], f32[16,2])) -> f32[4,2] {
  %p = (f32[4,8]{1,0}, f32[8,16]{1,0}, f32[16,2]{1,0}) parameter(0)
  %x = f32[4,8]{1,0} get-tuple-element(%p), index=0
  %w1 = f32[8,16]{1,0} get-tuple-element(%p), index=1
  %w2 = f32[16,2]{1,0} get-tuple-element(%p), index=2
  %d1 = f32[4,16]{1,0} dot(%x, %w1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  ROOT %d2 = f32[4,2]{1,0} dot(%d1, %w2), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

ENTRY %main (a: (f32[4,8], f32[8,16], f32[16,2])) -> f32[4,2] {
  %a = (f32[4,8]{1,0}, f32[8,16]{1,0}, f32[16,2]{1,0}) parameter(0)
  ROOT %w = f32[4,2]{1,0} while(%a), condition=%b, body=%b
}
"""
    kernels, _ = gpu_aot.loop_kernels(text)
    flops = {k.name: k.flops for k in kernels}
    assert flops == {"d1": 2 * 4 * 16 * 8, "d2": 2 * 4 * 2 * 16}


# A fusion as XLA:GPU makes them of a split-K gemm's consumer: the float32 partial sums
# f32[4,8,16] reduced over the split, converted, and a slice of 4 of the 16 columns taken
# (the V of a merged q/k/v gemm) and added to a bias; a second fusion reduces the same
# partial sums whole, as its result.
SPLIT_K = """HloModule jit_split_k, entry_computation_layout={()}

%add.f (x: f32[], y: f32[]) -> f32[] {
  %x = f32[] parameter(0)
  %y = f32[] parameter(1)
  ROOT %s = f32[] add(%x, %y)
}

%fused_v (param_0: f32[4,8,16], param_1: bf16[8,4]) -> bf16[8,4] {
  %param_0 = f32[4,8,16]{2,1,0} parameter(0)
  %param_1 = bf16[8,4]{1,0} parameter(1)
  %zero = f32[] constant(0)
  %sum = f32[8,16]{1,0} reduce(%param_0, %zero), dimensions={0}, to_apply=%add.f
  %half = bf16[8,16]{1,0} convert(%sum)
  %v = bf16[8,4]{1,0} slice(%half), slice={[0:8], [12:16]}
  ROOT %biased = bf16[8,4]{1,0} add(%v, %param_1)
}

%fused_all (param_0.1: f32[4,8,16]) -> f32[8,16] {
  %param_0.1 = f32[4,8,16]{2,1,0} parameter(0)
  %zero.1 = f32[] constant(0)
  ROOT %sum.1 = f32[8,16]{1,0} reduce(%param_0.1, %zero.1), dimensions={0}, to_apply=%add.f
}

%body (p: (s32[], f32[4,8,16], bf16[8,4])) -> (s32[], f32[4,8,16], bf16[8,4]) {
  %p = (s32[], f32[4,8,16]{2,1,0}, bf16[8,4]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %partial = f32[4,8,16]{2,1,0} get-tuple-element(%p), index=1
  %bias = bf16[8,4]{1,0} get-tuple-element(%p), index=2
  %input_v_fusion = bf16[8,4]{1,0} fusion(%partial, %bias), kind=kInput, calls=%fused_v
  %input_all_fusion = f32[8,16]{1,0} fusion(%partial), kind=kInput, calls=%fused_all
  ROOT %out = (s32[], f32[4,8,16]{2,1,0}, bf16[8,4]{1,0}) tuple(%i, %partial, %input_v_fusion)
}

%cond (p.o: (s32[], f32[4,8,16], bf16[8,4])) -> pred[] {
  %p.o = (s32[], f32[4,8,16]{2,1,0}, bf16[8,4]{1,0}) parameter(0)
  %n.o = s32[] get-tuple-element(%p.o), index=0
  %two = s32[] constant(2)
  ROOT %lt.o = pred[] compare(%n.o, %two), direction=LT
}

ENTRY %main (a: (s32[], f32[4,8,16], bf16[8,4])) -> (s32[], f32[4,8,16], bf16[8,4]) {
  %a = (s32[], f32[4,8,16]{2,1,0}, bf16[8,4]{1,0}) parameter(0)
  ROOT %while.1 = (s32[], f32[4,8,16]{2,1,0}, bf16[8,4]{1,0}) while(%a), condition=%cond, body=%body
}
"""


def test_a_slice_after_a_reduce_reads_its_share_of_the_partial_sums():
    kernels, _ = gpu_aot.loop_kernels(SPLIT_K)
    k = {k.name: k for k in kernels}
    # the slice keeps 4 of 16 columns: a quarter of the 4 x 8 x 16 float32 partial sums, and
    # the bias (8 x 4 bf16), written as 8 x 4 bf16
    assert k["input_v_fusion"].bytes_read == 4 * 8 * 4 * 4 + 8 * 4 * 2
    assert k["input_v_fusion"].bytes_written == 8 * 4 * 2
    # reduced whole: all the partial sums (the reduce's initial value is a constant)
    assert k["input_all_fusion"].bytes_read == 4 * 8 * 16 * 4
    assert k["input_all_fusion"].bytes_written == 8 * 16 * 4


# A cuBLAS gemm as XLA:GPU calls it (where the autotuner picks cuBLAS over its own gemm
# fusion): a custom call whose result is (the product, a workspace the call keeps).
CUBLAS = """HloModule jit_cublas, entry_computation_layout={()}

%body (p: (s32[], bf16[8,64], bf16[64,32])) -> (s32[], bf16[8,64], bf16[64,32]) {
  %p = (s32[], bf16[8,64]{1,0}, bf16[64,32]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %x = bf16[8,64]{1,0} get-tuple-element(%p), index=1
  %w = bf16[64,32]{1,0} get-tuple-element(%p), index=2
  %custom-call.1 = (bf16[8,32]{1,0}, s8[4194304]{0}) custom-call(%x, %w), TARGET, CONFIG
  ROOT %out = (s32[], bf16[8,64]{1,0}, bf16[64,32]{1,0}) tuple(%i, %x, %w)
}

%cond (p.o: (s32[], bf16[8,64], bf16[64,32])) -> pred[] {
  %p.o = (s32[], bf16[8,64]{1,0}, bf16[64,32]{1,0}) parameter(0)
  %n.o = s32[] get-tuple-element(%p.o), index=0
  %two = s32[] constant(2)
  ROOT %lt.o = pred[] compare(%n.o, %two), direction=LT
}

ENTRY %main (a: (s32[], bf16[8,64], bf16[64,32])) -> (s32[], bf16[8,64], bf16[64,32]) {
  %a = (s32[], bf16[8,64]{1,0}, bf16[64,32]{1,0}) parameter(0)
  ROOT %while.1 = (s32[], bf16[8,64]{1,0}, bf16[64,32]{1,0}) while(%a), condition=%cond, body=%body
}
""".replace("TARGET", 'custom_call_target="__cublas$lt$matmul"').replace(
    "CONFIG",
    'backend_config={"gemm_backend_config":{"alpha_real":1,"dot_dimension_numbers":'
    '{"lhs_contracting_dimensions":["1"],"rhs_contracting_dimensions":["0"],'
    '"lhs_batch_dimensions":[],"rhs_batch_dimensions":[]}}}',
)


def test_a_cublas_gemm_is_a_gemm_writing_its_product_not_its_workspace():
    (kernel,), _ = gpu_aot.loop_kernels(CUBLAS)
    assert kernel.kind == "gemm"
    assert (kernel.bytes_read, kernel.bytes_written) == (8 * 64 * 2 + 64 * 32 * 2, 8 * 32 * 2)
    assert kernel.flops == 2 * 8 * 32 * 64
    assert kernel.config == "cublas"


def test_gemm_config_names_the_tiling_autotuning_chose():
    def gemm(attrs):
        return gpu_aot.Instr("gemm_fusion_dot.1", "f32[8,32]{1,0}", "fusion", [], attrs)

    block_level = (
        'backend_config={"fusion_backend_config":{"kind":"__triton_nested_gemm_fusion",'
        '"block_level_fusion_config":{"num_warps":"4","output_tiles":[{"sizes":["1","64","32"]}]}}}'
    )
    older = (
        'backend_config={"fusion_backend_config":{"kind":"__triton_gemm","triton_gemm_config":'
        '{"block_m":"64","block_n":"128","block_k":"32","split_k":"4","num_stages":"3"}}}'
    )
    assert gpu_aot.gemm_config(gemm(block_level)) == "triton 1x64x32 w4"
    assert gpu_aot.gemm_config(gemm(older)) == "triton 64x128x32 k4"
    assert gpu_aot.gemm_config(gemm("")) == "triton"
    kernels, _ = gpu_aot.loop_kernels(CUBLAS)
    summary = gpu_aot.summarize(kernels, hbm_bytes_s=1e12, floor_us=2.0, peak_flops=989e12)
    assert summary["gemm_configs"] == {"cublas": 1}


# The TPU compiler's program (libtpu, read the same way): its loops state no trip count (the
# count is read off the condition, the start and the body's increment); arrays in the core's
# VMEM (``S(1)``) or semaphores (``S(2)``) are on chip and move no HBM bytes; asynchronous
# copies and slices into VMEM read their source once; a fusion nested in a fusion slices one
# layer of a stacked operand.
TPU_MODULE = """HloModule jit_decode, entry_computation_layout={()}

%nested_layer (q.0: f32[4,64,128], q.1: s32[]) -> f32[64,128] {
  %q.0 = f32[4,64,128]{2,1,0:T(8,128)} parameter(0)
  %q.1 = s32[]{:T(128)} parameter(1)
  %zero.n = s32[]{:T(128)} constant(0)
  %ds = f32[1,64,128]{2,1,0:T(8,128)} dynamic-slice(%q.0, %q.1, %zero.n, %zero.n), dynamic_slice_sizes={1,64,128}
  ROOT %bc.n = f32[64,128]{1,0:T(8,128)} bitcast(%ds)
}

%outer_layer (r.0: f32[4,64,128], r.1: s32[], r.2: f32[64,128]) -> f32[64,128] {
  %r.0 = f32[4,64,128]{2,1,0:T(8,128)} parameter(0)
  %r.1 = s32[]{:T(128)} parameter(1)
  %r.2 = f32[64,128]{1,0:T(8,128)S(1)} parameter(2)
  %layer = f32[64,128]{1,0:T(8,128)} fusion(%r.0, %r.1), kind=kLoop, calls=%nested_layer
  ROOT %sum = f32[64,128]{1,0:T(8,128)S(1)} add(%layer, %r.2)
}

%tpu_body (p: (s32[], f32[4,64,128], f32[64,128])) -> (s32[], f32[4,64,128], f32[64,128]) {
  %p = STATE parameter(0)
  %i = s32[]{:T(128)} get-tuple-element(%p), index=0
  %stack = f32[4,64,128]{2,1,0:T(8,128)} get-tuple-element(%p), index=1
  %w = f32[64,128]{1,0:T(8,128)} get-tuple-element(%p), index=2
  %cs = (f32[64,128]{1,0:T(8,128)S(1)}, f32[64,128]{1,0:T(8,128)}, u32[]{:S(2)}) copy-start(%w)
  %cd = f32[64,128]{1,0:T(8,128)S(1)} copy-done(%cs)
  %ss = ((f32[64,128]{1,0}), f32[16,128]{1,0:T(8,128)S(1)}, s32[]{:S(2)}) slice-start(%w), slice={[0:16], [0:128]}
  %sd = f32[16,128]{1,0:T(8,128)S(1)} slice-done(%ss)
  %fusion.7 = f32[64,128]{1,0:T(8,128)S(1)} fusion(%stack, %i, %cd), kind=kOutput, calls=%outer_layer
  %one = s32[]{:T(128)} constant(1)
  %next = s32[]{:T(128)} add(%i, %one)
  ROOT %t = STATE tuple(%next, %stack, %w)
}

%tpu_cond (c: (s32[], f32[4,64,128], f32[64,128])) -> pred[] {
  %c = STATE parameter(0)
  %n = s32[]{:T(128)} get-tuple-element(%c), index=0
  %bound = s32[]{:T(128)} constant(BOUND)
  ROOT %lt = pred[]{:T(512)} compare(%n, %bound), direction=LT
}

ENTRY %main (a: f32[4,64,128], b: f32[64,128]) -> f32[64,128] {
  %a = f32[4,64,128]{2,1,0:T(8,128)} parameter(0)
  %b = f32[64,128]{1,0:T(8,128)} parameter(1)
  %start = s32[]{:T(128)} constant(START)
  %start.copy = s32[]{:T(128)} copy(%start)
  %init = STATE tuple(%start.copy, %a, %b)
  %loop = STATE while(%init), condition=%tpu_cond, body=%tpu_body
  ROOT %out = f32[64,128]{1,0:T(8,128)} get-tuple-element(%loop), index=2
}
"""


def _tpu_module(bound=5, start=0):
    text = TPU_MODULE.replace("BOUND", str(bound)).replace("START", str(start))
    return text.replace(
        "STATE", "(s32[]{:T(128)}, f32[4,64,128]{2,1,0:T(8,128)}, f32[64,128]{1,0:T(8,128)})"
    )


def test_memory_spaces_other_than_hbm_count_nothing():
    assert gpu_aot.shape_bytes("f32[64,128]{1,0:T(8,128)S(1)}") == 0
    assert gpu_aot.shape_bytes("(f32[2]{0:S(1)}, f32[2]{0}, u32[]{:S(2)})") == 8


def test_tpu_loops_trip_counts_are_read_off_the_condition():
    assert gpu_aot.loop_kernels(_tpu_module())[1]["trip_count"] == 5
    assert gpu_aot.loop_kernels(_tpu_module(bound=9, start=2))[1]["trip_count"] == 7
    # a step other than +1, or a bound that is not a constant: unknown
    assert (
        gpu_aot.loop_kernels(_tpu_module().replace("constant(1)", "constant(2)"))[1]["trip_count"]
        is None
    )
    text = _tpu_module().replace(
        "%bound = s32[]{:T(128)} constant(5)",
        "%bound = s32[]{:T(128)} get-tuple-element(%c), index=0",
    )
    assert gpu_aot.loop_kernels(text)[1]["trip_count"] is None


def test_tpu_kernels_count_hbm_bytes_through_async_copies_and_nested_fusions():
    kernels, _ = gpu_aot.loop_kernels(_tpu_module())
    k = {k.name: k for k in kernels}
    assert sorted(k) == ["cs", "fusion.7", "next", "ss"]  # the -done ops launch nothing
    # copy-start: the f32[64,128] weight read from HBM into VMEM (written on chip: 0 bytes)
    assert (k["cs"].bytes_read, k["cs"].bytes_written) == (64 * 128 * 4, 0)
    # slice-start: only the 16 rows it takes
    assert (k["ss"].bytes_read, k["ss"].bytes_written) == (16 * 128 * 4, 0)
    # the fusion: one layer of the 4-layer stack through its nested fusion, the layer index,
    # and the VMEM operand (0); its result stays in VMEM
    assert (k["fusion.7"].bytes_read, k["fusion.7"].bytes_written) == (64 * 128 * 4 + 4, 0)


DECODE_LOOPS = """HloModule jit_rollout, entry_computation_layout={()}

%embed_one (e.0: bf16[8,1,16]) -> bf16[8,1,16] {
  ROOT %e.0 = bf16[8,1,16]{2,1,0} parameter(0), metadata={op_name="jit(rollout)/Qwen2.embed/gather"}
}

%embed_chunk (f.0: bf16[8,4,16]) -> bf16[8,4,16] {
  ROOT %f.0 = bf16[8,4,16]{2,1,0} parameter(0), metadata={op_name="jit(rollout)/Qwen2.embed/gather"}
}

%decode_body (p.d: bf16[8,1,16]) -> bf16[8,1,16] {
  %p.d = bf16[8,1,16]{2,1,0} parameter(0)
  ROOT %fusion.d = bf16[8,1,16]{2,1,0} fusion(%p.d), kind=kLoop, calls=%embed_one
}

%ingest_body (p.i: bf16[8,4,16]) -> bf16[8,4,16] {
  %p.i = bf16[8,4,16]{2,1,0} parameter(0)
  ROOT %fusion.i = bf16[8,4,16]{2,1,0} fusion(%p.i), kind=kLoop, calls=%embed_chunk
}

%outer_body (p.o: (bf16[8,1,16], bf16[8,4,16])) -> (bf16[8,1,16], bf16[8,4,16]) {
  %p.o = (bf16[8,1,16]{2,1,0}, bf16[8,4,16]{2,1,0}) parameter(0)
  %x = bf16[8,1,16]{2,1,0} get-tuple-element(%p.o), index=0
  %y = bf16[8,4,16]{2,1,0} get-tuple-element(%p.o), index=1
  %decode = bf16[8,1,16]{2,1,0} while(%x), condition=%cond1, body=%decode_body
  %ingest = bf16[8,4,16]{2,1,0} while(%y), condition=%cond4, body=%ingest_body
  ROOT %t.o = (bf16[8,1,16]{2,1,0}, bf16[8,4,16]{2,1,0}) tuple(%decode, %ingest)
}

%cond1 (c.1: bf16[8,1,16]) -> pred[] {
  %c.1 = bf16[8,1,16]{2,1,0} parameter(0)
  ROOT %k.1 = pred[] constant(false)
}

%cond4 (c.4: bf16[8,4,16]) -> pred[] {
  %c.4 = bf16[8,4,16]{2,1,0} parameter(0)
  ROOT %k.4 = pred[] constant(false)
}

%cond_o (c.o: (bf16[8,1,16], bf16[8,4,16])) -> pred[] {
  %c.o = (bf16[8,1,16]{2,1,0}, bf16[8,4,16]{2,1,0}) parameter(0)
  ROOT %k.o = pred[] constant(false)
}

ENTRY %main (a: (bf16[8,1,16], bf16[8,4,16])) -> (bf16[8,1,16], bf16[8,4,16]) {
  %a = (bf16[8,1,16]{2,1,0}, bf16[8,4,16]{2,1,0}) parameter(0)
  ROOT %outer = (bf16[8,1,16]{2,1,0}, bf16[8,4,16]{2,1,0}) while(%a), condition=%cond_o, body=%outer_body
}
"""


def test_decode_loops_are_those_whose_every_embedding_is_one_token_a_row():
    # the embedding sits inside a fused computation (as the TPU compiler leaves it, under the
    # fusion's own op name): found there; the loop around both loops embeds both shapes
    module = gpu_aot.parse_hlo(DECODE_LOOPS)
    assert gpu_aot.decode_loops(module) == {"decode": "decode_body"}


def test_ingest_loops_are_those_that_embed_chunks():
    module = gpu_aot.parse_hlo(DECODE_LOOPS)
    assert gpu_aot.decode_loops(module, "chunk") == {"ingest": "ingest_body"}


# Dots as the TPU compiler writes them, convolutions (forms of libtpu's compile of the 0.5B
# rollout, at 16 rows): the q projection ``btd,dnh->btnh`` (128 tokens, 896 -> 14 x 64), whose 14
# heads became a window of 14 over one input position padded by 13 a side, and one-query
# scores ``bkqh,bksh->bkqs`` (2 KV heads, 7 queries, a 128-slot key chunk), whose rows and KV
# heads became windows over a dilated input. And a Pallas kernel with its stated cost.
_X, _W, _Q, _K = "bf16[128,16,896,1]", "bf16[896,14,64,1]", "bf16[16,2,7,64]", "bf16[16,2,128,64]"
_COST = '{"cost_estimate":{"flops":"5000","bytes_accessed":"4000000"}}'
TPU_DOTS = f"""HloModule jit_dots, entry_computation_layout={{()}}

%dots (p: ({_X}, {_W}, {_Q}, {_K})) -> f32[16,2,7,128] {{
  %p = ({_X}{{3,2,1,0}}, {_W}{{3,2,1,0}}, {_Q}{{3,2,1,0}}, {_K}{{3,2,1,0}}) parameter(0)
  %x = {_X}{{3,2,1,0}} get-tuple-element(%p), index=0
  %w = {_W}{{3,2,1,0}} get-tuple-element(%p), index=1
  %q = {_Q}{{3,2,1,0}} get-tuple-element(%p), index=2
  %k = {_K}{{3,2,1,0}} get-tuple-element(%p), index=3
  %proj = bf16[128,16,14,64]{{3,2,1,0}} convolution(%x, %w), \
window={{size=1x14 pad=0_0x13_13 rhs_reversal=0x1}}, dim_labels=0bf1_i1o0->0b1f
  %scores = f32[16,2,7,128]{{3,2,1,0}} convolution(%q, %k), \
window={{size=16x2 stride=15x1 lhs_dilate=16x2}}, dim_labels=01bf_01oi->01bf
  %kernel = bf16[16,2,7,128,64]{{4,3,2,1,0}} custom-call(%k, %x), \
custom_call_target="tpu_custom_call", backend_config={_COST}
  %update = {_K}{{3,2,1,0}} custom-call(%q, %k), custom_call_target="tpu_custom_call", \
output_to_operand_aliasing={{{{}}: (1, {{}})}}, backend_config={_COST}
  ROOT %r = f32[16,2,7,128]{{3,2,1,0}} add(%scores, %scores)
}}

ENTRY %main (a: ({_X}, {_W}, {_Q}, {_K})) -> f32[16,2,7,128] {{
  %a = ({_X}{{3,2,1,0}}, {_W}{{3,2,1,0}}, {_Q}{{3,2,1,0}}, {_K}{{3,2,1,0}}) parameter(0)
  ROOT %w = f32[16,2,7,128]{{3,2,1,0}} while(%a), condition=%dots, body=%dots
}}
"""


def test_tpu_dots_count_their_flops_and_pallas_kernels_their_stated_bytes():
    # (libtpu's own cost analysis gives the same for these forms: 2 x 16 x 128 x 14 x 64 x 896
    # and 2 x 16 x 2 x 7 x 128 x 64)
    kernels = {k.name: k for k in gpu_aot.loop_kernels(TPU_DOTS)[0]}
    assert kernels["proj"].flops == 2 * 16 * 128 * 14 * 64 * 896
    assert kernels["scores"].flops == 2 * 16 * 2 * 7 * 128 * 64
    # the kernel moves what its estimate says (its operands hold the whole cache), of which its
    # result is written, and its FLOPs are its own
    kernel = kernels["kernel"]
    result = 16 * 2 * 7 * 128 * 64 * 2
    assert (kernel.bytes_read, kernel.bytes_written, kernel.flops) == (
        4_000_000 - result,
        result,
        5000.0,
    )
    # one that updates its operand in place (a cache) moves what it states, not the array
    update = kernels["update"]
    assert (update.bytes_read, update.bytes_written) == (4_000_000, 0)


# A GPU Pallas (Triton) kernel updating two caches in place: XLA:GPU's custom call returns the
# caches (aliased to operands 1 and 2) and the attention; no cost estimate reaches its config.
_C, _O = "bf16[1,8,2,128,64]", "bf16[8,1,2,7,64]"
GPU_ALIASED = f"""HloModule jit_fused, entry_computation_layout={{()}}

%step (p: ({_O}, {_C}, {_C})) -> ({_O}, {_C}, {_C}) {{
  %p = ({_O}{{4,3,2,1,0}}, {_C}{{4,3,2,1,0}}, {_C}{{4,3,2,1,0}}) parameter(0)
  %q = {_O}{{4,3,2,1,0}} get-tuple-element(%p), index=0
  %ck = {_C}{{4,3,2,1,0}} get-tuple-element(%p), index=1
  %cv = {_C}{{4,3,2,1,0}} get-tuple-element(%p), index=2
  %kernel = ({_C}{{4,3,2,1,0}}, {_C}{{4,3,2,1,0}}, {_O}{{4,3,2,1,0}}) custom-call(%q, %ck, %cv), \
custom_call_target="__gpu$xla.gpu.triton", output_to_operand_aliasing={{{{0}}: (1, {{}}), \
{{1}}: (2, {{}})}}, backend_config={{"name":"fused_decode_attention_gpu"}}
  %a = {_O}{{4,3,2,1,0}} get-tuple-element(%kernel), index=2
  %b = {_C}{{4,3,2,1,0}} get-tuple-element(%kernel), index=0
  %c = {_C}{{4,3,2,1,0}} get-tuple-element(%kernel), index=1
  ROOT %t = ({_O}{{4,3,2,1,0}}, {_C}{{4,3,2,1,0}}, {_C}{{4,3,2,1,0}}) tuple(%a, %b, %c)
}}

ENTRY %main (a: ({_O}, {_C}, {_C})) -> ({_O}, {_C}, {_C}) {{
  %a = ({_O}{{4,3,2,1,0}}, {_C}{{4,3,2,1,0}}, {_C}{{4,3,2,1,0}}) parameter(0)
  ROOT %w = ({_O}{{4,3,2,1,0}}, {_C}{{4,3,2,1,0}}, {_C}{{4,3,2,1,0}}) while(%a), \
condition=%step, body=%step
}}
"""


def test_a_gpu_kernel_updating_in_place_writes_only_its_other_outputs():
    # reads its operands whole (an upper bound: it may read less of a cache); writes the
    # attention, not the two caches it updates in place
    [kernel] = gpu_aot.loop_kernels(GPU_ALIASED)[0]
    cache, out = 8 * 2 * 128 * 64 * 2, 8 * 2 * 7 * 64 * 2
    assert (kernel.bytes_read, kernel.bytes_written) == (out + 2 * cache, out)


def test_the_tpu_compile_of_the_tiny_model_reads_its_loops():
    # libtpu's compiler on this host (no TPU): every decode variant's loop runs its 32 steps
    # (checked by the script), both sampler layer choices have decode loops, and the sampler
    # writes its per-row outputs without the per-row update loops TPUs make of a scatter.
    pytest.importorskip("libtpu", reason="libtpu not installed")
    import json  # noqa: PLC0415
    import subprocess  # noqa: PLC0415

    run = subprocess.run(
        [sys.executable, _PATH, "--tpu", "v5e", "--quick"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["chip"] == "TPU v5 lite" and out["floor_us"] == 0.0
    assert set(out["decode"]["variants"]) == {"window", "switch", "unrolled", "unrolled_cache"}
    for layers in ("scan", "split"):
        sampler = out["sampler"][layers]
        assert sampler["decode_layers"] == layers and sampler["decode_loops"] >= 1
        assert "dynamic-update-slice" not in sampler["whole_cache_loop"]["by_kind"]
        assert sampler["ingest_loops"]  # (the ingest steps: the Pallas chunk kernels on TPUs)
