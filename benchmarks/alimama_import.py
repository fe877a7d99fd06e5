"""Benchmark `dmrx data alimama`: generate fake raw Tianchi files of a given size, import them, and report
rows/s and the import's peak RSS.

    python benchmarks/alimama_import.py --behaviors 3000000 [--json]

The generator and the import run in child processes; the import's child reports its own peak RSS
(resource.getrusage(RUSAGE_SELF).ru_maxrss, cross-checked against /proc/self/status VmHWM), so the figure is
the import's alone (plus the small parent's RSS, which Linux carries across fork+exec into ru_maxrss). A
third child that only imports dmrx.data.importers.alimama gives the baseline (interpreter, numpy, h5py).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

START = 1494000000  # 2017-05-06 00:00 Beijing time (UTC+8), the real data's first day


def _write_csv(path: Path, header: str, columns: list, chunk: int = 1 << 18) -> None:
    import numpy as np

    n = len(columns[0])
    with open(path, "w") as f:
        f.write(header + "\n")
        for s in range(0, n, chunk):
            parts = [c[s : s + chunk].astype(str) for c in columns]
            rows = parts[0]
            for p in parts[1:]:
                rows = np.char.add(np.char.add(rows, ","), p)
            f.write("\n".join(rows.tolist()))
            f.write("\n")


def generate(out: Path, behaviors: int, users: int, impressions: int, ads: int, seed: int = 0) -> None:
    """Fake raw_sample.csv, ad_feature.csv, user_profile.csv, behavior_log.csv with the real columns."""
    import numpy as np

    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    day = 86400
    start = START
    user_ids = np.sort(rng.choice(2_000_000, users, replace=False)) + 1
    ad_ids = np.sort(rng.choice(1_000_000, ads, replace=False)) + 1
    cate = rng.integers(1, 13_000, ads)
    brand = rng.integers(1, 460_000, ads).astype(object)
    brand[rng.random(ads) < 0.3] = "NULL"
    price = np.round(np.exp(rng.normal(4, 1.5, ads)), 2)
    _write_csv(
        out / "ad_feature.csv",
        "adgroup_id,cate_id,campaign_id,customer,brand,price",
        [ad_ids, cate, rng.integers(1, 420_000, ads), rng.integers(1, 260_000, ads), brand, price],
    )
    prof = [user_ids] + [rng.integers(0, k, users).astype(object) for k in (98, 13, 3, 7, 4, 4, 2, 5)]
    for j in (5, 8):  # pvalue_level and new_user_class_level are often empty in the real data
        prof[j][rng.random(users) < 0.5] = ""
    keep = rng.random(users) < 0.93  # some users have no profile
    _write_csv(
        out / "user_profile.csv",
        "userid,cms_segid,cms_group_id,final_gender_code,age_level,"
        "pvalue_level,shopping_level,occupation,new_user_class_level ",
        [p[keep] for p in prof],
    )
    imp_user = user_ids[rng.integers(0, users, impressions)]
    imp_ts = np.sort(start + rng.integers(0, 8 * day, impressions))
    clk = (rng.random(impressions) < 0.05).astype(np.int64)
    pid = np.array(["430548_1007", "430539_1007"])[rng.integers(0, 2, impressions)]
    _write_csv(
        out / "raw_sample.csv",
        "user,time_stamp,adgroup_id,pid,nonclk,clk",
        [imp_user, imp_ts, ad_ids[rng.integers(0, ads, impressions)], pid, 1 - clk, clk],
    )
    beh_user = user_ids[rng.integers(0, users, behaviors)]
    beh_ts = start - 14 * day + rng.integers(0, 22 * day, behaviors)
    btag = np.array(["pv", "cart", "fav", "buy"])[rng.choice(4, behaviors, p=[0.9, 0.04, 0.03, 0.03])]
    bbrand = rng.integers(1, 460_000, behaviors).astype(object)
    bbrand[rng.random(behaviors) < 0.1] = "NULL"
    _write_csv(
        out / "behavior_log.csv",
        "user,time_stamp,btag,cate,brand",
        [beh_user, beh_ts, btag, rng.integers(1, 13_000, behaviors), bbrand],
    )


def _child(args: list[str]) -> dict:
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        sys.exit(f"child failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _peak_rss_mib() -> dict:
    """This process's peak RSS: getrusage (KiB on Linux) and, as a cross-check, /proc's VmHWM."""
    out = {"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                out["vm_hwm_mib"] = int(line.split()[1]) / 1024
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--behaviors", type=int, default=3_000_000, help="rows of behavior_log.csv")
    ap.add_argument("--users", type=int, default=10_000)
    ap.add_argument("--impressions", type=int, default=300_000, help="rows of raw_sample.csv")
    ap.add_argument("--ads", type=int, default=50_000)
    ap.add_argument("--chunk-rows", type=int, default=1 << 19)
    ap.add_argument("--dir", type=Path, help="work in this directory (kept) instead of a temporary one")
    ap.add_argument("--reuse", action="store_true", help="import the raw files already in --dir/raw")
    ap.add_argument("--json", action="store_true", help="print the result as JSON")
    ap.add_argument("--_import", nargs=3, help=argparse.SUPPRESS)
    ap.add_argument("--_baseline", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--_generate", nargs=5, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args._baseline:
        import dmrx.data.importers.alimama  # noqa: F401

        print(json.dumps(_peak_rss_mib()))
        return
    if args._generate:
        dst, *sizes = args._generate
        generate(Path(dst), *map(int, sizes))
        print(json.dumps({}))
        return
    if args._import:
        from dmrx.data.importers.alimama import import_alimama

        src, out, chunk = args._import
        t, cpu = time.perf_counter(), time.process_time()
        summary = import_alimama(src, out, chunk_rows=int(chunk))
        print(
            json.dumps(
                {
                    "seconds": time.perf_counter() - t,
                    "cpu_seconds": time.process_time() - cpu,
                    "summary": summary,
                    **_peak_rss_mib(),
                }
            )
        )
        return

    with tempfile.TemporaryDirectory() as tmp_name:
        work = args.dir or Path(tmp_name)
        src, out = work / "raw", work / "out"
        if args.reuse and not args.dir:
            sys.exit("--reuse needs --dir")
        t = time.perf_counter()
        # in a child, so that this process stays small: a child's getrusage peak includes the RSS of the
        # parent it was forked from (Linux carries the high-water mark across exec)
        if not args.reuse:
            sizes = (args.behaviors, args.users, args.impressions, args.ads)
            _child(["--_generate", str(src), *map(str, sizes)])
        shutil.rmtree(out, ignore_errors=True)
        gen_s = time.perf_counter() - t
        baseline = _child(["--_baseline"])["peak_rss_mib"]
        res = _child(["--_import", str(src), str(out), str(args.chunk_rows)])
        s = res["summary"]
        rows = s["behaviors_read"] + s["impressions"]
        bytes_in = sum((src / f).stat().st_size for f in os.listdir(src))
        result = {
            "behaviors": s["behaviors_read"],
            "impressions": s["impressions"],
            "users": s["impression_users"],
            "input_mib": bytes_in / 2**20,
            "chunk_rows": args.chunk_rows,
            "buckets": s["buckets"],
            "import_s": res["seconds"],
            "rows_per_s": rows / res["seconds"],
            # CPU time of the import: a figure that a busy machine (other processes) does not skew
            "import_cpu_s": res["cpu_seconds"],
            "rows_per_cpu_s": rows / res["cpu_seconds"],
            "behaviors_per_s": s["behaviors_read"] / res["seconds"],
            "peak_rss_mib": res["peak_rss_mib"],
            "vm_hwm_mib": res.get("vm_hwm_mib"),
            "baseline_rss_mib": baseline,
            "parent_rss_mib": _peak_rss_mib()["peak_rss_mib"],
            "rows_out": s["rows"],
            "generate_s": gen_s,
            "output_mib": sum((out / f).stat().st_size for f in os.listdir(out)) / 2**20,
        }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(
            f"{result['behaviors']:,} behaviours + {result['impressions']:,} impressions "
            f"({result['input_mib']:.0f} MiB) in {result['import_s']:.1f} s: "
            f"{result['rows_per_s']:,.0f} rows/s ({result['rows_per_cpu_s']:,.0f} per CPU second); "
            f"peak RSS {result['peak_rss_mib']:.0f} MiB "
            f"(baseline {result['baseline_rss_mib']:.0f} MiB), chunk_rows {args.chunk_rows}, "
            f"{result['buckets']} buckets"
        )


if __name__ == "__main__":
    main()
