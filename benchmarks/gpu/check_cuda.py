"""GPU-only checks of the CUDA kernels that the property suite does not make, plus per-kernel bandwidth.

    python benchmarks/gpu/check_cuda.py [--quick] [--json results.json]

Checks (each prints PASS/FAIL/SKIP and goes into the JSON):
  * large     : the benchmark shape (8,19,512,1024) and C = 150 (online path) against the float64 reference, for
                float32/bfloat16, every rule, T = 1 and 2, contiguous and channels_last (losses, counts, grads)
  * determinism: two runs give bitwise-equal losses, counts and gradients
  * cuda_graph : fwd+bwd captured in a CUDA graph and replayed on new data give the eager results
  * compile_ro : torch.compile(fullgraph=True, mode="reduce-overhead") gives the eager results
  * no_sync    : fwd+bwd under torch.cuda.set_sync_debug_mode("error") (any host sync raises)
  * bad_label  : an out-of-range label stops the kernel with a device-side assert (in a subprocess)
  * forward_gradients: gradients written by the forward (grad_mask) equal the backward's at unit upstream
                gradients; learners='a'/'b' give exactly 0 for the other loss and the same kept loss
  * liger      : ccl_bench.kernels.liger_peer matches the reference (when Liger-Kernel imports)
  * peers      : pixel_selective_kl_peers with 3 and 8 students against its float64 reference (pixel_bsd_peers),
                every rule, losses, counts and gradients; bitwise equal on a second run
Bandwidth (rule 'all' = worst case for the backward; 'correct' as in the benchmark): forward, backward and region
kernels alone, and pixel_selective_kl_peers with 3 students (forward with its gradient kernel), in GB/s of the
bytes each must move, and as % of a device copy.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import textwrap
import traceback

import torch

import ccl_ops
from ccl_ops import reference
from ccl_ops.testing import make_inputs, make_peer_inputs

DEV = torch.device("cuda")
RESULTS: dict[str, dict] = {}


def record(name, fn):
    try:
        info = fn() or {}
        RESULTS[name] = {"status": info.pop("status", "PASS"), **info}
    except Exception as exc:  # noqa: BLE001
        RESULTS[name] = {"status": "FAIL", "error": f"{type(exc).__name__}: {exc}",
                         "trace": traceback.format_exc(limit=4)}
    print(f"[{RESULTS[name]['status']}] {name} {json.dumps({k: v for k, v in RESULTS[name].items() if k not in ('status', 'trace')})}", flush=True)


def make(n, c, h, w, dtype, seed=0, ignore_frac=0.1, channels_last=False):
    """ccl_ops.testing.make_inputs on the GPU: each student right on about half the pixels, 10% ignored."""
    return make_inputs(seed, n, c, h, w, dtype, ignore_frac=ignore_frac, device=DEV,
                       layout="channels_last" if channels_last else "contiguous")


def fused_fwd_bwd(za, zb, y, **kw):
    a, b = za.detach().clone().requires_grad_(), zb.detach().clone().requires_grad_()
    out = ccl_ops.pixel_selective_kl(a, b, y, **kw)
    (out.loss_a + out.loss_b).backward()
    return out, a.grad, b.grad


def ref_fwd_bwd(za, zb, y, **kw):
    a, b = za.detach().double().requires_grad_(), zb.detach().double().requires_grad_()
    out = reference.pixel_selective_kl(a, b, y, **kw)
    (out.loss_a + out.loss_b).backward()
    return out, a.grad, b.grad


def check_large(quick):
    shapes = [(2, 19, 128, 256), (1, 150, 64, 128)] if quick else [(8, 19, 512, 1024), (2, 150, 256, 512)]
    worst = {}
    for shape in shapes:
        for dtype in (torch.float32, torch.bfloat16):
            for channels_last in (False, True):
                za, zb, y = make(*shape, dtype, seed=1, channels_last=channels_last)
                for rule in ("correct", "confidence", "all"):
                    for t in (1.0, 2.0):
                        kw = dict(rule=rule, temperature=t)
                        got, ga, gb = fused_fwd_bwd(za, zb, y, **kw)
                        ref, ra, rb = ref_fwd_bwd(za, zb, y, **kw)
                        torch.testing.assert_close(got.loss_a.double(), ref.loss_a, rtol=1e-4, atol=1e-6)
                        torch.testing.assert_close(got.loss_b.double(), ref.loss_b, rtol=1e-4, atol=1e-6)
                        # Counts may differ by a few near-tie pixels (float32 vs float64 cross-entropies).
                        for k in ("count_ab", "count_ba"):
                            diff = abs(int(getattr(got, k)) - int(getattr(ref, k)))
                            assert diff <= 2 + int(getattr(ref, k)) // 100000, (k, diff)
                        gtol = dict(rtol=2e-2, atol=1e-6) if dtype == torch.bfloat16 else dict(rtol=1e-3, atol=1e-9)
                        torch.testing.assert_close(ga.double(), ra, **gtol)
                        torch.testing.assert_close(gb.double(), rb, **gtol)
                        key = f"{'x'.join(map(str, shape))}/{str(dtype)[6:]}"
                        rel = float((got.loss_b.double() - ref.loss_b).abs() / ref.loss_b.abs().clamp(min=1e-12))
                        worst[key] = max(worst.get(key, 0.0), rel)
                        del got, ga, gb, ref, ra, rb
                        torch.cuda.empty_cache()
    return {"worst_rel_loss_err": worst}


def check_determinism(quick):
    za, zb, y = make(4, 19, 128 if quick else 512, 256 if quick else 1024, torch.float32, seed=2)
    first = fused_fwd_bwd(za, zb, y, rule="all", temperature=1.5)
    for _ in range(3):
        again = fused_fwd_bwd(za, zb, y, rule="all", temperature=1.5)
        assert torch.equal(first[0].loss_a, again[0].loss_a) and torch.equal(first[0].loss_b, again[0].loss_b)
        assert torch.equal(first[1], again[1]) and torch.equal(first[2], again[2])
    m1 = ccl_ops.region_direction_mask(za, zb, y)
    m2 = ccl_ops.region_direction_mask(za, zb, y)
    assert torch.equal(m1.direction, m2.direction) and torch.equal(m1.scores.nan_to_num(), m2.scores.nan_to_num())


def check_cuda_graph(quick):
    za, zb, y = make(2, 19, 64, 96, torch.float32, seed=3)
    a = za.clone().requires_grad_()
    b = zb.clone().requires_grad_()
    static_y = y.clone()

    def step():
        out = ccl_ops.pixel_selective_kl(a, b, static_y, rule="confidence", temperature=2.0)
        ga, gb = torch.autograd.grad(out.loss_a + out.loss_b, (a, b))
        d = ccl_ops.region_direction_mask(a.detach(), b.detach(), static_y).direction
        return out.loss_a, out.loss_b, ga, gb, d

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = step()
    za2, zb2, y2 = make(2, 19, 64, 96, torch.float32, seed=4)
    with torch.no_grad():
        a.copy_(za2)
        b.copy_(zb2)
    static_y.copy_(y2)
    graph.replay()
    eager = step()
    for x, e in zip(static_out, eager):
        torch.testing.assert_close(x, e)


def check_compile_reduce_overhead(quick):
    za, zb, y = make(2, 19, 64, 96, torch.float32, seed=5)

    def step(a, b, labels):
        out = ccl_ops.pixel_selective_kl(a, b, labels, rule="correct", normalize="selected")
        return out.loss_a + out.loss_b

    compiled = torch.compile(step, fullgraph=True, mode="reduce-overhead")
    results = []
    for fn in (step, compiled, compiled, compiled):
        a, b = za.clone().requires_grad_(), zb.clone().requires_grad_()
        loss = fn(a, b, y)
        loss.backward()
        results.append((loss.detach().clone(), a.grad, b.grad))
    for r in results[1:]:
        for x, e in zip(r, results[0]):
            torch.testing.assert_close(x, e)


def check_no_sync(quick):
    za, zb, y = make(2, 19, 64, 96, torch.bfloat16, seed=6)
    a, b = za.clone().requires_grad_(), zb.clone().requires_grad_()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = torch.ops.ccl.pixel_selective_kl(a, b, y, 1.0, "correct", "valid", 255)
        torch.autograd.grad(out[0] + out[1], (a, b))
        torch.ops.ccl.region_direction_mask(za, zb, y, 16, 16, "ce", 255)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def check_forward_gradients_and_learners(quick):
    """The launcher paths the SIMT harness does not run: gradients written by the forward (grad_mask) equal the
    backward's at unit upstream gradients, and learners='a'/'b' zero exactly the other loss."""
    za, zb, y = make(2, 19, 64, 96, torch.float32, seed=5)
    for rule, normalize in (("correct", "valid"), ("confidence", "selected"), ("all", "valid")):
        out = torch.ops.ccl.pixel_selective_kl(za, zb, y, 1.5, rule, normalize, 255, "both", [True, True])
        one = torch.ones((), device=DEV)
        again = torch.ops.ccl.pixel_selective_kl_backward(one, one, za, zb, out[4], out[5], 1.5, [True, True])
        torch.testing.assert_close(out[6], again[0], rtol=0, atol=0)
        torch.testing.assert_close(out[7], again[1], rtol=0, atol=0)
        for learners, kept, dropped in (("a", 0, 1), ("b", 1, 0)):
            part = torch.ops.ccl.pixel_selective_kl(za, zb, y, 1.5, rule, normalize, 255, learners)
            assert part[dropped].item() == 0.0, (rule, learners, part[dropped].item())
            torch.testing.assert_close(part[kept], out[kept], rtol=1e-6, atol=1e-7)


