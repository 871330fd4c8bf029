"""Model benchmark: LESS attention vs the dense joint-attention reference as C grows.

One forward + backward of the encoder (loss = mean square of the token grid) on 64 × 64 tiles with
p = 8 (N = 64 positions) at 10 m GSD, tiny width (D = 192, 3 heads, d_c 4), for C ∈ {4, 13, 50, 200}
observations. Rows:

- ``less``: LESS ViT (``less_vit_tiny``), rank 1, no perception field;
- ``less-r8``: the same with rank 8 (eight Kronecker terms per head, as the authors' launch);
- ``less-pf``: the same as ``less`` with the 640 m perception field (the default), so its cost shows;
- ``dense``: the dense reference (``dense_vit_tiny``) with PyTorch's fused
  ``scaled_dot_product_attention`` (flash kernel: the T × T attention matrix is never stored);
- ``dense-math``: the same model with the math attention backend, which materialises the
  T × T attention matrix as published ChannelViT code does;
- ``authors``: gfm's embedding with every block computed the LESS authors' way
  (:mod:`bench.less_reference`: branch-width projections of every token, pools at branch width,
  the outer products formed), rank 1, no perception field: the ``less`` row against the authors'
  maths at the same sizes. Its GFLOP column is gfm's count (the model's ``flops()``), not theirs;
- ``less-compiled`` (only when named in ``--rows``: each configuration compiles for a minute or more on
  a CPU): the ``less`` row with ``forward_features`` through ``torch.compile`` (inductor), what
  ``engine.compile`` does in training. Its time is taken after two compiling steps; its peak memory is
  not reported (the compiler's own high-water mark hides the step's on the CPU);
- ``less-ref``: the ``less`` row on the reference path of :mod:`gfm.model.attention` (CPU fast paths of
  :mod:`gfm.model.fused` off; what CUDA runs): the fast paths' gain on this machine shows;
- ``less-mkl`` (only when named in ``--rows``): the ``less`` row with PyTorch's oneDNN paths off
  (``torch.backends.mkldnn.enabled = False``), so the MLP's products run through ``F.linear``'s BLAS
  (MKL on x86) instead of oneDNN's kernel: the kernel's share of the ``less`` time shows;
- ``authors-src`` (only when named in ``--rows``, with ``--authors-src DIR``, a checkout of
  ``uiuctml/GeospatialFM``): the authors' own encoder (``SpatialSpectralLowRankViTEncoder``, their
  embedding and blocks) at the same sizes, imported from ``DIR`` in the child process, forward + backward
  of its output grid as for gfm's ``forward_features``. gfm ships none of their code; the row runs what the
  user points it at. Its GFLOP column is gfm's count too (their patch embedding is a two-layer MLP, so
  they do somewhat more).

Each configuration runs in a fresh subprocess. Peak memory on CPU is the growth of the process's
peak resident set (``getrusage`` high-water mark) over the first step, after model and batch are
built; on CUDA it is ``max_memory_allocated`` over the step. A watchdog kills a child whose resident
set passes ``--mem-cap-gb`` (reported OOM) or that runs past ``--timeout`` (reported TIMEOUT).
Time is the best of the steps after that first one: at least ``--repeats`` of them, more until
``--min-time`` seconds are spent (at most 50). The minimum is the figure least disturbed by other
processes on a shared machine; cheap configurations get more tries, which if anything flatters the
small-C times and so inflates ``growth_13_200``.

Run: ``python -m bench.model`` (``--depth``, ``--batch-size``, ``--repeats`` to trade time for
fidelity; ``--sizes 13,200`` for some C only; ``--rounds N`` runs every configuration N times, the rows
of one size one after another, and keeps the best time and the largest peak: on a shared machine a slow
spell then hits every row alike instead of one; ``--shared`` also times the rows of each size together in
one process, a step of each in turn, and reports each row's median step as ``shared s``: the ratio least
moved by the machine, though no peak memory can be told apart there). The last line is ``RESULT speedup_c200=...
mem_ratio_c200=... growth_13_200=... flops_growth_13_200=... rank8_cost_c200=... field_cost_c200=...
authors_time_c200=... authors_mem_c200=...
authors_time_c13=... authors_mem_c13=... authors_vs_compiled_c13=... authors_vs_compiled_c200=...
authors_src_time_c13=... authors_src_time_c200=... authors_src_mem_c13=... authors_src_mem_c200=...
onednn_gain_c13=... onednn_gain_c200=... fused_gain_c4=... fused_mem_c4=... (and c13, c200)
shared_authors_time_c13=... shared_authors_time_c200=... shared_authors_src_time_c13=...
shared_authors_src_time_c200=... shared_onednn_gain_c13=... shared_onednn_gain_c200=...
shared_fused_gain_c13=... shared_fused_gain_c200=...``
(dense = the fused-attention reference; ``rank8_cost`` to ``authors_mem`` are ratios to the ``less`` row at
C = 200 and ``authors_*_c13`` at C = 13, ``authors_vs_compiled`` the ``authors`` time over the
``less-compiled`` time, ``authors_src_*`` the ``authors-src`` row over the ``less`` row: above 1, gfm is
the cheaper; ``onednn_gain_*`` the ``less-mkl`` time over the ``less`` time; ``fused_gain_*`` and
``fused_mem_*`` the ``less-ref`` time and peak over the ``less`` ones; ``shared_*`` the same
ratios of the ``shared s`` medians; ``nan`` for rows or sizes not run).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    from gfm.batch import Batch

CHANNELS = (4, 13, 50, 200)
#: (row, model, attention backend, constructor overrides)
ROWS: tuple[tuple[str, str, str, dict[str, Any]], ...] = (
    ("less", "less_vit_tiny", "auto", {"perception_radius_m": 0.0}),
    ("less-r8", "less_vit_tiny", "auto", {"perception_radius_m": 0.0, "rank": 8}),
    ("less-pf", "less_vit_tiny", "auto", {"perception_radius_m": 640.0}),
    ("dense", "dense_vit_tiny", "auto", {"perception_radius_m": 0.0}),
    ("dense-math", "dense_vit_tiny", "math", {"perception_radius_m": 0.0}),
    ("authors", "less_vit_tiny", "auto", {"perception_radius_m": 0.0, "authors_blocks": True}),
    ("less-compiled", "less_vit_tiny", "auto", {"perception_radius_m": 0.0, "compiled": True}),
    ("authors-src", "less_vit_tiny", "auto", {"perception_radius_m": 0.0, "authors_src": True}),
    ("less-mkl", "less_vit_tiny", "auto", {"perception_radius_m": 0.0, "onednn": False}),
    ("less-ref", "less_vit_tiny", "auto", {"perception_radius_m": 0.0, "fused": False}),
)
#: rows run unless ``--rows`` says otherwise (compiling every configuration takes minutes on a CPU)
OPT_IN_ROWS = ("less-compiled", "authors-src", "less-mkl")
DEFAULT_ROWS = tuple(r[0] for r in ROWS if r[0] not in OPT_IN_ROWS)


def reflectance_batch(B: int, C: int, S: int) -> Batch:
    """``B`` random ``S × S`` tiles of ``C`` reflectance bands spread over 400-2500 nm, all valid, 10 m."""
    import torch

    from gfm.batch import Batch

    return Batch(
        pixels=torch.randn(B, C, S, S),
        wavelength=torch.linspace(400.0, 2500.0, C).repeat(B, 1),
        bandwidth=torch.full((B, C), 10.0),
        kind=torch.zeros(B, C, dtype=torch.long),
        time=torch.full((B, C), 19000.0),
        valid=torch.ones(B, C, S, S, dtype=torch.bool),
        gsd=torch.full((B,), 10.0),
    )


@dataclass
class _Configuration:
    """One row at one size, built in a child process: its step, gfm's FLOP count, how it runs."""

    step: Callable[[], None]
    flops: int
    device: Any
    compiled: bool
    onednn: bool
    sdpa: str
    fast: bool

    def run(self) -> None:
        """One step with the row's own settings (oneDNN on or off, attention backend, fast paths or reference)."""
        import torch
        from torch.nn.attention import SDPBackend, sdpa_kernel

        from gfm.model import fused

        torch.backends.mkldnn.enabled = self.onednn  # type: ignore[assignment]  # a ContextProp
        with sdpa_kernel(SDPBackend.MATH) if self.sdpa == "math" else _nullcontext(), fused.use_fused(self.fast):
            self.step()


