"""Scale benchmark of the sharded, fanned-out data plane: plan -> ingest per group -> merge (fan-in) ->
recaption per group -> score per group -> tier (fan-in), against the single-task ``ingest``.

For each source size N it writes N synthetic small images (64..96 px, coarse random noise so every
image is distinct, ~1 % exact duplicates, a ``.txt`` caption beside most) as WebDataset source shards
(``key.png|jpg`` + ``key.txt``, up to 1000 images a tar) and runs every step as separate child
processes (``python -m bench.scale step <name> <args-json>``), P at a time for the per-group steps.
Each child times its own call and reports its own peak RSS (``getrusage(RUSAGE_SELF).ru_maxrss``), so
a step's peak RSS is the max over its children; the step's wall time is measured by the parent from
the first child's start to the last one's end (process start-up and imports included, as a fanned-out
task pays them too). Each child runs with one decode thread and one BLAS/OpenMP thread.

Reported: per N, P and step, images/s, images/s per process and peak RSS (MiB); the RSS at the largest
N over the smallest per step (per-group steps should stay flat, < 1.3x; the fan-ins hold ~550 bytes a
kept image, so they grow); and images/s per core of the fanned-out ingest (plan + ingest + merge) next
to the single-task ``ingest`` in one process. Nothing is hard-coded: every figure is measured here.

The score step runs the built-in scorers by default (``--scorers all``: also the model scorers the
pipeline runs, which cost ~60 ms an image on a CPU and would dominate every other figure).

Run: ``python -m bench.scale --out bench/results/scale.json`` (``--quick``: N in 500, 2000 and P in
1, 2; ``--markdown`` prints Markdown tables; ``--from FILE`` only prints an earlier result).
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import platform
import resource
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from multiprocessing import Pool
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SIZES = (5000, 20000, 50000)
QUICK_SIZES = (500, 2000)
DEFAULT_PARALLEL = (1, 2, 4)
QUICK_PARALLEL = (1, 2)
PER_TAR = 1000
DUP_EVERY = 97  # every 97th image (after the first 300) is an exact copy of an earlier one
CAPTION_EVERY = 4  # every 4th image has no .txt caption beside it
STEPS = ("plan", "ingest", "merge", "recaption", "score", "tier")
KIND = {
    "plan": "single",
    "ingest": "per-group",
    "merge": "fan-in",
    "recaption": "per-group",
    "score": "per-group",
    "tier": "fan-in",
    "single-ingest": "single",
}
RSS_TARGET = 1.3
WORDS = "red blue green small large old new bright dark quiet busy round square soft sharp warm".split()
THINGS = "cat house tree river car bird mountain street flower boat chair city field lamp cup".split()


# --------------------------------------------------------------------------- synthetic source shards


def _content_seed(g: int) -> int:
    """The seed an image's bytes come from: its own index, or an earlier image's for an exact copy."""
    if g >= 300 and g % DUP_EVERY == 0:
        return g - 257  # usually in an earlier source tar: a duplicate across groups for the fan-in
    return g


def _image_bytes(seed: int) -> tuple[bytes, str]:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    w, h = (int(v) for v in rng.integers(64, 97, 2))
    cells = int(rng.integers(6, 13))
    coarse = rng.integers(0, 256, (cells, cells, 3), dtype=np.uint8)
    image = Image.fromarray(coarse).resize((w, h), Image.NEAREST)
    buf = io.BytesIO()
    if rng.random() < 0.2:
        image.save(buf, format="JPEG", quality=90)
        return buf.getvalue(), "jpg"
    image.save(buf, format="PNG")
    return buf.getvalue(), "png"


def _write_tar(job: tuple[Path, int, int]) -> int:
    path, start, stop = job
    with tarfile.open(path, "w") as tar:
        for g in range(start, stop):
            data, ext = _image_bytes(_content_seed(g))
            members = [(f"{g:08d}.{ext}", data)]
            if g % CAPTION_EVERY:
                words = [WORDS[(g * 7 + i) % len(WORDS)] for i in range(2)]
                text = f"a {' '.join(words)} {THINGS[g % len(THINGS)]} number {g}"
                members.append((f"{g:08d}.txt", text.encode()))
            for name, payload in members:
                info = tarfile.TarInfo(name)
                info.size, info.mtime = len(payload), 1_700_000_000
                tar.addfile(info, io.BytesIO(payload))
    return stop - start


def build_source(folder: Path, n: int, per_tar: int, procs: int) -> dict:
    """``n`` images in ``ceil(n / per_tar)`` source tars under ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    jobs = [(folder / f"src-{i:05d}.tar", s, min(s + per_tar, n)) for i, s in enumerate(range(0, n, per_tar))]
    start = time.perf_counter()
    with Pool(max(1, procs)) as pool:
        written = sum(pool.map(_write_tar, jobs))
    duplicates = sum(1 for g in range(n) if _content_seed(g) != g)
    return {
        "images": written,
        "tars": len(jobs),
        "per_tar": per_tar,
        "exact_duplicates": duplicates,
        "captioned": sum(1 for g in range(n) if g % CAPTION_EVERY),
        "bytes": sum(p.stat().st_size for p, _, _ in jobs),
        "generate_s": time.perf_counter() - start,
    }