def check_bad_label(quick):
    code = textwrap.dedent("""
        import torch, ccl_ops
        za = torch.randn(1, 5, 4, 4, device="cuda"); zb = torch.randn_like(za)
        y = torch.zeros(1, 4, 4, dtype=torch.long, device="cuda"); y[0, 1, 2] = 7
        torch.ops.ccl.%s
        torch.cuda.synchronize()
        print("NO ERROR")
    """)
    seen = {}
    for call in ("pixel_selective_kl(za, zb, y, 1.0, 'correct', 'valid', 255)",
                 "region_direction_mask(za, zb, y, 2, 2, 'ce', 255)"):
        proc = subprocess.run([sys.executable, "-c", code % call], capture_output=True, text=True, timeout=120)
        text = proc.stdout + proc.stderr
        ok = proc.returncode != 0 and "device-side assert" in text and "NO ERROR" not in text
        seen[call.split("(")[0]] = "assert" if ok else text[-400:]
        assert ok, text[-2000:]
    return seen


def check_liger(quick):
    from ccl_bench.kernels import liger_peer

    if not liger_peer.available():
        return {"status": "SKIP", "why": "liger_kernel does not import"}
    za, zb, y = make(2, 19, 64, 96, torch.float32, seed=7)
    for rule in ("correct", "confidence", "all"):
        for normalize in ("valid", "selected"):
            a1, b1 = za.clone().requires_grad_(), zb.clone().requires_grad_()
            a2, b2 = za.clone().requires_grad_(), zb.clone().requires_grad_()
            r = reference.pixel_selective_kl_math(a1, b1, y, 1.5, rule, normalize, 255)
            l = liger_peer.pixel_selective_kl_math(a2, b2, y, 1.5, rule, normalize, 255)
            for x, e in zip(l, r):
                torch.testing.assert_close(x, e, rtol=1e-4, atol=1e-6)
            (r.loss_a + r.loss_b).backward()
            (l.loss_a + l.loss_b).backward()
            torch.testing.assert_close(a2.grad, a1.grad, rtol=1e-4, atol=1e-8)
            torch.testing.assert_close(b2.grad, b1.grad, rtol=1e-4, atol=1e-8)


