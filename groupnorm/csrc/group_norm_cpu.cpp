// Group Normalization on the CPU (Wu & He 2018), fused with the per-channel affine, an optional
// residual add and an optional activation, as the torch op library `groupnorm_cpu`:
//
//   forward(x, weight?, bias?, residual?, num_groups, eps, activation) -> (y, mean, rstd)
//   backward(grad_y, x, weight?, bias?, residual?, mean, rstd, num_groups, activation, needs[4])
//       -> (dx, dweight, dbias, dresidual)          (0-element tensors where not needed)
//   group_norm(x, weight?, bias?, residual?, num_groups, eps, activation) -> y
//       (differentiable: its Autograd kernel is the C++ autograd::Function at the end of this file)
//
// Math, per sample n and group g (D = C/G channels x S positions, cnt = D*S elements):
//
//   mu = mean(x),  var = mean((x - mu)^2),  rstd = 1/sqrt(var + eps),  x_hat = (x - mu) * rstd
//   z = gamma_c * x_hat + beta_c (+ residual),  y = act(z),  act in {none, relu, silu, gelu (erf)}
//
//   backward, dz = dy * act'(z) (z recomputed from x):
//   dresidual = dz,  dbeta_c = sum_{n,s} dz,  dgamma_c = sum_{n,s} dz * x_hat,
//   dx = rstd * (gamma_c dz - mean_g(gamma dz) - x_hat * mean_g(gamma dz x_hat))
//
// Accuracy for ANY mean (the reason this op exists; torch's own kernel loses everything when
// |mean| >> std):
// * Statistics are sums of x - sh, where sh is the mean of the group's first 16 elements (cf) or
//   first rows (cl), rounded to the compute type: x - sh is exact when |mean| >> std (Sterbenz)
//   and O(std) in any case, so nothing cancels in sum((x - sh)^2) even at mean 1e6, std 0.1 in
//   float32. float / bf16 / half inputs sum x - sh in float lanes over short blocks (<= 6-16
//   terms per lane), each block then added in double; a group whose shift is far from its mean
//   (q > 4 (M2 + cnt eps): an outlier among the shift's elements) is summed again in double around
//   the mean found. double inputs sum in double.
// * The mean is split as mu = hi + lo with hi = mu rounded to the compute type. Elementwise code
//   computes (x - hi), exact when |mean| >> std (x and hi within a factor 2), and folds lo into
//   the per-channel constant: z = (x - hi) * (gamma rstd) + (beta - gamma rstd lo).
// * The backward gets the rounded mean (hi) back, and re-derives lo from sum(x - hi) in the same
//   pass that sums dz and dz*(x - hi): dx = k1_c dz + k2 (x - hi) + k3. Only with an activation
//   AND |mean| * rstd large enough for the rounding of the mean to show in z (> ~4 in float32)
//   does it read x once more first, to get lo before it evaluates act'(z).
//
// Layouts: "cf" = contiguous (N, C, *spatial): a group is one contiguous run of D*S elements.
// "cl" = x's (N, *spatial, C) permutation is dense (channels_last, channels_last_3d, (N, L, C)
// storage of an (N, C, L) tensor); also used for a contiguous input with S == 1 ((N, C), (N, C,
// 1, 1)), whose memory is the same, so that the vector loop runs along C. Outputs follow x: cl-like
// iff x is (and not contiguous); any other stride pattern is copied to contiguous first.
//
// Work split (shape-only, so the summation order, and the bits, never depend on the thread count):
// a "unit" is what one set of statistics covers: a group (n, g) in cf, a sample n in cl. A unit
// that is small enough to stay in L2 between its two passes, when there are enough of them, is one
// task (sums, coefficients, output: one read of memory; in cf, consecutive small groups go in
// batches of up to 256 KB: all their sums, then their outputs). Otherwise each unit is cut into
// chunks (cf: runs of ~32K elements; cl: blocks of rows), and blocks of units of a few MB run three
// steps: parallel partial sums per chunk, a merge in chunk order, a parallel output pass (each
// thread walks its chunks last-first: the latest come from its L2, the rest from L3). Batch 1 and
// 2 thus use every core. Sums are in a fixed order (lanes, then chunks, then channels); no atomics.
// cl rows of <= 640 channels are walked in memory order (one stream per tensor; per-channel block
// sums in L1), wider ones by columns of vectors down blocks of rows (sums in registers).
//
// Threads: at::parallel_for in torch's own OpenMP pool (the build compiles with -fopenmp; without
// it parallel_for runs everything on the calling thread), with a grain of >= 32K elements per
// thread, so that small inputs run inline on the calling thread without waking anyone.
//
// Memory: outputs of >= 32 MiB ask for transparent huge pages (fresh mmap'ed memory: one page
// fault per 2 MiB instead of per 4 KiB). silu / gelu use an own float exp on AVX-512 (<= 1 ulp,
// twice Sleef's speed); everything else is ATen's at::vec.
//
// Dtypes: float32 and float64 natively; bfloat16/float16 are loaded and computed in float32 inside
// the kernels (no conversion pass), weight/bias in x's dtype or float32. mean/rstd: float32
// (float64 for float64 x). Parameter gradients in the parameters' dtype.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/core/SymInt.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif
#if defined(__linux__)
#include <sys/mman.h>
#endif

// The op library's name: groupnorm_cpu. Benchmarks of two versions of this file in one process
// build one of them with -DGN_LIB=<another name>.
#ifndef GN_LIB
#define GN_LIB groupnorm_cpu
#endif
#define GN_STR2(x) #x
#define GN_STR(x) GN_STR2(x)
// (through one more macro, so that GN_LIB is expanded before TORCH_LIBRARY pastes it)
#define GN_TORCH_LIBRARY(ns, m) TORCH_LIBRARY(ns, m)
#define GN_TORCH_LIBRARY_IMPL(ns, k, m) TORCH_LIBRARY_IMPL(ns, k, m)

namespace groupnorm_cpu {
namespace {

using at::Tensor;
using at::vec::Vectorized;
using fVec = Vectorized<float>;
using dVec = Vectorized<double>;
using std::optional;

// Tuning constants (elements / bytes). All work splits depend on them and on the shape only.
constexpr int64_t kMinPerThread = 32768;     // least work that pays for waking a thread
constexpr int64_t kChunk = 32768;            // target chunk of a unit cut for the 2-step path
constexpr int64_t kFusedBytes = 1 << 20;     // a unit this small stays in L2 between its passes
constexpr int64_t kFusedUnits = 8;           // ... and is one task when there are this many units
constexpr int64_t kBlockBytes = 8 << 20;     // units per 2-step block: stays in L3 between steps
constexpr int64_t kBatchBytes = 256 << 10;   // cf: fused units in batches of this much (run_batched)

// ---------------------------------------------------------------------------------------------
// Vector helpers. op_t is the compute type: double for double, float for everything else.
// ---------------------------------------------------------------------------------------------

template <typename T> struct OpType { using type = float; };
template <> struct OpType<double> { using type = double; };
template <typename T> using op_t = typename OpType<T>::type;

inline fVec vload(const float* p) { return fVec::loadu(p); }
inline dVec vload(const double* p) { return dVec::loadu(p); }
inline fVec vload(const at::BFloat16* p) { fVec v; at::vec::load_to_float(p, v); return v; }
inline fVec vload(const at::Half* p) { fVec v; at::vec::load_to_float(p, v); return v; }
inline void vstore(float* p, const fVec& v) { v.store(p); }
inline void vstore(double* p, const dVec& v) { v.store(p); }
inline void vstore(at::BFloat16* p, const fVec& v) {
  at::vec::convert_from_float<at::BFloat16>(v, v).store(p, fVec::size());
}
inline void vstore(at::Half* p, const fVec& v) {
  at::vec::convert_from_float<at::Half>(v, v).store(p, fVec::size());
}

// The first n lanes (n <= size; the others load as 0 / are not stored): masked on AVX512.
inline fVec vload(const float* p, int64_t n) { return fVec::loadu(p, n); }
inline dVec vload(const double* p, int64_t n) { return dVec::loadu(p, n); }
template <typename R> inline fVec vload_reduced(const R* p, int64_t n) {
  if (n == fVec::size()) return vload(p);
  return std::get<0>(at::vec::convert_to_float<R>(Vectorized<R>::loadu(p, n)));
}
inline fVec vload(const at::BFloat16* p, int64_t n) { return vload_reduced(p, n); }
inline fVec vload(const at::Half* p, int64_t n) { return vload_reduced(p, n); }
// Partial stores go through a buffer: AVX-512 masked stores are slow on some CPUs (AMD Zen 4).
template <typename T, typename VV> inline void vstore_part(T* p, const VV& v, int64_t n) {
  if (n == VV::size()) {
    vstore(p, v);
    return;
  }
  __at_align__ T buf[VV::size() * 2];  // (room for a reduced type's pair of halves)
  vstore(buf, v);
  std::memcpy(p, buf, n * sizeof(T));
}
inline void vstore(float* p, const fVec& v, int64_t n) { v.store(p, n); }    // (masked)
inline void vstore(double* p, const dVec& v, int64_t n) { v.store(p, n); }
inline void vstore(at::BFloat16* p, const fVec& v, int64_t n) { vstore_part(p, v, n); }
inline void vstore(at::Half* p, const fVec& v, int64_t n) { vstore_part(p, v, n); }

// float lanes -> two double vectors (low half, high half). fVec always has 2x dVec's lanes.
inline void widen(const fVec& v, dVec& lo, dVec& hi) {
#if defined(CPU_CAPABILITY_AVX512)
  __m512 x = v;
  lo = _mm512_cvtps_pd(_mm512_castps512_ps256(x));
  hi = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(x), 1)));
#elif defined(CPU_CAPABILITY_AVX2)
  __m256 x = v;
  lo = _mm256_cvtps_pd(_mm256_castps256_ps128(x));
  hi = _mm256_cvtps_pd(_mm256_extractf128_ps(x, 1));
#else
  float f[fVec::size()];
  double d[fVec::size()];
  v.store(f);
  for (int i = 0; i < fVec::size(); ++i) d[i] = f[i];
  lo = dVec::loadu(d);
  hi = dVec::loadu(d + dVec::size());
#endif
}

// Lanes summed as a fixed pairwise tree (the same bits on every run; a short dependency chain,
// which matters when a channel has only 49 elements).
C10_ALWAYS_INLINE double hsum(const dVec& v) {
  double d[dVec::size()];
  v.store(d);
  for (int w = dVec::size() / 2; w >= 1; w /= 2) {
    for (int i = 0; i < w; ++i) d[i] = d[i] + d[i + w];
  }
  return d[0];
}

// Sum of v[0, n) in dVec lanes, then across them.
inline double lane_sum(const double* v, int64_t n) {
  constexpr int64_t KD = dVec::size();
  dVec acc(0);
  int64_t i = 0;
  for (; i + KD <= n; i += KD) acc = acc + dVec::loadu(v + i);
  double s = hsum(acc);
  for (; i < n; ++i) s += v[i];
  return s;
}

// sg = sum gm db, tg = sum gm (ds - lo db) over [0, n), in dVec lanes, then across them.
inline void gamma_dots(const double* gm, const double* db, const double* ds, double lo, int64_t n,
                       double& sg, double& tg) {
  constexpr int64_t KD = dVec::size();
  const dVec vlo(lo);
  dVec vs(0), vt(0);
  int64_t i = 0;
  for (; i + KD <= n; i += KD) {
    const dVec g = dVec::loadu(gm + i), b = dVec::loadu(db + i);
    vs = at::vec::fmadd(g, b, vs);
    vt = at::vec::fmadd(g, dVec::loadu(ds + i) - vlo * b, vt);
  }
  sg = hsum(vs);
  tg = hsum(vt);
  for (; i < n; ++i) {
    sg += gm[i] * db[i];
    tg += gm[i] * (ds[i] - lo * db[i]);
  }
}

// Scratch memory that lives as long as the calling thread: per-call arrays (coefficients, partial
// sums) are not allocated, zeroed and page-faulted again on every call. Slot k holds one array:
// 0-3 per call (the calling thread), 4-6 inside tasks (any thread, the caller's too when a task
// runs inline), 7-8 the parameters (the calling thread).
template <typename U> U* scratch(int slot, size_t n) {
  thread_local std::vector<std::vector<unsigned char>> slots(9);
  auto& buf = slots[slot];
  const size_t bytes = n * sizeof(U) + 64;
  if (buf.size() < bytes) buf.resize(bytes);
  auto addr = reinterpret_cast<uintptr_t>(buf.data());
  return reinterpret_cast<U*>((addr + 63) & ~uintptr_t(63));
}

// A double accumulator fed with compute-type vectors (float vectors are widened).
struct Acc {
  dVec a = dVec(0.0), b = dVec(0.0);
  inline void add(const fVec& v) { dVec l, h; widen(v, l, h); a = a + l; b = b + h; }
  inline void add(const dVec& v) { a = a + v; }
  C10_ALWAYS_INLINE double sum() const { return hsum(a + b); }
};

// Gradient sums run in the compute type over blocks of at most kFlush vectors (so <= kFlush terms
// per float lane: ~4e-7 relative), then go to double: the float -> double conversions, the
// costliest part of a double sum, then happen once per block instead of once per vector.
constexpr int64_t kFlush = 8;

// Lanes [0, split) of b, the others of a.
template <typename V> C10_ALWAYS_INLINE V first_lanes(const V& b, const V& a, int64_t split) {
  return V::blendv(a, b, V::arange(0, 1) < V(static_cast<typename V::value_type>(split)));
}

