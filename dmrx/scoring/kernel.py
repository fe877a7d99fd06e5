"""A fused CPU kernel for DMR's Item-to-Item attention at scoring time, compiled on first use.

Per candidate i of user u the candidate side needs a_t = z . tanh(K_ut + q_i) for every behaviour t
(T x h tanh: 3,200 at the default sizes), the masked softmax of a, r_hat = sum_t a_t m_ut and
u_hat = sum_t alpha_t e_ut. In torch eager that is a broadcast add, a tanh and a product with z, each a
pass over a [candidates, T, h] tensor, plus a dozen small ops per block; here it is one loop per candidate
that keeps everything in registers and L1, and never materialises the [T, h] tensor.

tanh(k + q) = 1 - 2 / (exp(2k) exp(2q) + 1): with A = exp(2K) computed once per user and B = exp(2q) once
per candidate, each (t, h) costs a multiply-add and a division instead of a tanh. Used when every |K| and
|q| of the batch is <= 20 (A, B and their products stay finite normal floats; trained models sit far
below); otherwise the kernel evaluates tanh directly with a rational approximation (|error| < 3e-7).
Both agree with torch's tanh path to ~1e-6 relative in the attention outputs (tests/test_score.py).

The C source below is compiled with the system C compiler (`$CC`, else cc or gcc; -O3 -march=native
-ffast-math) into ~/.cache/dmrx/kernels (or $DMRX_CACHE/kernels), keyed by source, compiler, flags and
CPU, on first use (under a second), and loaded with ctypes, which releases the GIL during the call. No
compiler, a failed build, or DMRX_SCORE_KERNEL=0: `load()` returns None and scoring uses torch ops.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

EXP_LIMIT = 20.0  # |K|, |q| bound for the exp form (e^40 * e^40 is far inside float32 range)

SOURCE = r"""
#include <math.h>
#include <stdint.h>
#include <string.h>

static inline float rational_tanh(float x) {
    /* a 13/6 rational approximation of tanh on [-7.9, 7.9] (as Eigen's fast tanh), saturated outside */
    const float c = 7.90531110763549805f;
    x = x > c ? c : (x < -c ? -c : x);
    float x2 = x * x;
    float p = x2 * -2.76076847742355e-16f + 2.00018790482477e-13f;
    p = p * x2 + -8.60467152213735e-11f;
    p = p * x2 + 5.12229709037114e-08f;
    p = p * x2 + 1.48572235717979e-05f;
    p = p * x2 + 6.37261928875436e-04f;
    p = p * x2 + 4.89352455891786e-03f;
    p = p * x;
    float q = x2 * 1.19825839466702e-06f + 1.18534705686654e-04f;
    q = q * x2 + 2.26843463243900e-03f;
    q = q * x2 + 4.89352518554385e-03f;
    return p / q;
}

/* keys [U,T,H] (exp_form: exp(2K)), e [U,T,D], mask [U,T] in {0,1}, q [B,H] (exp_form: exp(2q)), z [H],
   row [B] -> u_hat [B,D], r_hat [B]. T <= 4096. */