def _configuration(args: argparse.Namespace, model_name: str, sdpa: str, kwargs: dict[str, Any]) -> _Configuration:
    import torch

    from gfm.model import LESSViT, create_model

    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    kwargs = dict(kwargs)
    authors = bool(kwargs.pop("authors_blocks", False))
    compiled = bool(kwargs.pop("compiled", False))
    source = bool(kwargs.pop("authors_src", False))
    onednn = bool(kwargs.pop("onednn", True))
    fast = bool(kwargs.pop("fused", True))
    model = cast(LESSViT, create_model(model_name, depth=args.depth, patch_size=8, **kwargs))
    B, C, S = args.batch_size, args.channels, 64
    flops = model.flops(B, C, S)  # gfm's count, taken before the authors' blocks replace gfm's
    if authors:
        from bench.less_reference import authors_encoder

        model = authors_encoder(model, rank=int(kwargs.get("rank", 1)))
    batch = reflectance_batch(B, C, S).to(device)
    features: Any = torch.compile(model.forward_features) if compiled else model.forward_features
    if source:
        model, features = _authors_source_encoder(args.authors_src, args.depth, batch)
    model = model.to(device)

    def step() -> None:
        model.zero_grad(set_to_none=True)
        features(batch).float().square().mean().backward()
        if device.type == "cuda":
            torch.cuda.synchronize()

    return _Configuration(step, flops, device, compiled, onednn, sdpa, fast)