// Elementwise math written once for scalars and vectors.
inline float vexp(float v) { return std::exp(v); }
inline double vexp(double v) { return std::exp(v); }
template <typename V> inline V vexp(const V& v) { return v.exp(); }
#if defined(CPU_CAPABILITY_AVX512)
// e^v for float lanes at <= 1 ulp (checked against double on 23M floats: 0.91 ulp), in 12
// instructions instead of Sleef's ~25: silu's exp is most of the fused op's arithmetic.
// e^v = 2^k e^r: k = round(v log2 e), r = v - k ln2 with ln2 in two parts (r exact to an ulp),
// e^r by its Taylor series to r^7 (|r| <= ln2 / 2: truncation < 6e-9), 2^k by scalef (exact;
// overflow to inf, gradual underflow, NaN through).
inline fVec vexp(const fVec& v) {
  const __m512 x = v;
  const __m512 k = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(k, _mm512_set1_ps(0.693145751953125f), x);
  r = _mm512_fnmadd_ps(k, _mm512_set1_ps(1.428606765330187045e-06f), r);
  __m512 p = _mm512_set1_ps(1.f / 5040);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 720));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, k);
}
#endif
inline float verf(float v) { return std::erf(v); }
inline double verf(double v) { return std::erf(v); }
template <typename V> inline V verf(const V& v) { return v.erf(); }
inline float vrelu(float v) { return v < 0 ? 0.0f : v; }  // NaN stays NaN, as in torch
inline double vrelu(double v) { return v < 0 ? 0.0 : v; }
template <typename V> inline V vrelu(const V& v) { return at::vec::clamp_min(v, V(0)); }
// where(z > 0, v, 0)
inline float vpos(float z, float v) { return z > 0 ? v : 0.0f; }
inline double vpos(double z, double v) { return z > 0 ? v : 0.0; }
template <typename V> inline V vpos(const V& z, const V& v) { return V::blendv(V(0), v, z > V(0)); }
inline float vfma(float a, float b, float c) { return a * b + c; }
inline double vfma(double a, double b, double c) { return a * b + c; }
template <typename V> inline V vfma(const V& a, const V& b, const V& c) {
  return at::vec::fmadd(a, b, c);
}

// Activation codes: 0 none, 1 relu, 2 silu, 3 gelu (exact erf form); see groupnorm/_checks.py.
template <int ACT, typename V> inline V act_fwd(const V& z) {
  if constexpr (ACT == 0) {
    return z;
  } else if constexpr (ACT == 1) {
    return vrelu(z);
  } else if constexpr (ACT == 2) {
    return z / (V(1) + vexp(V(0) - z));                   // z * sigmoid(z)
  } else {
    return z * V(0.5) * (V(1) + verf(z * V(M_SQRT1_2)));  // z * Phi(z)
  }
}

// dy * act'(z)
template <int ACT, typename V> inline V act_bwd(const V& z, const V& dy) {
  if constexpr (ACT == 0) {
    return dy;
  } else if constexpr (ACT == 1) {
    return vpos(z, dy);
  } else if constexpr (ACT == 2) {
    V s = V(1) / (V(1) + vexp(V(0) - z));                 // silu' = s (1 + z (1 - s))
    return dy * s * (V(1) + z * (V(1) - s));
  } else {
    V cdf = V(0.5) * (V(1) + verf(z * V(M_SQRT1_2)));      // gelu' = Phi(z) + z phi(z)
    V pdf = vexp(z * z * V(-0.5)) * V(0.3989422804014327);
    return dy * (cdf + z * pdf);
  }
}