def check_peers(quick):
    shape = (2, 19, 64, 128) if quick else (4, 19, 256, 512)
    worst = {}
    for k in (3, 8):
        logits, y = make_peer_inputs(k, k, *shape, torch.float32, ignore_frac=0.1, device=DEV)
        for rule in ccl_ops.RULES:
            def fused():
                z = [x.clone().requires_grad_() for x in logits]
                out = ccl_ops.pixel_selective_kl_peers(z, y, rule=rule, temperature=1.5)
                return out, torch.autograd.grad(out.losses.sum(), z)

            (out, grads), (again, grads_again) = fused(), fused()
            assert torch.equal(out.losses, again.losses) and torch.equal(out.counts, again.counts)
            assert all(torch.equal(a, b) for a, b in zip(grads, grads_again))
            r = [x.double().requires_grad_() for x in logits]
            ref = ccl_ops.pixel_bsd_peers(r, y, rule=rule, temperature=1.5)
            ref_grads = torch.autograd.grad(sum(ref), r)
            ref = torch.stack(ref).detach()
            torch.testing.assert_close(out.losses.double(), ref, rtol=1e-4, atol=1e-6)
            masks = ccl_ops.peer_masks(r, y, rule=rule)
            counts = [int(learns.sum()) for learns in ccl_ops.learner_masks(masks)]
            # Counts may differ by a few near-tie pixels (float32 vs float64 cross-entropies).
            assert all(abs(int(a) - b) <= 2 + b // 100000 for a, b in zip(out.counts.tolist(), counts)), counts
            for g, rg in zip(grads, ref_grads):
                torch.testing.assert_close(g.double(), rg, rtol=1e-3, atol=1e-9)
            rel = (out.losses.detach().double() - ref).abs() / ref.abs().clamp(min=1e-12)
            worst[f"K={k}/{rule}"] = float(rel.max())
            del out, grads, again, grads_again, r, ref_grads
            torch.cuda.empty_cache()
    return {"worst_rel_loss_err": worst}


def time_ms(fn, reps=20, warmup=3):
    for _ in range(warmup):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


def bandwidth(quick):
    shape = (2, 19, 256, 512) if quick else (8, 19, 512, 1024)
    n, c, h, w = shape
    src = torch.empty(n * c * h * w, device=DEV).normal_()
    dst = torch.empty_like(src)
    copy_gbs = 2 * src.numel() * 4 / (time_ms(lambda: dst.copy_(src)) * 1e-3) / 1e9
    rows = {"shape": "x".join(map(str, shape)), "copy_GBps": round(copy_gbs, 1)}
    for dtype in (torch.float32, torch.bfloat16):
        za, zb, y = make(*shape, dtype, seed=8, ignore_frac=0.0)
        L = za.numel() * za.element_size()
        P = n * h * w
        for rule in ("all", "correct"):
            out = torch.ops.ccl.pixel_selective_kl(za, zb, y, 1.0, rule, "valid", 255)
            sel = out[4]
            learn_frac = float(((sel & 1) != 0).sum() + ((sel & 2) != 0).sum()) / (2 * P)
            fwd_ms = time_ms(lambda: torch.ops.ccl.pixel_selective_kl(za, zb, y, 1.0, rule, "valid", 255))
            g = torch.ones((), device=DEV)
            bwd_ms = time_ms(lambda: torch.ops.ccl.pixel_selective_kl_backward(g, g, za, zb, sel, out[5], 1.0,
                                                                               [True, True]))
            fwd_bytes = 2 * L + 8 * P + P  # logits, int64 labels, selection
            read_frac = float((sel != 0).float().mean())  # pixels whose logits the backward reads
            bwd_bytes = P + 2 * L + read_frac * 2 * L  # selection, grads written, logits re-read
            key = f"{str(dtype)[6:]}/{rule}"
            rows[key] = {
                "fwd_ms": round(fwd_ms, 3), "fwd_pct_copy": round(100 * fwd_bytes / (fwd_ms * 1e-3) / 1e9 / copy_gbs, 1),
                "bwd_ms": round(bwd_ms, 3), "bwd_pct_copy": round(100 * bwd_bytes / (bwd_ms * 1e-3) / 1e9 / copy_gbs, 1),
                "fwd_bwd_ms": round(fwd_ms + bwd_ms, 3),
                # the benchmark's accounting: 2 logits + labels read, 2 logits written
                "fwd_bwd_pct_copy_bench": round(100 * (2 * L + 8 * P + 2 * L) / ((fwd_ms + bwd_ms) * 1e-3) / 1e9 / copy_gbs, 1),
                "learn_frac": round(learn_frac, 3),
            }
        peers, _ = make_peer_inputs(9, 3, *shape, dtype, ignore_frac=0.0, device=DEV)
        peers_ms = time_ms(lambda: torch.ops.ccl.pixel_selective_kl_peers(peers, y, 1.0, "all", "valid", 255,
                                                                          [True] * 3))
        # 3 logits + labels read, learner bytes written and read, 3 gradients written, 3 logits read again
        peers_bytes = 3 * L + 8 * P + 2 * P + 3 * L + 3 * L
        rows[f"{str(dtype)[6:]}/peers3_all"] = {
            "fwd_bwd_ms": round(peers_ms, 3),
            "pct_copy": round(100 * peers_bytes / (peers_ms * 1e-3) / 1e9 / copy_gbs, 1)}
        del peers
        reg_ms = time_ms(lambda: torch.ops.ccl.region_direction_mask(za, zb, y, 16, 16, "ce", 255))
        rows[f"{str(dtype)[6:]}/region16"] = {
            "ms": round(reg_ms, 3), "pct_copy": round(100 * (2 * L + 8 * P) / (reg_ms * 1e-3) / 1e9 / copy_gbs, 1)}
        del za, zb, y
        torch.cuda.empty_cache()
    return rows


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="small shapes (sanity, not the targets)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    assert torch.cuda.is_available() and "cuda" in ccl_ops.KERNEL_DEVICES, ccl_ops.KERNEL_DEVICES
    for name, fn in (("large", check_large), ("determinism", check_determinism), ("cuda_graph", check_cuda_graph),
                     ("compile_reduce_overhead", check_compile_reduce_overhead), ("no_sync", check_no_sync),
                     ("bad_label", check_bad_label), ("forward_gradients", check_forward_gradients_and_learners),
                     ("liger", check_liger), ("peers", check_peers), ("bandwidth", bandwidth)):
        record(name, lambda fn=fn: fn(args.quick))
    info = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "results": RESULTS}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(info, f, indent=1)
    failed = [k for k, v in RESULTS.items() if v["status"] == "FAIL"]
    print(f"check_cuda: {len(RESULTS) - len(failed)}/{len(RESULTS)} not failed; failed: {failed}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
