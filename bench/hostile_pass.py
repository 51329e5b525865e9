"""A hostile pass over the ``diffkg-fast`` command line (issue 24): bad, broken and malicious
input of every kind, each run as a user would run it, each answer judged.

    python bench/hostile_pass.py [--kinds pickle,config,...] [--work DIR] [--json FILE]

Every probe (``bench/hostile_probes.py``, ``bench/hostile_probes_runs.py``) runs
``python -m diffkg_fast ARGS`` in a folder of its own, with its address space limited (4 GiB)
and a time limit. A probe passes when

- the exit status is 2 with one ``error:`` line (argparse's usage lines aside) that names the
  file or option, or 0 where the input is legitimately fine;
- standard error holds no Python traceback;
- the peak resident memory of the process (``VmHWM``, read at exit) stays under 1.5 GiB (a
  probe whose config asks for a huge model may take up to the address-space limit);
- nothing is left half-written: after an error no file in the probe's folder is new or changed
  (but those a probe allows), no temporary ``*.tmp`` is left after any run, and no hostile
  pickle or YAML ran its command (``PWNED``).

Disk-fault probes mount small tmpfs folders (a full disk, a read-only folder) and need root;
without it they are skipped and say so. The pass prints one line per probe and a summary by
kind, and writes every result as JSON (``--json``). Exit status 1 when a probe fails.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import hostile_probes as P
import hostile_probes_runs  # noqa: F401  (adds its probes to P.PROBES)

AS_LIMIT = 4 << 30
ERROR_LINE_LIMIT = 600  # characters: an excerpt, never a whole value
LAUNCH = r"""
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, (int(sys.argv.pop(1)),) * 2)
peak = sys.argv.pop(1)

def _peak():
    with open("/proc/self/status") as f:
        kb = next(line.split()[1] for line in f if line.startswith("VmHWM:"))
    with open(peak, "w") as g:
        g.write(kb)