inline int64_t divup(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Runs f(begin, end) over [0, n) tasks of `work` elements each, in torch's thread pool, with at
// least kMinPerThread elements per thread (inline on the caller for small inputs).
template <typename F> void run_tasks(int64_t n, int64_t work, const F& f) {
  if (n <= 0) return;
  int64_t grain = std::max<int64_t>(1, divup(kMinPerThread, std::max<int64_t>(work, 1)));
  if (n <= grain) {
    f(0, n);
    return;
  }
  at::parallel_for(0, n, grain, f);
}

// ---------------------------------------------------------------------------------------------
// Inner loops over contiguous runs (cf) and rows (cl).
// ---------------------------------------------------------------------------------------------

// s += sum(x - sh), q += sum((x - sh)^2), in double, over x[0, len).
template <typename T>
void sums_run(const T* x, int64_t len, double sh, double& s, double& q) {
  using O = op_t<T>;
  constexpr int64_t K = Vectorized<O>::size();
  const dVec vsh(sh);
  dVec s0(0.0), s1(0.0), q0(0.0), q1(0.0);
  int64_t i = 0;
  for (; i + K <= len; i += K) {
    if constexpr (std::is_same_v<O, float>) {
      dVec l, h;
      widen(vload(x + i), l, h);
      l = l - vsh;
      h = h - vsh;
      s0 = s0 + l;
      s1 = s1 + h;
      q0 = at::vec::fmadd(l, l, q0);
      q1 = at::vec::fmadd(h, h, q1);
    } else {
      dVec d = vload(x + i) - vsh;
      s0 = s0 + d;
      q0 = at::vec::fmadd(d, d, q0);
    }
  }
  double ss = hsum(s0 + s1), qq = hsum(q0 + q1);
  for (; i < len; ++i) {
    double d = static_cast<double>(static_cast<O>(x[i])) - sh;
    ss += d;
    qq += d * d;
  }
  s += ss;
  q += qq;
}

// cl: per-channel s[c] += sum_rows (x - sh[c]), q[c] += sum_rows (x - sh[c])^2 over `rows` rows
// of C. Blocks of kRowBlock rows: each column vector is summed down the block in registers, then
// added to the (L1/L2) arrays once, so a wide row's sums (C = 2048: 32 KiB of them) do not go
// through memory on every row. (Whole columns at a time would read x at a stride of C: with
// C = 2048 every row maps to the same cache set and no prefetcher follows.)
constexpr int64_t kRowBlock = 8;

template <typename T>
void sums_rows(const T* x, int64_t rows, int64_t C, int64_t ld, const double* sh, double* s,
               double* q) {
  using O = op_t<T>;
  constexpr int64_t K = Vectorized<O>::size();
  constexpr int64_t KD = dVec::size();
  for (int64_t r0 = 0; r0 < rows; r0 += kRowBlock) {
    const int64_t nr = std::min(kRowBlock, rows - r0);
    const T* p = x + r0 * ld;
    int64_t c = 0;
    for (; c + K <= C; c += K) {
      if constexpr (std::is_same_v<O, float>) {
        const dVec shl = dVec::loadu(sh + c), shh = dVec::loadu(sh + c + KD);
        dVec sl(0.0), sh2(0.0), ql(0.0), qh(0.0);
        for (int64_t rr = 0; rr < nr; ++rr) {
          dVec l, h;
          widen(vload(p + rr * ld + c), l, h);
          l = l - shl;
          h = h - shh;
          sl = sl + l;
          sh2 = sh2 + h;
          ql = at::vec::fmadd(l, l, ql);
          qh = at::vec::fmadd(h, h, qh);
        }
        (dVec::loadu(s + c) + sl).store(s + c);
        (dVec::loadu(s + c + KD) + sh2).store(s + c + KD);
        (dVec::loadu(q + c) + ql).store(q + c);
        (dVec::loadu(q + c + KD) + qh).store(q + c + KD);
      } else {
        const dVec shv = dVec::loadu(sh + c);
        dVec sv(0.0), qv(0.0);
        for (int64_t rr = 0; rr < nr; ++rr) {
          dVec d = vload(p + rr * ld + c) - shv;
          sv = sv + d;
          qv = at::vec::fmadd(d, d, qv);
        }
        (dVec::loadu(s + c) + sv).store(s + c);
        (dVec::loadu(q + c) + qv).store(q + c);
      }
    }
    for (; c < C; ++c) {
      double ts = 0, tq = 0;
      for (int64_t rr = 0; rr < nr; ++rr) {
        double d = static_cast<double>(static_cast<O>(p[rr * ld + c])) - sh[c];
        ts += d;
        tq += d * d;
      }
      s[c] += ts;
      q[c] += tq;
    }
  }
}

// The same sums in float blocks (float, bfloat16, half inputs): x - sh and its square summed in
// float lanes over short blocks (<= 6 terms per lane, in a tree of 4 accumulators), each block sum
// then added in double. The shifted values are O(std) when the shift is close to the mean (the
// callers shift by a mean of >= 16 elements of the group), so the float rounding errors are
// ~1e-7 of q; when it is not (q > kGuard * (M2 + cnt eps): a far outlier among those elements),
// the callers recompute the group with the double sums above, shifted by the mean found here.
// Half the instructions of the double sums: the forward's statistics pass reads at memory speed.
constexpr double kGuard = 4.0;
constexpr int64_t kFBlock = 16;  // vectors per float block (4 accumulators x 4)

inline bool stats_ok(double s, double q, double cnt, double eps) {
  return !(q > kGuard * (q - s * s / cnt + cnt * eps));  // (NaN: ok, it stays NaN)
}

template <typename T>
void fsums_run(const T* x, int64_t len, float sh, double& s, double& q) {
  constexpr int64_t K = fVec::size();
  const fVec vsh(sh);
  Acc as, aq;
  const int64_t full = len / K * K;
  int64_t i = 0;
  while (i < full) {
    const int64_t e = std::min(full, i + kFBlock * K);
    fVec s0(0), s1(0), s2(0), s3(0), q0(0), q1(0), q2(0), q3(0);
    for (; i + 4 * K <= e; i += 4 * K) {
      fVec d0 = vload(x + i) - vsh, d1 = vload(x + i + K) - vsh;
      fVec d2 = vload(x + i + 2 * K) - vsh, d3 = vload(x + i + 3 * K) - vsh;
      s0 = s0 + d0;
      s1 = s1 + d1;
      s2 = s2 + d2;
      s3 = s3 + d3;
      q0 = at::vec::fmadd(d0, d0, q0);
      q1 = at::vec::fmadd(d1, d1, q1);
      q2 = at::vec::fmadd(d2, d2, q2);
      q3 = at::vec::fmadd(d3, d3, q3);
    }
    for (; i < e; i += K) {
      fVec d = vload(x + i) - vsh;
      s0 = s0 + d;
      q0 = at::vec::fmadd(d, d, q0);
    }
    as.add((s0 + s1) + (s2 + s3));
    aq.add((q0 + q1) + (q2 + q3));
  }
  double ss = as.sum(), qq = aq.sum();
  for (; i < len; ++i) {
    double d = static_cast<double>(static_cast<float>(x[i])) - sh;
    ss += d;
    qq += d * d;
  }
  s += ss;
  q += qq;
}

// cl: per-channel sums over `rows` rows in float blocks of 2 x 8 rows (two accumulators), each
// block added to the double arrays s, q; sh: per-channel float shifts.
// Rows of at most kRowMajorC channels are walked in memory order with the block sums in an L1
// array (one sequential stream per tensor: from memory, strided column walks stall); wider rows
// (C = 1024-2048, short S: the data is in L2 / L3 anyway) walk each column of vectors down a
// block of rows with the sums in registers, as the L1 arrays would no longer fit beside the rows.
constexpr int64_t kRowMajorC = 640;

template <typename T>
void fsums_cols(const T* x, int64_t rows, int64_t C, int64_t ld, const float* sh, double* s,
                double* q) {
  constexpr int64_t K = fVec::size();
  constexpr int64_t KD = dVec::size();
  constexpr int64_t B = 2 * kRowBlock;
  for (int64_t r0 = 0; r0 < rows; r0 += B) {
    const int64_t nr = std::min(B, rows - r0);
    const T* p = x + r0 * ld;
    int64_t c = 0;
    for (; c + K <= C; c += K) {
      const fVec shv = fVec::loadu(sh + c);
      fVec s0(0), s1(0), q0(0), q1(0);
      int64_t rr = 0;
      for (; rr + 2 <= nr; rr += 2) {
        fVec d0 = vload(p + rr * ld + c) - shv, d1 = vload(p + (rr + 1) * ld + c) - shv;
        s0 = s0 + d0;
        s1 = s1 + d1;
        q0 = at::vec::fmadd(d0, d0, q0);
        q1 = at::vec::fmadd(d1, d1, q1);
      }
      if (rr < nr) {
        fVec d0 = vload(p + rr * ld + c) - shv;
        s0 = s0 + d0;
        q0 = at::vec::fmadd(d0, d0, q0);
      }
      dVec l, h;
      widen(s0 + s1, l, h);
      (dVec::loadu(s + c) + l).store(s + c);
      (dVec::loadu(s + c + KD) + h).store(s + c + KD);
      widen(q0 + q1, l, h);
      (dVec::loadu(q + c) + l).store(q + c);
      (dVec::loadu(q + c + KD) + h).store(q + c + KD);
    }
    for (; c < C; ++c) {
      double ts = 0, tq = 0;
      for (int64_t rr = 0; rr < nr; ++rr) {
        double d = static_cast<double>(static_cast<float>(p[rr * ld + c])) - sh[c];
        ts += d;
        tq += d * d;
      }
      s[c] += ts;
      q[c] += tq;
    }
  }
}

template <typename T>
void fsums_rows(const T* x, int64_t rows, int64_t C, int64_t ld, const float* sh, double* s,
                double* q) {
  if (C > kRowMajorC) return fsums_cols(x, rows, C, ld, sh, s, q);
  constexpr int64_t K = fVec::size();
  constexpr int64_t KD = dVec::size();
  constexpr int64_t B = 2 * kRowBlock;
  const int64_t Cv = C / K * K;
  // float block sums of [s | q] per channel (vector part), in L1
  float* fb = scratch<float>(4, static_cast<size_t>(2 * Cv));
  for (int64_t r0 = 0; r0 < rows; r0 += B) {
    const int64_t nr = std::min(B, rows - r0);
    const T* p = x + r0 * ld;
    std::fill(fb, fb + 2 * Cv, 0.0f);
    for (int64_t rr = 0; rr < nr; ++rr) {
      const T* row = p + rr * ld;
      for (int64_t c = 0; c < Cv; c += K) {
        fVec d = vload(row + c) - fVec::loadu(sh + c);
        (fVec::loadu(fb + c) + d).store(fb + c);
        at::vec::fmadd(d, d, fVec::loadu(fb + Cv + c)).store(fb + Cv + c);
      }
    }
    for (int64_t c = 0; c < Cv; c += K) {
      dVec l, h;
      widen(fVec::loadu(fb + c), l, h);
      (dVec::loadu(s + c) + l).store(s + c);
      (dVec::loadu(s + c + KD) + h).store(s + c + KD);
      widen(fVec::loadu(fb + Cv + c), l, h);
      (dVec::loadu(q + c) + l).store(q + c);
      (dVec::loadu(q + c + KD) + h).store(q + c + KD);
    }
    for (int64_t c = Cv; c < C; ++c) {
      double ts = 0, tq = 0;
      for (int64_t rr = 0; rr < nr; ++rr) {
        double d = static_cast<double>(static_cast<float>(p[rr * ld + c])) - sh[c];
        ts += d;
        tq += d * d;
      }
      s[c] += ts;
      q[c] += tq;
    }
  }
}

// y = act((x - hi) * a + cz (+ r)) over a run with scalar coefficients (cf). The tail is one
// masked vector: cf runs are channels, often short (7x7 = 49 = 3 vectors + 1).
template <typename T, int ACT, bool RES>
void apply_run(const T* x, const T* r, T* y, int64_t len, op_t<T> hi, op_t<T> a, op_t<T> cz) {
  using V = Vectorized<op_t<T>>;
  constexpr int64_t K = V::size();
  const V vhi(hi), va(a), vcz(cz);
  auto body = [&](int64_t i, int64_t n) {
    V z = vfma(vload(x + i, n) - vhi, va, vcz);
    if constexpr (RES) z = z + vload(r + i, n);
    vstore(y + i, act_fwd<ACT>(z), n);
  };
  int64_t i = 0;
  for (; i + K <= len; i += K) body(i, K);
  if (i < len) body(i, len - i);
}

// The same along a row of C channels with per-channel coefficient arrays (cl).
template <typename T, int ACT, bool RES>
void apply_row(const T* x, const T* r, T* y, int64_t C, const op_t<T>* hi, const op_t<T>* a,
               const op_t<T>* cz) {
  using O = op_t<T>;
  using V = Vectorized<O>;
  constexpr int64_t K = V::size();
  int64_t c = 0;
  for (; c + K <= C; c += K) {
    V z = vfma(vload(x + c) - V::loadu(hi + c), V::loadu(a + c), V::loadu(cz + c));
    if constexpr (RES) z = z + vload(r + c);
    vstore(y + c, act_fwd<ACT>(z));
  }
  for (; c < C; ++c) {
    O z = vfma(static_cast<O>(x[c]) - hi[c], a[c], cz[c]);
    if constexpr (RES) z += static_cast<O>(r[c]);
    y[c] = static_cast<T>(act_fwd<ACT>(z));
  }
}

// Backward sums over a run (cf), scalar coefficients: with dz = dy * act'(z) (stored in dr when
// given), db += sum dz, ds += sum dz (x - hi), sx += sum (x - hi). Masked tail (lanes past the
// run zeroed before they are summed).
template <typename T, int ACT, bool RES>
void bsums_run(const T* x, const T* dy, const T* r, T* dr, int64_t len, op_t<T> hi, op_t<T> a,
               op_t<T> cz, double& db, double& ds, double& sx) {
  using V = Vectorized<op_t<T>>;
  constexpr int64_t K = V::size();
  const V vhi(hi), va(a), vcz(cz), zero(0);
  Acc adb, ads, asx;
  for (int64_t i0 = 0; i0 < len; i0 += kFlush * K) {
    const int64_t i1 = std::min(len, i0 + kFlush * K);
    V fdb(0), fds(0), fsx(0);
    for (int64_t i = i0; i < i1; i += K) {
      const int64_t n = std::min(K, i1 - i);
      V xm = vload(x + i, n) - vhi;
      V dz = vload(dy + i, n);
      if constexpr (ACT != 0) {
        V z = vfma(xm, va, vcz);
        if constexpr (RES) z = z + vload(r + i, n);
        dz = act_bwd<ACT>(z, dz);
        if (dr) vstore(dr + i, dz, n);
      }
      if (n < K) {
        xm = first_lanes(xm, zero, n);
        dz = first_lanes(dz, zero, n);
      }
      fdb = fdb + dz;
      fds = vfma(dz, xm, fds);
      fsx = fsx + xm;
    }
    adb.add(fdb);
    ads.add(fds);
    asx.add(fsx);
  }
  db += adb.sum();
  ds += ads.sum();
  sx += asx.sum();
}

// cl backward sums for rows wider than kRowMajorC: columns of vectors down blocks of kRowBlock
// rows, the sums in registers; acc = [db | ds | sx] (3C).
template <typename T, int ACT, bool RES>
void bsums_cols(const T* x, const T* dy, const T* r, T* dr, int64_t rows, int64_t C, int64_t ld,
                const op_t<T>* hi, const op_t<T>* a, const op_t<T>* cz, double* acc) {
  using O = op_t<T>;
  using V = Vectorized<O>;
  constexpr int64_t K = V::size();
  constexpr int64_t KD = dVec::size();
  double* adb = acc;
  double* ads = acc + C;
  double* asx = acc + 2 * C;
  auto flush = [](double* p, const Acc& v) {
    (dVec::loadu(p) + v.a).store(p);
    if constexpr (std::is_same_v<O, float>) (dVec::loadu(p + KD) + v.b).store(p + KD);
  };
  for (int64_t r0 = 0; r0 < rows; r0 += kRowBlock) {
    const int64_t nr = std::min(kRowBlock, rows - r0);
    int64_t c = 0;
    for (; c + K <= C; c += K) {
      const V vhi = V::loadu(hi + c), va = V::loadu(a + c), vcz = V::loadu(cz + c);
      V fdb(0), fds(0), fsx(0);  // kRowBlock == kFlush terms per lane in the compute type
      for (int64_t rr = 0; rr < nr; ++rr) {
        const int64_t o = (r0 + rr) * ld + c;
        V xm = vload(x + o) - vhi;
        V dz = vload(dy + o);
        if constexpr (ACT != 0) {
          V z = vfma(xm, va, vcz);
          if constexpr (RES) z = z + vload(r + o);
          dz = act_bwd<ACT>(z, dz);
          if (dr) vstore(dr + o, dz);
        }
        fdb = fdb + dz;
        fds = vfma(dz, xm, fds);
        fsx = fsx + xm;
      }
      Acc sdb, sds, ssx;
      sdb.add(fdb);
      sds.add(fds);
      ssx.add(fsx);
      flush(adb + c, sdb);
      flush(ads + c, sds);
      flush(asx + c, ssx);
    }
    for (; c < C; ++c) {
      double tdb = 0, tds = 0, tsx = 0;
      for (int64_t rr = 0; rr < nr; ++rr) {
        const int64_t o = (r0 + rr) * ld + c;
        O xm = static_cast<O>(x[o]) - hi[c];
        O dz = static_cast<O>(dy[o]);
        if constexpr (ACT != 0) {
          O z = vfma(xm, a[c], cz[c]);
          if constexpr (RES) z += static_cast<O>(r[o]);
          dz = act_bwd<ACT>(z, dz);
          if (dr) dr[o] = static_cast<T>(dz);
        }
        tdb += dz;
        tds += static_cast<double>(dz * xm);
        tsx += xm;
      }
      adb[c] += tdb;
      ads[c] += tds;
      asx[c] += tsx;
    }
  }
}

// The same along `rows` rows of C channels (cl), per-channel arrays; acc = [db | ds | sx] (3C).
// Rows in memory order (x, dy, r each one sequential stream: walking a column of vectors down a
// block of rows instead ran up to 3 x 8 strided streams and stalled on memory); per-channel sums
// in the compute type in an L1 array [db | ds | sx] over blocks of kRowBlock rows, then added to
// the double sums (<= kRowBlock terms per lane).
template <typename T, int ACT, bool RES>
void bsums_rows(const T* x, const T* dy, const T* r, T* dr, int64_t rows, int64_t C, int64_t ld,
                const op_t<T>* hi, const op_t<T>* a, const op_t<T>* cz, double* acc) {
  if (C > kRowMajorC) return bsums_cols<T, ACT, RES>(x, dy, r, dr, rows, C, ld, hi, a, cz, acc);
  using O = op_t<T>;
  using V = Vectorized<O>;
  constexpr int64_t K = V::size();
  constexpr int64_t KD = dVec::size();
  const int64_t Cv = C / K * K;
  O* fb = scratch<O>(4, static_cast<size_t>(3 * Cv));
  O* fdb = fb;
  O* fds = fb + Cv;
  O* fsx = fb + 2 * Cv;
  for (int64_t r0 = 0; r0 < rows; r0 += kRowBlock) {
    const int64_t nr = std::min(kRowBlock, rows - r0);
    std::fill(fb, fb + 3 * Cv, O(0));
    for (int64_t rr = r0; rr < r0 + nr; ++rr) {
      const int64_t o = rr * ld;
      for (int64_t c = 0; c < Cv; c += K) {
        V xm = vload(x + o + c) - V::loadu(hi + c);
        V dz = vload(dy + o + c);
        if constexpr (ACT != 0) {
          V z = vfma(xm, V::loadu(a + c), V::loadu(cz + c));
          if constexpr (RES) z = z + vload(r + o + c);
          dz = act_bwd<ACT>(z, dz);
          if (dr) vstore(dr + o + c, dz);
        }
        (V::loadu(fdb + c) + dz).store(fdb + c);
        vfma(dz, xm, V::loadu(fds + c)).store(fds + c);
        (V::loadu(fsx + c) + xm).store(fsx + c);
      }
      for (int64_t c = Cv; c < C; ++c) {  // (C not a multiple of K: straight to double)
        O xm = static_cast<O>(x[o + c]) - hi[c];
        O dz = static_cast<O>(dy[o + c]);
        if constexpr (ACT != 0) {
          O z = vfma(xm, a[c], cz[c]);
          if constexpr (RES) z += static_cast<O>(r[o + c]);
          dz = act_bwd<ACT>(z, dz);
          if (dr) dr[o + c] = static_cast<T>(dz);
        }
        acc[c] += dz;
        acc[C + c] += static_cast<double>(dz * xm);
        acc[2 * C + c] += xm;
      }
    }
    for (int j = 0; j < 3; ++j) {
      double* d = acc + j * C;
      const O* f = fb + j * Cv;
      for (int64_t c = 0; c < Cv; c += K) {
        if constexpr (std::is_same_v<O, float>) {
          dVec l, h;
          widen(fVec::loadu(f + c), l, h);
          (dVec::loadu(d + c) + l).store(d + c);
          (dVec::loadu(d + c + KD) + h).store(d + c + KD);
        } else {
          (dVec::loadu(d + c) + dVec::loadu(f + c)).store(d + c);
        }
      }
    }
  }
}

// dx = k1 dz + k2 (x - hi) + k3 over a run (cf, scalars). dz: read back from dr when the sums
// pass stored it, else dy (ACT 0) or recomputed. Masked tail.
template <typename T, int ACT, bool RES>
void dx_run(const T* x, const T* dy, const T* r, const T* dzs, T* dx, int64_t len, op_t<T> hi,
            op_t<T> a, op_t<T> cz, op_t<T> k1, op_t<T> k2, op_t<T> k3) {
  using V = Vectorized<op_t<T>>;
  constexpr int64_t K = V::size();
  const V vhi(hi), va(a), vcz(cz), vk1(k1), vk2(k2), vk3(k3);
  auto body = [&](int64_t i, int64_t n) {
    V xm = vload(x + i, n) - vhi;
    V dz;
    if (ACT == 0 || dzs) {
      dz = vload((ACT == 0 ? dy : dzs) + i, n);
    } else {
      V z = vfma(xm, va, vcz);
      if constexpr (RES) z = z + vload(r + i, n);
      dz = act_bwd<ACT>(z, vload(dy + i, n));
    }
    vstore(dx + i, vfma(dz, vk1, vfma(xm, vk2, vk3)), n);
  };
  int64_t i = 0;
  for (; i + K <= len; i += K) body(i, K);
  if (i < len) body(i, len - i);
}

// The same along a row (cl); coefficient arrays.
template <typename T, int ACT, bool RES>
void dx_row(const T* x, const T* dy, const T* r, const T* dzs, T* dx, int64_t C, const op_t<T>* hi,
            const op_t<T>* a, const op_t<T>* cz, const op_t<T>* k1, const op_t<T>* k2,
            const op_t<T>* k3) {
  using O = op_t<T>;
  using V = Vectorized<O>;
  constexpr int64_t K = V::size();
  int64_t c = 0;
  for (; c + K <= C; c += K) {
    V xm = vload(x + c) - V::loadu(hi + c);
    V dz;
    if (ACT == 0 || dzs) {
      dz = vload((ACT == 0 ? dy : dzs) + c);
    } else {
      V z = vfma(xm, V::loadu(a + c), V::loadu(cz + c));
      if constexpr (RES) z = z + vload(r + c);
      dz = act_bwd<ACT>(z, vload(dy + c));
    }
    vstore(dx + c, vfma(dz, V::loadu(k1 + c), vfma(xm, V::loadu(k2 + c), V::loadu(k3 + c))));
  }
  for (; c < C; ++c) {
    O xm = static_cast<O>(x[c]) - hi[c];
    O dz;
    if (ACT == 0 || dzs) {
      dz = static_cast<O>((ACT == 0 ? dy : dzs)[c]);
    } else {
      O z = vfma(xm, a[c], cz[c]);
      if constexpr (RES) z += static_cast<O>(r[c]);
      dz = act_bwd<ACT>(z, static_cast<O>(dy[c]));
    }
    dx[c] = static_cast<T>(vfma(dz, k1[c], vfma(xm, k2[c], k3[c])));
  }
}

// cf backward sums for short channels (S <= kShortS: 7x7, 14x14, 16x16): dgamma and dbeta need
// per-channel sums, and a horizontal sum per channel would cost as much as the channel's own
// vectors. Each channel is summed into float vectors (<= kShortS / K / 2 terms per lane, tail by
// masked loads), kept for a batch of K channels, and the batch's K lane sums come from one
// transpose-and-add tree (lane_sums) instead of K horizontal sums.
constexpr int64_t kShortS = 512;

// out[j] = the sum of the K lanes of row j of buf (rows x K, rows <= K; rows past `rows` zero).
template <typename O> inline void lane_sums(O* buf, int64_t rows, O* out) {
  constexpr int64_t K = Vectorized<O>::size();
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<O, float>) {
    if (rows <= 4) {  // (a group of few channels: the tree would add mostly zero rows)
      for (int64_t j = 0; j < rows; ++j) out[j] = _mm512_reduce_add_ps(_mm512_loadu_ps(buf + j * K));
      return;
    }
    std::fill(buf + rows * K, buf + K * K, O(0));
    // Level with P partial sums per channel: lanes [k P, k P + P/2) and [k P + P/2, (k+1) P) of
    // each channel k of vectors a, b are added pairwise; a's channels, then b's, in order.
    alignas(64) static const int32_t idx[4][2][16] = {
        {{0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23},
         {8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31}},
        {{0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27},
         {4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31}},
        {{0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29},
         {2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31}},
        {{0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30},
         {1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31}}};
    __m512 v[16];
    for (int k = 0; k < 16; ++k) v[k] = _mm512_loadu_ps(buf + k * 16);
    for (int level = 0, n = 16; level < 4; ++level, n /= 2) {
      const __m512i lo = _mm512_load_si512(idx[level][0]), hi = _mm512_load_si512(idx[level][1]);
      for (int k = 0; k < n / 2; ++k) {
        v[k] = _mm512_add_ps(_mm512_permutex2var_ps(v[2 * k], lo, v[2 * k + 1]),
                             _mm512_permutex2var_ps(v[2 * k], hi, v[2 * k + 1]));
      }
    }
    _mm512_storeu_ps(out, v[0]);
    return;
  }
#endif
  for (int64_t j = 0; j < rows; ++j) {
    O d[K];
    std::copy(buf + j * K, buf + (j + 1) * K, d);
    for (int64_t w = K / 2; w >= 1; w /= 2) {
      for (int64_t i = 0; i < w; ++i) d[i] = d[i] + d[i + w];
    }
    out[j] = d[0];
  }
}