# --------------------------------------------------------------------------- child: one step in-process


def _import_step(name: str):
    """The function a step calls (an ImportError means the step is not written yet)."""
    if name == "plan":
        from components.plan.plan import plan_source

        return plan_source
    if name == "ingest":
        from components.ingest.group import ingest_group

        return ingest_group
    if name == "merge":
        from components.ingest.merge import merge_groups

        return merge_groups
    if name == "recaption":
        from components.recaption.recaption import recaption_group

        return recaption_group
    if name == "score":
        from components.tier.tier import score_group

        return score_group
    if name == "tier":
        from components.tier.tier import tier_groups

        return tier_groups
    if name == "single-ingest":
        from components.ingest.ingest import ingest

        return ingest
    raise SystemExit(f"unknown step {name!r}")


def _options(args: dict):
    from components.ingest.ingest import IngestOptions

    return IngestOptions(**args.get("options", {}))


def _scorer_names(spec: str) -> list[str]:
    """``builtin``: the scorers without a model (no BRISQUE/NIQE/NSFW/OCR/...); else a comma list."""
    if spec == "builtin":
        from components.tier.registry import available, model_scorers

        models = {s.name for s in model_scorers()}
        return [s.name for s in available() if s.name not in models]
    return [n for n in spec.split(",") if n]


