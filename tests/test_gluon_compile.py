"""Our Gluon kernels build with the installed Triton (kernels/gluon_api.py), and which of them runs.

Compiled for sm_90a in a child process (tests/gluon_builds.py), no GPU needed: CI's Triton (3.9)
and the GPU machines' (3.6) both build every kernel but the scan's bulk-copy loaders, which 3.9
refuses (its padded view of a ring slot) and which the scan then does not take.
"""

import pytest
import torch

from gluon_builds import BUILDS, build_all_ptx
from kernels import gluon_api
from kernels import indexer_scan_hopper as H


def refused_here(name: str) -> bool:
    """Whether this Triton may refuse the build: no Gluon at all, or the bulk-copy scan where padded
    views are refused (the scan then takes its registers loader: loader_for)."""
    return gluon_api.gluon is None or (name.startswith("scan_bulk_ws") and not gluon_api.PADDED_VIEWS)


@pytest.fixture(scope="module")
def builds():
    return build_all_ptx()


@pytest.mark.parametrize("name", sorted(BUILDS))
def test_the_gluon_kernel_builds_with_this_triton_onto_the_tensor_cores(builds, name):
    """Each kernel compiles for sm_90a with the launch's own options and keeps what it is built
    around: wgmma for the products, the copy engine for the bulk-copy scan, setmaxnreg where warps
    are specialised. A release whose Gluon API moved fails here first, not on a GPU."""
    ptx = builds[name].get("ptx")
    if ptx is None and refused_here(name):
        pytest.skip(f"this Triton does not build {name}: {builds[name]['why'][-300:]}")
    assert ptx is not None, builds[name]["why"]
    assert ".target sm_90a" in ptx
    if name != "decode_rows":
        assert "wgmma.mma_async" in ptx
    if name.startswith("scan_bulk_ws"):
        assert "cp.async.bulk.tensor" in ptx
        assert "setmaxnreg" in ptx
    if name.endswith("warp_specialized"):
        assert "setmaxnreg" in ptx
    # the general scan's queries: its 24 BF16 dots a page (three parts of K 128), as tl.dot_scaled
    # issues them on Hopper (kernels/indexer_scan_hopper.py, _score_general)
    if name == "scan_bulk_ws_general":
        assert ptx.count("wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16") == 24


def ring_copies_fenced_after_their_wait(ptx: str) -> list[bool]:
    """For each bulk copy into shared memory of the PTX, in text order: whether a fence.proxy.async
    comes after the last barrier wait before it (the loader's wait for the slot's hand-back)."""
    fenced, out = True, []
    for line in ptx.splitlines():
        if "mbarrier.try_wait" in line:
            fenced = False
        elif "fence.proxy.async" in line:
            fenced = True
        elif "cp.async.bulk.tensor" in line and "shared::cluster.global" in line:
            out.append(fenced)
    return out


@pytest.mark.parametrize("name", ["scan_bulk_ws", "scan_bulk_ws_general"])
def test_the_loader_fences_between_a_slots_hand_back_and_its_next_copy(builds, name):
    """The scorer reads a ring slot with plain shared loads (the generic proxy) and the loader's
    next bulk copy (the async proxy) overwrites it once the slot is handed back. The arrive and
    the wait order the reads for threads only, so a proxy fence must come between the wait and
    every copy: without one an H100 scored a few rows of a page from the next copy's words
    (kernels/RESULTS.md, twenty-third session)."""
    ptx = builds[name].get("ptx")
    if ptx is None and refused_here(name):
        pytest.skip(f"this Triton does not build {name}: {builds[name]['why'][-300:]}")
    copies = ring_copies_fenced_after_their_wait(ptx)
    assert copies and all(copies), copies


def test_the_fence_check_sees_a_missing_fence():
    copy = "@%p9 cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes [%r1], [%rd2];\n"
    ptx = ("mbarrier.try_wait.parity.shared.b64 complete, [%r3], %r4;\nfence.proxy.async.shared::cta;\n" + copy
           + copy + "mbarrier.try_wait.parity.shared.b64 complete, [%r3], %r4;\n" + copy)
    assert ring_copies_fenced_after_their_wait(ptx) == [True, True, False]


def test_the_release_is_major_dot_minor():
    assert gluon_api.release("3.6.0") == "3.6"
    assert gluon_api.release("3.10.1+git1a2b3c") == "3.10"


def test_gluon_runs_by_default_only_on_a_tested_release(monkeypatch, caplog):
    if gluon_api.gluon is None:
        pytest.skip("this Triton has no Gluon")
    monkeypatch.delenv("V4SERVE_GLUON", raising=False)
    monkeypatch.setattr(gluon_api, "_warned", False)
    monkeypatch.setattr(gluon_api, "TESTED_TRITON", ("0.1",))
    with caplog.at_level("WARNING", logger=gluon_api.__name__):
        assert not gluon_api.enabled()
        assert not gluon_api.enabled()
    assert len(caplog.records) == 1 and "V4SERVE_GLUON=on" in caplog.records[0].getMessage()
    monkeypatch.setenv("V4SERVE_GLUON", "on")
    assert gluon_api.enabled()
    monkeypatch.setattr(gluon_api, "TESTED_TRITON", (gluon_api.INSTALLED,))
    monkeypatch.setenv("V4SERVE_GLUON", "off")
    assert not gluon_api.enabled()
    monkeypatch.setenv("V4SERVE_GLUON", "auto")
    assert gluon_api.enabled()
    monkeypatch.setenv("V4SERVE_GLUON", "yes")
    with pytest.raises(ValueError, match="V4SERVE_GLUON"):
        gluon_api.enabled()


def test_the_scan_takes_the_bulk_copies_only_where_the_pages_and_this_triton_allow(monkeypatch):
    pages = torch.zeros(8, 64, 68, dtype=torch.uint8)
    monkeypatch.setattr(H, "LOADER", "bulk_ws")
    monkeypatch.setattr(gluon_api, "PADDED_VIEWS", True)
    assert H.loader_for(pages) == "bulk_ws"
    assert H.loader_for(torch.zeros(8, 64, 72, dtype=torch.uint8)[:, :, :68]) == "registers"  # rows not back to back
    monkeypatch.setattr(gluon_api, "PADDED_VIEWS", False)
    assert H.loader_for(pages) == "registers"
    monkeypatch.setattr(gluon_api, "PADDED_VIEWS", True)
    monkeypatch.setattr(H, "LOADER", "registers")
    assert H.loader_for(pages) == "registers"