// backward sums over a cf group's [e0, e1), S <= kShortS: per channel db[c] += sum dz,
// ds[c] += sum dz (x - hi); sx += sum (x - hi) for the group (a, cz: the group's channels).
template <typename T, int ACT, bool RES>
void bsums_short(const T* x, const T* dy, const T* r, T* dr, int64_t e0, int64_t e1, int64_t S,
                 op_t<T> hi, const op_t<T>* a, const op_t<T>* cz, double* db, double* ds,
                 double& sx) {
  using O = op_t<T>;
  using V = Vectorized<O>;
  constexpr int64_t K = V::size();
  __at_align__ O bdb[K * K], bds[K * K], rdb[K], rds[K];
  const V vhi(hi), zero(0);
  Acc asx;
  const int64_t c_end = divup(e1, S);
  for (int64_t c0 = e0 / S; c0 < c_end; c0 += K) {
    const int64_t c1 = std::min(c_end, c0 + K);
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t s1 = std::min(e1, (c + 1) * S);
      const V va(a[c]), vcz(cz[c]);
      V db0(0), db1(0), ds0(0), ds1(0), gsx(0);
      int64_t i = std::max(e0, c * S);
      for (; i + 2 * K <= s1; i += 2 * K) {
        V xm0 = vload(x + i) - vhi, xm1 = vload(x + i + K) - vhi;
        V dz0 = vload(dy + i), dz1 = vload(dy + i + K);
        if constexpr (ACT != 0) {
          V z0 = vfma(xm0, va, vcz), z1 = vfma(xm1, va, vcz);
          if constexpr (RES) {
            z0 = z0 + vload(r + i);
            z1 = z1 + vload(r + i + K);
          }
          dz0 = act_bwd<ACT>(z0, dz0);
          dz1 = act_bwd<ACT>(z1, dz1);
          if (dr) {
            vstore(dr + i, dz0);
            vstore(dr + i + K, dz1);
          }
        }
        db0 = db0 + dz0;
        db1 = db1 + dz1;
        ds0 = vfma(dz0, xm0, ds0);
        ds1 = vfma(dz1, xm1, ds1);
        gsx = gsx + (xm0 + xm1);
      }
      for (; i < s1; i += K) {  // lanes past the channel: dy loads as 0, so dz is 0
        const int64_t n = std::min(K, s1 - i);
        V xm = vload(x + i, n) - vhi;
        V dz = vload(dy + i, n);
        if constexpr (ACT != 0) {
          V z = vfma(xm, va, vcz);
          if constexpr (RES) z = z + vload(r + i, n);
          dz = act_bwd<ACT>(z, dz);
          if (dr) vstore(dr + i, dz, n);
        }
        if (n < K) xm = first_lanes(xm, zero, n);
        db0 = db0 + dz;
        ds0 = vfma(dz, xm, ds0);
        gsx = gsx + xm;
      }
      (db0 + db1).store(bdb + (c - c0) * K);
      (ds0 + ds1).store(bds + (c - c0) * K);
      asx.add(gsx);
    }
    lane_sums(bdb, c1 - c0, rdb);
    lane_sums(bds, c1 - c0, rds);
    for (int64_t c = c0; c < c1; ++c) {
      db[c] += rdb[c - c0];
      ds[c] += rds[c - c0];
    }
  }
  sx += asx.sum();
}

// cf groups with S >= K channels' worth of positions are walked as one run of vectors that go on
// across channel boundaries, rather than channel by channel: a channel of 49 elements would
// otherwise end in a partial vector (and start the next one misaligned) every 49 elements. A
// vector at [i, i + n) (n < K: the last one) has lanes [0, split) in channel c and lanes
// [split, n) in channel c + 1 (split == n: all in c). (Explicit loops, no lambdas: accumulators
// captured by reference in a lambda that the compiler does not inline live in memory.)

// Per-channel coefficient v[c] as a vector, v[c + 1] in the lanes from split on.
template <typename V, typename O>
C10_ALWAYS_INLINE V coef_vec(const O* v, int64_t c, int64_t split, int64_t n) {
  return split < n ? first_lanes(V(v[c]), V(v[c + 1]), split) : V(v[c]);
}

// forward output over a cf group's [e0, e1): y = act((x - hi) * a_c + cz_c (+ r)); S >= K.
template <typename T, int ACT, bool RES>
void apply_group(const T* x, const T* r, T* y, int64_t e0, int64_t e1, int64_t S, op_t<T> hi,
                 const op_t<T>* a, const op_t<T>* cz) {
  using V = Vectorized<op_t<T>>;
  constexpr int64_t K = V::size();
  const V vhi(hi);
  int64_t c = e0 / S, bound = (c + 1) * S;
  for (int64_t i = e0; i < e1; i += K) {
    const int64_t n = std::min(K, e1 - i);
    const int64_t split = std::min(n, bound - i);
    V z = vfma(vload(x + i, n) - vhi, coef_vec<V>(a, c, split, n), coef_vec<V>(cz, c, split, n));
    if constexpr (RES) z = z + vload(r + i, n);
    vstore(y + i, act_fwd<ACT>(z), n);
    if (i + n >= bound) {
      ++c;
      bound += S;
    }
  }
}

// dx over a cf group's [e0, e1), S >= K (see dx_run).
template <typename T, int ACT, bool RES>
void dx_group(const T* x, const T* dy, const T* r, const T* dzs, T* dx, int64_t e0, int64_t e1,
              int64_t S, op_t<T> hi, const op_t<T>* a, const op_t<T>* cz, const op_t<T>* k1,
              op_t<T> k2, op_t<T> k3) {
  using V = Vectorized<op_t<T>>;
  constexpr int64_t K = V::size();
  const V vhi(hi), vk2(k2), vk3(k3);
  int64_t c = e0 / S, bound = (c + 1) * S;
  for (int64_t i = e0; i < e1; i += K) {
    const int64_t n = std::min(K, e1 - i);
    const int64_t split = std::min(n, bound - i);
    V xm = vload(x + i, n) - vhi;
    V dz;
    if (ACT == 0 || dzs) {
      dz = vload((ACT == 0 ? dy : dzs) + i, n);
    } else {
      V z = vfma(xm, coef_vec<V>(a, c, split, n), coef_vec<V>(cz, c, split, n));
      if constexpr (RES) z = z + vload(r + i, n);
      dz = act_bwd<ACT>(z, vload(dy + i, n));
    }
    vstore(dx + i, vfma(dz, coef_vec<V>(k1, c, split, n), vfma(xm, vk2, vk3)), n);
    if (i + n >= bound) {
      ++c;
      bound += S;
    }
  }
}

// Calls f(c, s0, s1) for each channel piece of the element range [e0, e1) of a cf group
// (channel c local to the group, positions [s0, s1) of its S).
template <typename F> inline void channel_runs(int64_t e0, int64_t e1, int64_t S, const F& f) {
  for (int64_t c = e0 / S; c * S < e1; ++c) {
    f(c, std::max(e0, c * S) - c * S, std::min(e1, (c + 1) * S) - c * S);
  }
}

// ---------------------------------------------------------------------------------------------
// Shapes and work split.
// ---------------------------------------------------------------------------------------------

struct Shape {
  int64_t N, C, G, D, S;
  bool cl;  // kernel layout (see the top of the file)
};

// Chunks per unit (cf: elements of a group; cl: rows of a sample) and rows per chunk (cl).
struct Split {
  int64_t units, unit_elems, Q, rows;  // rows: cl rows per chunk (S for cf's unused field)
  int64_t gb = 0;  // cl "group blocks": > 0: a unit is gb groups of one sample (see make_split)
};

// cl samples of few rows (7x7, 14x14, 16x16) that are too large for one task: instead of cutting
// the rows into chunks (whose per-channel partial sums are as large as the data when rows are
// few, merged on one thread), each task takes whole groups: blocks of >= 256 channels over all the
// rows (one pass: the block stays in L2 between the sums and the output), as many tasks as blocks.
constexpr int64_t kGroupBlockRows = 256;
constexpr int64_t kGroupBlockC = 256;

// Group blocks of a sample come in multiples of kBalance (when there are more than that), so that 2
// or 4 threads get equal shares: parallel_for gives each thread ceil(n / threads) tasks, and 5
// blocks (1280 channels, G = 32) on 2 threads left one with 3/5 of the work. (These tasks work in
// L2, so the share shows; rounding the row chunks of the streaming path the same way measured
// slower: more chunks, and a thread that ends early leaves the other the whole memory bandwidth.)
constexpr int64_t kBalance = 4;

Split make_split(const Shape& sh, int64_t bytes_per_elem) {
  Split sp;
  if (!sh.cl) {
    sp.units = sh.N * sh.G;
    sp.unit_elems = sh.D * sh.S;
    bool fused = (sp.units >= kFusedUnits && sp.unit_elems * bytes_per_elem <= kFusedBytes) ||
                 sp.unit_elems <= kChunk;
    sp.Q = fused ? 1 : divup(sp.unit_elems, kChunk);
    sp.rows = sh.S;
  } else {
    sp.units = sh.N;
    sp.unit_elems = sh.S * sh.C;
    bool fused = (sp.units >= kFusedUnits && sp.unit_elems * bytes_per_elem <= kFusedBytes) ||
                 sp.unit_elems <= kChunk;
    int64_t gpb = divup(kGroupBlockC, sh.D);  // groups per block
    if (divup(sh.G, gpb) > kBalance) gpb = divup(sh.G, divup(sh.G, gpb) / kBalance * kBalance);
    if (fused) {
      sp.Q = 1;
      sp.rows = sh.S;
    } else if (sh.S <= kGroupBlockRows && sh.G >= 2 * gpb) {
      sp.gb = gpb;
      sp.units = sh.N * divup(sh.G, gpb);
      sp.unit_elems = sh.S * gpb * sh.D;
      sp.Q = 1;
      sp.rows = sh.S;
    } else {
      // >= 16 rows a chunk: each chunk keeps 2-3 doubles per channel of partial sums.
      int64_t rows = std::min(sh.S, std::max<int64_t>(16, divup(4 * kChunk, sh.C)));
      int64_t Q = divup(sh.S, rows);
      int64_t want = divup(4, sh.N);  // >= 4 tasks in all (batch 1, 2), while rows allow
      if (Q < want) Q = std::min(want, std::max<int64_t>(1, sh.S / 4));
      sp.rows = divup(sh.S, Q);
      sp.Q = divup(sh.S, sp.rows);
    }
  }
  return sp;
}