def run_step(name: str, args: dict) -> dict:
    """Run one step in this process; the measurements of the call (imports not timed, but in the RSS)."""
    try:
        fn = _import_step(name.removeprefix("import:"))
    except ImportError as exc:
        return {"skipped": f"{type(exc).__name__}: {exc}"}
    from components.plan.plan import Group

    out: dict = {}
    start, cpu_start = time.perf_counter(), time.process_time()
    if name.startswith("import:"):  # only the imports: the RSS every child of that step starts from
        items = 0
    elif name == "plan":
        plan = fn(
            args["source"],
            args["data_root"],
            group_size=args["group_size"],
            options=_options(args).fingerprint_fields(),
        )
        out["groups"] = plan.group_items
        items = args["images"]  # the plan lists the source tars; its rate is over the images they hold
    elif name == "ingest":
        res = fn(Group.from_json(args["group"]), args["out_dir"], _options(args), progress=False)
        items = res.candidates + res.rejected
        out.update(candidates=res.candidates, rejected=res.rejected)
    elif name == "merge":
        groups = [Group.from_json(g) for g in args["groups"]]
        res = fn(args["group_dirs"], groups, args["out_dir"], _options(args))
        out.update(kept=res.kept, rejected=res.rejected, dataset_hash=res.dataset_hash)
        items = None
    elif name == "recaption":
        fn(Group.from_json(args["group"]), args["out_dir"], backend="alt-text", progress=False)
        items = args["items"]
    elif name == "score":
        kwargs = (
            {"scorer_names": _scorer_names(args["scorers"])} if args.get("scorers", "all") != "all" else {}
        )
        fn(args["captions_dir"], args["out_dir"], progress=False, **kwargs)
        items = args["items"]
    elif name == "tier":
        res = fn(args["captions_dirs"], args["score_dirs"], args["out_dir"])
        items = args["items"]
        counts = getattr(res, "counts", None)
        if isinstance(counts, dict):
            out["tier_counts"] = counts
    elif name == "single-ingest":
        res = fn(
            args["source"], args["out_dir"], _options(args), group_size=args["group_size"], progress=False
        )
        items = res.kept + res.rejected
        out.update(kept=res.kept, rejected=res.rejected, dataset_hash=res.dataset_hash)
    else:
        raise SystemExit(f"unknown step {name!r}")
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    if name == "merge":  # the candidate rows the fan-in replayed (read after the clock stopped)
        items = sum(
            json.loads((Path(d) / "summary.json").read_text())["candidates"] for d in args["group_dirs"]
        )
    out.update(
        elapsed_s=elapsed,
        cpu_s=cpu,
        items=items,
        max_rss_kib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
    )
    return out


def child_main(name: str, args_json: str) -> None:
    try:
        result = run_step(name, json.loads(args_json))
    except Exception as exc:
        traceback.print_exc()
        result = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]}
    print(json.dumps(result), flush=True)
    sys.exit(1 if "error" in result else 0)


# --------------------------------------------------------------------------- parent: launch children

CHILD_ENV = {
    "OMP_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "NUMEXPR_NUM_THREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
}


