"""The optimal-transport coupling between a group's channels and the channels that stay.

Intra-Fusion moves every channel's mass (pruned ones included) onto the k remaining channels along
the cheapest plan, so the information of pruned channels is merged instead of dropped.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import ot
import torch

PROBABILITIES = ("uniform", "importance")
TARGETS = ("most_important", "cluster_centroid")
SOLVERS = ("emd", "sinkhorn")
SINKHORN_ITERATIONS = 20000
SINKHORN_MARGINAL_TOLERANCE = 1e-3  # relative error of the plan's row/column sums that gets a warning
# p=1 costs with at least this many |a - b| terms (n * k * d) go through the compiled kernel below
COMPILED_L1_MIN_TERMS = 1 << 22


def _check_choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {name} {value!r}; choose one of: {', '.join(map(str, allowed))}")


def _marginal(weights: np.ndarray | None, size: int) -> np.ndarray:
    """A float64 probability vector; uniform when the weights are absent, all zero or not finite."""
    if weights is not None:
        weights = np.clip(np.asarray(weights, dtype=np.float64), 0.0, None)
        total = weights.sum()
        if np.isfinite(total) and total > 0:
            return weights / total
    return np.full(size, 1.0 / size, dtype=np.float64)


def _unit_rows(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return np.divide(vectors, norms, out=np.zeros_like(vectors), where=norms > 0)


def _unit_rows_float32(vectors: np.ndarray, block: int = 256) -> torch.Tensor:
    """torch.from_numpy(_unit_rows(vectors)).float(), bit for bit, made block by block of rows in
    parallel (no float64 copy of the whole matrix) where the rows are contiguous: numpy then sums each
    row's squares along the contiguous axis, a pairwise sum that depends on that row alone."""
    vectors = np.asarray(vectors, dtype=np.float64)
    if not vectors.flags.c_contiguous or vectors.ndim != 2:
        return torch.from_numpy(_unit_rows(vectors)).float()
    out = np.empty(vectors.shape, dtype=np.float32)

    def run(start: int) -> None:
        out[start:start + block] = _unit_rows(vectors[start:start + block])

    with ThreadPoolExecutor(max(1, torch.get_num_threads())) as pool:  # numpy releases the GIL
        list(pool.map(run, range(0, len(vectors), block)))
    return torch.from_numpy(out)