// Units of one task each (Q == 1): f(u) for every unit.
template <typename F> void run_units(const Split& sp, const F& f) {
  run_tasks(sp.units, sp.unit_elems, [&](int64_t b, int64_t e) {
    for (int64_t u = b; u < e; ++u) f(u);
  });
}

// Units cut into Q > 1 chunks, in blocks of units of ~kBlockBytes: parallel partial sums per
// (unit, chunk), a merge per unit, a parallel output pass per (unit, chunk).
template <typename Partial, typename Merge, typename Output>
void run_chunks(const Split& sp, int64_t bytes_per_elem, const Partial& partial, const Merge& merge,
                const Output& output) {
  const int64_t chunk_elems = divup(sp.unit_elems, sp.Q);
  const int64_t block =
      std::max<int64_t>(1, kBlockBytes / std::max<int64_t>(1, sp.unit_elems * bytes_per_elem));
  for (int64_t u0 = 0; u0 < sp.units; u0 += block) {
    const int64_t u1 = std::min(sp.units, u0 + block);
    run_tasks((u1 - u0) * sp.Q, chunk_elems, [&](int64_t b, int64_t e) {
      for (int64_t t = b; t < e; ++t) partial((u0 * sp.Q + t) / sp.Q, (u0 * sp.Q + t) % sp.Q);
    });
    run_tasks(u1 - u0, kMinPerThread / 8, [&](int64_t b, int64_t e) {
      for (int64_t u = u0 + b; u < u0 + e; ++u) merge(u);
    });
    // (each thread gets the same range as in the partial pass and walks it backwards: its last
    // chunks are still in its L2)
    run_tasks((u1 - u0) * sp.Q, chunk_elems, [&](int64_t b, int64_t e) {
      for (int64_t t = e - 1; t >= b; --t) output((u0 * sp.Q + t) / sp.Q, (u0 * sp.Q + t) % sp.Q);
    });
  }
}

// Fused cf units (Q == 1) in batches of consecutive units, each batch up to kBatchBytes of what the
// sums read (bytes_per_elem per element): sums(u, st) for each unit of the batch, then finish(u,
// st) for each, then output(u) for each; st: the unit's `per_unit` doubles of statistics. Unit by
// unit, the stream of loads from memory stopped at every small group for its coefficients and
// output (5-10 % slower on 7x7 and 14x14 groups at batch 1 and 2).
template <typename Sums, typename Finish, typename Output>
void run_batched(const Split& sp, int64_t bytes_per_elem, int64_t per_unit, const Sums& sums,
                 const Finish& finish, const Output& output) {
  const int64_t ub =
      std::clamp<int64_t>(kBatchBytes / (sp.unit_elems * bytes_per_elem), 1, sp.units);
  run_tasks(sp.units, sp.unit_elems, [&](int64_t b, int64_t e) {
    double* st = scratch<double>(5, static_cast<size_t>(std::min(ub, e - b) * per_unit));
    for (int64_t u0 = b; u0 < e; u0 += ub) {
      const int64_t u1 = std::min(e, u0 + ub);
      for (int64_t u = u0; u < u1; ++u) sums(u, st + (u - u0) * per_unit);
      for (int64_t u = u0; u < u1; ++u) finish(u, st + (u - u0) * per_unit);
      for (int64_t u = u0; u < u1; ++u) output(u);
    }
  });
}

// Per-channel parameters as double (1 / 0 when absent).
const double* param_values(const optional<Tensor>& p, int64_t C, double fill, int slot) {
  double* v = scratch<double>(slot, static_cast<size_t>(C));
  std::fill(v, v + C, fill);
  if (p.has_value() && p->defined()) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, p->scalar_type(), "gn_param", [&] {
      const scalar_t* d = p->const_data_ptr<scalar_t>();
      const int64_t st = p->stride(0);
      for (int64_t c = 0; c < C; ++c) v[c] = static_cast<double>(d[c * st]);
    });
  }
  return v;
}

// ---------------------------------------------------------------------------------------------
// Forward.
// ---------------------------------------------------------------------------------------------

template <typename T> struct ForwardArgs {
  Shape sh;
  const T* x;
  const T* r;
  T* y;
  op_t<T>* mean;
  op_t<T>* rstd;
  const double* gamma;
  const double* beta;
  double eps;
};

template <typename T, int ACT, bool RES> void forward_kernel(const ForwardArgs<T>& A) {
  using O = op_t<T>;
  const Shape& sh = A.sh;
  const int64_t N = sh.N, C = sh.C, G = sh.G, D = sh.D, S = sh.S;
  const int64_t cnt = D * S;
  // Per (n, c): hi (the rounded group mean), a = gamma rstd, cz = beta - a lo.
  O* coef = scratch<O>(0, static_cast<size_t>(N * 3 * C));
  auto coefs = [&](int64_t n, int64_t g, double shift, double s, double q) {
    const double md = s / cnt;
    const double var = std::max(q / cnt - md * md, 0.0);
    const double mu = shift + md;
    const double rs = 1.0 / std::sqrt(var + A.eps);
    const O hi = static_cast<O>(mu);
    const double lo = mu - static_cast<double>(hi);
    A.mean[n * G + g] = static_cast<O>(mu);
    A.rstd[n * G + g] = static_cast<O>(rs);
    O* row = coef + n * 3 * C;
    for (int64_t c = g * D; c < (g + 1) * D; ++c) {
      const double a = A.gamma[c] * rs;
      row[c] = hi;
      row[C + c] = static_cast<O>(a);
      row[2 * C + c] = static_cast<O>(A.beta[c] - a * lo);
    }
  };
  const Split sp = make_split(sh, sizeof(T));

  if (!sh.cl) {
    // unit u = group (n, g): elements [u * cnt, (u + 1) * cnt)
    auto output = [&](int64_t u, int64_t e0, int64_t e1) {
      const int64_t n = u / G, g = u % G;
      const O* row = coef + n * 3 * C;
      if (S >= Vectorized<O>::size()) {
        const int64_t o = u * cnt;
        apply_group<T, ACT, RES>(A.x + o, RES ? A.r + o : nullptr, A.y + o, e0, e1, S,
                                 row[g * D], row + C + g * D, row + 2 * C + g * D);
        return;
      }
      channel_runs(e0, e1, S, [&](int64_t cl, int64_t s0, int64_t s1) {
        const int64_t c = g * D + cl;
        const int64_t o = u * cnt + cl * S + s0;
        apply_run<T, ACT, RES>(A.x + o, RES ? A.r + o : nullptr, A.y + o, s1 - s0, row[c],
                               row[C + c], row[2 * C + c]);
      });
    };
    // shift: the mean of the group's first 16 elements, in the compute type (contiguous: a
    // strided pick from every channel would break the prefetcher's stream into the sums pass)
    const int64_t m = std::min<int64_t>(cnt, 16);
    auto shift_of = [&](int64_t u) {
      const T* x0 = A.x + u * cnt;
      double t = 0;
      for (int64_t j = 0; j < m; ++j) t += static_cast<double>(static_cast<O>(x0[j]));
      return static_cast<double>(static_cast<O>(t / static_cast<double>(m)));
    };
    auto sums = [&](int64_t u, int64_t e0, int64_t e1, double shift, double& s, double& q) {
      if constexpr (std::is_same_v<O, float>) {
        fsums_run(A.x + u * cnt + e0, e1 - e0, static_cast<float>(shift), s, q);
      } else {
        sums_run(A.x + u * cnt + e0, e1 - e0, shift, s, q);
      }
    };
    // float sums whose shift was far from the mean: again, exactly, around that mean
    auto finish = [&](int64_t u, double shift, double s, double q) {
      if (std::is_same_v<O, float> && !stats_ok(s, q, cnt, A.eps)) {
        shift = static_cast<double>(static_cast<O>(shift + s / cnt));
        s = q = 0;
        sums_run(A.x + u * cnt, cnt, shift, s, q);
      }
      coefs(u / G, u % G, shift, s, q);
    };
    if (sp.Q == 1) {
      run_batched(
          sp, sizeof(T), 3,
          [&](int64_t u, double* v) {  // shift, s, q
            v[0] = shift_of(u);
            v[1] = v[2] = 0;
            sums(u, 0, cnt, v[0], v[1], v[2]);
          },
          [&](int64_t u, const double* v) { finish(u, v[0], v[1], v[2]); },
          [&](int64_t u) { output(u, 0, cnt); });
      return;
    }
    double* part = scratch<double>(1, static_cast<size_t>(sp.units * sp.Q * 2));
    run_chunks(
        sp, sizeof(T),
        [&](int64_t u, int64_t k) {
          const int64_t e0 = cnt * k / sp.Q, e1 = cnt * (k + 1) / sp.Q;
          double s = 0, q = 0;
          sums(u, e0, e1, shift_of(u), s, q);
          part[(u * sp.Q + k) * 2] = s;
          part[(u * sp.Q + k) * 2 + 1] = q;
        },
        [&](int64_t u) {
          double s = 0, q = 0;
          for (int64_t k = 0; k < sp.Q; ++k) {
            s += part[(u * sp.Q + k) * 2];
            q += part[(u * sp.Q + k) * 2 + 1];
          }
          finish(u, shift_of(u), s, q);
        },
        [&](int64_t u, int64_t k) { output(u, cnt * k / sp.Q, cnt * (k + 1) / sp.Q); });
    return;
  }

  // cl: unit = sample n, rows of C channels; chunk k = rows [k * R, min(S, (k + 1) * R)).
  // Output of rows [r0, r1) of sample n, all channels.
  auto output = [&](int64_t n, int64_t r0, int64_t r1) {
    const O* row = coef + n * 3 * C;
    for (int64_t rr = r0; rr < r1; ++rr) {
      const int64_t o = (n * S + rr) * C;
      apply_row<T, ACT, RES>(A.x + o, RES ? A.r + o : nullptr, A.y + o, C, row, row + C,
                             row + 2 * C);
    }
  };
  if (sp.gb) {  // cl group blocks: one task = groups [g0, g1) of sample n, all rows
    const int64_t B = divup(G, sp.gb);
    const int64_t m = std::min(S, divup(16, D));
    // With a residual and a tensor larger than L2, the output goes over whole rows once every
    // block has its coefficients: within a block, r (read for the first time, from L3 or memory)
    // comes in runs of w channels at a stride of C, and the loop stalled on every run (whole rows:
    // 1.13-1.25x faster with inputs from memory, A/B; a smaller tensor is in L2 or L3 anyway, and
    // the second parallel pass then costs more than it saves).
    const bool rows_out = RES && N * S * C * static_cast<int64_t>(sizeof(T)) > kFusedBytes;
    run_units(
        sp,
        [&](int64_t u) {
          const int64_t n = u / B, g0 = (u % B) * sp.gb, g1 = std::min(G, g0 + sp.gb);
          const int64_t c0 = g0 * D, w = (g1 - g0) * D;
          const T* xs = A.x + n * S * C;  // the sample
          double* buf = scratch<double>(5, static_cast<size_t>(3 * w));  // [shift | s | q]
          float* shf = scratch<float>(6, static_cast<size_t>(w));
          std::fill(buf + w, buf + 3 * w, 0.0);
          for (int64_t g = g0; g < g1; ++g) {  // shift: the mean of the group's first m rows
            double t = 0;
            for (int64_t r = 0; r < m; ++r) {
              for (int64_t c = g * D; c < (g + 1) * D; ++c) {
                t += static_cast<double>(static_cast<O>(xs[r * C + c]));
              }
            }
            const double v = static_cast<double>(static_cast<O>(t / static_cast<double>(D * m)));
            for (int64_t c = g * D - c0; c < (g + 1) * D - c0; ++c) {
              buf[c] = v;
              shf[c] = static_cast<float>(v);
            }
          }
          if constexpr (std::is_same_v<O, float>) {  // (columns: a block is short and narrow)
            fsums_cols(xs + c0, S, w, C, shf, buf + w, buf + 2 * w);
          } else {
            sums_rows(xs + c0, S, w, C, buf, buf + w, buf + 2 * w);
          }
          auto group_sums = [&](const double* s, const double* q, int64_t g, double& ts,
                                double& tq) {
            ts = tq = 0;
            for (int64_t c = g * D - c0; c < (g + 1) * D - c0; ++c) {
              ts += s[c];
              tq += q[c];
            }
          };
          double ts, tq;
          bool ok = true;
          for (int64_t g = g0; std::is_same_v<O, float> && g < g1 && ok; ++g) {
            group_sums(buf + w, buf + 2 * w, g, ts, tq);
            ok = stats_ok(ts, tq, cnt, A.eps);
          }
          if (!ok) {  // a shift far from its group's mean: the block again, exactly
            for (int64_t g = g0; g < g1; ++g) {
              group_sums(buf + w, buf + 2 * w, g, ts, tq);
              const double v = static_cast<double>(static_cast<O>(buf[g * D - c0] + ts / cnt));
              for (int64_t c = g * D - c0; c < (g + 1) * D - c0; ++c) buf[c] = v;
            }
            std::fill(buf + w, buf + 3 * w, 0.0);
            sums_rows(xs + c0, S, w, C, buf, buf + w, buf + 2 * w);
          }
          for (int64_t g = g0; g < g1; ++g) {
            group_sums(buf + w, buf + 2 * w, g, ts, tq);
            coefs(n, g, buf[g * D - c0], ts, tq);
          }
          if (rows_out) return;
          const O* row = coef + n * 3 * C + c0;
          for (int64_t rr = 0; rr < S; ++rr) {
            const int64_t o = (n * S + rr) * C + c0;
            apply_row<T, ACT, RES>(A.x + o, RES ? A.r + o : nullptr, A.y + o, w, row, row + C,
                                   row + 2 * C);
          }
        });
    if (rows_out) {
      run_tasks(N * S, C, [&](int64_t b, int64_t e) {
        for (int64_t t = b; t < e; ++t) output(t / S, t % S, t % S + 1);
      });
    }
    return;
  }

  const int64_t R = sp.rows;
  // Each channel shifted by its group's shift: the mean of the group's first ceil(16 / D) rows,
  // in the compute type; shv (double) and shf (float, for the float sums).
  const int64_t m = std::min(S, divup(16, D));
  auto shifts = [&](int64_t n, double* shv, float* shf) {
    const T* x0 = A.x + n * S * C;
    for (int64_t g = 0; g < G; ++g) {
      double t = 0;
      for (int64_t r = 0; r < m; ++r) {
        for (int64_t c = g * D; c < (g + 1) * D; ++c) {
          t += static_cast<double>(static_cast<O>(x0[r * C + c]));
        }
      }
      const double v = static_cast<double>(static_cast<O>(t / static_cast<double>(D * m)));
      for (int64_t c = g * D; c < (g + 1) * D; ++c) {
        shv[c] = v;
        shf[c] = static_cast<float>(v);
      }
    }
  };
  auto sums = [&](int64_t n, int64_t r0, int64_t r1, const double* shv, const float* shf,
                  double* s, double* q) {
    const T* x0 = A.x + (n * S + r0) * C;
    if constexpr (std::is_same_v<O, float>) {
      fsums_rows(x0, r1 - r0, C, C, shf, s, q);
    } else {
      sums_rows(x0, r1 - r0, C, C, shv, s, q);
    }
  };
  auto group_sums = [&](int64_t g, const double* s, const double* q, double& ts, double& tq) {
    ts = tq = 0;
    for (int64_t c = g * D; c < (g + 1) * D; ++c) {
      ts += s[c];
      tq += q[c];
    }
  };
  auto merge_groups = [&](int64_t n, const double* shv, const double* s, const double* q) {
    double ts, tq;
    bool ok = true;
    for (int64_t g = 0; std::is_same_v<O, float> && g < G && ok; ++g) {
      group_sums(g, s, q, ts, tq);
      ok = stats_ok(ts, tq, cnt, A.eps);
    }
    if (!ok) {  // float sums with a shift far from a group's mean: the sample again, exactly
      std::vector<double> buf(3 * C, 0.0);
      for (int64_t g = 0; g < G; ++g) {
        group_sums(g, s, q, ts, tq);
        const double v = static_cast<double>(static_cast<O>(shv[g * D] + ts / cnt));
        for (int64_t c = g * D; c < (g + 1) * D; ++c) buf[c] = v;
      }
      sums_rows(A.x + n * S * C, S, C, C, buf.data(), buf.data() + C, buf.data() + 2 * C);
      for (int64_t g = 0; g < G; ++g) {
        group_sums(g, buf.data() + C, buf.data() + 2 * C, ts, tq);
        coefs(n, g, buf[g * D], ts, tq);
      }
      return;
    }
    for (int64_t g = 0; g < G; ++g) {
      group_sums(g, s, q, ts, tq);
      coefs(n, g, shv[g * D], ts, tq);
    }
  };
  auto fused = [&](int64_t n) {
    double* shv = scratch<double>(5, static_cast<size_t>(3 * C));
    float* shf = scratch<float>(6, static_cast<size_t>(C));
    std::fill(shv + C, shv + 3 * C, 0.0);
    shifts(n, shv, shf);
    sums(n, 0, S, shv, shf, shv + C, shv + 2 * C);
    merge_groups(n, shv, shv + C, shv + 2 * C);
    output(n, 0, S);
  };
  if (sp.Q == 1) {
    run_units(sp, fused);
    return;
  }
  double* shv_all = scratch<double>(2, static_cast<size_t>(N * C));
  float* shf_all = scratch<float>(3, static_cast<size_t>(N * C));
  double* part = scratch<double>(1, static_cast<size_t>(N * sp.Q * 2 * C));
  for (int64_t n = 0; n < N; ++n) shifts(n, shv_all + n * C, shf_all + n * C);
  run_chunks(
      sp, sizeof(T),
      [&](int64_t n, int64_t k) {
        double* s = part + (n * sp.Q + k) * 2 * C;
        std::fill(s, s + 2 * C, 0.0);
        const int64_t r0 = k * R, r1 = std::min(S, r0 + R);
        sums(n, r0, r1, shv_all + n * C, shf_all + n * C, s, s + C);
      },
      [&](int64_t n) {
        std::vector<double> tot(2 * C, 0.0);
        for (int64_t k = 0; k < sp.Q; ++k) {
          const double* s = part + (n * sp.Q + k) * 2 * C;
          for (int64_t c = 0; c < 2 * C; ++c) tot[c] += s[c];
        }
        merge_groups(n, shv_all + n * C, tot.data(), tot.data() + C);
      },
      [&](int64_t n, int64_t k) { output(n, k * R, std::min(S, k * R + R)); });
}