def _enough(times: list[float], args: argparse.Namespace) -> bool:
    return len(times) >= args.repeats and (sum(times) >= args.min_time or len(times) >= 50)


def child(args: argparse.Namespace) -> None:
    """One configuration: build, time forward + backward, print a JSON line."""
    import torch

    torch.set_num_threads(args.threads)
    conf = _configuration(args, args.model, args.sdpa, json.loads(args.kwargs))
    if conf.compiled:  # compile (forward and backward graphs) before anything is measured
        conf.run()
        conf.run()
    if conf.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        conf.run()
        peak_mb = (torch.cuda.max_memory_allocated() - base) / 2**20
        method = "cuda max_memory_allocated"
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        conf.run()
        peak_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
        method = "peak RSS growth (getrusage)"
        if conf.compiled:
            peak_mb = math.nan  # under the compiler's own high-water mark
    times: list[float] = []
    while not _enough(times, args):
        t0 = time.perf_counter()
        conf.run()
        times.append(time.perf_counter() - t0)
    print(json.dumps({"time_s": min(times), "peak_mb": peak_mb, "method": method,
                      "device": str(conf.device), "flops": conf.flops}))


def shared_child(args: argparse.Namespace) -> None:
    """Several rows at one size in this one process, a step of each in turn: print their median step times.

    Every row sees the same machine at the same moments (a slow spell, the allocator's state), which a
    process per configuration cannot give; what it cannot measure is each row's own peak memory.
    """
    import torch

    torch.set_num_threads(args.threads)
    rows = json.loads(args.configs)
    confs = {row: _configuration(args, model, sdpa, kwargs) for row, model, sdpa, kwargs in rows}
    for conf in confs.values():  # warm-up (and compilation) outside the timing
        for _ in range(2 if conf.compiled else 1):
            conf.run()
    times: dict[str, list[float]] = {row: [] for row in confs}
    while not all(_enough(t, args) for t in times.values()):
        for row, conf in confs.items():
            t0 = time.perf_counter()
            conf.run()
            times[row].append(time.perf_counter() - t0)
    print(json.dumps({row: sorted(t)[len(t) // 2] for row, t in times.items()}))


def _authors_source_encoder(src: str, depth: int, batch: Batch) -> tuple[Any, Any]:
    """The LESS authors' own encoder from their code in ``src``, and a function running it on a batch.

    ``src`` is a checkout of ``uiuctml/GeospatialFM``; the encoder has the sizes of ``less_vit_tiny`` (D 192,
    3 heads, ``d_c`` 4, rank 1, p 8, no perception field) and runs as their fine-tuning runs it (no
    masking): the whole encoder, their embedding included, as gfm's ``forward_features`` is. Their code is
    imported only in this child process and only when the row is asked for.
    """
    sys.path.insert(0, src)
    from GeospatialFM.models.spatial_spectral_low_rank_vit import (  # type: ignore[import-not-found]
        SpatialSpectralLowRankViTConfig,
        SpatialSpectralLowRankViTEncoder,
    )

    config = SpatialSpectralLowRankViTConfig(patch_size=8, embed_dim=192, depth=depth, num_heads=3)
    config.pretrain = False  # their encoder masks tokens in training only while pretraining
    model = SpatialSpectralLowRankViTEncoder(config).train()
    wavelengths = batch.wavelength[:1].cpu()  # [1, C], nm: one band set per batch, as their embedding takes

    def features(b: Batch) -> Any:
        return model(optical=b.pixels, optical_channel_wv=wavelengths, spatial_resolution=10)[0]

    return model, features


class _nullcontext:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def _rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _common(args: argparse.Namespace, channels: int) -> list[str]:
    cmd = ["--channels", str(channels), "--depth", str(args.depth), "--batch-size", str(args.batch_size),
           "--repeats", str(args.repeats), "--min-time", str(args.min_time), "--threads", str(args.threads)]
    return cmd + (["--authors-src", args.authors_src] if args.authors_src else [])


def run_one(args: argparse.Namespace, model: str, sdpa: str, kwargs: dict[str, Any], channels: int) -> dict:
    """Run one configuration in a fresh subprocess under the memory and time watchdog."""
    cmd = ["--child", "--model", model, "--sdpa", sdpa, "--kwargs", json.dumps(kwargs), *_common(args, channels)]
    return _watched(args, cmd)


def run_shared(args: argparse.Namespace, rows: list[tuple[str, str, str, dict[str, Any]]], channels: int) -> dict:
    """Time ``rows`` at one size in one subprocess, a step of each in turn (:func:`shared_child`)."""
    return _watched(args, ["--shared-child", "--configs", json.dumps(rows), *_common(args, channels)],
                    timeout=args.timeout * len(rows))


def _watched(args: argparse.Namespace, child_args: list[str], timeout: float | None = None) -> dict:
    """``python -m bench.model CHILD_ARGS`` under the watchdog: its last JSON line, with a status."""
    proc = subprocess.Popen([sys.executable, "-m", "bench.model", *child_args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    t0 = time.monotonic()
    status = None
    while proc.poll() is None:
        if _rss_mb(proc.pid) > args.mem_cap_gb * 1024:
            status = "OOM"
        elif time.monotonic() - t0 > (timeout or args.timeout):
            status = "TIMEOUT"
        if status:
            proc.kill()
            proc.wait()
            return {"status": status}
        time.sleep(0.05)
    out, err = proc.communicate()
    if proc.returncode != 0:
        oom = "out of memory" in err.lower() or "can't allocate" in err.lower() or proc.returncode == -9
        return {"status": "OOM" if oom else f"ERROR rc={proc.returncode}: {err.strip().splitlines()[-1:]}"}
    return {"status": "ok", **json.loads(out.strip().splitlines()[-1])}


def _ratio(a: float, b: float) -> float:
    """``a / b``, or nan where ``b`` is 0 (a peak below the resolution of the high-water mark)."""
    return a / b if b else math.nan


def _merge(old: dict | None, new: dict) -> dict:
    """Two runs of one configuration: the best time and the largest peak; a failed run stands."""
    if old is None or old["status"] != "ok":
        return old or new
    if new["status"] != "ok":
        return new
    return {**old, "time_s": min(old["time_s"], new["time_s"]), "peak_mb": max(old["peak_mb"], new["peak_mb"])}


def main(argv: list[str] | None = None) -> None:
    """Run every row and configuration, print the table and the RESULT line."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", default="less_vit_tiny", help=argparse.SUPPRESS)
    p.add_argument("--sdpa", default="auto", help=argparse.SUPPRESS)
    p.add_argument("--kwargs", default="{}", help=argparse.SUPPRESS)
    p.add_argument("--channels", type=int, default=4, help=argparse.SUPPRESS)
    p.add_argument("--shared-child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--configs", default="[]", help=argparse.SUPPRESS)
    p.add_argument("--depth", type=int, default=2, help="encoder blocks (tiny width; ratios do not depend on it)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--repeats", type=int, default=2, help="timed steps after the first (best reported)")
    p.add_argument("--min-time", type=float, default=5.0, help="keep timing steps until this many seconds")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (1: robust on a shared machine)")
    p.add_argument("--mem-cap-gb", type=float, default=6.0, help="resident-set cap per configuration")
    p.add_argument("--timeout", type=float, default=240.0, help="seconds per configuration")
    p.add_argument("--rows", default=",".join(DEFAULT_ROWS),
                   help=f"which rows to run (default {','.join(DEFAULT_ROWS)}; also: {', '.join(OPT_IN_ROWS)})")
    p.add_argument("--sizes", default=",".join(map(str, CHANNELS)), help="observation counts C to run")
    p.add_argument("--rounds", type=int, default=1,
                   help="run every configuration this many times, rows alternating (best time, largest peak)")
    p.add_argument("--authors-src", default=None, metavar="DIR",
                   help="a checkout of uiuctml/GeospatialFM for the authors-src row (their encoder, run in the child)")
    p.add_argument("--shared", action="store_true",
                   help="also time the rows of each size in one process, a step of each in turn (median step: "
                        "the 'shared s' column), so every row meets the same machine at the same moments")
    args = p.parse_args(argv)
    if args.child:
        child(args)
        return
    if args.shared_child:
        shared_child(args)
        return

    wanted = args.rows.split(",")
    unknown = sorted(set(wanted) - {r[0] for r in ROWS})
    if unknown:
        raise SystemExit(f"bench.model: unknown row(s) {unknown}; known: {[r[0] for r in ROWS]}")
    if "authors-src" in wanted and not (args.authors_src and Path(args.authors_src, "GeospatialFM").is_dir()):
        raise SystemExit(f"bench.model: row authors-src needs --authors-src DIR holding GeospatialFM/ "
                         f"(a checkout of uiuctml/GeospatialFM); got {args.authors_src!r}")
    sizes = [int(c) for c in args.sizes.split(",")]
    results: dict[tuple[str, int], dict] = {}
    shared: dict[tuple[str, int], float] = {}  # median step in the shared process, best over the rounds
    shared_status: dict[int, str] = {}
    chosen = [r for r in ROWS if r[0] in wanted]
    for _ in range(args.rounds):
        for c in sizes:  # the rows of one size one after another: a slow spell hits them alike
            for row, model, sdpa, kwargs in chosen:
                results[(row, c)] = _merge(results.get((row, c)), run_one(args, model, sdpa, kwargs, c))
            if args.shared:
                together = run_shared(args, chosen, c)
                shared_status[c] = together.pop("status")
                for row, median in together.items():
                    shared[(row, c)] = min(shared.get((row, c), math.inf), median)
    results = {(r[0], c): results[(r[0], c)] for r in chosen for c in sizes}
    print(f"# LESS vs dense joint attention: tiny width (D 192, 3 heads), depth {args.depth}, batch "
          f"{args.batch_size}, 64x64 tiles at 10 m, p 8 (N 64), forward+backward, {args.threads} threads")
    header = f"{'model':<13} {'C':>4} {'tokens':>7} {'GFLOP fwd':>10} {'fwd+bwd s':>10} {'peak MB':>9}"
    header += f" {'shared s':>9}" if args.shared else ""
    print(header)
    print("-" * len(header))
    method = ""
    for (row, c), r in results.items():
        tokens = (c + 1) * 65
        if r["status"] == "ok":
            method = f"{r['method']} on {r['device']}"
            line = f"{row:<13} {c:>4} {tokens:>7} {r['flops'] / 1e9:>10.1f} {r['time_s']:>10.3f} {r['peak_mb']:>9.0f}"
        else:
            line = f"{row:<13} {c:>4} {tokens:>7} {'':>10} {r['status']:>10} {r['status']:>9}"
        if args.shared:
            line += f" {shared[(row, c)]:>9.3f}" if (row, c) in shared else f" {shared_status.get(c, ''):>9}"
        print(line)
    print(f"# time: best step of >= {args.repeats} (more until {args.min_time:g} s), best over {args.rounds} "
          f"round(s); peak memory: {method}, largest over the rounds; OOM = resident set over "
          f"{args.mem_cap_gb:g} GB; load average {' '.join(f'{v:.1f}' for v in os.getloadavg())}")
    if args.shared:
        print(f"# shared s: median step with the rows of one size in one process, a step of each in turn "
              f"(>= {args.repeats} each, more until each row's take {args.min_time:g} s), "
              f"best over {args.rounds} round(s)")

    def get(row: str, c: int, key: str) -> float:
        r = results.get((row, c), {})
        return float(r[key]) if r.get("status") == "ok" else math.nan

    def ratio(row: str, over: str, c: int, key: str) -> float:
        return _ratio(get(row, c, key), get(over, c, key))

    dense = results.get(("dense", 200), {})
    if dense.get("status") == "OOM":
        speedup, mem_ratio = math.inf, math.inf
    else:
        speedup, mem_ratio = ratio("dense", "less", 200, "time_s"), ratio("dense", "less", 200, "peak_mb")
    growth = _ratio(get("less", 200, "time_s"), get("less", 13, "time_s"))
    flops_growth = _ratio(get("less", 200, "flops"), get("less", 13, "flops"))
    keys = {
        "speedup_c200": speedup, "mem_ratio_c200": mem_ratio, "growth_13_200": growth,
        "flops_growth_13_200": flops_growth,
        "rank8_cost_c200": ratio("less-r8", "less", 200, "time_s"),
        "field_cost_c200": ratio("less-pf", "less", 200, "time_s"),
        "authors_time_c200": ratio("authors", "less", 200, "time_s"),
        "authors_mem_c200": ratio("authors", "less", 200, "peak_mb"),
        "authors_time_c13": ratio("authors", "less", 13, "time_s"),
        "authors_mem_c13": ratio("authors", "less", 13, "peak_mb"),
        "authors_vs_compiled_c13": ratio("authors", "less-compiled", 13, "time_s"),
        "authors_vs_compiled_c200": ratio("authors", "less-compiled", 200, "time_s"),
    }
    for key, field in (("time", "time_s"), ("mem", "peak_mb")):
        for c in (13, 200):
            keys[f"authors_src_{key}_c{c}"] = ratio("authors-src", "less", c, field)
    for c in (13, 200):
        keys[f"onednn_gain_c{c}"] = ratio("less-mkl", "less", c, "time_s")
    for c in (4, 13, 200):
        keys[f"fused_gain_c{c}"] = ratio("less-ref", "less", c, "time_s")
        keys[f"fused_mem_c{c}"] = ratio("less-ref", "less", c, "peak_mb")
    for row, key in (("authors", "authors_time"), ("authors-src", "authors_src_time"), ("less-mkl", "onednn_gain"),
                     ("less-ref", "fused_gain")):
        for c in (13, 200):
            keys[f"shared_{key}_c{c}"] = _ratio(shared.get((row, c), math.nan), shared.get(("less", c), math.nan))
    print("RESULT " + " ".join(f"{k}={v:.2f}" for k, v in keys.items()))


if __name__ == "__main__":
    main()