int dmrx_i2i(const float *keys, const float *e, const float *mask, const float *q, const float *z,
             const int64_t *row, int64_t B, int64_t T, int64_t H, int64_t D, int exp_form,
             float *u_hat, float *r_hat) {
    float a[4096], w[4096];
    if (T > 4096) return 1;
    float zsum = 0.f;
    for (int64_t h = 0; h < H; h++) zsum += z[h];
    for (int64_t i = 0; i < B; i++) {
        const int64_t u = row[i];
        const float *K = keys + u * T * H, *qi = q + i * H, *m = mask + u * T;
        float rh = 0.f;
        for (int64_t t = 0; t < T; t++) {
            const float *k = K + t * H;
            float s = 0.f;
            if (exp_form) {
                #pragma omp simd reduction(+:s)
                for (int64_t h = 0; h < H; h++) s += z[h] / (k[h] * qi[h] + 1.f);
                s = zsum - 2.f * s;
            } else {
                #pragma omp simd reduction(+:s)
                for (int64_t h = 0; h < H; h++) s += z[h] * rational_tanh(k[h] + qi[h]);
            }
            a[t] = s;
            rh += s * m[t];
        }
        r_hat[i] = rh;
        /* the model's masked softmax: padding takes the row's minimum, never reaches exp */
        float lo = a[0];
        for (int64_t t = 1; t < T; t++) lo = a[t] < lo ? a[t] : lo;
        float mx = lo;
        for (int64_t t = 0; t < T; t++) { float r = m[t] > 0.f ? a[t] : lo; mx = r > mx ? r : mx; }
        float sum = 0.f;
        for (int64_t t = 0; t < T; t++) {
            float r = m[t] > 0.f ? a[t] : lo;
            w[t] = expf(r - mx) * m[t];
            sum += w[t];
        }
        const float inv = 1.f / (sum > 1e-6f ? sum : 1e-6f);
        float *o = u_hat + i * D;
        memset(o, 0, sizeof(float) * (size_t)D);
        const float *E = e + u * T * D;
        for (int64_t t = 0; t < T; t++) {
            const float al = w[t] * inv;
            if (al == 0.f) continue;
            const float *et = E + t * D;
            #pragma omp simd
            for (int64_t d = 0; d < D; d++) o[d] += al * et[d];
        }
    }
    return 0;
}
"""

FLAGS = ["-O3", "-march=native", "-ffast-math", "-fopenmp-simd", "-fPIC"]
# Linked in a second step without -ffast-math: linking with it adds crtfastmath.o, whose constructor turns on
# flush-to-zero for the whole process when the library loads, and so changes every other library's float
# arithmetic (ONNX Runtime's INT8 scores moved by 1e-3 in the same process).
LINK_FLAGS = ["-shared"]

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False
reason: str | None = None  # why the kernel is not in use, when it is not


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_id() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _cache_dir() -> Path:
    base = os.environ.get("DMRX_CACHE")
    return (Path(base) if base else Path.home() / ".cache" / "dmrx") / "kernels"


def load() -> ctypes.CDLL | None:
    """The compiled kernel (built on first use), or None (see `reason`)."""
    global _lib, _tried, reason
    if os.environ.get("DMRX_SCORE_KERNEL", "1") == "0":
        reason = "disabled by DMRX_SCORE_KERNEL=0"
        return None
    with _lock:
        if not _tried:
            _tried = True
            _lib, reason = build(_compiler(), _cache_dir())
        return _lib


def build(cc: str | None, cache: Path) -> tuple[ctypes.CDLL | None, str | None]:
    """Compile (or find in `cache`) and load the kernel with compiler `cc`: (library, None) or (None, why)."""
    if cc is None:
        return None, "no C compiler found ($CC, cc, gcc, clang)"
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
        key = hashlib.sha256(
            "\0".join([SOURCE, cc, version, " ".join(FLAGS + LINK_FLAGS), platform.machine(), _cpu_id()]).encode()
        ).hexdigest()[:16]
        so = cache / f"dmrx_i2i-{key}.so"
        if not so.exists():
            cache.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=cache) as tmp:
                src = Path(tmp) / "i2i.c"
                src.write_text(SOURCE)
                obj, out = Path(tmp) / "i2i.o", Path(tmp) / "i2i.so"
                res = subprocess.run(
                    [cc, *FLAGS, "-c", "-o", str(obj), str(src)], capture_output=True, text=True, timeout=120
                )
                if res.returncode == 0:
                    res = subprocess.run(
                        [cc, *LINK_FLAGS, "-o", str(out), str(obj), "-lm"], capture_output=True, text=True, timeout=120
                    )
                if res.returncode != 0 or not out.exists():
                    last = (res.stderr or res.stdout or "no output").strip().splitlines()[-1:]
                    return None, f"C compiler {cc} failed: {last}"
                os.replace(out, so)  # atomic: concurrent first uses race harmlessly
        lib = ctypes.CDLL(str(so))
        fn = lib.dmrx_i2i
        fn.restype = ctypes.c_int
        fn.argtypes = [ctypes.c_void_p] * 6 + [ctypes.c_int64] * 4 + [ctypes.c_int] + [ctypes.c_void_p] * 2
        return lib, None
    except (OSError, subprocess.SubprocessError) as e:
        return None, f"kernel build/load failed ({e.__class__.__name__}: {e})"


def i2i(
    keys: torch.Tensor,
    e: torch.Tensor,
    mask: torch.Tensor,
    q: torch.Tensor,
    z: torch.Tensor,
    user_row: torch.Tensor,
    exp_form: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """u_hat [B, D] and r_hat [B] (CPU float32). exp_form None: the exp form when the batch allows it."""
    lib = _lib or load()  # a scorer that loaded the kernel keeps it, whatever the environment says later
    if lib is None:
        raise RuntimeError(f"dmrx i2i kernel unavailable: {reason}")
    U, T, H = keys.shape
    D = e.shape[2]
    B = q.shape[0]
    if exp_form is None:
        exp_form = bool(keys.abs().max() <= EXP_LIMIT) if keys.numel() else True
        exp_form = exp_form and (B == 0 or bool(q.abs().max() <= EXP_LIMIT))
    if exp_form:
        keys, q = torch.exp(2 * keys), torch.exp(2 * q)
    keys, e, mask, q = (x.float().contiguous() for x in (keys, e, mask, q))
    z = z.float().contiguous().reshape(-1)
    row = user_row.to(torch.int64).contiguous()
    u_hat = torch.empty(B, D, dtype=torch.float32)
    r_hat = torch.empty(B, dtype=torch.float32)
    if B:
        rc = lib.dmrx_i2i(
            keys.data_ptr(),
            e.data_ptr(),
            mask.data_ptr(),
            q.data_ptr(),
            z.data_ptr(),
            row.data_ptr(),
            B,
            T,
            H,
            D,
            int(exp_form),
            u_hat.data_ptr(),
            r_hat.data_ptr(),
        )
        if rc:
            raise RuntimeError(f"dmrx i2i kernel: history length {T} is over its limit of 4096")
    return u_hat, r_hat