// ---------------------------------------------------------------------------------------------
// Backward.
// ---------------------------------------------------------------------------------------------

template <typename T> struct BackwardArgs {
  Shape sh;
  const T* dy;
  const T* x;
  const T* r;
  const op_t<T>* mean;
  const op_t<T>* rstd;
  const double* gamma;
  const double* beta;
  T* dx;        // null: not needed
  T* dr;        // null: not stored
  double* wb;   // (N, C, 2): per-sample dgamma, dbeta partials; null: not needed
};

template <typename T, int ACT, bool RES> void backward_kernel(const BackwardArgs<T>& A) {
  using O = op_t<T>;
  const Shape& sh = A.sh;
  const int64_t N = sh.N, C = sh.C, G = sh.G, D = sh.D, S = sh.S;
  const int64_t cnt = D * S;
  // Per (n, c): [hi, a, cz, k1, k2, k3] x C.
  O* coef = scratch<O>(0, static_cast<size_t>(N * 6 * C));
  double* lo_pre = scratch<double>(2, static_cast<size_t>(N * G));
  std::fill(lo_pre, lo_pre + N * G, 0.0);

  // With an activation, z needs lo when the rounding of the mean shows in z: get the exact mean
  // first (one more read of x, only then).
  if constexpr (ACT != 0) {
    constexpr double eps_o = std::numeric_limits<O>::epsilon();
    bool need = false;
    for (int64_t i = 0; i < N * G; ++i) {
      need |= std::abs(static_cast<double>(A.mean[i])) * static_cast<double>(A.rstd[i]) * eps_o >
              5e-7;
    }
    if (need) {
      if (!sh.cl) {
        run_tasks(N * G, cnt, [&](int64_t b, int64_t e) {
          for (int64_t u = b; u < e; ++u) {
            double s = 0, q = 0;
            sums_run(A.x + u * cnt, cnt, static_cast<double>(A.mean[u]), s, q);
            lo_pre[u] = s / cnt;
          }
        });
      } else {
        run_tasks(N, S * C, [&](int64_t b, int64_t e) {
          std::vector<double> buf(3 * C);
          for (int64_t n = b; n < e; ++n) {
            for (int64_t c = 0; c < C; ++c) buf[c] = static_cast<double>(A.mean[n * G + c / D]);
            std::fill(buf.begin() + C, buf.end(), 0.0);
            sums_rows(A.x + n * S * C, S, C, C, buf.data(), buf.data() + C, buf.data() + 2 * C);
            for (int64_t g = 0; g < G; ++g) {
              double s = 0;
              for (int64_t c = g * D; c < (g + 1) * D; ++c) s += buf[C + c];
              lo_pre[n * G + g] = s / cnt;
            }
          }
        });
      }
    }
  }
  for (int64_t n = 0; n < N; ++n) {  // (by group: no division per channel)
    O* row = coef + n * 6 * C;
    for (int64_t g = 0; g < G; ++g) {
      const int64_t i = n * G + g;
      const double rs = static_cast<double>(A.rstd[i]), lo = lo_pre[i];
      const O hi = static_cast<O>(A.mean[i]);
      for (int64_t c = g * D; c < (g + 1) * D; ++c) {
        const double a = A.gamma[c] * rs;
        row[c] = hi;
        row[C + c] = static_cast<O>(a);
        row[2 * C + c] = static_cast<O>(A.beta[c] - a * lo);
      }
    }
  }
  // Group (n, g) from its channels' sums db, ds, sx (D entries each, channel order). Its sums over
  // the D channels go in vector lanes (lane_sum, gamma_dots): one channel after another, three
  // chains of dependent double adds, they cost a third of the group's own sums on 7x7 channels.
  auto finish = [&](int64_t n, int64_t g, const double* db, const double* ds, const double* sx) {
    const double rs = static_cast<double>(A.rstd[n * G + g]);
    const double* gm = A.gamma + g * D;
    const double lo = lane_sum(sx, D) / cnt;  // mean = hi + lo exactly
    double sg, tg;
    gamma_dots(gm, db, ds, lo, D, sg, tg);
    const double mA = sg / cnt, mB = rs * tg / cnt;  // mean_g(gamma dz), mean_g(gamma dz x_hat)
    O* row = coef + n * 6 * C + g * D;
    for (int64_t c = 0; c < D; ++c) row[3 * C + c] = static_cast<O>(rs * gm[c]);
    std::fill(row + 4 * C, row + 4 * C + D, static_cast<O>(-rs * rs * mB));
    std::fill(row + 5 * C, row + 5 * C + D, static_cast<O>(-rs * mA + rs * rs * mB * lo));
    if (A.wb) {
      double* w = A.wb + (n * C + g * D) * 2;
      for (int64_t c = 0; c < D; ++c) {
        w[2 * c] = rs * (ds[c] - lo * db[c]);
        w[2 * c + 1] = db[c];
      }
    }
  };
  // bytes per element read by the sums pass (x, dy) decide the fused size
  const Split sp = make_split(sh, 2 * sizeof(T));

  if (!sh.cl) {
    auto sums = [&](int64_t u, int64_t e0, int64_t e1, double* acc /*3 x D*/) {
      const int64_t n = u / G, g = u % G;
      const O* row = coef + n * 6 * C;
      if (S <= kShortS) {  // the group's sx goes to its first channel's slot
        const int64_t o = u * cnt;
        bsums_short<T, ACT, RES>(A.x + o, A.dy + o, RES ? A.r + o : nullptr,
                                 A.dr ? A.dr + o : nullptr, e0, e1, S, row[g * D],
                                 row + C + g * D, row + 2 * C + g * D, acc, acc + D,
                                 acc[2 * D + e0 / S]);
        return;
      }
      channel_runs(e0, e1, S, [&](int64_t cl, int64_t s0, int64_t s1) {
        const int64_t c = g * D + cl;
        const int64_t o = u * cnt + cl * S + s0;
        bsums_run<T, ACT, RES>(A.x + o, A.dy + o, RES ? A.r + o : nullptr,
                               A.dr ? A.dr + o : nullptr, s1 - s0, row[c], row[C + c],
                               row[2 * C + c], acc[cl], acc[D + cl], acc[2 * D + cl]);
      });
    };
    auto output = [&](int64_t u, int64_t e0, int64_t e1) {
      if (!A.dx) return;
      const int64_t n = u / G, g = u % G;
      const O* row = coef + n * 6 * C;
      if (S >= Vectorized<O>::size()) {
        const int64_t o = u * cnt;
        dx_group<T, ACT, RES>(A.x + o, A.dy + o, RES ? A.r + o : nullptr,
                              A.dr ? A.dr + o : nullptr, A.dx + o, e0, e1, S, row[g * D],
                              row + C + g * D, row + 2 * C + g * D, row + 3 * C + g * D,
                              row[4 * C + g * D], row[5 * C + g * D]);
        return;
      }
      channel_runs(e0, e1, S, [&](int64_t cl, int64_t s0, int64_t s1) {
        const int64_t c = g * D + cl;
        const int64_t o = u * cnt + cl * S + s0;
        dx_run<T, ACT, RES>(A.x + o, A.dy + o, RES ? A.r + o : nullptr, A.dr ? A.dr + o : nullptr,
                            A.dx + o, s1 - s0, row[c], row[C + c], row[2 * C + c], row[3 * C + c],
                            row[4 * C + c], row[5 * C + c]);
      });
    };
    if (sp.Q == 1) {
      run_batched(
          sp, 2 * sizeof(T), 3 * D,
          [&](int64_t u, double* a) {  // db, ds, sx (D each)
            std::fill(a, a + 3 * D, 0.0);
            sums(u, 0, cnt, a);
          },
          [&](int64_t u, const double* a) { finish(u / G, u % G, a, a + D, a + 2 * D); },
          [&](int64_t u) { output(u, 0, cnt); });
      return;
    }
    double* part = scratch<double>(1, static_cast<size_t>(sp.units * sp.Q * 3 * D));
    run_chunks(
        sp, 2 * sizeof(T),
        [&](int64_t u, int64_t k) {
          double* acc = part + (u * sp.Q + k) * 3 * D;
          std::fill(acc, acc + 3 * D, 0.0);
          sums(u, cnt * k / sp.Q, cnt * (k + 1) / sp.Q, acc);
        },
        [&](int64_t u) {
          std::vector<double> tot(3 * D, 0.0);
          for (int64_t k = 0; k < sp.Q; ++k) {
            const int64_t e0 = cnt * k / sp.Q, e1 = cnt * (k + 1) / sp.Q;
            const double* acc = part + (u * sp.Q + k) * 3 * D;
            for (int64_t c = e0 / S; c * S < e1; ++c) {  // the channels chunk k touched
              for (int j = 0; j < 3; ++j) tot[j * D + c] += acc[j * D + c];
            }
          }
          finish(u / G, u % G, tot.data(), tot.data() + D, tot.data() + 2 * D);
        },
        [&](int64_t u, int64_t k) { output(u, cnt * k / sp.Q, cnt * (k + 1) / sp.Q); });
    return;
  }

  if (sp.gb) {  // cl group blocks (see make_split): sums, coefficients, dx of whole groups
    const int64_t B = divup(G, sp.gb);
    run_units(
        sp,
        [&](int64_t u) {
          const int64_t n = u / B, g0 = (u % B) * sp.gb, g1 = std::min(G, g0 + sp.gb);
          const int64_t c0 = g0 * D, w = (g1 - g0) * D;
          double* acc = scratch<double>(5, static_cast<size_t>(3 * w));  // [db | ds | sx]
          std::fill(acc, acc + 3 * w, 0.0);
          const O* row = coef + n * 6 * C + c0;
          const int64_t o = n * S * C + c0;
          bsums_cols<T, ACT, RES>(A.x + o, A.dy + o, RES ? A.r + o : nullptr,
                                  A.dr ? A.dr + o : nullptr, S, w, C, row, row + C, row + 2 * C,
                                  acc);
          for (int64_t g = g0; g < g1; ++g) {
            const int64_t c = g * D - c0;
            finish(n, g, acc + c, acc + w + c, acc + 2 * w + c);
          }
          if (!A.dx) return;
          for (int64_t rr = 0; rr < S; ++rr) {
            const int64_t p = (n * S + rr) * C + c0;
            dx_row<T, ACT, RES>(A.x + p, A.dy + p, RES ? A.r + p : nullptr,
                                A.dr ? A.dr + p : nullptr, A.dx + p, w, row, row + C, row + 2 * C,
                                row + 3 * C, row + 4 * C, row + 5 * C);
          }
        });
    return;
  }

  const int64_t R = sp.rows;
  auto sums = [&](int64_t n, int64_t r0, int64_t r1, double* acc /*3 x C*/) {
    const O* row = coef + n * 6 * C;
    const int64_t o = (n * S + r0) * C;
    bsums_rows<T, ACT, RES>(A.x + o, A.dy + o, RES ? A.r + o : nullptr, A.dr ? A.dr + o : nullptr,
                            r1 - r0, C, C, row, row + C, row + 2 * C, acc);
  };
  auto finish_sample = [&](int64_t n, const double* acc) {
    for (int64_t g = 0; g < G; ++g) {
      finish(n, g, acc + g * D, acc + C + g * D, acc + 2 * C + g * D);
    }
  };
  auto output = [&](int64_t n, int64_t r0, int64_t r1) {
    if (!A.dx) return;
    const O* row = coef + n * 6 * C;
    for (int64_t rr = r0; rr < r1; ++rr) {
      const int64_t o = (n * S + rr) * C;
      dx_row<T, ACT, RES>(A.x + o, A.dy + o, RES ? A.r + o : nullptr, A.dr ? A.dr + o : nullptr,
                          A.dx + o, C, row, row + C, row + 2 * C, row + 3 * C, row + 4 * C,
                          row + 5 * C);
    }
  };
  auto fused = [&](int64_t n) {
    double* acc = scratch<double>(5, static_cast<size_t>(3 * C));
    std::fill(acc, acc + 3 * C, 0.0);
    sums(n, 0, S, acc);
    finish_sample(n, acc);
    output(n, 0, S);
  };
  if (sp.Q == 1) {
    run_units(sp, fused);
    return;
  }
  double* part = scratch<double>(1, static_cast<size_t>(N * sp.Q * 3 * C));
  run_chunks(
      sp, 2 * sizeof(T),
      [&](int64_t n, int64_t k) {
        double* acc = part + (n * sp.Q + k) * 3 * C;
        std::fill(acc, acc + 3 * C, 0.0);
        sums(n, k * R, std::min(S, k * R + R), acc);
      },
      [&](int64_t n) {
        std::vector<double> tot(3 * C, 0.0);
        for (int64_t k = 0; k < sp.Q; ++k) {
          const double* acc = part + (n * sp.Q + k) * 3 * C;
          for (int64_t c = 0; c < 3 * C; ++c) tot[c] += acc[c];
        }
        finish_sample(n, tot.data());
      },
      [&](int64_t n, int64_t k) { output(n, k * R, std::min(S, k * R + R)); });
}

