"""Scale-out benchmark (issue 5): all cores in memory, out of core from Parquet, Dask LocalCluster.

    OPENBLAS_NUM_THREADS=1 python bench/compare_scaleout.py --cores [--cores-rows 10000000]
    python bench/compare_scaleout.py --generate /tmp/lmefast-scaleout --rows 100000000 \
        --groups 1000000 --files 64
    python bench/compare_scaleout.py --ooc /tmp/lmefast-scaleout
    python bench/compare_scaleout.py --dask /tmp/lmefast-scaleout [--worker-memory 2GiB]
    python bench/compare_scaleout.py --check /tmp/lmefast-scaleout     # in-memory fit, same rows

--cores     in memory, y ~ x1 + x2 + (1 + x1 | g), 10,000,000 rows, 1,000,000 groups (the
            generator of bench/compare_core.py): the pass over the rows (compute_crossprods) and
            the fit (model.fit) with 1 and with 2 threads, medians.
--generate  the same model written as Parquet in --files files (row groups of 500,000 rows),
            one file at a time: never all rows in memory. Group keys are drawn at random, so every
            group spans many files.
--ooc       lmefast.mixedlm(formula, DIR, ...) in a fresh process: time of the two data passes and
            of the fit, peak resident memory of that process (getrusage).
--dask      LocalCluster(n_workers=2, threads_per_worker=1, memory_limit=--worker-memory),
            dd.read_parquet(DIR), lmefast.mixedlm(formula, ddf, ...): time of the passes and of
            the fit, peak resident memory of each worker process and of the client.
--check     the in-memory fit of the same rows (when they fit in memory), for the numbers.
Results are appended to --out (bench/out/scaleout.json).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

import lmefast  # noqa: E402

HERE = Path(__file__).resolve().parent
FORMULA, GROUPS, RE = "y ~ x1 + x2", "g", "~x1"


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def machine() -> dict:
    out = {"platform": platform.platform(), "python": sys.version.split()[0], "cores": os.cpu_count(),
           "numpy": np.__version__, "pandas": pd.__version__,
           "OPENBLAS_NUM_THREADS": os.environ.get("OPENBLAS_NUM_THREADS")}
    for mod in ("pyarrow", "dask", "distributed"):
        try:
            out[mod] = __import__(mod).__version__
        except ImportError:
            out[mod] = None
    return out


def summary(res) -> dict:
    return {"llf": res.llf, "theta": res.theta.tolist(), "fe_params": res.fe_params.tolist(),
            "scale": res.scale, "converged": res.converged, "n_evals": res.optsummary.n_evals,
            "nobs": res.nobs, "n_groups": res.n_groups}


# -- generate -------------------------------------------------------------------------------------
def generate(directory: Path, n_rows: int, n_groups: int, n_files: int, seed: int = 1,
             row_group: int = 500_000) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq

    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    b0 = rng.normal(0.0, 1.0, n_groups)
    b1 = rng.normal(0.0, 0.5, n_groups)
    bounds = np.linspace(0, n_rows, n_files + 1).astype(np.int64)
    t0 = time.perf_counter()
    for i in range(n_files):
        n = int(bounds[i + 1] - bounds[i])
        r = np.random.default_rng([seed, i])
        g = r.integers(0, n_groups, n)
        x1 = r.standard_normal(n)
        x2 = r.standard_normal(n)
        y = (1.0 + b0[g]) + (2.0 + b1[g]) * x1 - 0.5 * x2 + r.standard_normal(n)
        table = pa.table({"y": y, "x1": x1, "x2": x2, "g": g})
        pq.write_table(table, directory / f"part-{i:04d}.parquet", row_group_size=row_group)
        print(f"\rwrote {i + 1}/{n_files} files", end="", flush=True)
    print()
    size = sum(f.stat().st_size for f in directory.glob("*.parquet"))
    return {"rows": n_rows, "groups": n_groups, "files": n_files, "row_group": row_group,
            "bytes_on_disk": size, "seconds": time.perf_counter() - t0}


# -- cores -----------------------------------------------------------------------------------------
def cores(n_rows: int, n_groups: int, reps: int) -> dict:
    """1 and 2 threads, interleaved rep by rep (the machine is shared: a rep disturbed by another
    process hits both settings alike); medians and minima."""
    sys.path.insert(0, str(HERE))
    from compare_core import synthetic

    from lmefast.crossprods import compute_crossprods

    df = synthetic(n_rows, n_groups)
    model = lmefast.mixedlm(FORMULA, df, groups=GROUPS, re_formula=RE)
    theta = model.fit().theta
    times: dict[str, list[float]] = {}

    def timed(name: str, fn) -> object:
        t0 = time.perf_counter()
        out = fn()
        times.setdefault(name, []).append(time.perf_counter() - t0)
        return out

    out: dict = {"rows": n_rows, "groups": n_groups, "reps": reps,
                 "load_average_before": os.getloadavg()[0]}
    for _ in range(reps):
        for n in (1, 2):
            timed(f"crossprods_{n}", lambda: compute_crossprods(model.spec, n))
            res = timed(f"fit_{n}", lambda: model.fit(n_threads=n))
            obj = model.objective(True, n)
            obj.solve(theta)
            timed(f"objective_{n}", lambda: obj.solve(theta * 1.001))
            timed(f"objective_gradient_{n}", lambda: obj.solve(theta * 1.002, want_grad=True))
            out[f"n_evals_{n}"] = res.optsummary.n_evals
            out[f"llf_{n}"] = res.llf
    for name, ts in times.items():
        out[f"{name}_median_s"] = statistics.median(ts)
        out[f"{name}_min_s"] = min(ts)
    for name in ("crossprods", "fit", "objective", "objective_gradient"):
        for stat in ("median", "min"):
            out[f"speedup_{name}_{stat}"] = out[f"{name}_1_{stat}_s"] / out[f"{name}_2_{stat}_s"]
    out["load_average_after"] = os.getloadavg()[0]
    return out


# -- out of core -------------------------------------------------------------------------------------
def ooc_child(directory: str, batch_rows: int) -> dict:
    t0 = time.perf_counter()
    model = lmefast.mixedlm(FORMULA, directory, groups=GROUPS, re_formula=RE, batch_rows=batch_rows,
                            progress=True)
    t1 = time.perf_counter()
    res = model.fit()
    t2 = time.perf_counter()
    str(res.summary())
    return {"passes_s": t1 - t0, "fit_s": t2 - t1, "total_s": t2 - t0, "peak_rss_bytes": peak_rss_bytes(),
            "batch_rows": batch_rows, **summary(res)}


def run_in_child(args: list[str]) -> dict:
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, check=False)
    sys.stderr.write(proc.stderr[-3000:])
    if proc.returncode:
        raise RuntimeError(f"child failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# -- dask ---------------------------------------------------------------------------------------------
def dask_run(directory: str, worker_memory: str, n_workers: int) -> dict:
    import dask.dataframe as dd
    from distributed import Client, LocalCluster

    def worker_peak() -> int:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    with LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True,
                      memory_limit=worker_memory, dashboard_address=":0") as cluster, Client(cluster) as client:
        client.run(lambda: __import__("lmefast"))  # imports on the workers, outside the timing
        before = client.run(worker_peak)
        t0 = time.perf_counter()
        ddf = dd.read_parquet(directory)
        model = lmefast.mixedlm(FORMULA, ddf, groups=GROUPS, re_formula=RE, progress=True)
        t1 = time.perf_counter()
        res = model.fit()
        t2 = time.perf_counter()
        str(res.summary())
        peaks = client.run(worker_peak)
        return {"passes_s": t1 - t0, "fit_s": t2 - t1, "total_s": t2 - t0,
                "npartitions": ddf.npartitions, "worker_memory_limit": worker_memory,
                "n_workers": n_workers, "worker_peak_rss_bytes": list(peaks.values()),
                "worker_rss_before_bytes": list(before.values()),
                "client_peak_rss_bytes": peak_rss_bytes(), **summary(res)}


def check(directory: str) -> dict:
    t0 = time.perf_counter()
    df = pd.read_parquet(directory)
    t1 = time.perf_counter()
    res = lmefast.mixedlm(FORMULA, df, groups=GROUPS, re_formula=RE).fit()
    t2 = time.perf_counter()
    return {"read_s": t1 - t0, "fit_from_frame_s": t2 - t1, "peak_rss_bytes": peak_rss_bytes(),
            **summary(res)}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cores", action="store_true")
    ap.add_argument("--cores-rows", type=int, default=10_000_000)
    ap.add_argument("--cores-groups", type=int, default=1_000_000)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--generate", metavar="DIR")
    ap.add_argument("--rows", type=int, default=100_000_000)
    ap.add_argument("--groups", type=int, default=1_000_000)
    ap.add_argument("--files", type=int, default=64)
    ap.add_argument("--ooc", metavar="DIR")
    ap.add_argument("--batch-rows", type=int, default=1_000_000)
    ap.add_argument("--dask", metavar="DIR")
    ap.add_argument("--worker-memory", default="2GiB")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--check", metavar="DIR")
    ap.add_argument("--child", choices=["ooc", "dask", "check"])
    ap.add_argument("--out", default=str(HERE / "out" / "scaleout.json"))
    args = ap.parse_args()
    if args.child == "ooc":
        print(json.dumps(ooc_child(args.ooc, args.batch_rows)))
        return 0
    if args.child == "dask":
        print(json.dumps(dask_run(args.dask, args.worker_memory, args.workers)))
        return 0
    if args.child == "check":
        print(json.dumps(check(args.check)))
        return 0
    out_path = Path(args.out)
    record = json.loads(out_path.read_text()) if out_path.exists() else {}
    record["machine"] = machine()
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    if args.cores:
        record["cores"] = {"date": stamp, **cores(args.cores_rows, args.cores_groups, args.reps)}
        print(json.dumps(record["cores"]), flush=True)
    if args.generate:
        record["data"] = {"date": stamp, "dir": args.generate,
                          **generate(Path(args.generate), args.rows, args.groups, args.files)}
        print(json.dumps(record["data"]), flush=True)
    if args.ooc:
        record["ooc"] = {"date": stamp, **run_in_child(["--child", "ooc", "--ooc", args.ooc,
                                                        "--batch-rows", str(args.batch_rows)])}
        print(json.dumps(record["ooc"]), flush=True)
    if args.dask:
        record["dask"] = {"date": stamp, **run_in_child(["--child", "dask", "--dask", args.dask,
                                                         "--worker-memory", args.worker_memory,
                                                         "--workers", str(args.workers)])}
        print(json.dumps(record["dask"]), flush=True)
    if args.check:
        record["check"] = {"date": stamp, **run_in_child(["--child", "check", "--check", args.check])}
        print(json.dumps(record["check"]), flush=True)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(record, indent=1, default=str))
    print(f"wrote {out_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