def launch(name: str, args: dict) -> dict:
    """One child process running one step; its JSON line, or an ``error`` with the end of its stderr."""
    env = {
        **os.environ,
        **CHILD_ENV,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    proc = subprocess.run(
        [sys.executable, "-m", "bench.scale", "step", name, json.dumps(args)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    try:
        result = json.loads(lines[-1])
    except (IndexError, ValueError):
        result = {}
    if proc.returncode != 0 or not result:
        result.setdefault("error", f"exit {proc.returncode}")
        result["stderr_tail"] = proc.stderr[-1500:]
    return result


def run_fanout(name: str, arg_list: list[dict], parallel: int) -> dict:
    """``arg_list`` as children, ``parallel`` at a time; the step's wall time, items and peak RSS."""
    start = time.perf_counter()
    with ThreadPoolExecutor(max(1, parallel)) as pool:
        results = list(pool.map(lambda a: launch(name, a), arg_list))
    wall = time.perf_counter() - start
    row = {"processes": len(results), "parallel": parallel, "wall_s": wall, "children": results}
    errors = [r for r in results if "error" in r]
    skipped = [r for r in results if "skipped" in r]
    if errors:
        row.update(status="error", note=errors[0]["error"], stderr_tail=errors[0].get("stderr_tail", ""))
        return row
    if skipped:
        row.update(status="skipped", note=f"not importable yet: {skipped[0]['skipped']}")
        return row
    items = sum(r["items"] for r in results)
    rate = items / wall if wall > 0 else 0.0
    row.update(
        status="ok",
        items=items,
        images_per_s=rate,
        images_per_s_per_process=rate / max(1, parallel),
        peak_rss_mib=max(r["max_rss_kib"] for r in results) / 1024,
        child_seconds_sum=sum(r["elapsed_s"] for r in results),
        child_seconds_max=max(r["elapsed_s"] for r in results),
        child_cpu_seconds_sum=sum(r["cpu_s"] for r in results),
    )
    return row


def _skip(note: str) -> dict:
    return {"status": "skipped", "note": note, "processes": 0}


def _kept_per_group(merged_dir: Path) -> dict[str, int]:
    import pandas as pd

    frame = pd.read_parquet(merged_dir / "manifest.parquet", columns=["group"])
    return {str(k): int(v) for k, v in frame["group"].value_counts().items()}


def run_pipeline(
    source: Path, work: Path, n: int, group_size: int, parallel: int, options: dict, scorers: str
) -> dict:
    """The data plane once over ``source`` at parallelism ``parallel``; one row per step."""
    work.mkdir(parents=True)
    steps: dict[str, dict] = {}
    steps["plan"] = run_fanout(
        "plan",
        [
            {
                "source": str(source),
                "data_root": str(work / "data"),
                "group_size": group_size,
                "images": n,
                "options": options,
            }
        ],
        1,
    )
    if steps["plan"]["status"] != "ok":
        return {s: steps.get(s, _skip("needs plan")) for s in STEPS}
    groups = steps["plan"]["children"][0]["groups"]
    names = [json.loads(g)["name"] for g in groups]
    ingest_dirs = [str(work / "ingest" / nm) for nm in names]
    steps["ingest"] = run_fanout(
        "ingest",
        [{"group": g, "out_dir": d, "options": options} for g, d in zip(groups, ingest_dirs, strict=True)],
        parallel,
    )
    if steps["ingest"]["status"] != "ok":
        return {s: steps.get(s, _skip("needs ingest")) for s in STEPS}
    merged = work / "merged"
    steps["merge"] = run_fanout(
        "merge",
        [{"group_dirs": ingest_dirs, "groups": groups, "out_dir": str(merged), "options": options}],
        1,
    )
    if steps["merge"]["status"] != "ok":
        return {s: steps.get(s, _skip("needs merge")) for s in STEPS}
    kept = _kept_per_group(merged)
    caption_dirs = [str(work / "recaption" / nm) for nm in names]
    steps["recaption"] = run_fanout(
        "recaption",
        [
            {"group": g, "out_dir": d, "items": kept.get(nm, 0)}
            for g, d, nm in zip(groups, caption_dirs, names, strict=True)
        ],
        parallel,
    )
    if steps["recaption"]["status"] != "ok":
        steps["score"] = steps["tier"] = _skip(f"needs recaption ({steps['recaption']['status']})")
        return steps
    score_dirs = [str(work / "score" / nm) for nm in names]
    steps["score"] = run_fanout(
        "score",
        [
            {"captions_dir": c, "out_dir": d, "items": kept.get(nm, 0), "scorers": scorers}
            for c, d, nm in zip(caption_dirs, score_dirs, names, strict=True)
        ],
        parallel,
    )
    if steps["score"]["status"] != "ok":
        steps["tier"] = _skip(f"needs score ({steps['score']['status']})")
        return steps
    steps["tier"] = run_fanout(
        "tier",
        [
            {
                "captions_dirs": caption_dirs,
                "score_dirs": score_dirs,
                "out_dir": str(work / "tier"),
                "items": sum(kept.values()),
            }
        ],
        1,
    )
    return steps


def _strip(row: dict) -> dict:
    """A step row for the report: the children's extra outputs (group lists) left out."""
    keep = (
        "elapsed_s",
        "cpu_s",
        "items",
        "max_rss_kib",
        "candidates",
        "rejected",
        "kept",
        "dataset_hash",
        "tier_counts",
    )
    out = {k: v for k, v in row.items() if k != "children"}
    if "children" in row:
        out["children"] = [{k: c[k] for k in keep if k in c} for c in row["children"]]
    return out


def benchmark(
    sizes: list[int], parallels: list[int], workers: int, scorers: str, keep_tmp: bool, group_images: int = 0
) -> dict:
    cpus = os.cpu_count() or 1
    options = {"workers": workers}
    report: dict = {
        "cpus": cpus,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "sizes": sizes,
        "parallel": parallels,
        "ingest_options": options,
        "child_env": CHILD_ENV,
        "scorers": scorers,
        "group_images": group_images,
        "runs": [],
        "single": [],
        "import_only": {},
        "loadavg_start": os.getloadavg(),
    }
    names = (*STEPS, "single-ingest")  # what a child of each step holds before it does anything
    with ThreadPoolExecutor(cpus) as pool:  # RSS only (not timed), so these may overlap
        baselines = list(pool.map(lambda nm: launch(f"import:{nm}", {}), names))
    for name, res in zip(names, baselines, strict=True):
        report["import_only"][name] = (
            {"peak_rss_mib": res["max_rss_kib"] / 1024}
            if "max_rss_kib" in res
            else {"status": "skipped", "note": res.get("skipped") or res.get("error")}
        )
    tmp = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    try:
        for n in sizes:
            # fixed images per group: N grows the number of groups, not their size; else 4 groups
            # (small N: smaller tars, so there are still >= 4 groups)
            per_tar = min(PER_TAR, group_images or math.ceil(n / 8))
            source = tmp / f"n{n}" / "source"
            info = build_source(source, n, per_tar, cpus)
            # a source tar is one entry of a group
            group_size = max(1, group_images // per_tar) if group_images else max(1, info["tars"] // 4)
            info["group_size_tars"] = group_size
            print(
                f"N={n}: {info['tars']} source tars of <= {per_tar} images "
                f"({info['bytes'] / 2**20:.1f} MiB, generated in {info['generate_s']:.1f}s), "
                f"{group_size} tars a group",
                flush=True,
            )
            work = tmp / f"n{n}" / "single"
            row = run_fanout(
                "single-ingest",
                [{"source": str(source), "out_dir": str(work), "group_size": group_size, "options": options}],
                1,
            )
            shutil.rmtree(work, ignore_errors=True)
            child = row["children"][0] if row.get("children") else {}
            report["single"].append(
                {"n": n, **_strip(row), "kept": child.get("kept"), "dataset_hash": child.get("dataset_hash")}
            )
            _progress(n, "-", "single-ingest", row)
            for p in parallels:
                work = tmp / f"n{n}" / f"p{p}"
                steps = run_pipeline(source, work, n, group_size, p, options, scorers)
                shutil.rmtree(work, ignore_errors=True)
                groups = (
                    len(steps["plan"]["children"][0].get("groups", [])) if "children" in steps["plan"] else 0
                )
                merge_child = steps["merge"]["children"][0] if steps["merge"].get("children") else {}
                run = {
                    "n": n,
                    "parallel": p,
                    "groups": groups,
                    "source": info,
                    "kept": merge_child.get("kept"),
                    "dataset_hash": merge_child.get("dataset_hash"),
                    "steps": {s: _strip(r) for s, r in steps.items()},
                }
                report["runs"].append(run)
                for s in STEPS:
                    _progress(n, p, s, steps[s])
            shutil.rmtree(tmp / f"n{n}", ignore_errors=True)
    finally:
        if keep_tmp:
            print(f"kept temporary files under {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    report["loadavg_end"] = os.getloadavg()
    summarise(report)
    return report


def _progress(n: int, p, step: str, row: dict) -> None:
    if row.get("status") == "ok":
        print(
            f"  N={n} P={p} {step}: {row['images_per_s']:.0f} img/s, peak {row['peak_rss_mib']:.0f} MiB "
            f"({row['processes']} processes, {row['wall_s']:.1f}s)",
            flush=True,
        )
    else:
        print(f"  N={n} P={p} {step}: {row.get('status')} - {row.get('note')}", flush=True)


# --------------------------------------------------------------------------- summaries and tables


def summarise(report: dict) -> None:
    """RSS growth per step, fan-out vs single-task ingest per core, and kept-count consistency."""
    cpus = report["cpus"]
    sizes = report["sizes"]
    lo, hi = min(sizes), max(sizes)
    ratios = []
    for p in report["parallel"]:
        by_n = {r["n"]: r for r in report["runs"] if r["parallel"] == p}
        for step in STEPS:
            a, b = (
                by_n.get(lo, {}).get("steps", {}).get(step, {}),
                by_n.get(hi, {}).get("steps", {}).get(step, {}),
            )
            if a.get("status") == "ok" and b.get("status") == "ok" and lo != hi:
                ratio = b["peak_rss_mib"] / a["peak_rss_mib"]
                target = RSS_TARGET if KIND[step] == "per-group" else None
                ratios.append(
                    {
                        "step": step,
                        "kind": KIND[step],
                        "parallel": p,
                        "n_small": lo,
                        "n_large": hi,
                        "rss_small_mib": a["peak_rss_mib"],
                        "rss_large_mib": b["peak_rss_mib"],
                        "ratio": ratio,
                        "target": target,
                        "meets_target": None if target is None else ratio < target,
                    }
                )
    single = {s["n"]: s for s in report["single"]}
    per_core = []
    for run in report["runs"]:
        steps = run["steps"]
        if not all(steps[s].get("status") == "ok" for s in ("plan", "ingest", "merge")):
            continue
        wall = sum(steps[s]["wall_s"] for s in ("plan", "ingest", "merge"))
        rate = run["source"]["images"] / wall
        cores = min(run["parallel"], cpus)
        cpu = sum(steps[s]["child_cpu_seconds_sum"] for s in ("plan", "ingest", "merge"))
        entry = {
            "n": run["n"],
            "parallel": run["parallel"],
            "cores_used": cores,
            "fanout_wall_s": wall,
            "fanout_images_per_s": rate,
            "fanout_images_per_s_per_core": rate / cores,
            # the same images over the CPU seconds of the step calls (no start-up/imports; other load
            # on the machine does not count)
            "fanout_images_per_cpu_s": run["source"]["images"] / cpu,
        }
        s = single.get(run["n"], {})
        if s.get("status") == "ok":
            entry.update(
                single_images_per_s=s["images_per_s"],
                single_images_per_s_per_core=s["images_per_s"],
                single_images_per_cpu_s=s["items"] / s["child_cpu_seconds_sum"],
                per_core_ratio=(rate / cores) / s["images_per_s"],
            )
        per_core.append(entry)
    consistency = []
    for n in sizes:
        kept = {r["parallel"]: r["kept"] for r in report["runs"] if r["n"] == n}
        hashes = {r["dataset_hash"] for r in report["runs"] if r["n"] == n}
        s = single.get(n, {})
        consistency.append(
            {
                "n": n,
                "kept_by_parallel": kept,
                "kept_single": s.get("kept"),
                "same_kept": len(set(kept.values()) | {s.get("kept")}) == 1,
                "same_dataset_hash": len(hashes | {s.get("dataset_hash")}) == 1,
            }
        )
    report["rss_ratio"] = ratios
    report["per_core"] = per_core
    report["consistency"] = consistency
    report["skipped_steps"] = sorted(
        {
            f"{s}: {r['steps'][s].get('note')}"
            for r in report["runs"]
            for s in STEPS
            if r["steps"][s].get("status") != "ok"
        }
    )


def _f(value, fmt: str = ".0f") -> str:
    return "-" if value is None else format(value, fmt)


def _cpu_rate(row: dict) -> str:
    """Items over the CPU seconds of the step calls (start-up and other load on the machine left out)."""
    cpu = row.get("child_cpu_seconds_sum")
    return f"{row['items'] / cpu:.0f}" if cpu else "-"


def tables(report: dict) -> list[tuple[str, list[str], list[list[str]]]]:
    steps_rows = []
    for s in report["single"]:
        ok = s.get("status") == "ok"
        steps_rows.append(
            [
                str(s["n"]),
                "1",
                "single-ingest",
                "single",
                str(s.get("processes", 1)),
                _f(s.get("items"), "d") if ok else "-",
                _f(s.get("wall_s"), ".1f"),
                _f(s.get("images_per_s")) if ok else s.get("status", "-"),
                _f(s.get("images_per_s_per_process")),
                _cpu_rate(s) if ok else "-",
                _f(s.get("peak_rss_mib")),
            ]
        )
    for run in report["runs"]:
        for step in STEPS:
            r = run["steps"][step]
            ok = r.get("status") == "ok"
            steps_rows.append(
                [
                    str(run["n"]),
                    str(run["parallel"]),
                    step,
                    KIND[step],
                    str(r.get("processes", 0)),
                    _f(r.get("items"), "d") if ok else "-",
                    _f(r.get("wall_s"), ".1f") if ok else "-",
                    _f(r.get("images_per_s")) if ok else r.get("status", "-"),
                    _f(r.get("images_per_s_per_process")) if ok else "-",
                    _cpu_rate(r) if ok else "-",
                    _f(r.get("peak_rss_mib")) if ok else "-",
                ]
            )
    steps_rows.sort(key=lambda row: (int(row[0]), row[2] != "single-ingest", int(row[1])))
    out = [
        (
            "Per step (peak RSS: max over the step's processes)",
            [
                "N",
                "P",
                "step",
                "kind",
                "procs",
                "items",
                "wall s",
                "img/s",
                "img/s/proc",
                "img/CPU-s",
                "peak RSS MiB",
            ],
            steps_rows,
        )
    ]
    imports = report.get("import_only", {})
    ratio_rows = [
        [
            r["step"],
            r["kind"],
            str(r["parallel"]),
            _f(imports.get(r["step"], {}).get("peak_rss_mib")),
            f"{r['rss_small_mib']:.0f} (N={r['n_small']}{_per_group(report, r, 'n_small')})",
            f"{r['rss_large_mib']:.0f} (N={r['n_large']}{_per_group(report, r, 'n_large')})",
            f"{r['ratio']:.2f}x",
            "-" if r["target"] is None else f"< {r['target']}x: {'yes' if r['meets_target'] else 'NO'}",
        ]
        for r in report.get("rss_ratio", [])
    ]
    out.append(
        (
            "Peak RSS, largest N over smallest N",
            ["step", "kind", "P", "imports only MiB", "RSS small MiB", "RSS large MiB", "ratio", "target"],
            ratio_rows,
        )
    )
    core_rows = [
        [
            str(c["n"]),
            str(c["parallel"]),
            str(c["cores_used"]),
            f"{c['fanout_images_per_s']:.0f}",
            f"{c['fanout_images_per_s_per_core']:.0f}",
            _f(c.get("single_images_per_s")),
            _f(c.get("per_core_ratio"), ".2f"),
            f"{c['fanout_images_per_cpu_s']:.0f} / {_f(c.get('single_images_per_cpu_s'))}",
        ]
        for c in report.get("per_core", [])
    ]
    out.append(
        (
            f"Ingest (plan + ingest + merge) per core vs the single-task ingest ({report['cpus']} CPUs)",
            [
                "N",
                "P",
                "cores used",
                "fan-out img/s",
                "fan-out img/s/core",
                "single img/s (1 core)",
                "per-core ratio",
                "img per CPU-s in the calls, fan-out / single",
            ],
            core_rows,
        )
    )
    cons_rows = [
        [
            str(c["n"]),
            ", ".join(f"P={p}: {k}" for p, k in c["kept_by_parallel"].items()),
            str(c["kept_single"]),
            "yes" if c["same_kept"] else "NO",
            "yes" if c["same_dataset_hash"] else "NO",
        ]
        for c in report.get("consistency", [])
    ]
    out.append(
        (
            "Kept images (must not depend on P)",
            ["N", "kept (fan-out)", "kept (single)", "same kept", "same dataset hash"],
            cons_rows,
        )
    )
    return out


def _per_group(report: dict, ratio: dict, key: str) -> str:
    """``, <images>/group`` for a per-group step (the group size grows with N here)."""
    if ratio["kind"] != "per-group":
        return ""
    run = next(
        (r for r in report["runs"] if r["n"] == ratio[key] and r["parallel"] == ratio["parallel"]), None
    )
    return f", {run['n'] // max(1, run['groups'])}/group" if run else ""


def render(report: dict, markdown: bool) -> str:
    parts = []
    for title, header, rows in tables(report):
        if markdown:
            parts.append(f"**{title}**\n")
            parts.append("| " + " | ".join(header) + " |")
            parts.append("|" + "|".join("---" for _ in header) + "|")
            parts.extend("| " + " | ".join(row) + " |" for row in rows)
        else:
            widths = [
                max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)
            ]
            parts.append(title)
            parts.append("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
            parts.append("  ".join("-" * w for w in widths))
            parts.extend("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows)
        parts.append("")
    for note in report.get("skipped_steps", []):
        parts.append(f"note: {note}")
    if "loadavg_start" in report:
        start, end = report["loadavg_start"][0], report.get("loadavg_end", [float("nan")])[0]
        parts.append(
            f"{report['cpus']} CPUs, load average {start:.1f} at the start, {end:.1f} at the end; "
            f"scorers: {report.get('scorers', '?')}; ingest decode threads: "
            f"{report.get('ingest_options', {}).get('workers')}"
        )
    return "\n".join(parts)


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["step"]:
        if len(argv) != 3:
            raise SystemExit("usage: python -m bench.scale step <name> <args-json>")
        child_main(argv[1], argv[2])
        return
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("bench/results/scale.json"))
    parser.add_argument("--sizes", type=_ints, default=None, help="source sizes N (default 5000,20000,50000)")
    parser.add_argument("--parallel", type=_ints, default=None, help="processes at a time (default 1,2,4)")
    parser.add_argument("--quick", action="store_true", help="N in 500,2000 and P in 1,2 (the test)")
    parser.add_argument("--workers", type=int, default=1, help="decode threads in each ingest process")
    parser.add_argument(
        "--scorers",
        default="builtin",
        help="score step: builtin (default: no model scorers), all (as the pipeline: OCR, NSFW, BRISQUE, "
        "NIQE, ... ~60 ms an image on a CPU) or a comma list of scorer names",
    )
    parser.add_argument(
        "--group-images",
        type=int,
        default=0,
        help="images per group, fixed as N grows (default 0: always 4 groups, growing with N)",
    )
    parser.add_argument("--markdown", action="store_true", help="print Markdown tables (for the README)")
    parser.add_argument(
        "--from", dest="from_file", type=Path, help="only print the tables of an earlier --out"
    )
    parser.add_argument("--keep-tmp", action="store_true", help="keep the generated files (debugging)")
    args = parser.parse_args(argv)
    if args.from_file:
        report = json.loads(args.from_file.read_text())
        summarise(report)  # recomputed, so the summaries follow this code
        print(render(report, args.markdown))
        return
    sizes = args.sizes or list(QUICK_SIZES if args.quick else DEFAULT_SIZES)
    parallels = args.parallel or list(QUICK_PARALLEL if args.quick else DEFAULT_PARALLEL)
    if min(sizes) < 1 or min(parallels) < 1:
        parser.error("sizes and parallel must be positive")
    start = time.perf_counter()
    report = benchmark(
        sorted(set(sizes)),
        sorted(set(parallels)),
        args.workers,
        args.scorers,
        args.keep_tmp,
        args.group_images,
    )
    report["total_s"] = time.perf_counter() - start
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print()
    print(render(report, args.markdown))
    print(f"wrote {args.out} ({report['total_s']:.0f}s)")


if __name__ == "__main__":
    main()