import atexit
atexit.register(_peak)
sys.argv[0] = "diffkg-fast"
from diffkg_fast.cli import main
raise SystemExit(main())
"""


@dataclass
class Result:
    kind: str
    name: str
    argv: str
    rc: list[int] = field(default_factory=list)
    traceback: bool = False
    error_line: str = ""
    peak_mb: float = 0.0
    seconds: float = 0.0
    left: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    skipped: str = ""

    @property
    def ok(self) -> bool:
        return not self.problems and not self.skipped


# ------------------------------------------------------------------ running one command
def _snapshot(d: Path) -> dict[str, tuple[int, int]]:
    out = {}
    for p in d.rglob("*"):
        if p.is_file() or p.is_symlink():
            st = p.lstat()
            out[str(p.relative_to(d))] = (st.st_size, st.st_mtime_ns)
    return out


def _spawn(argv: list[str], cwd: Path, log: Path, peak: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    with open(log.with_suffix(".out"), "wb") as out, open(log.with_suffix(".err"), "wb") as err:
        return subprocess.Popen(
            [sys.executable, "-c", LAUNCH, str(AS_LIMIT), str(peak), *argv], cwd=cwd, env=env,
            stdin=subprocess.DEVNULL, stdout=out, stderr=err, start_new_session=True)


def _wait(procs: list[subprocess.Popen], timeout: float) -> list[int]:
    def kill() -> None:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    timer = threading.Timer(timeout, kill)
    timer.start()
    try:
        return [p.wait() for p in procs]
    finally:
        timer.cancel()


def run_cli(args: list[str], cwd: Path, logs: Path, n: int = 1,
            timeout: float = 300) -> tuple[list[int], list[str], float]:
    """Run ``diffkg-fast ARGS`` ``n`` times at once; exit codes, stderr texts, peak MB."""
    procs, peaks, errs = [], [], []
    for i in range(n):
        log, peak = logs / f"{i}", logs / f"{i}.peak"
        peak.unlink(missing_ok=True)
        procs.append(_spawn(args, cwd, log, peak))
        peaks.append(peak)
        errs.append(log.with_suffix(".err"))
    rcs = _wait(procs, timeout)
    mb = max((int(p.read_text()) / 1024 for p in peaks if p.exists()), default=0.0)
    return rcs, [e.read_text(errors="replace") for e in errs], mb


def _error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error:")
            or (line.startswith("diffkg-fast") and ": error:" in line)]


# ------------------------------------------------------------------ judging
def judge(pr: P.Probe, res: Result, errs: list[str], before: dict, after: dict,
          d: Path) -> None:
    expect = {"error": {2}, "ok": {0}, "either": {0, 2}}[pr.expect]
    if pr.parallel > 1:
        wins = sorted(res.rc)
        if wins != [0] + [2] * (pr.parallel - 1):
            res.problems.append(f"exit codes {res.rc}, expected one 0 and the rest 2")
    elif res.rc[0] not in expect:
        res.problems.append(f"exit {res.rc[0]}, expected {'/'.join(map(str, sorted(expect)))}"
                            + (" (killed: time or memory)" if res.rc[0] < 0 else ""))
    res.traceback = any("Traceback (most recent call last)" in e for e in errs)
    if res.traceback:
        last = [e.strip().splitlines()[-1] for e in errs if e.strip()]
        res.problems.append(f"traceback: {last[-1][:160] if last else ''}")
    for rc, err in zip(res.rc, errs, strict=True):
        if rc != 2:
            continue
        lines = _error_lines(err)
        others = [ln for ln in err.splitlines() if ln.strip() and ln not in lines
                  and not ln.startswith(("usage:", " ", "note:"))]
        if len(lines) != 1 or others:
            res.problems.append(f"{len(lines)} error lines and {len(others)} other lines")
        for line in lines:
            res.error_line = res.error_line or line
            if pr.names and pr.names.lower() not in line.lower():
                res.problems.append(f"the error line does not name {pr.names!r}")
            if len(line) > ERROR_LINE_LIMIT:
                res.problems.append(f"error line of {len(line):,} characters")
    if res.peak_mb > pr.peak_mb:
        res.problems.append(f"peak memory {res.peak_mb:.0f} MB")
    new = sorted(k for k in after if before.get(k) != after[k])
    res.left = new
    tmp = [k for k in after if k.endswith(".tmp")]
    if tmp:
        res.problems.append(f"temporaries left: {tmp[:3]}")
    if any(Path(k).name == "PWNED" for k in after):
        res.problems.append("a hostile input ran its command (PWNED)")
    failed = all(rc != 0 for rc in res.rc)
    if failed and pr.parallel == 1:
        stray = [k for k in new if k not in pr.allow and not k.endswith(".tmp")]
        if stray:
            res.problems.append(f"an error left files: {stray[:4]}")
    if pr.check is not None:
        res.problems += pr.check(d)


def run_probe(i: int, pr: P.Probe, root: Path, fx: Path, can_mount: bool) -> Result:
    argv = pr.argv.replace("{fx}", str(fx))
    res = Result(pr.kind, pr.name, argv)
    if pr.needs == "mount" and not can_mount:
        res.skipped = "needs root to mount a tmpfs"
        return res
    if pr.needs == "dill":
        try:
            import dill  # noqa: F401
        except ImportError:
            res.skipped = "needs dill to name its functions"
            return res
    d = root / f"{i:03d}"
    d.mkdir(parents=True)
    logs = root / "logs" / f"{i:03d}"
    logs.mkdir(parents=True)
    if pr.make is not None:
        try:
            pr.make(d, fx)
        except Exception as exc:  # a broken probe, not a finding: say so and go on
            res.skipped = f"setup failed: {type(exc).__name__}: {exc}"[:200]
            return res
    before = _snapshot(d)
    import shlex
    t0 = time.perf_counter()
    res.rc, errs, res.peak_mb = run_cli(shlex.split(argv), d, logs, pr.parallel, pr.timeout)
    res.seconds = time.perf_counter() - t0
    judge(pr, res, errs, before, _snapshot(d), d)
    return res


# ------------------------------------------------------------------ fixtures and mounts
MOUNTS: list[Path] = []


def mount(path: Path, size: str, readonly: bool) -> None:
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                   check=True, capture_output=True)
    MOUNTS.append(path)
    if readonly:
        subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True,
                       capture_output=True)


def _can_mount(root: Path) -> bool:
    try:
        mount(root / "mount-test", "64k", False)
    except (OSError, subprocess.CalledProcessError):
        return False
    return True


def unmount_all() -> None:
    for p in reversed(MOUNTS):
        subprocess.run(["umount", "-l", str(p)], capture_output=True)
    MOUNTS.clear()


def fixtures(fx: Path) -> None:
    """The good inputs every probe starts from (module docstring of hostile_probes)."""
    fx.mkdir(parents=True)
    logs = fx / "logs"
    logs.mkdir()
    lg = "--model lightgcn --set epoch=1 --set latdim=8 --no-plot --no-progress".split()
    steps = [
        ["data", "build", "--source", "synthetic", "--set", "n_patients=200", "--out",
         "small.npz"],
        ["data", "build", "--source", "synthetic", "--set", "n_patients=200", "--set", "seed=1",
         "--out", "small_b.npz"],
        ["data", "export", "small.npz", "--format", "diffkg", "--out", "dk"],
        ["data", "export", "small.npz", "--format", "kgat", "--out", "kg"],
        ["train", "--data", "small.npz", *lg, "--out", "runA"],
        ["train", "--data", "small_b.npz", *lg, "--out", "runB"],
        ["train", "--data", "small.npz", "--set", "epoch=1", "--set", "latdim=8", "--set",
         "dims=[16]", "--no-plot", "--no-progress", "--out", "runD"],
        ["compare", "--data", "small.npz", "--rows", "MostPop", "--seeds", "1", "--out", "cmp"],
    ]
    for step in steps:
        rcs, errs, _ = run_cli(step, fx, logs)
        if rcs != [0]:
            raise SystemExit(f"fixture step {' '.join(step)} failed:\n{errs[0][-2000:]}")
    from diffkg_fast.data.codes import bundled_path
    from diffkg_fast.data.safedrug import write_safedrug
    from diffkg_fast.data.synthetic import synthetic_records

    write_safedrug(synthetic_records(n_patients=200), fx / "sd")
    shutil.copytree(bundled_path("mimic3-demo"), fx / "mm")


# ------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kinds", help="comma-separated kinds to run (default: all)")
    ap.add_argument("--match", help="only probes whose name contains this")
    ap.add_argument("--work", help="working folder (default: a temporary one, removed)")
    ap.add_argument("--json", help="write every result to this file")
    args = ap.parse_args(argv)
    kinds = set(args.kinds.split(",")) if args.kinds else None
    probes = [p for p in P.PROBES if (kinds is None or p.kind in kinds)
              and (not args.match or args.match.lower() in p.name.lower())]
    work = Path(args.work or tempfile.mkdtemp(prefix="hostile-"))
    root, fx = work / "probes", work / "fx"
    if root.exists():
        shutil.rmtree(root)
    P.MOUNT["tmpfs"] = mount
    # SIGTERM (timeout, kill) as SystemExit, so that the finally below unmounts the tmpfs folders.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    results: list[Result] = []
    try:
        if not fx.exists():
            print(f"fixtures in {fx} …", flush=True)
            fixtures(fx)
        can = _can_mount(work)
        for i, pr in enumerate(probes):
            res = run_probe(i, pr, root, fx, can)
            results.append(res)
            mark = "skip" if res.skipped else "ok  " if res.ok else "FAIL"
            what = res.skipped or "; ".join(res.problems) or res.error_line[:110] or "exit 0"
            print(f"{mark} {i:03d} {pr.kind:<10} {pr.name[:52]:<52} rc={res.rc} "
                  f"{res.peak_mb:5.0f} MB {res.seconds:5.1f} s  {what}", flush=True)
    finally:
        unmount_all()
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    by_kind: Counter = Counter(r.kind for r in results)
    fails = [r for r in results if r.problems]
    skipped = [r for r in results if r.skipped]
    print("\nprobes by kind: " + ", ".join(f"{k} {n}" for k, n in by_kind.items()))
    print(f"{len(results)} probes: {len(results) - len(fails) - len(skipped)} clear, "
          f"{len(fails)} failed, {len(skipped)} skipped")
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in results], indent=1))
    return 1 if fails else 0


if __name__ == "__main__":
    raise SystemExit(main())
