"""Run Opacus 1.6.0's own test suite against fastdp (through an import alias) and against Opacus.

Dev-time only, not run in CI: the whole suite takes hours on 2 cores. Usage, from the repository root:

    python -m bench.opacus_suite                         # every test file, on fastdp and (if it can) on Opacus
    python -m bench.opacus_suite --target fastdp --files privacy_engine_test accountants_test
    python -m bench.opacus_suite --table                 # print the table of what was recorded so far

What it does:

1. ``pip download opacus==1.6.0 --no-deps --no-binary :all:`` into the cache folder (``--cache``, default
   ``~/.cache/fastdp-opacus-suite``, outside the source tree) and unpacks the sdist there.
2. For each selected test file (``--by-class``: each test class), one ``python -m pytest`` process per
   target, with a junit report; hypothesis tests draw at most ``--max-examples`` examples (default 10,
   the same on both targets; 0 keeps hypothesis's 100), which is what makes the suite fit 2 cores:
   - ``fastdp``: ``-p bench.opacus_alias`` maps ``opacus`` and every ``opacus.X.Y`` onto ``fastdp`` /
     ``fastdp.X.Y`` (``opacus.tests`` stays the sdist's);
   - ``opacus``: the sdist's own ``opacus`` package. It needs ``opt_einsum``; when it is not importable,
     ``pip install --no-deps --target <cache>/site opt-einsum`` puts it in the cache (never in the
     environment). Five test files import ``torchvision``: pass a folder that has it with
     ``--extra-path`` (e.g. ``pip install --no-deps --target DIR torchvision==<yours>``); a CUDA wheel
     on a CPU torch is made importable by ``bench.opacus_alias`` (see there). Without torchvision those
     files fail to import on both targets and count for neither.
3. Outcomes are merged into ``<cache>/results-<target>.json`` (re-running a file replaces its entries),
   and the per-file table is printed: tests that pass on Opacus, on fastdp, on both, and the share of
   Opacus's passing tests that pass on fastdp, leaving out the tests of Opacus-only internals
   (``EXCLUDED``, each with its reason).
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import subprocess
import sys
import tarfile
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import Dict, List

OPACUS_VERSION = "1.6.0"
REPO_ROOT = Path(__file__).resolve().parent.parent

#: Tests of Opacus-only internals, left out of the goal ratio: pattern (fnmatch on "file::class::test")
#: → why fastdp does not (and should not) pass it.
_LOGGER = "asserts log records on the logger named 'opacus.data_loader' (fastdp logs under 'fastdp.*')"
EXCLUDED: Dict[str, str] = {
    # Opacus privacy failures fastdp stays right about
    "*module_validator_test.py::*::test_is_valid_non_learnable_bn":
        "Opacus accepts a parameterless BatchNorm in train mode, which mixes the samples of a batch into the "
        "gradients of the layers before it (a privacy failure); fastdp refuses it",
    "*privacy_engine_test.py::PrivacyEngineText*::test_make_private_with_epsilon":
        "trains a sequence-first model without batch_first=False: Opacus then takes the 12 time steps for 12 "
        "samples and clips per time step (a silent privacy failure; the test only checks epsilon); fastdp "
        "refuses the mismatched batch sizes",
    # Opacus internals
    "*accountants_test.py::*::test_prv_accountant":
        "checks Opacus's PRV grid's number to 7 decimal places; fastdp's PRV gives 6.77693 vs 6.77740, within "
        "the eps_error=0.01 error bars both methods guarantee",
    "*grad_sample_module_test.py::*::test_standard_module_validation":
        "reads gsm._module.ft_compute_sample_grad, Opacus's functorch attribute on the wrapped model",
    "*grad_sample_module_fast_gradient_clipping_test.py::*::test_standard_module_validation":
        "reads gsm._module.ft_compute_sample_grad, Opacus's functorch attribute on the wrapped model",
    "*grad_sample_hooks_test.py::*::test_standard_module_validation":
        "reads model.ft_compute_sample_grad, Opacus's functorch attribute on the model",
    "*grad_sample_hooks_fast_gradient_clipping_test.py::*::test_hooks_creation":
        "reads hooks.autograd_grad_sample_hooks, Opacus's list of hook handles",
    "*grad_sample_hooks_fast_gradient_clipping_test.py::*::test_cleanup":
        "reads hooks.autograd_grad_sample_hooks, Opacus's list of hook handles",
    "*grad_sample_hooks_fast_gradient_clipping_test.py::*::test_norm_sample_computation":
        "reads p._norm_sample, the per-parameter norms of Opacus's two-pass ghost clipping",
    "*grad_sample_module_fast_gradient_clipping_test.py::*::test_norm_calculation_fast_gradient_clipping":
        "reads p._norm_sample, the per-parameter norms of Opacus's two-pass ghost clipping",
    "*privacy_engine_validation_test.py::*::test_custom_linear_hooks":
        "reads gsm._module.ft_compute_sample_grad, Opacus's functorch attribute on the wrapped model",
    "*privacy_engine_validation_test.py::*::test_unsupported_hooks":
        "reads gsm._module.ft_compute_sample_grad, Opacus's functorch attribute on the wrapped model",
    "*privacy_engine_validation_test.py::*::test_extra_param_hooks_requires_grad":
        "reads gsm._module.ft_compute_sample_grad, Opacus's functorch attribute on the wrapped model",
    "*privacy_engine_validation_test.py::*::test_unsupported_ew":
        "asserts that torch's ExpandedWeights cannot run torch.matmul; fastdp's 'ew' is its hooks mode, whose "
        "torch.func fallback can",
    "*grad_sample_hooks_fast_gradient_clipping_test.py::*::test_grad_sample_computation":
        "reads p._norm_sample, the per-parameter norms of Opacus's two-pass ghost clipping",
    "*grad_sample_module_fast_gradient_clipping_test.py::*EmbeddingLayerTest::test_norm_calculation":
        "reads p._norm_sample, the per-parameter norms of Opacus's two-pass ghost clipping",
    "*grad_sample_module_fast_gradient_clipping_test.py::*EmbeddingLayerTest::test_gradient_calculation":
        "compares ghost clipping's p.grad after step() with standard DP-SGD's p.summed_grad: with a mean loss "
        "Opacus 1.6's ghost clipping releases the clipped sum, batch-size times what its standard DP-SGD releases "
        "(the mean); fastdp releases the same mean in every mode",
    "*privacy_engine_validation_test.py::*::test_extra_param_ew":
        "asserts that torch's ExpandedWeights cannot handle a parameter used outside its layer; fastdp's 'ew' "
        "is its hooks mode, whose torch.func fallback can",
    "*distributed_poisson_test.py::*::test_separate_batches":
        "iterates the sampler's indices as tensors (i.item()); fastdp's samplers yield lists of ints, which "
        "DataLoader takes alike",
    "*dpdataloader_test.py::CollateFnWithEmptyTest::test_empty_batch_before_first_returns_zero_tensors": _LOGGER,
    "*dpdataloader_test.py::CollateFnWithEmptyTest::test_empty_first_batch_shapes_match_dataset": _LOGGER,
    "*dpdataloader_test.py::CollateFnWithEmptyTest::test_empty_first_batch_then_normal_batches": _LOGGER,
    "*dpdataloader_test.py::CollateFnWithEmptyTest::test_empty_first_batch_without_shapes_returns_empty_list": _LOGGER,
    "*dpdataloader_test.py::DPDataLoaderEmptyFirstBatchTest::test_empty_first_batch_with_dp_dataloader":
        _LOGGER + "; and fastdp's DPDataLoader knows an empty batch's structure from dataset[0], so its first "
        "empty batch needs no fallback",
}


def ensure_sdist(cache: Path) -> Path:
    root = cache / f"opacus-{OPACUS_VERSION}"
    if (root / "opacus" / "tests").is_dir():
        return root
    cache.mkdir(parents=True, exist_ok=True)
    archive = cache / f"opacus-{OPACUS_VERSION}.tar.gz"
    if not archive.exists():
        subprocess.run(
            [sys.executable, "-m", "pip", "download", f"opacus=={OPACUS_VERSION}", "--no-deps",
             "--no-binary", ":all:", "-d", str(cache)],
            check=True,
        )
    with tarfile.open(archive) as tar:
        tar.extractall(cache, filter="data")
    return root


def ensure_opacus_deps(cache: Path) -> Path:
    """A folder with Opacus's one dependency fastdp's environment may lack (opt_einsum)."""
    site = cache / "site"
    probe = subprocess.run([sys.executable, "-c", "import opt_einsum"], capture_output=True,
                           env={**os.environ, "PYTHONPATH": str(site)})
    if probe.returncode != 0:
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(site), "opt-einsum"],
            check=True,
        )
    return site


def test_files(root: Path, patterns: List[str]) -> List[str]:
    tests = root / "opacus" / "tests"
    files = sorted(str(p.relative_to(root)) for p in tests.rglob("*_test.py"))
    if not patterns:
        return files
    chosen = [f for f in files if any(pat in f for pat in patterns)]
    if not chosen:
        raise SystemExit(f"no test file matches {patterns}; files: {[Path(f).name for f in files]}")
    return chosen


def _environment(root: Path, target: str, cache: Path, extra_path: List[str], max_examples: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("FASTDP_OPACUS_TESTS",)}
    paths = [str(REPO_ROOT)]
    if target == "fastdp":
        env["FASTDP_OPACUS_TESTS"] = str(root / "opacus" / "tests")
    else:
        paths = [str(root), str(ensure_opacus_deps(cache))] + paths
    env["PYTHONPATH"] = os.pathsep.join(paths + extra_path)
    env["FASTDP_SUITE_MAX_EXAMPLES"] = str(max_examples)
    return env


def test_classes(root: Path, path: str, env: dict) -> List[str]:
    """The node ids ``file::Class`` of a test file (collected on the target), for per-class processes."""
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "-p",
                           "bench.opacus_alias", path], cwd=root, env=env, capture_output=True, text=True)
    classes = []
    for line in proc.stdout.splitlines():
        parts = line.strip().split("::")
        if len(parts) >= 3 and parts[0] == path and "::".join(parts[:2]) not in classes:
            classes.append("::".join(parts[:2]))
    return classes or [path]


def run_file(root: Path, target: str, path: str, *, cache: Path, extra_path: List[str], timeout: float,
             max_examples: int = 0, by_class: bool = False) -> dict:
    """One pytest process per test file (``by_class``: per test class); {test id: outcome} (a process that
    did not finish: every test it reported, and '<node>' → 'timeout' / 'crashed')."""
    env = _environment(root, target, cache, extra_path, max_examples)
    nodes = test_classes(root, path, env) if by_class else [path]
    outcomes: Dict[str, str] = {}
    for node in nodes:
        outcomes.update(_run_node(root, target, path, node, env=env, cache=cache, timeout=timeout))
    return outcomes


def _run_node(root: Path, target: str, path: str, node: str, *, env: dict, cache: Path, timeout: float) -> dict:
    report = cache / "junit" / target / (node.replace("/", "__").replace("::", "__") + ".xml")
    report.parent.mkdir(parents=True, exist_ok=True)
    if report.exists():
        report.unlink()
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "bench.opacus_alias",
               f"--junitxml={report}", "-o", "junit_family=xunit1", node]
    started = time.time()
    try:
        proc = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
        status = None if proc.returncode in (0, 1) else f"exit {proc.returncode}"
        log = proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as expired:
        status, log = "timeout", (expired.stdout or b"").decode(errors="replace") if isinstance(expired.stdout, bytes) else (expired.stdout or "")
    (report.with_suffix(".log")).write_text(log)
    outcomes = parse_junit(report, path) if report.exists() else {}
    if status is not None and not outcomes:
        outcomes[f"{node}::<file>" if node == path else f"{node}::<class>"] = status
    print(f"  {target:7s} {node}: {sum(v == 'passed' for v in outcomes.values())}/{len(outcomes)} passed"
          f"{' (' + status + ')' if status else ''} in {time.time() - started:.0f}s", flush=True)
    return outcomes


def parse_junit(report: Path, path: str) -> Dict[str, str]:
    outcomes: Dict[str, str] = {}
    rank = {"passed": 0, "skipped": 1, "failed": 2, "error": 3}
    for case in ElementTree.parse(report).getroot().iter("testcase"):
        cls = case.get("classname", "").split(".")[-1]
        test_id = f"{path}::{cls}::{case.get('name')}"
        outcome = "passed"
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = {"failure": "failed"}.get(child.tag, child.tag)
        previous = outcomes.get(test_id)
        if previous is None or rank[outcome] > rank[previous]:  # subtests: the worst outcome counts
            outcomes[test_id] = outcome
    return outcomes


def load(cache: Path, target: str) -> Dict[str, Dict[str, str]]:
    path = cache / f"results-{target}.json"
    return json.loads(path.read_text()) if path.exists() else {}


def save(cache: Path, target: str, results: Dict[str, Dict[str, str]]) -> None:
    (cache / f"results-{target}.json").write_text(json.dumps(results, indent=1, sort_keys=True))


def excluded_reason(test_id: str):
    return next((reason for pattern, reason in EXCLUDED.items() if fnmatch.fnmatch(test_id, pattern)), None)


def table(cache: Path) -> str:
    fast, opac = load(cache, "fastdp"), load(cache, "opacus")
    rows = ["| file | Opacus passed | fastdp passed | both | Opacus-only internals (excluded) | fastdp/Opacus |",
            "|---|---|---|---|---|---|"]
    totals = [0, 0, 0, 0]
    for path in sorted(set(fast) | set(opac)):
        o, f = opac.get(path, {}), fast.get(path, {})
        o_pass = {t for t, v in o.items() if v == "passed"}
        f_pass = {t for t, v in f.items() if v == "passed"}
        excluded = {t for t in o_pass if excluded_reason(t)}
        counted = o_pass - excluded
        both = counted & f_pass
        ratio = f"{len(both) / len(counted):.0%}" if counted else "-"
        name = path.replace("opacus/tests/", "")
        o_txt = str(len(o_pass)) if path in opac else "not run"
        f_txt = str(len(f_pass)) if path in fast else "not run"
        rows.append(f"| {name} | {o_txt} | {f_txt} | {len(both)} | {len(excluded)} | {ratio} |")
        for i, n in enumerate((len(o_pass), len(f_pass), len(both), len(excluded))):
            totals[i] += n
    counted_total = totals[0] - totals[3]
    share = f"{totals[2] / counted_total:.1%}" if counted_total else "-"
    rows.append(f"| **total** | {totals[0]} | {totals[1]} | {totals[2]} | {totals[3]} | {share} |")
    missing = []
    for path in sorted(opac):
        for t, v in sorted(opac[path].items()):
            if v == "passed" and not excluded_reason(t) and fast.get(path, {}).get(t) != "passed":
                missing.append(f"  {t}: {fast.get(path, {}).get(t, 'not run')}")
    lines = rows + ["", f"Passing on Opacus, not on fastdp ({len(missing)}):"] + missing
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "fastdp-opacus-suite")
    parser.add_argument("--target", choices=("fastdp", "opacus", "both"), default="both")
    parser.add_argument("--files", nargs="*", default=[], help="substrings of test file paths (default: all)")
    parser.add_argument("--extra-path", action="append", default=[], help="folders added to PYTHONPATH (torchvision)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per test process")
    parser.add_argument("--max-examples", type=int, default=10,
                        help="cap on hypothesis examples per test, both targets alike (0: hypothesis's own)")
    parser.add_argument("--by-class", action="store_true", help="one process per test class (long files)")
    parser.add_argument("--table", action="store_true", help="only print the table of recorded results")
    args = parser.parse_args(argv)
    cache = args.cache.resolve()
    if not args.table:
        root = ensure_sdist(cache)
        targets = ["fastdp", "opacus"] if args.target == "both" else [args.target]
        for path in test_files(root, args.files):
            for target in targets:
                results = load(cache, target)
                results[path] = run_file(root, target, path, cache=cache, extra_path=args.extra_path,
                                         timeout=args.timeout, max_examples=args.max_examples,
                                         by_class=args.by_class)
                save(cache, target, results)
    print(table(cache))
    return 0


if __name__ == "__main__":
    sys.exit(main())