// ---------------------------------------------------------------------------------------------
// Tensors: layouts, allocation, argument checks (a safety net: groupnorm/_checks.py validates).
// ---------------------------------------------------------------------------------------------

// Whether a tensor's (N, *spatial, C) permutation is dense (size-1 dims may have any stride).
// Templated on the size type so that the Meta kernels can run it on symbolic shapes.
template <typename Sizes, typename Strides> bool cl_dense(const Sizes& size, const Strides& stride) {
  using I = std::decay_t<decltype(size[0])>;
  I expected = 1;
  auto ok = [&](size_t d) {
    if (size[d] != 1 && stride[d] != expected) return false;
    expected = expected * size[d];
    return true;
  };
  if (!ok(1)) return false;
  for (size_t d = size.size() - 1; d >= 2; --d) {
    if (!ok(d)) return false;
  }
  return ok(0);
}

bool cl_order_dense(const Tensor& t) { return cl_dense(t.sizes(), t.strides()); }

// x's output layout: channels-last-like iff x is, and x is not contiguous (groupnorm/_layout.py).
bool is_channels_last(const Tensor& x) {
  return x.dim() > 2 && !x.is_contiguous() && cl_order_dense(x);
}

// An uninitialized tensor of x's shape in the output layout for x (works on meta tensors with
// symbolic shapes too).
Tensor empty_like_layout(const Tensor& x, bool cl, at::ScalarType dtype) {
  auto opts = x.options().dtype(dtype);
  if (!cl) return at::empty_symint(x.sym_sizes(), opts);
  std::vector<c10::SymInt> sizes;
  std::vector<int64_t> perm;  // (N, *spatial, C) -> (N, C, *spatial)
  const int64_t d = x.dim();
  sizes.push_back(x.sym_size(0));
  for (int64_t i = 2; i < d; ++i) sizes.push_back(x.sym_size(i));
  sizes.push_back(x.sym_size(1));
  perm.push_back(0);
  perm.push_back(d - 1);
  for (int64_t i = 1; i < d - 1; ++i) perm.push_back(i);
  return at::empty_symint(sizes, opts).permute(perm);
}

// Outputs are NaN-filled instead when GROUPNORM_CPU_POISON=1 (tests: an element a kernel fails
// to write then shows up).
bool poison() {
  const char* v = std::getenv("GROUPNORM_CPU_POISON");
  return v && v[0] == '1';
}

// Outputs of >= kHugeBytes come from fresh mmap'ed memory (glibc maps allocations above 32 MiB by
// themselves), whose first touch costs a page fault per 4 KiB page: 3x the time of writing a
// 100 MB output here. Asking for transparent huge pages on it (Linux, THP "madvise" mode) makes
// that one fault per 2 MiB. A hint only: nothing changes where THP is off or the memory is reused.
constexpr int64_t kHugeBytes = 32 << 20;

void advise_huge_pages(const Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  const int64_t bytes = t.numel() * static_cast<int64_t>(t.element_size());
  if (bytes < kHugeBytes) return;
  constexpr uintptr_t huge = uintptr_t(2) << 20;
  const uintptr_t p = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t b = (p + huge - 1) & ~(huge - 1), e = (p + bytes) & ~(huge - 1);
  if (e > b) madvise(reinterpret_cast<void*>(b), e - b, MADV_HUGEPAGE);  // (errors: no hint)
#else
  (void)t;
#endif
}

Tensor new_output(const Tensor& x, bool cl, at::ScalarType dtype) {
  Tensor t = empty_like_layout(x, cl, dtype);
  advise_huge_pages(t);
  if (poison()) t.fill_(std::numeric_limits<double>::quiet_NaN());
  return t;
}

// t (x's shape) with memory in the kernel layout: (N, *spatial, C) dense when kcl, else
// contiguous. A copy only when it differs.
Tensor in_kernel_layout(const Tensor& t, bool kcl) {
  if (!kcl) return t.contiguous();
  if (cl_order_dense(t)) return t;
  return t.movedim(1, -1).contiguous().movedim(-1, 1);
}

// t in dtype: t itself when it is already (no dispatcher round trip on the per-call path).
Tensor as_type(const Tensor& t, at::ScalarType dtype) {
  return t.scalar_type() == dtype ? t : t.to(dtype);
}

at::ScalarType stat_type(const Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

Shape make_shape(const Tensor& x, int64_t G, bool cl) {
  Shape sh;
  sh.N = x.size(0);
  sh.C = x.size(1);
  sh.G = G;
  sh.D = sh.C / G;
  sh.S = 1;
  for (int64_t d = 2; d < x.dim(); ++d) sh.S *= x.size(d);
  sh.cl = cl || sh.S == 1;  // S == 1: the same memory as channels-last, vectorized along C
  return sh;
}

void check_args(const Tensor& x, int64_t G, int64_t act, const char* where) {
  TORCH_CHECK(x.dim() >= 2, where, ": expected an input of rank >= 2 (N, C, *spatial), got ",
              x.sizes());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), where,
              ": expected a floating-point input, got ", x.scalar_type());
  TORCH_CHECK(G > 0 && x.size(1) % G == 0, where, ": num_channels=", x.size(1),
              " is not divisible by num_groups=", G);
  TORCH_CHECK(act >= 0 && act <= 3, where, ": activation code must be 0..3, got ", act);
}

void check_param(const optional<Tensor>& p, const Tensor& x, const char* name) {
  if (!p.has_value() || !p->defined()) return;
  TORCH_CHECK(p->dim() == 1 && p->size(0) == x.size(1), "groupnorm_cpu: ", name,
              " must have shape (", x.size(1), ",), got ", p->sizes());
  TORCH_CHECK(at::isFloatingType(p->scalar_type()), "groupnorm_cpu: ", name,
              " must be floating-point, got ", p->scalar_type());
}

template <typename F> void dispatch_act(int64_t act, const F& f) {
  switch (act) {
    case 0: f(std::integral_constant<int, 0>()); break;
    case 1: f(std::integral_constant<int, 1>()); break;
    case 2: f(std::integral_constant<int, 2>()); break;
    default: f(std::integral_constant<int, 3>()); break;
  }
}

std::tuple<Tensor, Tensor, Tensor> forward_cpu(const Tensor& x_in, const optional<Tensor>& weight,
                                               const optional<Tensor>& bias,
                                               const optional<Tensor>& residual, int64_t G,
                                               double eps, int64_t act) {
  check_args(x_in, G, act, "groupnorm_cpu.forward");
  check_param(weight, x_in, "weight");
  check_param(bias, x_in, "bias");
  const bool out_cl = is_channels_last(x_in);
  const int64_t N = x_in.size(0);
  Tensor y = new_output(x_in, out_cl, x_in.scalar_type());
  Tensor mean = at::empty({N, G}, x_in.options().dtype(stat_type(x_in)));
  Tensor rstd = at::empty({N, G}, x_in.options().dtype(stat_type(x_in)));
  if (x_in.numel() == 0) {  // no positions: statistics of an empty set
    mean.fill_(std::numeric_limits<double>::quiet_NaN());
    rstd.fill_(std::numeric_limits<double>::quiet_NaN());
    return {y, mean, rstd};
  }
  const Shape sh = make_shape(x_in, G, out_cl);
  Tensor x = in_kernel_layout(x_in, sh.cl);
  const bool has_res = residual.has_value() && residual->defined();
  Tensor r;
  if (has_res) {
    TORCH_CHECK(residual->sizes() == x_in.sizes(), "groupnorm_cpu.forward: residual shape ",
                residual->sizes(), " must equal input shape ", x_in.sizes());
    r = in_kernel_layout(as_type(*residual, x_in.scalar_type()), sh.cl);
  }
  // y's memory is in the kernel layout already (contiguous, or cl-like; S == 1: both the same)
  const double* gamma = param_values(weight, sh.C, 1.0, 7);
  const double* beta = param_values(bias, sh.C, 0.0, 8);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "gn_forward", [&] {
    ForwardArgs<scalar_t> A{sh,
                            x.const_data_ptr<scalar_t>(),
                            has_res ? r.const_data_ptr<scalar_t>() : nullptr,
                            y.data_ptr<scalar_t>(),
                            mean.data_ptr<op_t<scalar_t>>(),
                            rstd.data_ptr<op_t<scalar_t>>(),
                            gamma,
                            beta,
                            eps};
    dispatch_act(act, [&](auto a) {
      if (has_res) {
        forward_kernel<scalar_t, decltype(a)::value, true>(A);
      } else {
        forward_kernel<scalar_t, decltype(a)::value, false>(A);
      }
    });
  });
  return {y, mean, rstd};
}

Tensor empty0(const Tensor& x) { return at::empty({0}, x.options()); }

