"""Corpus builder benchmark (issue 3): a big local tree, against `find -exec cat` and `xargs cat`.

    .venv/bin/python bench/corpus.py [--tree DIR] [--jobs N] [--repeat 3] [--no-exec] [--no-double]

Tree: this interpreter's standard library directory (`sysconfig` "stdlib", site-packages
included; ~940 MB, ~50,000 files here). In one run it measures, page cache warmed first:

- the builder (`workers.corpus.build_corpus_file`, default CorpusConfig) in a child process,
  and again without its C extension (CHARFORGE_NO_NATIVE=1, wall time only):
  bytes and files kept/skipped, wall time (best of --repeat), and, in one more run, the peak
  memory of its whole process tree (builder + forkserver + workers, sampled every 20 ms, as PSS:
  shared pages divided among the processes);
- the seed's `find DIR -name '*' -exec cat {} \\;` (one process per file) and the ratio of its
  wall time to the builder's (goal >= 10x);
- a raw `find DIR -name '*.py' -print0 | xargs -0 cat` (best of --repeat), and the builder's
  throughput on the bytes it kept as a fraction of that (goal >= 50%);
- the builder's C byte work alone on the files it kept (`read_files` and `Sink`: reading, both
  sha256s, the scans, the byte counts, the writing; no walk, no Python per file), best of
  --repeat, in one thread and in two (the reading apart from the sink, as the builder splits
  it): what no build of that corpus can go below on one core, and on two with this split;
- listing the tree alone (`find DIR > /dev/null`), best of --repeat: the walk, which no build
  skips either;
- the builder on the tree doubled (two hard-linked copies side by side), whose peak memory must
  stay within 10% of the single tree's (goal), with duplicates dropped (the default) and kept.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def child(tree: str, out: str, jobs: int, keep_duplicates: bool) -> None:
    """Runs in a subprocess: one build, facts as JSON on stdout."""
    from schemas.corpus import CorpusConfig
    from workers.corpus import build_corpus_file
    from workers.corpus.textscan import NATIVE

    start = time.perf_counter()
    summary = build_corpus_file([tree], CorpusConfig(dedupe=not keep_duplicates), Path(out),
                                git_base_url="https://github.com/", jobs=jobs)
    wall = time.perf_counter() - start
    totals = summary["totals"]
    print(json.dumps({
        "wall": wall, "bytes": totals["bytes"], "source_bytes": totals["source_bytes"],
        "files": totals["files"], "skipped": totals["skipped"], "by_reason": totals["skipped_by_reason"],
        "vocab": totals["vocab_size"], "main_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "native": NATIVE,
    }))


def floor_child(tree: str, manifest: str, out: str, threads: str) -> None:
    """Runs in a subprocess: the builder's C byte work alone on the files a build kept (from its
    manifest): each read, hashed and scanned (`read_files`), and their text hashed, counted and
    written (`Sink`); no walk, no path rules, no verdicts, no headers. With `threads` "1" all of
    it in one thread; with "2" split as the builder splits it, the reading on a thread of its
    own and the sink on this one (both hold no GIL). Wall time as JSON on stdout."""
    import queue
    import threading

    from schemas.corpus import CorpusConfig
    from workers.corpus import _native  # type: ignore[attr-defined]
    from workers.corpus.reading import FileReader
    from workers.corpus.textscan import new_counts

    paths = [f["path"] for f in json.loads(Path(manifest).read_text())["files"]]
    config, counts = CorpusConfig(), new_counts()
    reader = FileReader(tree)

    def slices():
        done = 0
        while done < len(paths):
            window = paths[done:done + 2048]
            reads = reader.read(window, bytes(len(window)), config.max_file_bytes, 1 << 20, config.max_line_length)
            yield [r[3] for r in reads]
            done += len(reads)

    def read_ahead(ready: queue.Queue) -> None:
        for texts in slices():
            ready.put(texts)
        ready.put(None)

    start = time.perf_counter()
    with open(out, "wb") as fh:
        sink = _native.Sink(fh.fileno())
        if threads == "1":
            for texts in slices():
                sink.write(texts, counts)
        else:
            ready: queue.Queue = queue.Queue(4)  # as the builder's READ_AHEAD
            thread = threading.Thread(target=read_ahead, args=(ready,))
            thread.start()
            while (texts := ready.get()) is not None:
                sink.write(texts, counts)
            thread.join()
    print(json.dumps({"wall": time.perf_counter() - start, "bytes": sink.size}))


def run_floor(tree: Path, manifest: Path, out: Path, repeat: int, threads: int) -> dict:
    """`floor_child` in a child process, best of `repeat`."""
    runs = []
    for _ in range(repeat):
        out.unlink(missing_ok=True)
        proc = subprocess.run([sys.executable, __file__, "--floor", str(tree), str(manifest), str(out), str(threads)],
                              capture_output=True, text=True, check=True)
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    out.unlink(missing_ok=True)
    return min(runs, key=lambda r: r["wall"])


def run_builder(tree: Path, out: Path, jobs: int, keep_duplicates: bool = False, *, sample: bool = True,
                native: bool = True) -> dict:
    """One build in a child process; with `sample`, adds the peak memory of its process tree;
    `native=False`: without the C extension (CHARFORGE_NO_NATIVE=1).

    Sampling reads /proc/*/smaps_rollup and costs CPU: timed runs do not sample.
    """
    out.unlink(missing_ok=True)
    cmd = [sys.executable, __file__, "--child", str(tree), str(out), str(jobs)]
    if keep_duplicates:
        cmd.append("--keep-duplicates")
    env = {**os.environ, "CHARFORGE_NO_NATIVE": "0" if native else "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
    peak_rss = peak_pss = 0
    parent = psutil.Process(proc.pid)
    while sample and proc.poll() is None:
        rss = pss = 0
        try:
            for p in [parent, *parent.children(recursive=True)]:
                info = p.memory_full_info()  # PSS: shared pages divided among the processes
                rss, pss = rss + info.rss, pss + info.pss
        except psutil.Error:
            pass
        peak_rss, peak_pss = max(peak_rss, rss), max(peak_pss, pss)
        time.sleep(0.02)
    stdout, _ = proc.communicate()  # (without sampling, just wait)
    if proc.returncode != 0:
        raise SystemExit(f"builder failed with exit code {proc.returncode}")
    facts = json.loads(stdout.strip().splitlines()[-1])
    if facts["native"] != native:
        raise SystemExit(f"builder ran {'with' if facts['native'] else 'without'} the C extension")
    facts["tree_rss"], facts["tree_pss"] = peak_rss, peak_pss
    return facts


def timed_shell(command: str) -> float:
    start = time.perf_counter()
    subprocess.run(["bash", "-c", command], check=True)
    return time.perf_counter() - start


def q(path: Path) -> str:
    return "'" + str(path).replace("'", "'\\''") + "'"


def mb(n: float) -> str:
    return f"{n / 1e6:,.1f} MB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tree", type=Path, default=Path(sysconfig.get_paths()["stdlib"]))
    parser.add_argument("--jobs", type=int, default=None, help="builder worker processes (default: its own)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--no-exec", action="store_true", help="skip the (slow) find -exec cat baseline")
    parser.add_argument("--no-double", action="store_true", help="skip the doubled-tree RSS check")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--floor", nargs=4, help=argparse.SUPPRESS)
    parser.add_argument("--keep-duplicates", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], args.child[1], int(args.child[2]), args.keep_duplicates)
        return
    if args.floor:
        floor_child(*args.floor)
        return

    from workers.corpus.pool import default_jobs

    tree = args.tree.resolve()
    jobs = args.jobs or default_jobs()
    work = Path(tempfile.mkdtemp(prefix="corpus-bench-", dir=ROOT / "bench" / "out"
                                 if (ROOT / "bench" / "out").is_dir() else None))
    try:
        print(f"tree: {tree}  cores: {os.cpu_count()}  builder jobs: {jobs}  load: {os.getloadavg()[0]:.1f}")
        timed_shell(f"find {q(tree)} -type f -print0 | xargs -0 cat > /dev/null")  # warm the cache

        xargs_wall, xargs_bytes = xargs_baseline(tree, work, args.repeat)
        runs = [run_builder(tree, work / f"corpus-{i}.txt", jobs, sample=False) for i in range(args.repeat)]
        best = min(runs, key=lambda r: r["wall"])
        for i in range(args.repeat):
            (work / f"corpus-{i}.txt").unlink(missing_ok=True)
        sampled = run_builder(tree, work / "corpus-sampled.txt", jobs)
        peak, peak_rss = sampled["tree_pss"], sampled["tree_rss"]
        (work / "corpus-sampled.txt").unlink()

        print(f"builder: kept {best['files']:,} files, {mb(best['bytes'])} of corpus "
              f"({mb(best['source_bytes'])} of source), skipped {best['skipped']:,} {best['by_reason']}")
        walls = ", ".join(f"{r['wall']:.2f}" for r in runs)
        print(f"builder: wall {best['wall']:.2f} s (runs: {walls}), "
              f"{mb(best['bytes'] / best['wall'])}/s, vocabulary {best['vocab']}")
        print(f"xargs cat *.py: {mb(xargs_bytes)} in {xargs_wall:.2f} s = {mb(xargs_bytes / xargs_wall)}/s")
        fraction = (best["bytes"] / best["wall"]) / (xargs_bytes / xargs_wall)
        print(f"throughput vs raw xargs cat: {fraction:.0%} (goal >= 50%)")
        if best["native"]:
            floor_line(tree, work / "corpus-0.txt.manifest.json", work, args.repeat, best["wall"],
                       xargs_bytes / xargs_wall)
        without_native(tree, work, jobs, args.repeat, best["wall"], best["bytes"] / (xargs_bytes / xargs_wall))
        if not args.no_exec:
            exec_out = work / "exec.txt"
            exec_wall = timed_shell(f"find {q(tree)} -name '*' -exec cat {{}} \\; > {q(exec_out)} 2>/dev/null || true")
            print(f"find -exec cat: {mb(exec_out.stat().st_size)} in {exec_wall:.2f} s; "
                  f"builder is {exec_wall / best['wall']:.1f}x faster (goal >= 10x)")
            exec_out.unlink()
        print(f"peak memory, single tree: builder process RSS {sampled['main_rss'] / 2**20:.0f} MiB; whole "
              f"process tree PSS {peak / 2**20:.0f} MiB (RSS summed {peak_rss / 2**20:.0f} MiB) (goal < 256 MiB)")
        if not args.no_double:
            double_check(tree, work, jobs, sampled)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def xargs_baseline(tree: Path, work: Path, repeat: int) -> tuple[float, int]:
    """`find DIR -name '*.py' -print0 | xargs -0 cat` into a file: best wall of `repeat`, bytes."""
    out = work / "xargs.txt"
    wall = min(timed_shell(f"find {q(tree)} -name '*.py' -print0 | xargs -0 cat > {q(out)}") for _ in range(repeat))
    size = out.stat().st_size
    out.unlink()
    return wall, size


def floor_line(tree: Path, manifest: Path, work: Path, repeat: int, wall: float, xargs_rate: float) -> None:
    """The C byte work alone on the files of a build's `manifest`, against `xargs cat`'s rate and
    the builder's `wall`."""
    listing = min(timed_shell(f"find {q(tree)} > /dev/null") for _ in range(repeat))
    print(f"listing the tree alone (find DIR > /dev/null): {listing:.2f} s")
    for threads, how in ((1, "one thread"), (2, "two threads, reading apart from the sink as in the builder")):
        floor = run_floor(tree, manifest, work / "floor.txt", repeat, threads)
        rate = floor["bytes"] / floor["wall"]
        print(f"C byte work alone, {how} (the kept files read, hashed and scanned; their text hashed, "
              f"counted, written): {floor['wall']:.2f} s for {mb(floor['bytes'])} = {mb(rate)}/s, "
              f"{rate / xargs_rate:.0%} of xargs cat; the builder takes {wall / floor['wall']:.2f}x that")


def without_native(tree: Path, work: Path, jobs: int, repeat: int, wall: float, xargs_seconds: float) -> None:
    """The builder again with CHARFORGE_NO_NATIVE=1 (best of `repeat`), against its `wall` and
    `xargs_seconds`, the time xargs cat would take for the corpus's bytes at its throughput."""
    runs = [run_builder(tree, work / f"plain-{i}.txt", jobs, sample=False, native=False) for i in range(repeat)]
    for i in range(repeat):
        (work / f"plain-{i}.txt").unlink(missing_ok=True)
    slow = min(r["wall"] for r in runs)
    print(f"builder without the C extension (CHARFORGE_NO_NATIVE=1): wall {slow:.2f} s, "
          f"{slow / wall:.2f}x the builder's; {xargs_seconds / slow:.0%} of xargs cat")


def _growth(label: str, single: dict, double: dict) -> str:
    rss, pss = double["main_rss"] / single["main_rss"] - 1, double["tree_pss"] / single["tree_pss"] - 1
    return (f"{label}: single {mb(single['bytes'])}, doubled {mb(double['bytes'])} in {double['wall']:.2f} s; "
            f"builder RSS {single['main_rss'] / 2**20:.0f} -> {double['main_rss'] / 2**20:.0f} MiB ({rss:+.1%}), "
            f"process tree PSS {single['tree_pss'] / 2**20:.0f} -> {double['tree_pss'] / 2**20:.0f} MiB ({pss:+.1%})")


def double_check(tree: Path, work: Path, jobs: int, single: dict) -> None:
    double = work / "double"
    double.mkdir()
    for name in ("a", "b"):  # hard links: the same bytes twice without copying them
        if subprocess.run(["cp", "-al", str(tree), str(double / name)], capture_output=True, check=False).returncode:
            print("doubled tree: skipped (cp -al failed: the bench dir is on another filesystem)")
            return
    same = run_builder(double, work / "double-dedupe.txt", jobs)
    print(_growth("doubled tree, duplicates dropped (goal: within 10%)", single, same))
    single_keep = run_builder(tree, work / "single-keep.txt", jobs, keep_duplicates=True)
    kept = run_builder(double, work / "double-keep.txt", jobs, keep_duplicates=True)
    print(_growth("doubled tree, duplicates kept", single_keep, kept))


if __name__ == "__main__":
    main()
