"""The benchmark scripts' own logic (their timings are printed by CI's quick run, never asserted).

- ``benchmarks/op_profile.py`` sorts oneDNN's verbose lines into convolutions,
  weight reorders and activation reorders (the split behind benchmarks/RESULTS.md);
  the lines below are copied from a real ``ONEDNN_VERBOSE=1`` run of torch 2.13.
- Both scripts reject bad arguments with a message naming the argument.
"""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import bench, op_profile  # noqa: E402

VERBOSE = [
    "onednn_verbose,v1,primitive,info,template:operation,engine,primitive,implementation,prop_kind,"
    "memory_descriptors,attributes,auxiliary,problem_desc,exec_time",
    "onednn_verbose,v1,primitive,exec,cpu,reorder,jit:blk,undef,src:f32::blocked:abcd::f0 "
    "dst:f32::blocked:aBcd16b::f0,attr-scratchpad:user,,2x1280x4x4,0.0219727",
    "onednn_verbose,v1,primitive,exec,cpu,reorder,jit:uni,undef,src:f32::blocked:abcd::f0 "
    "dst:f32::blocked:ABcd16b16a::f0,attr-scratchpad:user,,1280x1280x3x3,25.293",
    "onednn_verbose,v1,primitive,exec,cpu,convolution,jit:avx512_core,forward_training,"
    "src:f32:a:blocked:aBcd16b::f0 wei:f32:a:blocked:ABcd16b16a::f0 bia:f32:a:blocked:a::f0 "
    "dst:f32:a:blocked:aBcd16b::f0,attr-scratchpad:user,alg:convolution_direct,"
    "mb2_ic1280oc1280_ih4oh4kh3sh1dh0ph1_iw4ow4kw3sw1dw0pw1,6.44678",
    "onednn_verbose,v1,primitive,exec,cpu,reorder,jit:blk,undef,src:f32::blocked:aBcd16b::f0 "
    "dst:f32::blocked:abcd::f0,attr-scratchpad:user,,2x1280x4x4,0.0249023",
    "some other output",
]


def test_onednn_lines_are_sorted_by_what_they_move():
    summary = op_profile.summarise_onednn(VERBOSE)
    assert set(summary) == {"convolution", "reorder of a weight", "reorder of activations"}
    assert summary["reorder of a weight"] == pytest.approx((25.293, 1))
    assert summary["convolution"] == pytest.approx((6.44678, 1))
    assert summary["reorder of activations"] == pytest.approx((0.0219727 + 0.0249023, 2))


@pytest.mark.parametrize("main, argv, message", [
    (bench.main, ["--only", "unet,nope"], "unknown benchmark"),
    (bench.main, ["--only", ","], "unknown benchmark"),
    (op_profile.main, ["unet", "--side", "12"], "--side must be a positive multiple of 8"),
    (op_profile.main, ["clip"], "invalid choice"),
])
def test_bad_arguments_name_the_argument(main, argv, message, capsys):
    with pytest.raises(SystemExit):
        main(argv)
    assert message in capsys.readouterr().err
