"""The Nsight Compute source-page reader of load_tests/profile_kernels.py, on a made-up export
shaped like ncu's (`--page source --csv --print-source sass`): two kernels, stall columns with and
without "(Not Issued)"."""

import gzip

from load_tests import profile_kernels as P

HEADER = ('"Address","Source","Warp Stall Sampling (All Samples)","Instructions Executed",'
          '"stall_barrier","stall_long_sb","stall_selected","stall_barrier (Not Issued)"')


def export(*kernels):
    out = []
    for name, lines in kernels:
        out.append(f'"Kernel Name","{name}",')
        out.append(HEADER)
        for i, (src, barrier, long_sb, selected) in enumerate(lines):
            total = barrier + long_sb + selected
            out.append(f'"0x{i:x}","      {src}","{total}","1","{barrier}","{long_sb}","{selected}","{barrier}"')
    return "\n".join(out) + "\n"


SCAN = ("_scan_kernel_ws", [("LDS R1, [R2]", 0, 7, 1), ("BAR.SYNC 0x0", 9, 0, 0), ("FFMA R1, R2, R3, R4", 0, 0, 5)])
HCA = ("_split_kernel", [("QGMMA.64x64x16", 2, 0, 1), ("NOP", 0, 0, 0)])


def test_sections_come_in_launch_order_with_their_lines():
    sections = P.kernel_sections(export(SCAN, HCA))
    assert [name for name, _ in sections] == ["_scan_kernel_ws", "_split_kernel"]
    assert [len(lines) for _, lines in sections] == [3, 2]
    assert sections[0][1][1]["Source"].strip() == "BAR.SYNC 0x0"


def test_stall_totals_skip_the_not_issued_copies_and_take_a_range_of_lines():
    lines = P.kernel_sections(export(SCAN, HCA))[0][1]
    assert P.stall_totals(lines) == {"barrier": 9, "long_sb": 7, "selected": 6}
    assert P.stall_totals(lines[1:]) == {"barrier": 9, "long_sb": 0, "selected": 5}


def test_hottest_lines_are_the_most_sampled_listed_in_sass_order():
    lines = P.kernel_sections(export(SCAN, HCA))[0][1]
    hot = P.hottest(lines, 2)
    assert [(i, n) for i, n, _, _ in hot] == [(0, 8), (1, 9)]
    assert hot[0][2] == "LDS R1, [R2]" and hot[0][3] == [("long_sb", 7), ("selected", 1)]


def test_print_stalls_reads_a_gzipped_export(tmp_path, capsys):
    path = tmp_path / "source.csv.gz"
    with gzip.open(path, "wt") as f:
        f.write(export(SCAN, HCA))
    P.print_stalls(str(path), kernel=1, rows=None, top=1)
    out = capsys.readouterr().out
    assert "kernel 1: _split_kernel" in out and "_scan_kernel_ws" not in out
    assert "barrier 66.7%, selected 33.3%" in out and "QGMMA" in out