class OptimalTransport:
    """Computes the coupling G (n x k) between all n channels and the k targets.

    p: order of the p-norm distance used as transport cost (p=1 in the paper).
    source_prob / target_prob: "uniform" or "importance" (mass proportional to importance).
    target: "most_important" (the kept channels) or "cluster_centroid" (k spherical GMM means).
    solver: "emd" (exact, as in the paper) or "sinkhorn" (entropic, for very large groups).
    """

    def __init__(self, p: float = 1, source_prob: str = "uniform", target_prob: str = "uniform",
                 target: str = "most_important", solver: str = "emd", sinkhorn_reg: float = 0.01):
        if not (isinstance(p, (int, float)) and p > 0):
            raise ValueError(f"p must be a positive number, got {p!r}")
        _check_choice("source_prob", source_prob, PROBABILITIES)
        _check_choice("target_prob", target_prob, PROBABILITIES)
        _check_choice("target", target, TARGETS)
        _check_choice("solver", solver, SOLVERS)
        if not sinkhorn_reg > 0:
            raise ValueError(f"sinkhorn_reg must be positive, got {sinkhorn_reg!r}")
        self.p, self.source_prob, self.target_prob = p, source_prob, target_prob
        self.target, self.solver, self.sinkhorn_reg = target, solver, sinkhorn_reg
        self.last_solve_seconds = 0.0  # time of the last solver call alone (benchmarks read it)
        self.last_cost_seconds = 0.0  # time of the last cost matrix alone

    def __repr__(self) -> str:
        return (f"OptimalTransport(p={self.p}, source_prob={self.source_prob!r}, target_prob="
                f"{self.target_prob!r}, target={self.target!r}, solver={self.solver!r})")

    def targets(self, features: np.ndarray, kept: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Target vectors (k x d) and, for cluster centroids, each channel's cluster label."""
        if self.target == "most_important":
            return features[kept], np.full(len(features), -1)
        from sklearn.mixture import GaussianMixture
        mixture = GaussianMixture(n_components=len(kept), covariance_type="spherical", random_state=0)
        labels = mixture.fit(features).predict(features)
        return mixture.means_, labels

    def cost(self, vectors: np.ndarray, target_vectors: np.ndarray, kept: np.ndarray | None = None) -> np.ndarray:
        """The transport cost (float64, n x k): p-norm distances between the unit-norm rows, computed in
        float32 (several times faster than float64 and far finer than weight noise). `kept`: indices
        with target_vectors == vectors[kept] (target="most_important"); the p=1 kernel then computes the
        symmetric kept x kept block once."""
        vectors = np.asarray(vectors, dtype=np.float64)
        n, k, d = len(vectors), len(target_vectors), vectors.shape[1]
        if self.p != 1 or n * k * d < COMPILED_L1_MIN_TERMS or _l1_kernel() is None:
            return torch.cdist(_unit_rows_float32(vectors), _unit_rows_float32(target_vectors),
                               p=float(self.p)).double().numpy()
        sources = _unit_rows_float32(vectors).numpy()
        if kept is not None and vectors.flags.c_contiguous and len(np.unique(kept)) == k:
            # numpy's row norms along the contiguous axis depend on the row alone, so the targets'
            # unit rows are sources[kept], bit for bit
            return l1_distances(sources, kept=np.asarray(kept, dtype=np.int64)).astype(np.float64)
        return l1_distances(sources, _unit_rows_float32(target_vectors).numpy()).astype(np.float64)

    def coupling(self, features: torch.Tensor, importance: torch.Tensor | None,
                 kept: torch.Tensor) -> torch.Tensor:
        """Return G (float64, n x k): G[i, j] is the mass moved from channel i to target j."""
        vectors = features.detach().double().cpu().numpy()
        kept_np = np.asarray(kept.cpu(), dtype=np.int64)
        n, k = len(vectors), len(kept_np)
        if not np.all(np.isfinite(vectors)):
            raise ValueError("channel feature vectors contain NaN or inf; check the model's weights")
        scores = None if importance is None else importance.detach().double().cpu().numpy()
        target_vectors, labels = self.targets(vectors, kept_np)
        source = _marginal(scores if self.source_prob == "importance" else None, n)
        if self.target_prob == "importance" and scores is not None:
            if self.target == "most_important":
                target_scores = scores[kept_np]
            else:
                target_scores = np.array([scores[labels == j].sum() for j in range(k)])
            target_mass = _marginal(target_scores, k)
        else:
            target_mass = _marginal(None, k)
        started = time.perf_counter()
        cost = self.cost(vectors, target_vectors, kept_np if self.target == "most_important" else None)
        self.last_cost_seconds = time.perf_counter() - started
        started = time.perf_counter()
        if self.solver == "emd":
            plan = ot.emd(source, target_mass, cost, numItermax=max(100_000, 50 * n * k))
        else:
            scaled = cost / cost.max() if cost.max() > 0 else cost
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Sinkhorn did not converge")
                plan = ot.sinkhorn(source, target_mass, scaled, self.sinkhorn_reg, method="sinkhorn_log",
                                   numItermax=SINKHORN_ITERATIONS, stopThr=1e-9)
            _warn_if_marginals_off(np.asarray(plan), source, target_mass, self.sinkhorn_reg)
        self.last_solve_seconds = time.perf_counter() - started
        return torch.from_numpy(np.asarray(plan, dtype=np.float64))


def _warn_if_marginals_off(plan: np.ndarray, source: np.ndarray, target: np.ndarray, reg: float) -> None:
    """POT stops Sinkhorn at its iteration cap with a generic warning; say instead how far the plan
    is from moving the right masses, and only when that matters."""
    error = max(np.abs(plan.sum(1) - source).max() / source.max(), np.abs(plan.sum(0) - target).max() / target.max())
    if error > SINKHORN_MARGINAL_TOLERANCE:
        warnings.warn(f"Sinkhorn stopped after {SINKHORN_ITERATIONS} iterations with marginals off by "
                      f"{100 * error:.2g}% (sinkhorn_reg={reg:g}); raise sinkhorn_reg or use solver='emd'",
                      RuntimeWarning, stacklevel=3)


# ---- p=1 cost kernel ------------------------------------------------------------------------------
# torch.cdist(p=1) on the CPU sums |a - b| coordinate after coordinate in float32, in a scalar loop
# bound by the latency of each addition: 30 s to minutes on 2 cores for a 4096-channel Linear group
# (feature vectors of 4096 to 25088 values), against ~2 s for p=2 (a matrix product). The kernel below
# makes the very same sums, each in the same order, so its matrix is bitwise the one torch.cdist gives
# (hence the same EMD plan and the same released numbers); it is fast because it runs 16 target channels
# side by side in SIMD lanes (4 source channels x 16 targets per register tile) instead of vectorising
# one sum. It is compiled once per machine with the system C compiler and checked against torch.cdist
# before use; without a compiler, if the check fails or with TORCH_PRUNING_EXT_NO_KERNEL=1 set,
# torch.cdist is used.
_L1_SOURCE = r"""
#include <stddef.h>
#include <string.h>
typedef float v8 __attribute__((vector_size(32)));
typedef int v8i __attribute__((vector_size(32)));
static inline v8 ld(const float *p) { v8 v; memcpy(&v, p, sizeof v); return v; }
static inline void st(float *p, v8 v) { memcpy(p, &v, sizeof v); }
static inline v8 bc(float s) { v8 v = {s, s, s, s, s, s, s, s}; return v; }
static inline v8 absdiff(v8 a, v8 b) {  /* fabsf(a - b) lane by lane: clear the sign bit */
    const v8i mask = {0x7fffffff, 0x7fffffff, 0x7fffffff, 0x7fffffff,
                      0x7fffffff, 0x7fffffff, 0x7fffffff, 0x7fffffff};
    return (v8)((v8i)(a - b) & mask);
}

/* rows a0..a3 against one packed strip b[x * 16 + t] (16 targets), coordinates x0..x1; partial sums
   are read from and written to c0..c3 */
static void tile4(const float *a0, const float *a1, const float *a2, const float *a3, const float *b,
                  size_t x0, size_t x1, float *c0, float *c1, float *c2, float *c3) {
    v8 s00, s01, s10, s11, s20, s21, s30, s31;
    if (x0 == 0) {
        s00 = s01 = s10 = s11 = s20 = s21 = s30 = s31 = bc(0.0f);
    } else {
        s00 = ld(c0); s01 = ld(c0 + 8); s10 = ld(c1); s11 = ld(c1 + 8);
        s20 = ld(c2); s21 = ld(c2 + 8); s30 = ld(c3); s31 = ld(c3 + 8);
    }
    for (size_t x = x0; x < x1; x++) {
        v8 b0 = ld(b + 16 * x), b1 = ld(b + 16 * x + 8), v;
        v = bc(a0[x]); s00 += absdiff(v, b0); s01 += absdiff(v, b1);
        v = bc(a1[x]); s10 += absdiff(v, b0); s11 += absdiff(v, b1);
        v = bc(a2[x]); s20 += absdiff(v, b0); s21 += absdiff(v, b1);
        v = bc(a3[x]); s30 += absdiff(v, b0); s31 += absdiff(v, b1);
    }
    st(c0, s00); st(c0 + 8, s01); st(c1, s10); st(c1 + 8, s11);
    st(c2, s20); st(c2 + 8, s21); st(c3, s30); st(c3 + 8, s31);
}

static void tile1(const float *a, const float *b, size_t x0, size_t x1, float *c) {
    v8 s0, s1;
    if (x0 == 0) { s0 = s1 = bc(0.0f); } else { s0 = ld(c); s1 = ld(c + 8); }
    for (size_t x = x0; x < x1; x++) {
        v8 v = bc(a[x]);
        s0 += absdiff(v, ld(b + 16 * x)); s1 += absdiff(v, ld(b + 16 * x + 8));
    }
    st(c, s0); st(c + 8, s1);
}

/* For the rows index[0..rows) of a (row-major, d columns) and the targets packed in strips of 16
   (bp[(s * d + x) * 16 + t] is coordinate x of target 16 s + t): c[index[i] * ldc + j] = the sum over x,
   in order, of |a[index[i], x] - target j [x]|. The sums run over blocks of xc coordinates, the
   partial sums staying in c in float32 as in torch.cdist. Position g = pos0 + i below `shared` means
   source index[i] is target g: strips wholly left of g are skipped (the caller mirrors that block). */
void l1_rows(const float *a, const long long *index, size_t rows, size_t d, size_t pos0, size_t shared,
             const float *bp, size_t strips, float *c, size_t ldc, size_t xc) {
    for (size_t x0 = 0; x0 < d; x0 += xc) {
        size_t x1 = x0 + xc < d ? x0 + xc : d;
        for (size_t s = 0; s < strips; s++) {
            const float *b = bp + s * d * 16;
            size_t i = 0, col = 16 * s;
            for (; i + 4 <= rows; i += 4) {
                size_t g = pos0 + i;
                if (g + 3 < shared && s < g / 16) continue;
                const long long *r = index + i;
                tile4(a + r[0] * d, a + r[1] * d, a + r[2] * d, a + r[3] * d, b, x0, x1,
                      c + r[0] * ldc + col, c + r[1] * ldc + col, c + r[2] * ldc + col, c + r[3] * ldc + col);
            }
            for (; i < rows; i++) {
                size_t g = pos0 + i;
                if (g < shared && s < g / 16) continue;
                tile1(a + index[i] * d, b, x0, x1, c + index[i] * ldc + col);
            }
        }
    }
}
"""
_L1_ROWS_PER_TASK, _L1_BLOCK = 64, 512  # rows per thread task; coordinates per pass (cache blocking)
_l1_function = None  # None: not built yet; False: unavailable (torch.cdist is used)


def _cpu_signature() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return "".join(sorted({line for line in lines if line.startswith(("model name", "flags", "Features"))}))
    except OSError:
        return platform.processor()


def _private_folder() -> Path | None:
    """A folder only this user can write, for the compiled kernel; None where there is none."""
    folder = Path(tempfile.gettempdir()) / f"torch_pruning_ext-{os.getuid()}"
    try:
        folder.mkdir(mode=0o700, exist_ok=True)
        info = folder.lstat()
    except OSError:
        return None
    if folder.is_symlink() or info.st_uid != os.getuid() or info.st_mode & 0o022:
        return None
    return folder


def _compile_l1(folder: Path) -> Path | None:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if compiler is None:
        return None
    key = hashlib.sha256("\0".join([_L1_SOURCE, compiler, platform.machine(), _cpu_signature()]).encode())
    library = folder / f"l1_{key.hexdigest()[:16]}.so"
    if library.exists():
        return library
    with tempfile.TemporaryDirectory(dir=folder) as work:
        source, built = Path(work) / "l1.c", Path(work) / "l1.so"
        source.write_text(_L1_SOURCE)
        for arch in (["-march=native"], []):  # IEEE arithmetic only: no -ffast-math, no contraction
            command = [compiler, "-O3", *arch, "-fno-fast-math", "-ffp-contract=off", "-shared", "-fPIC",
                       str(source), "-o", str(built)]
            try:
                if subprocess.run(command, capture_output=True, timeout=120).returncode == 0:
                    os.replace(built, library)
                    return library
            except (OSError, subprocess.SubprocessError):
                return None
    return None


def _l1_kernel():
    """The compiled l1_rows function, or None (then torch.cdist is used)."""
    global _l1_function
    if _l1_function is None:
        _l1_function = False
        if os.name == "posix" and not os.environ.get("TORCH_PRUNING_EXT_NO_KERNEL"):
            folder = _private_folder()
            library = _compile_l1(folder) if folder is not None else None
            if library is not None:
                try:
                    function = ctypes.CDLL(str(library)).l1_rows
                except (OSError, AttributeError):
                    function = None
                if function is not None:
                    size = ctypes.c_size_t
                    function.argtypes = [ctypes.c_void_p, ctypes.c_void_p, size, size, size, size, ctypes.c_void_p,
                                         size, ctypes.c_void_p, size, size]
                    function.restype = None
                    _l1_function = function
                    if not _l1_kernel_agrees_with_cdist():
                        _l1_function = False
    return _l1_function or None


def _l1_kernel_agrees_with_cdist() -> bool:
    """Bitwise equality with torch.cdist(p=1) on a small case that covers every code path."""
    generator = torch.Generator().manual_seed(0)
    rows = torch.randn(23, 301, generator=generator)
    rows = rows / rows.norm(dim=1, keepdim=True)
    kept = torch.tensor([3, 0, 22, 7, 8, 9, 10, 11, 12, 13, 14, 15, 1])
    expected = torch.cdist(rows, rows[kept], p=1.0).numpy()
    sources = rows.numpy()
    return (np.array_equal(l1_distances(sources, kept=kept.numpy(), _block=128), expected)
            and np.array_equal(l1_distances(sources, sources[kept.numpy()]), expected))


def l1_distances(sources: np.ndarray, targets: np.ndarray | None = None, kept: np.ndarray | None = None,
                 _block: int = _L1_BLOCK) -> np.ndarray:
    """float32 L1 distances (n x k) between the rows of sources (n x d) and those of targets (k x d), or
    of sources[kept] (distinct indices; the symmetric kept x kept block is then computed once), bitwise
    equal to torch.cdist(p=1) on the CPU, which it falls back to without the compiled kernel."""
    function = _l1_kernel()
    sources = np.ascontiguousarray(sources, dtype=np.float32)
    if kept is not None:
        kept = np.asarray(kept, dtype=np.int64)
        targets = sources[kept]
        if len(np.unique(kept)) != len(kept):
            kept = None
    targets = np.ascontiguousarray(targets, dtype=np.float32)
    (n, d), k = sources.shape, len(targets)
    if function is None or n == 0 or k == 0 or d == 0:
        return torch.cdist(torch.from_numpy(sources), torch.from_numpy(targets), p=1.0).numpy()
    strips, full = -(-k // 16), k // 16
    packed = torch.zeros(strips, d, 16)  # strip s holds targets 16s..16s+15, coordinate-major
    rows = torch.from_numpy(targets)
    if full:
        packed[:full] = rows[:16 * full].view(full, 16, d).transpose(1, 2)
    if k % 16:
        packed[full, :, :k % 16] = rows[16 * full:].t()
    packed = packed.numpy()
    # the kept rows first, in target order: position g < k is then target g
    order = np.arange(n, dtype=np.int64) if kept is None else np.concatenate(
        [kept, np.setdiff1d(np.arange(n, dtype=np.int64), kept)])
    shared = 0 if kept is None else k
    width = 16 * strips
    out = np.empty((n, width), dtype=np.float32)

    def run(start: int) -> None:
        count = min(n, start + _L1_ROWS_PER_TASK) - start
        function(sources.ctypes.data, order.ctypes.data + start * order.itemsize, count, d, start, shared,
                 packed.ctypes.data, strips, out.ctypes.data, width, _block)

    # ctypes releases the GIL: the row blocks run in parallel threads
    with ThreadPoolExecutor(max(1, torch.get_num_threads())) as pool:
        list(pool.map(run, range(0, n, _L1_ROWS_PER_TASK)))
    if kept is not None:  # the kept x kept block: lower triangle from the upper one (d(u, v) = d(v, u))
        block = out[kept, :k]
        out[kept, :k] = np.where(np.tri(k, dtype=bool, k=-1), block.T, block)
    return np.ascontiguousarray(out[:, :k])