std::tuple<Tensor, Tensor, Tensor, Tensor> backward_cpu(
    const Tensor& dy_in, const Tensor& x_in, const optional<Tensor>& weight,
    const optional<Tensor>& bias, const optional<Tensor>& residual, const Tensor& mean_in,
    const Tensor& rstd_in, int64_t G, int64_t act, std::array<bool, 4> needs) {
  check_args(x_in, G, act, "groupnorm_cpu.backward");
  check_param(weight, x_in, "weight");
  check_param(bias, x_in, "bias");
  TORCH_CHECK(dy_in.sizes() == x_in.sizes(), "groupnorm_cpu.backward: grad_y shape ",
              dy_in.sizes(), " must equal input shape ", x_in.sizes());
  const int64_t N = x_in.size(0), C = x_in.size(1);
  TORCH_CHECK(mean_in.numel() == N * G && rstd_in.numel() == N * G,
              "groupnorm_cpu.backward: mean and rstd must have shape (", N, ", ", G, ")");
  const bool has_w = weight.has_value() && weight->defined();
  const bool has_b = bias.has_value() && bias->defined();
  const bool has_res = residual.has_value() && residual->defined();
  const bool need_dx = needs[0], need_dw = needs[1] && has_w, need_db = needs[2] && has_b;
  const bool store_dr = needs[3] && has_res && act != 0;
  const bool out_cl = is_channels_last(x_in);
  Tensor dx = need_dx ? new_output(x_in, out_cl, x_in.scalar_type()) : empty0(x_in);
  Tensor dr = store_dr ? new_output(x_in, out_cl, x_in.scalar_type()) : empty0(x_in);
  Tensor dw = need_dw ? at::empty({C}, weight->options()) : empty0(x_in);
  Tensor db = need_db ? at::empty({C}, bias->options()) : empty0(x_in);
  if (!(need_dx || need_dw || need_db || store_dr)) return {dx, dw, db, dr};
  if (x_in.numel() == 0) {
    if (need_dw) dw.zero_();
    if (need_db) db.zero_();
    return {dx, dw, db, dr};
  }
  const Shape sh = make_shape(x_in, G, out_cl);
  Tensor x = in_kernel_layout(x_in, sh.cl);
  Tensor dy = in_kernel_layout(as_type(dy_in, x_in.scalar_type()), sh.cl);
  Tensor r;
  const bool use_res = has_res && act != 0;  // only z (for act'(z)) needs the residual
  if (use_res) r = in_kernel_layout(as_type(*residual, x_in.scalar_type()), sh.cl);
  Tensor mean = as_type(mean_in, stat_type(x_in)).contiguous();
  Tensor rstd = as_type(rstd_in, stat_type(x_in)).contiguous();
  const double* gamma = param_values(weight, C, 1.0, 7);
  const double* beta = param_values(bias, C, 0.0, 8);
  double* wb = scratch<double>(3, (need_dw || need_db) ? static_cast<size_t>(N * C * 2) : 0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "gn_backward", [&] {
    BackwardArgs<scalar_t> A{sh,
                             dy.const_data_ptr<scalar_t>(),
                             x.const_data_ptr<scalar_t>(),
                             use_res ? r.const_data_ptr<scalar_t>() : nullptr,
                             mean.const_data_ptr<op_t<scalar_t>>(),
                             rstd.const_data_ptr<op_t<scalar_t>>(),
                             gamma,
                             beta,
                             need_dx ? dx.data_ptr<scalar_t>() : nullptr,
                             store_dr ? dr.data_ptr<scalar_t>() : nullptr,
                             (need_dw || need_db) ? wb : nullptr};
    dispatch_act(act, [&](auto a) {
      if (use_res) {
        backward_kernel<scalar_t, decltype(a)::value, true>(A);
      } else {
        backward_kernel<scalar_t, decltype(a)::value, false>(A);
      }
    });
  });
  if (need_dw || need_db) {
    // dgamma_c = sum_n wb[n, c, 0], dbeta_c = sum_n wb[n, c, 1], n in order.
    std::vector<double> tot(2 * C, 0.0);
    run_tasks(C, 4 * N, [&](int64_t c0, int64_t c1) {
      for (int64_t n = 0; n < N; ++n) {
        for (int64_t c = c0; c < c1; ++c) {
          tot[2 * c] += wb[(n * C + c) * 2];
          tot[2 * c + 1] += wb[(n * C + c) * 2 + 1];
        }
      }
    });
    auto store = [&](Tensor& out, int j) {
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out.scalar_type(), "gn_dw", [&] {
        scalar_t* p = out.data_ptr<scalar_t>();
        for (int64_t c = 0; c < C; ++c) p[c] = static_cast<scalar_t>(tot[2 * c + j]);
      });
    };
    if (need_dw) store(dw, 0);
    if (need_db) store(db, 1);
  }
  return {dx, dw, db, dr};
}

Tensor group_norm_cpu(const Tensor& x, const optional<Tensor>& weight,
                      const optional<Tensor>& bias, const optional<Tensor>& residual, int64_t G,
                      double eps, int64_t act) {
  return std::get<0>(forward_cpu(x, weight, bias, residual, G, eps, act));
}

// ---------------------------------------------------------------------------------------------
// Meta (shape / dtype / layout only; symbolic shapes allowed): FakeTensor, torch.compile.
// ---------------------------------------------------------------------------------------------

std::tuple<Tensor, Tensor, Tensor> forward_meta(const Tensor& x, const optional<Tensor>&,
                                                const optional<Tensor>&,
                                                const optional<Tensor>&, int64_t G, double,
                                                int64_t) {
  const bool cl = x.dim() > 2 && !x.is_contiguous() && cl_dense(x.sym_sizes(), x.sym_strides());
  auto sopts = x.options().dtype(stat_type(x));
  std::vector<c10::SymInt> ssz{x.sym_size(0), c10::SymInt(G)};
  return {empty_like_layout(x, cl, x.scalar_type()), at::empty_symint(ssz, sopts),
          at::empty_symint(ssz, sopts)};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> backward_meta(
    const Tensor&, const Tensor& x, const optional<Tensor>& weight, const optional<Tensor>& bias,
    const optional<Tensor>& residual, const Tensor&, const Tensor&, int64_t, int64_t act,
    std::array<bool, 4> needs) {
  const bool cl = x.dim() > 2 && !x.is_contiguous() && cl_dense(x.sym_sizes(), x.sym_strides());
  const bool has_w = weight.has_value() && weight->defined();
  const bool has_b = bias.has_value() && bias->defined();
  const bool has_res = residual.has_value() && residual->defined();
  Tensor dx = needs[0] ? empty_like_layout(x, cl, x.scalar_type()) : empty0(x);
  Tensor dw = needs[1] && has_w ? at::empty_symint(weight->sym_sizes(), weight->options())
                                : empty0(x);
  Tensor db = needs[2] && has_b ? at::empty_symint(bias->sym_sizes(), bias->options()) : empty0(x);
  Tensor dr = needs[3] && has_res && act != 0 ? empty_like_layout(x, cl, x.scalar_type())
                                              : empty0(x);
  return {dx, dw, db, dr};
}

Tensor group_norm_meta(const Tensor& x, const optional<Tensor>& w, const optional<Tensor>& b,
                       const optional<Tensor>& r, int64_t G, double eps, int64_t act) {
  return std::get<0>(forward_meta(x, w, b, r, G, eps, act));
}

// ---------------------------------------------------------------------------------------------
// Autograd: group_norm's backward runs the fused backward op; under create_graph=True (grad mode
// on inside the backward) it differentiates an exact composite of ATen ops instead, so that
// double backward works.
// ---------------------------------------------------------------------------------------------

// act(gamma * x_hat + beta + residual) from differentiable ATen ops, in float64, with the group
// statistics of x - (the group's first element, detached): exact for any mean.
Tensor composite(const Tensor& x, const Tensor& w, const Tensor& b, const Tensor& r, int64_t G,
                 double eps, int64_t act) {
  const int64_t N = x.size(0), C = x.size(1);
  const int64_t per = C / G * (x.numel() / std::max<int64_t>(1, N * C));
  Tensor xg = x.to(at::kDouble).reshape({N, G, per});
  Tensor d = xg - xg.narrow(2, 0, 1).detach();
  Tensor c = d - d.mean(2, true);
  Tensor xhat = (c * (c * c).mean(2, true).add(eps).rsqrt()).reshape(x.sizes());
  std::vector<int64_t> pshape(x.dim(), 1);
  pshape[1] = C;
  Tensor z = xhat;
  if (w.defined()) z = z * w.to(at::kDouble).reshape(pshape);
  if (b.defined()) z = z + b.to(at::kDouble).reshape(pshape);
  if (r.defined()) z = z + r.to(at::kDouble);
  switch (act) {
    case 1: z = at::relu(z); break;
    case 2: z = at::silu(z); break;
    case 3: z = at::gelu(z); break;
    default: break;
  }
  return z.to(x.scalar_type());
}

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

struct GroupNormFunction : public torch::autograd::Function<GroupNormFunction> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const optional<Tensor>& weight,
                        const optional<Tensor>& bias, const optional<Tensor>& residual, int64_t G,
                        double eps, int64_t act) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow(GN_STR(GN_LIB) "::forward", "")
                         .typed<decltype(forward_cpu)>();
    auto [y, mean, rstd] = op.call(x, weight, bias, residual, G, eps, act);
    ctx->save_for_backward({x, weight.value_or(Tensor()), bias.value_or(Tensor()),
                            residual.value_or(Tensor()), mean, rstd});
    ctx->saved_data["G"] = G;
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["act"] = act;
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const Tensor &x = saved[0], &w = saved[1], &b = saved[2], &r = saved[3];
    const int64_t G = ctx->saved_data["G"].toInt();
    const double eps = ctx->saved_data["eps"].toDouble();
    const int64_t act = ctx->saved_data["act"].toInt();
    const Tensor& dy = grads[0];
    variable_list out(7);
    // needs_input_grad counts the tensor inputs that were given (an absent optional has no edge)
    size_t edge = 0;
    auto needs = [&](const Tensor& t) { return t.defined() && ctx->needs_input_grad(edge++); };
    const bool nx = needs(x), nw = needs(w), nb = needs(b), nr = needs(r);
    if (!dy.defined() || !(nx || nw || nb || nr)) return out;
    if (at::GradMode::is_enabled()) {  // create_graph=True: differentiable gradients
      variable_list inputs;
      std::vector<int> slot;
      const Tensor* ts[4] = {&x, &w, &b, &r};
      const bool ns[4] = {nx, nw, nb, nr};
      for (int i = 0; i < 4; ++i) {
        if (ns[i]) {
          inputs.push_back(*ts[i]);
          slot.push_back(i);
        }
      }
      Tensor y = composite(x, w, b, r, G, eps, act);
      auto gs = torch::autograd::grad({y}, inputs, {dy}, /*retain_graph=*/true,
                                      /*create_graph=*/true, /*allow_unused=*/true);
      for (size_t i = 0; i < slot.size(); ++i) {
        out[slot[i]] = gs[i].defined() ? gs[i] : at::zeros_like(*ts[slot[i]]);
      }
      return out;
    }
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow(GN_STR(GN_LIB) "::backward", "")
                         .typed<decltype(backward_cpu)>();
    auto opt = [](const Tensor& t) { return t.defined() ? optional<Tensor>(t) : std::nullopt; };
    auto [dx, dw, db, dr] = op.call(dy, x, opt(w), opt(b), act != 0 ? opt(r) : std::nullopt,
                                    saved[4], saved[5], G, act, {nx, nw, nb, nr && act != 0});
    if (nx) out[0] = dx;
    if (nw) out[1] = dw;
    if (nb) out[2] = db;
    if (nr) out[3] = act != 0 ? dr : dy;
    return out;
  }
};

Tensor group_norm_autograd(const Tensor& x, const optional<Tensor>& weight,
                           const optional<Tensor>& bias, const optional<Tensor>& residual,
                           int64_t G, double eps, int64_t act) {
  return GroupNormFunction::apply(x, weight, bias, residual, G, eps, act);
}

}  // namespace
}  // namespace groupnorm_cpu

GN_TORCH_LIBRARY(GN_LIB, m) {
  m.def(
      "forward(Tensor x, Tensor? weight, Tensor? bias, Tensor? residual, int num_groups, "
      "float eps, int activation) -> (Tensor, Tensor, Tensor)");
  m.def(
      "backward(Tensor grad_y, Tensor x, Tensor? weight, Tensor? bias, Tensor? residual, "
      "Tensor mean, Tensor rstd, int num_groups, int activation, bool[4] needs) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "group_norm(Tensor x, Tensor? weight, Tensor? bias, Tensor? residual, int num_groups, "
      "float eps, int activation) -> Tensor");
}

GN_TORCH_LIBRARY_IMPL(GN_LIB, CPU, m) {
  m.impl("forward", &groupnorm_cpu::forward_cpu);
  m.impl("backward", &groupnorm_cpu::backward_cpu);
  m.impl("group_norm", &groupnorm_cpu::group_norm_cpu);
}

GN_TORCH_LIBRARY_IMPL(GN_LIB, Meta, m) {
  m.impl("forward", &groupnorm_cpu::forward_meta);
  m.impl("backward", &groupnorm_cpu::backward_meta);
  m.impl("group_norm", &groupnorm_cpu::group_norm_meta);
}

GN_TORCH_LIBRARY_IMPL(GN_LIB, Autograd, m) {
  m.impl("group_norm", &groupnorm_cpu::group_norm_autograd);
}
