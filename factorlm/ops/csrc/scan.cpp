// The time recurrence of factorlm's fast F-LSTM / G-LSTM paths, in C++.
//
// Same four functions, signatures and buffer layouts as factorlm/ops/_scan_torch.py (read its
// docstring first): GEMMs go through ATen (MKL / oneDNN), the pointwise gate math of one step
// is ONE fused, vectorised loop instead of 8 (forward) and 7 (backward) tensor ops, and the
// loop over time runs here, so a step costs a few ATen calls instead of dozens of Python ones.
//
// Rows: every buffer has one row per (step, sequence), step-major, N rows in all; step t has
// batch_sizes[t] rows (non-increasing), the sequences still running, and reads h_{t-1}, c_{t-1} from
// the first batch_sizes[t] rows of step t-1. A padded batch has every batch size B; a packed one runs
// with a shrinking batch, as cuDNN does (factorlm/ops/_packed.py says why).
//
// Gates of one step: k groups of B_t rows of 4·nk values in torch.nn.LSTM's order [i, f, g, o]
// (F-LSTM: k = 1), the order of the layer's weight rows, so that the weights are read as they are;
// cell states and m in the layer's (rows, n) layout, cell j*nk + mm of row b at b*n + j*nk + mm.
// With coupled input and forget gates (CIFG, the layers' num_gates = 3) each row has 3·nk values
// [i, g, o] instead, f = 1 - σ(i), and forget_bias is subtracted from i (factorlm/nn/reference.py);
// the scans read the gate count G off the shapes (gate rows / n, n the cell states' width) and
// pass it to the cell loops, which are the only code that differs.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <vector>


namespace {

using at::Tensor;

// exp for float without a libm call, so that the gate loops vectorise: 2^round(x·log2 e) times
// a degree-6 Taylor polynomial on |r| <= ln2/2 (relative error ~2e-7, about 1-2 ulp). The
// argument is clamped so that the exponent stays normal: exp(-87.3) ~ 1.2e-38, exp(88.3) ~ 2e38.
inline float fast_exp(float x) {
  x = x < -87.3f ? -87.3f : (x > 88.3f ? 88.3f : x);
  const float shifter = 12582912.0f;  // 1.5·2^23: adding it rounds to an integer in the low bits
  float n = (x * 1.44269504088896341f + shifter) - shifter;
  float r = x - n * 0.693145751953125f;  // ln 2 split in two for an exact product with n
  r = r - n * 1.428606765330187045e-06f;
  float p = 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  return p * __builtin_bit_cast(float, bits);
}

// float64 is the gradcheck / reference-precision path: keep libm's exact exp there.
inline double fast_exp(double x) { return std::exp(x); }

template <typename T>
inline T sigmoid(T x) {
  return T(1) / (T(1) + fast_exp(-x));
}

// 1 - 2/(1 + e^{2x}): saturates cleanly to ±1 and has absolute error ~1e-7 in float.
template <typename T>
inline T tanh_(T x) {
  return T(1) - T(2) / (T(1) + fast_exp(T(2) * x));
}

// Rows of the pointwise loops are (group, batch row) pairs; split them across threads only
// when a step has enough cells to pay for the fork (small layers stay on one thread).
inline int64_t row_grain(int64_t nk) {
  const int64_t min_cells_per_task = 32768;
  return std::max<int64_t>(1, min_cells_per_task / std::max<int64_t>(1, nk));
}

// One step forward. Row (j, b) = group j, batch row b; its 4·nk pre-activations [i f g o] are
// pre[j*pre_group_stride + b*4*nk + ...] (the step's gate products) + the bias of gate s,
// bias[j*bias_group_stride + s*bias_gate_stride + ...] (the layer's (4n,) bias read in place: for
// G-LSTM, group stride nk and gate stride n), + forget_bias on f. The activated gates are written
// to gates[j*gates_group_stride + b*4*nk + ...], which may be the same memory as pre: every element
// is read before it is written in the same iteration, and `omp simd` (not __restrict__) is what
// licenses the vectorisation. Likewise c may be c_prev (the inference scans update one (B, n)
// cell-state tile in place). Adding the bias here rather than in the GEMM avoids addmm's β·C copy
// of a B×4n tile. Then c = σf·c_prev + σi·tanh g; m = σo·tanh(c). tanh(c) is not stored: the
// backward recomputes it from c, cheaper than writing and re-reading a (B, n) tile.
// c_prev, c and m have rows of n values (n >= k·nk: a chunk of groups may be a layer's part).
// The coupled cell (3 gates [i, g, o], rows of 3·nk), with the same arguments as cell_forward:
// i = σ(a_i + b_i − forget_bias), c = c_prev + i·(g − c_prev) = (1 − i)·c_prev + i·g.
template <typename T>
void coupled_cell_forward(const T* pre, int64_t pre_group_stride, const T* bias, int64_t bias_group_stride,
                          int64_t bias_gate_stride, T forget_bias, T* gates, int64_t gates_group_stride,
                          const T* c_prev, T* c, T* m, int64_t k, int64_t batch, int64_t nk, int64_t n) {
  at::parallel_for(0, k * batch, row_grain(nk), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t j = row / batch, b = row % batch;
      const T* p = pre + j * pre_group_stride + b * 3 * nk;
      const T* __restrict__ bb = bias + j * bias_group_stride;
      T* gt = gates + j * gates_group_stride + b * 3 * nk;
      const int64_t off = b * n + j * nk;
      const T* cp = c_prev + off;  // may be c itself, as in cell_forward
      T* cc = c + off;
      T* __restrict__ mm_ = m + off;
#pragma omp simd
      for (int64_t q = 0; q < nk; ++q) {
        const T zi = p[q] + bb[q] - forget_bias, zg = p[nk + q] + bb[bias_gate_stride + q];
        const T zo = p[2 * nk + q] + bb[2 * bias_gate_stride + q];
        const T i = sigmoid(zi), g = tanh_(zg), o = sigmoid(zo);
        gt[q] = i;
        gt[nk + q] = g;
        gt[2 * nk + q] = o;
        const T cv = cp[q] + i * (g - cp[q]);
        cc[q] = cv;
        mm_[q] = o * tanh_(cv);
      }
    }
  });
}

template <typename T>
void cell_forward(const T* pre, int64_t pre_group_stride, const T* bias, int64_t bias_group_stride,
                  int64_t bias_gate_stride, T forget_bias, T* gates, int64_t gates_group_stride, const T* c_prev,
                  T* c, T* m, int64_t k, int64_t batch, int64_t nk, int64_t n, int64_t num_gates) {
  if (num_gates == 3) {
    coupled_cell_forward(pre, pre_group_stride, bias, bias_group_stride, bias_gate_stride, forget_bias, gates,
                         gates_group_stride, c_prev, c, m, k, batch, nk, n);
    return;
  }
  at::parallel_for(0, k * batch, row_grain(nk), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t j = row / batch, b = row % batch;
      const T* p = pre + j * pre_group_stride + b * 4 * nk;
      const T* __restrict__ bb = bias + j * bias_group_stride;
      T* gt = gates + j * gates_group_stride + b * 4 * nk;
      const int64_t off = b * n + j * nk;
      const T* cp = c_prev + off;  // may be c itself (inference keeps one cell-state tile): read, then written
      T* cc = c + off;
      T* __restrict__ mm_ = m + off;
#pragma omp simd
      for (int64_t q = 0; q < nk; ++q) {
        const T zi = p[q] + bb[q], zf = p[nk + q] + bb[bias_gate_stride + q] + forget_bias;
        const T zg = p[2 * nk + q] + bb[2 * bias_gate_stride + q], zo = p[3 * nk + q] + bb[3 * bias_gate_stride + q];
        const T i = sigmoid(zi), f = sigmoid(zf), g = tanh_(zg), o = sigmoid(zo);
        gt[q] = i;
        gt[nk + q] = f;
        gt[2 * nk + q] = g;
        gt[3 * nk + q] = o;
        const T cv = f * cp[q] + i * g;
        cc[q] = cv;
        mm_[q] = o * tanh_(cv);
      }
    }
  });
}

// One step backward. gates: activated, laid out as in cell_forward; c_prev, c: the cell states
// before and after the step (B, n); dm = dL/dm_t (B, n); dc: dL/dc_t from later steps, turned in
// place into dL/dc_{t-1}; dgates: pre-activation gradients, row (j, b) at
// dgates + j*dgates_group_stride + b*4*nk.
// The coupled cell's backward (rows of 3·nk, [i, g, o]), with the same arguments as cell_backward:
// dL/di (pre-activation) = dcell·(g − c_prev)·σ'(i), dL/dc_{t-1} = dcell·(1 − i).
template <typename T>
void coupled_cell_backward(const T* gates, int64_t gates_group_stride, const T* c_prev, const T* c, const T* dm,
                           T* dc, T* dgates, int64_t dgates_group_stride, int64_t k, int64_t batch, int64_t nk) {
  const int64_t n = k * nk;
  at::parallel_for(0, k * batch, row_grain(nk), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t j = row / batch, b = row % batch;
      const T* __restrict__ gi = gates + j * gates_group_stride + b * 3 * nk;
      const T* __restrict__ gg = gi + nk;
      const T* __restrict__ go = gi + 2 * nk;
      T* __restrict__ di = dgates + j * dgates_group_stride + b * 3 * nk;
      T* __restrict__ dg = di + nk;
      T* __restrict__ d_o = di + 2 * nk;
      const int64_t off = b * n + j * nk;
      const T* __restrict__ cp = c_prev + off;
      const T* __restrict__ cc = c + off;
      const T* __restrict__ dmv = dm + off;
      T* __restrict__ dcv = dc + off;
#pragma omp simd
      for (int64_t q = 0; q < nk; ++q) {
        const T i = gi[q], o = go[q], g = gg[q], t = tanh_(cc[q]), d = dmv[q];
        const T dcell = dcv[q] + d * o * (T(1) - t * t);
        d_o[q] = d * t * o * (T(1) - o);
        di[q] = dcell * (g - cp[q]) * i * (T(1) - i);
        dg[q] = dcell * i * (T(1) - g * g);
        dcv[q] = dcell * (T(1) - i);
      }
    }
  });
}

template <typename T>
void cell_backward(const T* gates, int64_t gates_group_stride, const T* c_prev, const T* c, const T* dm, T* dc,
                   T* dgates, int64_t dgates_group_stride, int64_t k, int64_t batch, int64_t nk, int64_t num_gates) {
  if (num_gates == 3) {
    coupled_cell_backward(gates, gates_group_stride, c_prev, c, dm, dc, dgates, dgates_group_stride, k, batch, nk);
    return;
  }
  const int64_t n = k * nk;
  at::parallel_for(0, k * batch, row_grain(nk), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t j = row / batch, b = row % batch;
      const T* __restrict__ gi = gates + j * gates_group_stride + b * 4 * nk;
      const T* __restrict__ gf = gi + nk;
      const T* __restrict__ gg = gi + 2 * nk;
      const T* __restrict__ go = gi + 3 * nk;
      T* __restrict__ di = dgates + j * dgates_group_stride + b * 4 * nk;
      T* __restrict__ df = di + nk;
      T* __restrict__ dg = di + 2 * nk;
      T* __restrict__ d_o = di + 3 * nk;
      const int64_t off = b * n + j * nk;
      const T* __restrict__ cp = c_prev + off;
      const T* __restrict__ cc = c + off;
      const T* __restrict__ dmv = dm + off;
      T* __restrict__ dcv = dc + off;
#pragma omp simd
      for (int64_t q = 0; q < nk; ++q) {
        const T i = gi[q], f = gf[q], o = go[q], g = gg[q], t = tanh_(cc[q]), d = dmv[q];
        const T dcell = dcv[q] + d * o * (T(1) - t * t);
        d_o[q] = d * t * o * (T(1) - o);
        di[q] = dcell * g * i * (T(1) - i);
        df[q] = dcell * cp[q] * f * (T(1) - f);
        dg[q] = dcell * i * (T(1) - g * g);
        dcv[q] = dcell * f;
      }
    }
  });
}

// Products with very few rows: batch-1 generation runs every GEMM of a step as a (1, K)·(K, N)
// product, and there MKL's per-call cost is most of the time (on the AVX2 EPYC: 5.8 µs for
// 1×32×1024, whose 32K multiply-adds take well under 1 µs; a k = 4 bmm of 1×16×256 products 5.5 µs).
// Up to kSmallRows rows and kSmallWeights elements of b (in cache), the product is one of two loops
// instead, by b's layout:
//   kColumns: b is the transposed view of a row-major (N, K) weight (rows at stride ldb >= K), the
//             layout the scans receive every weight in (W^T of the layer's parameter, no copy):
//             out[r, c] = Σ_q a[r, q]·W[c, q], dot products over contiguous memory;
//   kRows:    b is row-major (K, N) (a weight that is itself a transposed view): each row of out is
//             built from K contiguous axpys over b's rows.
// Larger products and any other layout go to ATen.
constexpr int64_t kSmallRows = 4;
constexpr int64_t kSmallWeights = int64_t(1) << 17;

enum class SmallLayout { kNone, kRows, kColumns };

// Which small loop computes a·b into out (a (…, M, K), b (…, K, N)), if any.
inline SmallLayout small_layout(const Tensor& a, const Tensor& b, const Tensor& out) {
  const int64_t inner = b.size(-2), cols = b.size(-1);
  if (a.size(-2) > kSmallRows || a.stride(-1) != 1 || out.stride(-1) != 1 || inner * cols > kSmallWeights) {
    return SmallLayout::kNone;
  }
  if (b.stride(-1) == 1 && b.stride(-2) == cols) return SmallLayout::kRows;
  if (b.stride(-2) == 1 && b.stride(-1) >= inner) return SmallLayout::kColumns;
  return SmallLayout::kNone;
}

// out (M, N) (+)= a (M, K)·b (K, N): rows of a and out at strides lda and ldo, b row-major.
template <typename T>
void small_rows_product(T* out, int64_t ldo, const T* a, int64_t lda, const T* b, int64_t rows, int64_t inner,
                        int64_t cols, bool accumulate) {
  for (int64_t r = 0; r < rows; ++r) {
    T* __restrict__ o = out + r * ldo;
    const T* ar = a + r * lda;
    if (!accumulate) std::fill(o, o + cols, T(0));
    for (int64_t q = 0; q < inner; ++q) {
      const T av = ar[q];
      const T* __restrict__ bq = b + q * cols;
#pragma omp simd
      for (int64_t c = 0; c < cols; ++c) o[c] += av * bq[c];
    }
  }
}

// One row of out (N) (+)= a (K)·W^T for columns [begin, end), W (N, K) with rows at stride ldw:
// out[c] = Σ_q a[q]·W[c, q], a vectorised dot product over contiguous memory per column.
template <typename T>
void dot_columns(T* o, const T* __restrict__ ar, const T* w, int64_t ldw, int64_t inner, int64_t begin, int64_t end,
                 bool accumulate) {
  for (int64_t c = begin; c < end; ++c) {
    const T* __restrict__ wc = w + c * ldw;
    T s = 0;
#pragma omp simd reduction(+ : s)
    for (int64_t q = 0; q < inner; ++q) s += ar[q] * wc[q];
    o[c] = accumulate ? o[c] + s : s;
  }
}

// out (M, N) (+)= a (M, K)·W^T, W (N, K) with rows at stride ldw: out[r, c] = Σ_q a[r, q]·W[c, q].
// The generic loop (float64, the reference-precision path): one dot product per column.
template <typename T>
void small_columns_product(T* out, int64_t ldo, const T* a, int64_t lda, const T* w, int64_t ldw, int64_t rows,
                           int64_t inner, int64_t cols, bool accumulate) {
  for (int64_t r = 0; r < rows; ++r) dot_columns<T>(out + r * ldo, a + r * lda, w, ldw, inner, 0, cols, accumulate);
}

// float32, the generation path: eight columns at a time, each an 8-lane accumulator over q, then
// the eight accumulators summed into one 8-lane vector of results by three rounds of shuffles and
// adds. The horizontal sums are what dot products cost beyond the multiply-adds: summing each
// accumulator on its own (dot_columns: GCC keeps an `omp simd` reduction's lanes in memory) was
// 2-18x slower than the axpy loop over a row-major copy of the same weight; summing eight
// together it is within 1.3x of it at K = 8 and 16 and faster from K = 32 (AVX-512 Xeon, 1 core,
// µs, axpy / one at a time / eight together: K=16 N=1024 1.37 / 7.03 / 1.78; K=8 N=128 0.049 /
// 0.89 / 0.061; K=32 N=1024 3.8 / 9.9 / 3.2; K=256 N=64 3.7 / 2.0 / 1.0). GCC / Clang vector
// extensions: the compiler lowers them to the instruction set the build targets.
typedef float Float8 __attribute__((vector_size(32)));
typedef int32_t Int8 __attribute__((vector_size(32)));

#if defined(__clang__)
#define FACTORLM_SHUFFLE(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define FACTORLM_SHUFFLE(a, b, ...) __builtin_shuffle(a, b, (Int8){__VA_ARGS__})
#endif

inline Float8 load8(const float* p) {
  Float8 v;
  std::memcpy(&v, p, sizeof(v));  // any alignment: a weight view may start mid-row
  return v;
}

// {Σ lanes of s[0], ..., Σ lanes of s[7]}
inline Float8 sum_each(const Float8* s) {
  // [s0(0+1) s1(0+1) s0(2+3) s1(2+3) s0(4+5) s1(4+5) s0(6+7) s1(6+7)], and likewise for s2..s7
  const Float8 b0 = FACTORLM_SHUFFLE(s[0], s[1], 0, 8, 2, 10, 4, 12, 6, 14) +
                    FACTORLM_SHUFFLE(s[0], s[1], 1, 9, 3, 11, 5, 13, 7, 15);
  const Float8 b1 = FACTORLM_SHUFFLE(s[2], s[3], 0, 8, 2, 10, 4, 12, 6, 14) +
                    FACTORLM_SHUFFLE(s[2], s[3], 1, 9, 3, 11, 5, 13, 7, 15);
  const Float8 b2 = FACTORLM_SHUFFLE(s[4], s[5], 0, 8, 2, 10, 4, 12, 6, 14) +
                    FACTORLM_SHUFFLE(s[4], s[5], 1, 9, 3, 11, 5, 13, 7, 15);
  const Float8 b3 = FACTORLM_SHUFFLE(s[6], s[7], 0, 8, 2, 10, 4, 12, 6, 14) +
                    FACTORLM_SHUFFLE(s[6], s[7], 1, 9, 3, 11, 5, 13, 7, 15);
  // [s0(0-3) s1(0-3) s2(0-3) s3(0-3) s0(4-7) s1(4-7) s2(4-7) s3(4-7)], and likewise for s4..s7
  const Float8 c0 = FACTORLM_SHUFFLE(b0, b1, 0, 1, 8, 9, 4, 5, 12, 13) + FACTORLM_SHUFFLE(b0, b1, 2, 3, 10, 11, 6, 7, 14, 15);
  const Float8 c1 = FACTORLM_SHUFFLE(b2, b3, 0, 1, 8, 9, 4, 5, 12, 13) + FACTORLM_SHUFFLE(b2, b3, 2, 3, 10, 11, 6, 7, 14, 15);
  // the two halves of each sum
  return FACTORLM_SHUFFLE(c0, c1, 0, 1, 2, 3, 8, 9, 10, 11) + FACTORLM_SHUFFLE(c0, c1, 4, 5, 6, 7, 12, 13, 14, 15);
}

template <>
void small_columns_product<float>(float* out, int64_t ldo, const float* a, int64_t lda, const float* w, int64_t ldw,
                                  int64_t rows, int64_t inner, int64_t cols, bool accumulate) {
  const int64_t inner8 = inner / 8 * 8, cols8 = cols / 8 * 8;
  for (int64_t r = 0; r < rows; ++r) {
    float* o = out + r * ldo;
    const float* ar = a + r * lda;
    for (int64_t c = 0; c < cols8; c += 8) {
      const float* wc = w + c * ldw;
      Float8 s[8] = {};
      for (int64_t q = 0; q < inner8; q += 8) {
        const Float8 av = load8(ar + q);
        for (int j = 0; j < 8; ++j) s[j] += av * load8(wc + j * ldw + q);
      }
      Float8 result = sum_each(s);
      for (int64_t q = inner8; q < inner; ++q) {  // K not a multiple of 8: the last few terms
        for (int j = 0; j < 8; ++j) result[j] += ar[q] * wc[j * ldw + q];
      }
      if (accumulate) result += load8(o + c);
      std::memcpy(o + c, &result, sizeof(result));
    }
    dot_columns<float>(o, ar, w, ldw, inner, cols8, cols, accumulate);  // N not a multiple of 8: the rest
  }
}

// out (M, N) (+)= a (M, K)·b (K, N) by the small loop for ``layout`` (not kNone); rows at strides
// lda, ldo; b's per-layout stride is read from b.
template <typename T>
void small_product(SmallLayout layout, T* out, int64_t ldo, const T* a, int64_t lda, const Tensor& b, const T* bp,
                   int64_t rows, bool accumulate) {
  const int64_t inner = b.size(-2), cols = b.size(-1);
  if (layout == SmallLayout::kRows) {
    small_rows_product<T>(out, ldo, a, lda, bp, rows, inner, cols, accumulate);
  } else {
    small_columns_product<T>(out, ldo, a, lda, bp, b.stride(-1), rows, inner, cols, accumulate);
  }
}

// out = a·b, or out += a·b with accumulate; a (M, K), b (K, N), out (M, N).
void matmul_into(Tensor& out, const Tensor& a, const Tensor& b, bool accumulate) {
  const SmallLayout layout = small_layout(a, b, out);
  if (layout == SmallLayout::kNone) {
    if (accumulate) {
      out.addmm_(a, b);
    } else {
      at::mm_out(out, a, b);
    }
    return;
  }
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "small_product", [&] {
    small_product<scalar_t>(layout, out.data_ptr<scalar_t>(), out.stride(0), a.data_ptr<scalar_t>(), a.stride(0), b,
                            b.data_ptr<scalar_t>(), a.size(0), accumulate);
  });
}

// out = bmm(a, b), or out += bmm(a, b) with accumulate: a (k, M, K), b (k, K, N), out (k, M, N)
// contiguous; small products group by group.
void batched_matmul_into(Tensor& out, const Tensor& a, const Tensor& b, bool accumulate = false) {
  const SmallLayout layout = small_layout(a, b, out);
  if (layout == SmallLayout::kNone) {
    if (accumulate) {
      out.baddbmm_(a, b);
    } else {
      at::bmm_out(out, a, b);
    }
    return;
  }
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "small_product", [&] {
    for (int64_t j = 0; j < a.size(0); ++j) {
      small_product<scalar_t>(layout, out.data_ptr<scalar_t>() + j * out.stride(0), out.stride(1),
                              a.data_ptr<scalar_t>() + j * a.stride(0), a.stride(1), b,
                              b.data_ptr<scalar_t>() + j * b.stride(0), a.size(1), accumulate);
    }
  });
}

// Buffers of the whole sequence are tens of MB, and fresh memory costs a page fault per page and
// the kernel's zeroing on first touch, more or less of it depending on what ran before (glibc
// returns freed heap to the kernel): factorlm/ops/_memory.py says how much. Buffers of at least
// POOL_MIN_BYTES there (read from it once) come from its pool, shared with the PyTorch loop, which
// reuses them once nothing refers to them; smaller ones glibc's heap serves without faults. The
// call into Python costs a few µs, a handful of times per layer call, never for batch-1 tokens.
Tensor empty_buffer(at::IntArrayRef sizes, const Tensor& like) {
  // never destroyed: a py::object must not outlive the interpreter's shutdown
  static py::object* memory = new py::object(py::module_::import("factorlm.ops._memory"));
  static const int64_t pool_min_bytes = memory->attr("POOL_MIN_BYTES").cast<int64_t>();
  static py::object* pooled_empty = new py::object(memory->attr("empty"));
  const int64_t bytes = c10::multiply_integers(sizes) * like.element_size();
  if (bytes < pool_min_bytes || !like.device().is_cpu()) return at::empty(sizes, like.options());
  py::tuple shape(sizes.size());
  for (size_t d = 0; d < sizes.size(); ++d) shape[d] = sizes[d];
  return (*pooled_empty)(*shape, py::arg("like") = like).cast<Tensor>();
}

void check_cpu(const Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "factorlm scan: ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble,
              "factorlm scan: ", name, " must be float32 or float64, got ", t.scalar_type());
}

// (B, m) -> (k, B, m/k) view: group j's column slice of every row.
Tensor grouped(const Tensor& t, int64_t k) {
  return t.view({t.size(0), k, t.size(1) / k}).transpose(0, 1);
}

// Moves between a (rows, k·w) matrix and the grouped rows of a (k, rows, ·) buffer, group j's
// row b holding columns j·w … (j+1)·w of row b. A step's rows are 32K values at G-LSTM k=8 p=256
// B=128, which copy_ / add_out on the strided views took 35-55 µs to move; a plain loop of row
// copies takes a few. Both arguments need unit column strides (checked).
enum class GroupedMove {
  kToGroups,    // grouped = flat
  kFromGroups,  // flat = grouped
  kSumOut,      // flat = addend + grouped (addend laid out as flat)
};

// flat (rows at stride ld), grouped (group j's row b at j·group_stride + b·ld_grouped), addend
// (rows at stride ld_addend; kSumOut only).
template <typename T>
void move_grouped_rows(T* flat, int64_t ld, T* grouped_rows, int64_t group_stride, int64_t ld_grouped,
                       const T* addend, int64_t ld_addend, int64_t rows, int64_t k, int64_t w, GroupedMove move) {
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, k * w)), [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      for (int64_t j = 0; j < k; ++j) {
        T* __restrict__ fr = flat + b * ld + j * w;
        T* __restrict__ gr = grouped_rows + j * group_stride + b * ld_grouped;
        if (move == GroupedMove::kToGroups) {
          std::memcpy(gr, fr, w * sizeof(T));
        } else if (move == GroupedMove::kFromGroups) {
          std::memcpy(fr, gr, w * sizeof(T));
        } else {
          const T* __restrict__ ar = addend + b * ld_addend + j * w;
#pragma omp simd
          for (int64_t q = 0; q < w; ++q) fr[q] = ar[q] + gr[q];
        }
      }
    }
  });
}

// flat (rows, k·w), grouped (k, rows, >= w: the first w columns move), addend as flat (kSumOut).
void move_grouped(const Tensor& flat, const Tensor& grouped_rows, GroupedMove move, const Tensor& addend = Tensor()) {
  const bool sum = move == GroupedMove::kSumOut;
  TORCH_CHECK(flat.stride(1) == 1 && grouped_rows.stride(2) == 1 && (!sum || addend.stride(1) == 1),
              "factorlm scan: move_grouped needs unit column strides");
  const int64_t k = grouped_rows.size(0);
  AT_DISPATCH_FLOATING_TYPES(flat.scalar_type(), "move_grouped", [&] {
    move_grouped_rows<scalar_t>(flat.data_ptr<scalar_t>(), flat.stride(0), grouped_rows.data_ptr<scalar_t>(),
                                grouped_rows.stride(0), grouped_rows.stride(1),
                                sum ? addend.data_ptr<scalar_t>() : nullptr, sum ? addend.stride(0) : 0,
                                flat.size(0), k, flat.size(1) / k, move);
  });
}

// The row of cells where c_{t-1} of step t's rows begins: c0 for t = 0, else step t-1's first row.
inline int64_t cells_before(const std::vector<int64_t>& starts, int64_t batch, int64_t t) {
  return t == 0 ? 0 : batch + starts[t - 1];
}

struct StateBuffers {
  Tensor out, cells, m;
};

// keep (training): out (N, p); cells (B + N, n) with c0 in its first B rows; m (N, n), or out itself
// without a projection. Not keep (inference, nothing saved for a backward): out (N, p); cells (B, n),
// written by step 0 from c0 (every sequence has a step 0) and then updated in place step after step,
// so that each row ends holding its sequence's c_T (the rows of sequences that have ended are not
// touched again); m one step's (B, n) scratch, or out itself.
StateBuffers state_buffers(const Tensor& like, int64_t rows, int64_t batch, int64_t n, int64_t p, bool proj,
                           const Tensor& c0, bool keep) {
  StateBuffers s;
  s.out = empty_buffer({rows, p}, like);
  s.cells = empty_buffer({keep ? batch + rows : batch, n}, like);
  if (keep) s.cells.narrow(0, 0, batch).copy_(c0);
  s.m = proj ? empty_buffer({keep ? rows : batch, n}, like) : s.out;
  return s;
}

// Where step t's rows (starting at row `start` of the sequence) live in the state buffers.
struct StepRows {
  int64_t c_prev, c, m;  // first rows of c_{t-1} and c_t in cells, of m_t in m
};

// c_{t-1} of step t's first row: in cells, or c0 itself at an inference scan's step 0 (whose cells
// have no copy of it).
template <typename T>
inline const T* previous_cells(const Tensor& c0, T* cells, const StepRows& at, int64_t n, bool keep, size_t t) {
  return !keep && t == 0 ? c0.data_ptr<T>() : cells + at.c_prev * n;
}

// What a forward scan returns of a whole-sequence buffer: the buffer when the backward needs it
// (keep), else an undefined tensor (None in Python), one object fewer to hand back per call.
inline Tensor kept(const Tensor& t, bool keep) { return keep ? t : Tensor(); }

inline StepRows step_rows(const std::vector<int64_t>& starts, int64_t batch, int64_t t, bool keep, bool proj) {
  const int64_t start = starts[t];
  if (keep) return {cells_before(starts, batch, t), batch + start, start};
  return {0, 0, proj ? 0 : start};
}

// The first row of each step, and N at the end, after checking that the batch sizes are what the
// Python side promises (positive, non-increasing, starting at B, summing to N): a wrong size here
// would read or write outside the buffers.
std::vector<int64_t> step_starts(const std::vector<int64_t>& batch_sizes, int64_t batch, int64_t rows) {
  TORCH_CHECK(!batch_sizes.empty() && batch_sizes[0] == batch, "factorlm scan: batch_sizes must start with B = ",
              batch);
  std::vector<int64_t> starts{0};
  for (size_t t = 0; t < batch_sizes.size(); ++t) {
    TORCH_CHECK(batch_sizes[t] >= 1 && (t == 0 || batch_sizes[t] <= batch_sizes[t - 1]),
                "factorlm scan: batch_sizes must be positive and non-increasing");
    starts.push_back(starts.back() + batch_sizes[t]);
  }
  TORCH_CHECK(starts.back() == rows, "factorlm scan: batch_sizes sum to ", starts.back(), ", not to the ", rows,
              " rows of the input");
  return starts;
}

// dL/dm_t of a step's rows from dL/dh_t (B_t, p): through the projection W_hr (p, n) into dm's first
// B_t rows, or dh_t itself without one (then h = m).
inline Tensor projection_input_grad(const Tensor& dh_t, Tensor& dm, const std::optional<Tensor>& proj) {
  if (!proj.has_value()) return dh_t;
  Tensor dm_t = dm.narrow(0, 0, dh_t.size(0));
  at::mm_out(dm_t, dh_t, *proj);
  return dm_t;
}

// dL/dh of the rows [following, size) of the step starting at row `start`, whose sequences end at that
// step: dout + dL/dh_T, and no recurrent term.
void ending_rows_grad(Tensor& dh, const Tensor& dout, const Tensor& dh_last, int64_t start, int64_t size,
                      int64_t following) {
  if (size <= following) return;
  Tensor rows = dh.narrow(0, start + following, size - following);
  at::add_out(rows, dout.narrow(0, start + following, size - following), dh_last.narrow(0, following, size - following));
}

// A grouped backward's dL/dh_{t-1} (t > 0) for step t-1's rows: dout + rec, the groups' recurrent
// term (k, B_t, pk), for the rows that go on to step t; dout + dL/dh_T for those that end at t-1.
inline void grouped_previous_step_grad(Tensor& dh, const Tensor& dout, const Tensor& dh_last, const Tensor& rec,
                                       const std::vector<int64_t>& starts, const std::vector<int64_t>& batch_sizes,
                                       int64_t t, int64_t k) {
  const int64_t before = starts[t - 1], size = batch_sizes[t];
  move_grouped(dh.narrow(0, before, size), rec, GroupedMove::kSumOut, dout.narrow(0, before, size));
  ending_rows_grad(dh, dout, dh_last, before, batch_sizes[t - 1], size);
}

// The layer's (G·n,) gate bias in nn.LSTM order, contiguous (a view of it as it is, normally), or
// zeros when the layer has none.
Tensor gate_bias(const std::optional<Tensor>& bias, int64_t num_gates, int64_t n, const Tensor& like) {
  if (!bias.has_value()) return at::zeros({num_gates * n}, like.options());
  TORCH_CHECK(bias->numel() == num_gates * n, "factorlm scan: bias must have ", num_gates, "n = ", num_gates * n,
              " elements, got ", bias->numel());
  return bias->contiguous();
}

// G, the gate blocks of one cell state's width n among gate_rows pre-activations: 4 ([i, f, g, o]),
// or 3 (coupled input and forget gates, [i, g, o]).
int64_t gate_count(int64_t gate_rows, int64_t n) {
  TORCH_CHECK(n > 0 && (gate_rows == 4 * n || gate_rows == 3 * n), "factorlm scan: ", gate_rows,
              " gate rows for cell states of width ", n, "; expected 4n or 3n");
  return gate_rows / n;
}

}  // namespace

// The forward scans multiply every step's rows by the same weights, which arrive as transposed
// views of the layer's parameters (W^T of a row-major (N, K) W). MKL runs a many-row product
// 10-40% faster on a row-major (K, N) operand than on that view (one core, AVX-512 Xeon, µs,
// view / row-major: W_hr^T p=256 n=2048 at B=128 888 / 727, at B=32 276 / 185; F-LSTM's W2^T
// r=128 n=2048 at B=32 566 / 431; G-LSTM k=8's (8, 32, 1024) bmm at B=128 515 / 454), while
// the transposing copy costs one or two such products (W_hr: 405 µs). So a scan of at least
// kRowMajorSteps steps of more than kSmallRows rows copies its step weights once; a short or
// few-row scan (token-by-token generation) reads the views, through the small-product loops.
constexpr size_t kRowMajorSteps = 4;

inline bool step_weights_row_major(const std::vector<int64_t>& batch_sizes) {
  return batch_sizes.size() >= kRowMajorSteps && batch_sizes[0] > kSmallRows;
}

// w, or its row-major copy with ``copy``.
inline Tensor step_weight(const Tensor& w, bool copy) { return copy ? w.contiguous() : w; }

// W_hr^T (n, p) for the step products (step_weight), or None.
inline std::optional<Tensor> step_projection(const std::optional<Tensor>& w_hr, bool copy) {
  return w_hr.has_value() ? std::optional<Tensor>(step_weight(w_hr->t(), copy)) : std::nullopt;
}

// The layer's weights as they are: w1 (r, p_in + p), w2 (4n, r), w_hr (p, n) or None; the
// products read their transposed views (taken here: in Python they were a few µs of a batch-1 token),
// or row-major copies of them in a long scan (step_weights_row_major).
// bias (4n,) in nn.LSTM order or None (zeros); forget_bias is added to every f pre-activation.
// x (N, p_in) the rows; u (N, r) = x·W1x^T, one GEMM over all rows, is turned in place into
// z = W1·[x; h] (a second buffer would cost page faults).
// keep = false (inference): nothing whole-sequence but out and z; gates and m are one step's scratch and
// the returned cells are (B, n), each sequence's c_T.
std::vector<Tensor> flstm_forward_scan(Tensor x, Tensor w1, std::optional<Tensor> bias_opt, double forget_bias,
                                       Tensor w2, std::optional<Tensor> w_hr, Tensor h0, Tensor c0,
                                       std::vector<int64_t> batch_sizes, bool keep) {
  check_cpu(x, "x");
  c0 = c0.contiguous();
  const int64_t p_in = x.size(1);
  const bool copy = step_weights_row_major(batch_sizes);
  const Tensor w1x_t = w1.narrow(1, 0, p_in).t();
  const Tensor w1h_t = step_weight(w1.narrow(1, p_in, w1.size(1) - p_in).t(), copy), w2_t = step_weight(w2.t(), copy);
  const std::optional<Tensor> proj_t = step_projection(w_hr, copy);
  Tensor u = empty_buffer({x.size(0), w1x_t.size(1)}, x);
  matmul_into(u, x, w1x_t, false);
  const int64_t rows = u.size(0), batch = h0.size(0), n = c0.size(1), p = h0.size(1);
  const int64_t num_gates = gate_count(w2_t.size(1), n);
  const Tensor bias = gate_bias(bias_opt, num_gates, n, u);
  const std::vector<int64_t> starts = step_starts(batch_sizes, batch, rows);
  const bool proj = proj_t.has_value();
  StateBuffers s = state_buffers(u, rows, batch, n, p, proj, c0, keep);
  Tensor gates = empty_buffer({keep ? rows : batch, num_gates * n}, u);
  Tensor h = h0;
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "flstm_forward_scan", [&] {
    for (size_t t = 0; t < batch_sizes.size(); ++t) {
      const int64_t start = starts[t], size = batch_sizes[t];
      const StepRows at = step_rows(starts, batch, t, keep, proj);
      Tensor z_t = u.narrow(0, start, size), gates_t = gates.narrow(0, keep ? start : 0, size);
      Tensor m_t = s.m.narrow(0, at.m, size), out_t = s.out.narrow(0, start, size);
      matmul_into(z_t, h.narrow(0, 0, size), w1h_t, true);
      matmul_into(gates_t, z_t, w2_t, false);
      scalar_t* g = gates_t.data_ptr<scalar_t>();
      scalar_t* cells = s.cells.data_ptr<scalar_t>();
      cell_forward<scalar_t>(g, 0, bias.data_ptr<scalar_t>(), 0, n, scalar_t(forget_bias), g, 0,
                             previous_cells(c0, cells, at, n, keep, t), cells + at.c * n, m_t.data_ptr<scalar_t>(), 1,
                             size, n, n, num_gates);
      if (proj) matmul_into(out_t, m_t, *proj_t, false);
      h = out_t;
    }
  });
  return {s.out, kept(u, keep), kept(gates, keep), s.cells, kept(s.m, keep)};
}

// How many rows of dgates the backward keeps for one weight-gradient product when it has the rows
// that multiply them (G-LSTM: the forward's [x; h_{t-1}; 1]; F-LSTM: z): whole steps, at least
// kWeightGradRows rows. The whole sequence's dgates (84 MB at G-LSTM k=8 p=256 n=2048 B=128),
// written to memory by the gate loop and read back by one product over all rows, cost more than
// that product's arithmetic; a ring of a few steps stays in cache, and the same multiply-adds run
// as one product every few steps. The
// weight-gradient product alone at that shape, 2 threads, ms, one bmm over all rows (dgates from
// memory) / a product every 1 / 2 / 4 steps (dgates in cache): AVX-512 14.6 / 10.1 / 12.1 / 10.4,
// AVX2 15.4 / 18.3 / 15.2 / 14.5 (MKL's products of one step's 128 rows are slow under AVX2).
// Whole layer, fwd + bwd, paired runs: k=8 p=256 97.4 -> 90.5 ms AVX-512, 125 -> 122 AVX2; k=4
// 138 -> 118 / 177 -> 169; k=8 p=512 161 -> 151 / 230 -> 221; k=2 unchanged.
constexpr int64_t kWeightGradRows = 512;

// The blocks of a backward that sums its weight gradients from a ring (``on``): whole steps, at least
// kWeightGradRows rows each (a step has at most B), counted from the sequence's last step back. The
// scan calls enter(t) at every step from the last down; the ring holds the block's rows in order.
class WeightGradBlocks {
 public:
  WeightGradBlocks(bool on, const std::vector<int64_t>& starts, int64_t batch)
      : on_(on),
        starts_(starts),
        steps_(static_cast<int64_t>(starts.size()) - 1),
        block_steps_(on ? std::min(steps_, std::max<int64_t>(1, (kWeightGradRows + batch - 1) / batch)) : 0),
        ring_rows_(block_steps_ * batch) {}

  bool on() const { return on_; }
  int64_t ring_rows() const { return ring_rows_; }  // rows the ring needs (0 when off)
  // Opens t's block when t is its latest step.
  void enter(int64_t t) {
    if (on_ && (t == steps_ - 1 || t < first_)) {
      last_ = t;
      first_ = std::max<int64_t>(0, t - block_steps_ + 1);
    }
  }
  // Where step t's first row goes: in the ring, or, off, in a whole-sequence buffer.
  int64_t row(int64_t t) const { return starts_[t] - (on_ ? starts_[first_] : 0); }
  bool complete(int64_t t) const { return on_ && t == first_; }  // t is the block's earliest step: sum it
  bool first_summed() const { return last_ == steps_ - 1; }      // the block is the sequence's last
  int64_t first_row() const { return starts_[first_]; }         // the block's rows in the sequence
  int64_t rows() const { return starts_[last_ + 1] - starts_[first_]; }

 private:
  bool on_;
  const std::vector<int64_t>& starts_;
  int64_t steps_, block_steps_, ring_rows_, first_ = 0, last_ = 0;
};

// z (N, r), the forward's W1·[x; h] rows, given when dL/dW2 or dL/dbias is wanted: then both are
// summed here from a ring of a few steps' dgates (kWeightGradRows) and returned, dL/dW2 (4n, r) and
// Σ_rows dgates (4n,), and dgates is not; without it, dgates (N, 4n) is, and they are undefined.
std::vector<Tensor> flstm_backward_scan(Tensor dout, Tensor dh_last, Tensor dc_last, Tensor gates, Tensor cells,
                                        Tensor w1h, Tensor w2, std::optional<Tensor> proj,
                                        std::vector<int64_t> batch_sizes, std::optional<Tensor> z) {
  check_cpu(gates, "gates");
  const int64_t rows = gates.size(0), n = dc_last.size(1), batch = dh_last.size(0);
  const int64_t num_gates = gate_count(gates.size(1), n);
  const std::vector<int64_t> starts = step_starts(batch_sizes, batch, rows);
  const int64_t steps = static_cast<int64_t>(batch_sizes.size());
  const bool ring = z.has_value();
  TORCH_CHECK(!ring || z->size(0) == rows, "factorlm scan: z must have one row per row of gates");
  WeightGradBlocks block(ring, starts, batch);
  Tensor dgates = empty_buffer({ring ? block.ring_rows() : rows, gates.size(1)}, gates);
  Tensor dw2 = ring ? at::empty({gates.size(1), z->size(1)}, gates.options()) : Tensor();
  Tensor bias_sums = ring ? at::empty({gates.size(1)}, gates.options()) : Tensor();
  Tensor dz = empty_buffer({rows, w2.size(1)}, gates);
  Tensor dh = empty_buffer(dout.sizes(), dout);
  Tensor dm = proj.has_value() ? at::empty({batch, n}, gates.options()) : Tensor();
  Tensor dh0 = at::empty({batch, w1h.size(1)}, gates.options());
  Tensor dc = dc_last.clone();  // rows of sequences that have not started (backwards) keep dL/dc_T
  ending_rows_grad(dh, dout, dh_last, starts[steps - 1], batch_sizes[steps - 1], 0);
  AT_DISPATCH_FLOATING_TYPES(gates.scalar_type(), "flstm_backward_scan", [&] {
    scalar_t* c = cells.data_ptr<scalar_t>();
    for (int64_t t = steps - 1; t >= 0; --t) {
      const int64_t start = starts[t], size = batch_sizes[t];
      block.enter(t);
      Tensor dh_t = dh.narrow(0, start, size), dz_t = dz.narrow(0, start, size);
      Tensor dgates_t = dgates.narrow(0, block.row(t), size);
      Tensor dm_t = projection_input_grad(dh_t, dm, proj);
      cell_backward<scalar_t>(gates.data_ptr<scalar_t>() + start * num_gates * n, 0,
                              c + cells_before(starts, batch, t) * n, c + (batch + start) * n,
                              dm_t.data_ptr<scalar_t>(), dc.data_ptr<scalar_t>(), dgates_t.data_ptr<scalar_t>(), 0, 1,
                              size, n, num_gates);
      at::mm_out(dz_t, dgates_t, w2);
      if (t > 0) {  // dL/dh_{t-1} = dout_{t-1} + dz_t·W1h for the rows that go on; + dL/dh_T for those that end
        const int64_t before = starts[t - 1];
        Tensor dh_prev = dh.narrow(0, before, size);
        at::addmm_out(dh_prev, dout.narrow(0, before, size), dz_t, w1h);
        ending_rows_grad(dh, dout, dh_last, before, batch_sizes[t - 1], size);
      } else {
        at::mm_out(dh0, dz_t, w1h);
      }
      if (block.complete(t)) {  // the block's dgates^T · z, and their column sums
        Tensor block_dgates = dgates.narrow(0, 0, block.rows());
        Tensor block_z = z->narrow(0, block.first_row(), block.rows());
        if (block.first_summed()) {
          at::mm_out(dw2, block_dgates.t(), block_z);
          at::sum_out(bias_sums, block_dgates, 0);
        } else {
          dw2.addmm_(block_dgates.t(), block_z);
          bias_sums.add_(block_dgates.sum(0));
        }
      }
    }
  });
  return {ring ? Tensor() : dgates, dz, dh, dh0, dc, dw2, bias_sums};
}

// A G-LSTM step's gate products are narrow (p/k deep) and their output large (B·4n values: 4 MB
// at B = 128, n = 2048), so they and the gate loop are bound by memory. Computing the input side
// for all rows up front (one bmm into a (k, N, 4nk) buffer) left the gate loop waiting on that
// buffer's loads from memory, two fifths of its time. Per step, chunk by chunk of groups whose
// products fit kGateChunkBytes, both products (input and recurrent) are summed into a scratch the
// gate loop then reads from L2: the same GEMM work in twice as many calls, but the only
// whole-sequence traffic left is the activated gates written for the backward. G-LSTM k=8 p=256
// n=2048 B=128, forward 73-77 -> 67-70 ms (one core, AVX-512 Xeon). Small steps (batch-1
// generation) stay one chunk for all groups.
// The two products are one where the step weights are row-major copies (a long scan): each group's
// [x_t^(j); h_{t-1}^(j)] rows times [W_ih^(j)^T; W_hh^(j)^T], twice as deep, half the calls and no
// accumulating pass over the scratch. The rows live in a (k, N, pk_in + pk + 1) buffer, x's part
// copied in once, h's step by step, with a column of ones: it is the backward's weight-gradient
// operand (factorlm/ops/_function.py, grouped_gate_weight_grads), returned so that it is not built
// again. k=8 p=256 n=2048 B=128, 2 threads, µs a step's products, two / one: 584 / 460 AVX-512,
// 840 / 757 AVX2.
constexpr int64_t kGateChunkBytes = int64_t(1) << 20;

// How many groups a chunk holds when each group's products are group_bytes.
inline int64_t gate_chunk(int64_t k, int64_t group_bytes) {
  return std::max<int64_t>(1, std::min<int64_t>(k, kGateChunkBytes / std::max<int64_t>(1, group_bytes)));
}

// Narrow groups (k = 8 at p = 256: 32 + 32 deep) make each step's gate products shallow GEMMs
// whose (B, 4nk) output the gate loop then reads back. The fused step computes a tile of
// kFusedRows batch rows × one vector of cells, all four gates, in registers from the group's
// [x; h] slices and the step weights (the tile's columns of W_ih^T and W_hh^T, a few KB, stay in
// L1 while the tile moves down the batch), then runs the gate math on it: the pre-activations
// never reach memory. Measured against the unfused step (benchmarks/isa_compare.py --layers GLSTM,
// forward + backward, ms, AVX-512 / AVX2 Xeon, 2 threads): it wins on small batches, G-LSTM p=64
// n=256 B=32 k=8 4.2 -> 3.5 / 5.2 -> 4.1, k=4 4.5 -> 3.9 / 5.1 -> 4.6; and loses at B=128, where
// MKL's batched products have rows enough to run near their peak, k=8 p=256 n=2048 117 -> 141 /
// 151 -> 188, p=512 177 -> 208 / 243 -> 293. So it runs steps of at most kFusedMaxRows rows, with
// narrow groups (kFusedMaxDepth), cells filling whole vectors and row-major step weights
// (step_weights_row_major); GCC's vector extensions give AVX-512 or AVX2 code by the build's
// flags, and a build without AVX keeps the unfused step.
#if defined(__AVX512F__)
constexpr int kFusedVectorBytes = 64;
constexpr int kFusedRows = 4;  // 4 rows × 4 gates: 16 of the 32 vector registers accumulate
#elif defined(__AVX2__)
constexpr int kFusedVectorBytes = 32;
constexpr int kFusedRows = 3;  // 12 of the 16 registers, leaving room for the weights and a broadcast
#else
constexpr int kFusedVectorBytes = 0;
constexpr int kFusedRows = 1;
#endif
constexpr int64_t kFusedMaxDepth = 128;  // p_in/k + p/k: deeper products are MKL's to run
constexpr int64_t kFusedMaxRows = 32;    // B: larger batches are MKL's to run (measured above)

template <typename T>
struct FusedVector {
  typedef T type __attribute__((vector_size(kFusedVectorBytes > 0 ? kFusedVectorBytes : 16)));
  static constexpr int64_t width = (kFusedVectorBytes > 0 ? kFusedVectorBytes : 16) / sizeof(T);
};

// Whether a G-LSTM scan with these sizes runs fused steps (see above): four gates (the coupled cell
// keeps its unfused loop), nk a whole number of vectors, narrow groups, a small batch, row-major
// step weights.
template <typename T>
inline bool fused_step_applies(int64_t num_gates, int64_t nk, int64_t depth, int64_t batch, bool row_major) {
  return kFusedVectorBytes > 0 && num_gates == 4 && nk % FusedVector<T>::width == 0 && depth <= kFusedMaxDepth &&
         batch <= kFusedMaxRows && row_major;
}

// acc[r][s] += a[r·lda + q]·w[q·ldw + s·nk] (one vector of cells), q < depth: R rows' four gates.
template <typename T, int R>
inline void accumulate_tile(typename FusedVector<T>::type (&acc)[R][4], const T* a, int64_t lda, const T* w,
                            int64_t ldw, int64_t depth, int64_t nk) {
  using V = typename FusedVector<T>::type;
  for (int64_t q = 0; q < depth; ++q) {
    const T* wq = w + q * ldw;
    V w0, w1, w2, w3;
    std::memcpy(&w0, wq, sizeof(V));
    std::memcpy(&w1, wq + nk, sizeof(V));
    std::memcpy(&w2, wq + 2 * nk, sizeof(V));
    std::memcpy(&w3, wq + 3 * nk, sizeof(V));
    for (int r = 0; r < R; ++r) {
      const T s = a[r * lda + q];
      acc[r][0] += s * w0;
      acc[r][1] += s * w1;
      acc[r][2] += s * w2;
      acc[r][3] += s * w3;
    }
  }
}

// One fused tile: rows [0, R) (pointers already at the tile's first row) of one group, cells
// [col, col + width) of the group's nk. x, h: the group's input and recurrent slices (rows at
// strides ldx, ldh); wx (pk_in, 4nk), wh (pk, 4nk): the group's W_ih^T, W_hh^T row-major; bias at
// the group's cells with gate stride bias_gate_stride; gates: activated, rows of 4nk; c_prev, c, m
// rows of n, already at the group's first cell. The gate math is cell_forward's, on the tile.
template <typename T, int R>
inline void fused_tile(const T* x, int64_t ldx, int64_t pk_in, const T* h, int64_t ldh, int64_t pk, const T* wx,
                       const T* wh, int64_t nk, int64_t col, const T* bias, int64_t bias_gate_stride, T forget_bias,
                       T* gates, const T* c_prev, T* c, T* m, int64_t n) {
  using V = typename FusedVector<T>::type;
  constexpr int64_t W = FusedVector<T>::width;
  V acc[R][4] = {};
  accumulate_tile<T, R>(acc, x, ldx, wx + col, 4 * nk, pk_in, nk);
  accumulate_tile<T, R>(acc, h, ldh, wh + col, 4 * nk, pk, nk);
  for (int r = 0; r < R; ++r) {
    T pre[4][W];
    std::memcpy(pre, acc[r], sizeof(pre));
    T* gt = gates + r * 4 * nk + col;
    const T* cp = c_prev + r * n + col;  // may be c itself (inference): read, then written
    T* cc = c + r * n + col;
    T* __restrict__ mm_ = m + r * n + col;
    const T* __restrict__ bb = bias + col;
#pragma omp simd
    for (int64_t q = 0; q < W; ++q) {
      const T i = sigmoid(pre[0][q] + bb[q]), f = sigmoid(pre[1][q] + bb[bias_gate_stride + q] + forget_bias);
      const T g = tanh_(pre[2][q] + bb[2 * bias_gate_stride + q]), o = sigmoid(pre[3][q] + bb[3 * bias_gate_stride + q]);
      gt[q] = i;
      gt[nk + q] = f;
      gt[2 * nk + q] = g;
      gt[3 * nk + q] = o;
      const T cv = f * cp[q] + i * g;
      cc[q] = cv;
      mm_[q] = o * tanh_(cv);
    }
  }
}

// A whole fused G-LSTM step: batch rows of x_t (stride ldx) and h_{t-1} (stride ldh); wih (k, pk_in,
// 4nk), whh (k, pk, 4nk) contiguous; bias (4n,) gate-major; gates: group j's row b at
// gates + j*gates_group_stride + b*4nk; c_prev, c, m (batch, n). Work items are (group, vector of
// cells) pairs, each running down the batch: its weight columns stay in L1.
template <typename T>
void fused_glstm_step(const T* x, int64_t ldx, const T* h, int64_t ldh, const T* wih, const T* whh, const T* bias,
                      T forget_bias, T* gates, int64_t gates_group_stride, const T* c_prev, T* c, T* m, int64_t k,
                      int64_t batch, int64_t pk_in, int64_t pk, int64_t nk, int64_t n) {
  constexpr int64_t W = FusedVector<T>::width;
  const int64_t vectors = nk / W;
  at::parallel_for(0, k * vectors, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t j = item / vectors, col = (item % vectors) * W;
      const T* wx = wih + j * pk_in * 4 * nk;
      const T* wh = whh + j * pk * 4 * nk;
      const T* bj = bias + j * nk;
      T* gj = gates + j * gates_group_stride;
      const int64_t cell = j * nk;
      int64_t b = 0;
      for (; b + kFusedRows <= batch; b += kFusedRows) {
        fused_tile<T, kFusedRows>(x + b * ldx + j * pk_in, ldx, pk_in, h + b * ldh + j * pk, ldh, pk, wx, wh, nk, col,
                                  bj, n, forget_bias, gj + b * 4 * nk, c_prev + b * n + cell, c + b * n + cell,
                                  m + b * n + cell, n);
      }
      for (; b < batch; ++b) {
        fused_tile<T, 1>(x + b * ldx + j * pk_in, ldx, pk_in, h + b * ldh + j * pk, ldh, pk, wx, wh, nk, col, bj, n,
                         forget_bias, gj + b * 4 * nk, c_prev + b * n + cell, c + b * n + cell, m + b * n + cell, n);
      }
    }
  });
}

// x (N, p_in) the rows; the layer's weights as they are, w_ih (k, 4nk, p_in/k), w_hh (k, 4nk, pk),
// w_hr (p, n) or None, read through their transposed views as in flstm_forward_scan; bias (4n,) in
// nn.LSTM order (gate-major: group j's part of gate s at s*n + j*nk) or None, and forget_bias, as in
// flstm_forward_scan. Returns out (N, p), the activated gates (k, N, 4nk) (keep; else undefined),
// cells and m as in flstm_forward_scan, and the rows [x^(j); h_{t-1}^(j); 1] (k, N, pk_in + pk + 1)
// where the steps ran the joined product and keep (else undefined). keep = false (inference): gates
// are one step's scratch; cells (B, n) and m (B, n) as in flstm_forward_scan.
std::vector<Tensor> glstm_forward_scan(Tensor x, Tensor w_ih, std::optional<Tensor> bias_opt, double forget_bias,
                                       Tensor w_hh, std::optional<Tensor> w_hr, Tensor h0, Tensor c0,
                                       std::vector<int64_t> batch_sizes, bool keep) {
  check_cpu(x, "x");
  c0 = c0.contiguous();
  const bool copy = step_weights_row_major(batch_sizes);
  const std::optional<Tensor> proj_t = step_projection(w_hr, copy);
  const int64_t k = w_ih.size(0), rows = x.size(0), four_nk = w_ih.size(1), n = c0.size(1), nk = n / k;
  const int64_t num_gates = gate_count(four_nk * k, n);
  const int64_t batch = h0.size(0), p = h0.size(1), pk = p / k, pk_in = x.size(1) / k;
  Tensor gates = empty_buffer({k, keep ? rows : batch, four_nk}, x);
  const Tensor bias = gate_bias(bias_opt, num_gates, n, x);
  const std::vector<int64_t> starts = step_starts(batch_sizes, batch, rows);
  const int64_t group_stride = gates.stride(0);
  const bool proj = proj_t.has_value();
  StateBuffers s = state_buffers(x, rows, batch, n, p, proj, c0, keep);
  const int64_t chunk = gate_chunk(k, batch * four_nk * x.element_size());
  Tensor pre_store;  // the unfused step's scratch (allocated below when a step needs it)
  Tensor operand;   // the joined product's [x; h_{t-1}; 1] rows (see kGateChunkBytes)
  Tensor h = h0;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "glstm_forward_scan", [&] {
    // h's rows are h0's or out's, contiguous; x's may be a strided view of the caller's input
    const bool fused = fused_step_applies<scalar_t>(num_gates, nk, pk_in + pk, batch, copy) && x.stride(1) == 1 &&
                       h0.stride(1) == 1;
    const bool joined = copy && !fused;
    Tensor wih_t, whh_t, w_joined;  // the step weights: W_ih^T and W_hh^T, or [W_ih^T; W_hh^T] (k, pk_in + pk, 4nk)
    if (joined) {
      w_joined = at::cat({w_ih.transpose(1, 2), w_hh.transpose(1, 2)}, 1);
      operand = empty_buffer({k, rows, pk_in + pk + 1}, x);
      if (x.stride(1) == 1) {
        move_grouped(x, operand, GroupedMove::kToGroups);
      } else {
        operand.narrow(2, 0, pk_in).copy_(grouped(x, k));
      }
      operand.select(2, pk_in + pk).fill_(1);
    } else {
      wih_t = step_weight(w_ih.transpose(1, 2), copy);
      whh_t = step_weight(w_hh.transpose(1, 2), copy);
    }
    if (!fused) pre_store = at::empty({chunk * batch * four_nk}, x.options());
    scalar_t* cells = s.cells.data_ptr<scalar_t>();
    for (size_t t = 0; t < batch_sizes.size(); ++t) {
      const int64_t start = starts[t], size = batch_sizes[t];
      const StepRows at = step_rows(starts, batch, t, keep, proj);
      Tensor m_t = s.m.narrow(0, at.m, size), out_t = s.out.narrow(0, start, size);
      const scalar_t* c_prev = previous_cells(c0, cells, at, n, keep, t);
      Tensor x_t = x.narrow(0, start, size), h_t = h.narrow(0, 0, size);
      if (fused) {
        fused_glstm_step<scalar_t>(x_t.data_ptr<scalar_t>(), x_t.stride(0), h_t.data_ptr<scalar_t>(), h_t.stride(0),
                                   wih_t.data_ptr<scalar_t>(), whh_t.data_ptr<scalar_t>(), bias.data_ptr<scalar_t>(),
                                   scalar_t(forget_bias), gates.data_ptr<scalar_t>() + (keep ? start : 0) * four_nk,
                                   group_stride, c_prev, cells + at.c * n, m_t.data_ptr<scalar_t>(), k, size, pk_in,
                                   pk, nk, n);
        if (proj) matmul_into(out_t, m_t, *proj_t, false);
        h = out_t;
        continue;
      }
      Tensor xh_t;  // (k, B_t, pk_in + pk): the step's [x^(j); h_{t-1}^(j)] rows (joined)
      if (joined) {
        Tensor rows_t = operand.narrow(1, start, size);
        move_grouped(h_t, rows_t.narrow(2, pk_in, pk), GroupedMove::kToGroups);  // h's rows: h0's or out's, contiguous
        xh_t = rows_t.narrow(2, 0, pk_in + pk);
      }
      for (int64_t j = 0; j < k; j += chunk) {
        const int64_t kc = std::min(chunk, k - j);
        Tensor pre = pre_store.narrow(0, 0, kc * size * four_nk).view({kc, size, four_nk});  // contiguous
        if (joined) {
          batched_matmul_into(pre, xh_t.narrow(0, j, kc), w_joined.narrow(0, j, kc));
        } else {
          batched_matmul_into(pre, grouped(x_t.narrow(1, j * pk_in, kc * pk_in), kc), wih_t.narrow(0, j, kc));
          batched_matmul_into(pre, grouped(h_t.narrow(1, j * pk, kc * pk), kc), whh_t.narrow(0, j, kc), true);
        }
        scalar_t* g = gates.data_ptr<scalar_t>() + j * group_stride + (keep ? start : 0) * four_nk;
        cell_forward<scalar_t>(pre.data_ptr<scalar_t>(), size * four_nk, bias.data_ptr<scalar_t>() + j * nk, nk, n,
                               scalar_t(forget_bias), g, group_stride, c_prev + j * nk, cells + at.c * n + j * nk,
                               m_t.data_ptr<scalar_t>() + j * nk, kc, size, nk, n, num_gates);
      }
      if (proj) matmul_into(out_t, m_t, *proj_t, false);
      h = out_t;
    }
  });
  return {s.out, kept(gates, keep), s.cells, kept(s.m, keep), kept(operand, keep)};
}


// wih (k, 4nk, p_in/k), given when dL/dx is wanted: then each step's one bmm multiplies its dgates
// by [W_hh | W_ih] (k, 4nk, pk + p_in/k), giving dL/dh_{t-1} and the step's rows of dL/dx together
// while the step's dgates are still in cache. Computing dL/dx afterwards, as one bmm over all rows,
// read the whole (k, N, 4nk) dgates back from memory: G-LSTM k=8 p=256 n=2048 B=128, the two
// products took 25.5 ms per backward that way and 19.8 ms this way; k=2 87.8 -> 69.0 ms.
// operand: the forward's rows [x^(j); h_{t-1}^(j); 1] (k, N, w) (glstm_forward_scan's last result),
// given when the weight gradients are wanted: then they are summed here, every few steps
// (kWeightGradRows), from a ring of the last steps' dgates, and returned as (k, w, 4nk) (rows
// [dL/dW_ih^T; dL/dW_hh^T; dL/dbias]); dgates is not returned. Without it, dgates (k, N, 4nk) is,
// for the caller's one product over all rows.
std::vector<Tensor> glstm_backward_scan(Tensor dout, Tensor dh_last, Tensor dc_last, Tensor gates, Tensor cells,
                                        Tensor whh, std::optional<Tensor> wih, std::optional<Tensor> proj,
                                        std::vector<int64_t> batch_sizes, std::optional<Tensor> operand) {
  check_cpu(gates, "gates");
  TORCH_CHECK(gates.is_contiguous(), "factorlm scan: gates must be contiguous");
  const int64_t k = gates.size(0), rows = gates.size(1), four_nk = gates.size(2), n = dc_last.size(1), nk = n / k;
  const int64_t num_gates = gate_count(four_nk * k, n);
  const int64_t batch = dh_last.size(0), p = dh_last.size(1), pk = p / k;
  const std::vector<int64_t> starts = step_starts(batch_sizes, batch, rows);
  const int64_t steps = static_cast<int64_t>(batch_sizes.size());
  const int64_t group_stride = gates.stride(0);
  const bool input_grad = wih.has_value();
  const int64_t pk_in = input_grad ? wih->size(2) : 0, width = pk + pk_in;
  const bool ring = operand.has_value();
  TORCH_CHECK(!ring || (operand->size(0) == k && operand->size(1) == rows && operand->stride(2) == 1),
              "factorlm scan: operand must be (k, N, w) rows of unit column stride");
  WeightGradBlocks block(ring, starts, batch);
  Tensor weights = input_grad ? at::cat({whh, *wih}, 2) : whh;  // (k, 4nk, pk + pk_in)
  Tensor dx = input_grad ? empty_buffer({rows, k * pk_in}, gates) : Tensor();
  Tensor dgates = ring ? empty_buffer({k, block.ring_rows(), four_nk}, gates) : empty_buffer(gates.sizes(), gates);
  Tensor weight_grads = ring ? at::empty({k, operand->size(2), four_nk}, gates.options()) : Tensor();
  Tensor dh = empty_buffer(dout.sizes(), dout);
  Tensor dm = proj.has_value() ? at::empty({batch, n}, gates.options()) : Tensor();
  Tensor rec_store = at::empty({k * batch * width}, gates.options());  // each step's (k, B_t, pk [+ pk_in])
  Tensor dh_rec;
  Tensor dc = dc_last.clone();  // rows of sequences that have not started (backwards) keep dL/dc_T
  ending_rows_grad(dh, dout, dh_last, starts[steps - 1], batch_sizes[steps - 1], 0);
  AT_DISPATCH_FLOATING_TYPES(gates.scalar_type(), "glstm_backward_scan", [&] {
    scalar_t* c = cells.data_ptr<scalar_t>();
    for (int64_t t = steps - 1; t >= 0; --t) {
      const int64_t start = starts[t], size = batch_sizes[t];
      block.enter(t);
      Tensor dh_t = dh.narrow(0, start, size);
      Tensor dm_t = projection_input_grad(dh_t, dm, proj);
      Tensor dgates_t = dgates.narrow(1, block.row(t), size);  // (k, B_t, 4nk)
      cell_backward<scalar_t>(gates.data_ptr<scalar_t>() + start * four_nk, group_stride,
                              c + cells_before(starts, batch, t) * n, c + (batch + start) * n,
                              dm_t.data_ptr<scalar_t>(), dc.data_ptr<scalar_t>(), dgates_t.data_ptr<scalar_t>(),
                              dgates.stride(0), k, size, nk, num_gates);
      Tensor products = rec_store.narrow(0, 0, k * size * width).view({k, size, width});
      at::bmm_out(products, dgates_t, weights);
      dh_rec = products.narrow(2, 0, pk);
      if (input_grad) move_grouped(dx.narrow(0, start, size), products.narrow(2, pk, pk_in), GroupedMove::kFromGroups);
      if (t > 0) grouped_previous_step_grad(dh, dout, dh_last, dh_rec, starts, batch_sizes, t, k);
      if (block.complete(t)) {  // the block's rows [x; h; 1]^T · its dgates
        Tensor block_operand = operand->narrow(1, block.first_row(), block.rows()).transpose(1, 2);
        Tensor block_dgates = dgates.narrow(1, 0, block.rows());
        if (block.first_summed()) {
          at::bmm_out(weight_grads, block_operand, block_dgates);
        } else {
          weight_grads.baddbmm_(block_operand, block_dgates);
        }
      }
    }
  });
  return {ring ? Tensor() : dgates, dh, dh_rec.transpose(0, 1).reshape({batch, p}), dc, dx, weight_grads};
}

// G∘F-LSTM (groups of low rank): F-LSTM's two products per step, each a bmm over the k groups, on
// G-LSTM's gate tiles, so the cell loops are G-LSTM's. Same arguments and results as
// factorlm/ops/_scan_torch.py's gflstm_forward_scan: x (N, p_in) the rows; the layer's weights as
// they are, w1 (k, r, (p_in + p)/k) with group j's columns [x^(j); h^(j)], w2 (k, 4nk, r), w_hr
// (p, n) or None, read through transposed views (row-major copies in a long scan, as
// step_weights_row_major says); bias (4n,) or None in nn.LSTM order and forget_bias as in
// flstm_forward_scan. u = x^(j)·W1x^(j)^T (k, N, r) for all rows first, turned in place into
// z^(j) = W1^(j)·[x^(j); h^(j)] step by step. Nothing of G-LSTM's 4nk × (p_in + p)/k per group is
// formed: a step costs B·r·(pk + 4nk) multiply-adds per group, the point of the cell.
// Returns out (N, p), z (k, N, r), activated gates (k, N, 4nk), cells, m as glstm_forward_scan;
// keep = false (inference): gates and m are one step's scratch, cells (B, n) each sequence's c_T.
std::vector<Tensor> gflstm_forward_scan(Tensor x, Tensor w1, std::optional<Tensor> bias_opt, double forget_bias,
                                        Tensor w2, std::optional<Tensor> w_hr, Tensor h0, Tensor c0,
                                        std::vector<int64_t> batch_sizes, bool keep) {
  check_cpu(x, "x");
  c0 = c0.contiguous();
  const bool copy = step_weights_row_major(batch_sizes);
  const int64_t k = w1.size(0), r = w1.size(1), rows = x.size(0), pk_in = x.size(1) / k;
  const Tensor w1_t = w1.transpose(1, 2);  // (k, (p_in + p)/k, r)
  const Tensor w1x_t = w1_t.narrow(1, 0, pk_in), w1h_t = step_weight(w1_t.narrow(1, pk_in, w1_t.size(1) - pk_in), copy);
  const Tensor w2_t = step_weight(w2.transpose(1, 2), copy);  // (k, r, 4nk)
  const std::optional<Tensor> proj_t = step_projection(w_hr, copy);
  const int64_t four_nk = w2_t.size(2), n = c0.size(1), nk = n / k;
  const int64_t num_gates = gate_count(four_nk * k, n);
  const int64_t batch = h0.size(0), p = h0.size(1);
  Tensor u = empty_buffer({k, rows, r}, x);
  batched_matmul_into(u, grouped(x, k), w1x_t);
  Tensor gates = empty_buffer({k, keep ? rows : batch, four_nk}, x);
  const Tensor bias = gate_bias(bias_opt, num_gates, n, x);
  const std::vector<int64_t> starts = step_starts(batch_sizes, batch, rows);
  const int64_t group_stride = gates.stride(0);
  const bool proj = proj_t.has_value();
  StateBuffers s = state_buffers(x, rows, batch, n, p, proj, c0, keep);
  Tensor h = h0;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "gflstm_forward_scan", [&] {
    scalar_t* cells = s.cells.data_ptr<scalar_t>();
    for (size_t t = 0; t < batch_sizes.size(); ++t) {
      const int64_t start = starts[t], size = batch_sizes[t];
      const StepRows at = step_rows(starts, batch, t, keep, proj);
      Tensor m_t = s.m.narrow(0, at.m, size), out_t = s.out.narrow(0, start, size);
      Tensor z_t = u.narrow(1, start, size), gates_t = gates.narrow(1, keep ? start : 0, size);  // (k, B_t, ·)
      batched_matmul_into(z_t, grouped(h.narrow(0, 0, size), k), w1h_t, true);
      batched_matmul_into(gates_t, z_t, w2_t);
      scalar_t* g = gates_t.data_ptr<scalar_t>();  // the pre-activations, activated in place
      cell_forward<scalar_t>(g, group_stride, bias.data_ptr<scalar_t>(), nk, n, scalar_t(forget_bias), g,
                             group_stride, previous_cells(c0, cells, at, n, keep, t), cells + at.c * n,
                             m_t.data_ptr<scalar_t>(), k, size, nk, n, num_gates);
      if (proj) matmul_into(out_t, m_t, *proj_t, false);
      h = out_t;
    }
  });
  return {s.out, kept(u, keep), kept(gates, keep), s.cells, kept(s.m, keep)};
}

// Backward of gflstm_forward_scan through time, as _scan_torch.py's gflstm_backward_scan: dout (N, p),
// dh_last (B, p), dc_last (B, n); gates (k, N, 4nk), cells from the forward; w1h (k, r, pk) the
// recurrent columns of W1, w2 (k, 4nk, r), proj = W_hr (p, n) or None. Per step the cell's backward
// into dgates (k, B_t, 4nk), then dz = dgates·W2 (k, B_t, r) and dL/dh_{t-1} = dz·W1h. Returns dgates,
// dz (k, N, r), dh (N, p) = total dL/dh_t, dh0 (B, p), dc0 (B, n); W1's gradient and dL/dx are the
// caller's products over all rows. z (k, N, r), the forward's W1·[x; h] rows, given when dL/dW2 or
// dL/dbias is wanted: then both are summed here from a ring of a few steps' dgates, as in
// flstm_backward_scan, and returned, dL/dW2 transposed (k, r, 4nk: the narrow side as rows, see
// factorlm/ops/_function.py NARROW_WEIGHT_GRAD) and Σ_rows dgates (k, 4nk); dgates is then not.
std::vector<Tensor> gflstm_backward_scan(Tensor dout, Tensor dh_last, Tensor dc_last, Tensor gates, Tensor cells,
                                         Tensor w1h, Tensor w2, std::optional<Tensor> proj,
                                         std::vector<int64_t> batch_sizes, std::optional<Tensor> z) {
  check_cpu(gates, "gates");
  TORCH_CHECK(gates.is_contiguous(), "factorlm scan: gates must be contiguous");
  const int64_t k = gates.size(0), rows = gates.size(1), four_nk = gates.size(2), n = dc_last.size(1), nk = n / k;
  const int64_t num_gates = gate_count(four_nk * k, n);
  const int64_t batch = dh_last.size(0), p = dh_last.size(1), pk = p / k, r = w2.size(2);
  const std::vector<int64_t> starts = step_starts(batch_sizes, batch, rows);
  const int64_t steps = static_cast<int64_t>(batch_sizes.size());
  const int64_t group_stride = gates.stride(0);
  const bool ring = z.has_value();
  TORCH_CHECK(!ring || (z->size(0) == k && z->size(1) == rows), "factorlm scan: z must be (k, N, r)");
  WeightGradBlocks block(ring, starts, batch);
  Tensor dgates = ring ? empty_buffer({k, block.ring_rows(), four_nk}, gates) : empty_buffer(gates.sizes(), gates);
  Tensor dw2_t = ring ? at::empty({k, r, four_nk}, gates.options()) : Tensor();
  Tensor bias_sums = ring ? at::empty({k, four_nk}, gates.options()) : Tensor();
  Tensor dz = empty_buffer({k, rows, r}, gates);
  Tensor dh = empty_buffer(dout.sizes(), dout);
  Tensor dm = proj.has_value() ? at::empty({batch, n}, gates.options()) : Tensor();
  Tensor rec_store = at::empty({k * batch * pk}, gates.options());  // each step's (k, B_t, pk) dL/dh_{t-1}
  Tensor dh_rec;
  Tensor dc = dc_last.clone();  // rows of sequences that have not started (backwards) keep dL/dc_T
  ending_rows_grad(dh, dout, dh_last, starts[steps - 1], batch_sizes[steps - 1], 0);
  AT_DISPATCH_FLOATING_TYPES(gates.scalar_type(), "gflstm_backward_scan", [&] {
    scalar_t* c = cells.data_ptr<scalar_t>();
    for (int64_t t = steps - 1; t >= 0; --t) {
      const int64_t start = starts[t], size = batch_sizes[t];
      block.enter(t);
      Tensor dh_t = dh.narrow(0, start, size);
      Tensor dm_t = projection_input_grad(dh_t, dm, proj);
      Tensor dgates_t = dgates.narrow(1, block.row(t), size);  // (k, B_t, 4nk)
      Tensor dz_t = dz.narrow(1, start, size);
      cell_backward<scalar_t>(gates.data_ptr<scalar_t>() + start * four_nk, group_stride,
                              c + cells_before(starts, batch, t) * n, c + (batch + start) * n,
                              dm_t.data_ptr<scalar_t>(), dc.data_ptr<scalar_t>(), dgates_t.data_ptr<scalar_t>(),
                              dgates.stride(0), k, size, nk, num_gates);
      batched_matmul_into(dz_t, dgates_t, w2);
      dh_rec = rec_store.narrow(0, 0, k * size * pk).view({k, size, pk});
      batched_matmul_into(dh_rec, dz_t, w1h);
      if (t > 0) grouped_previous_step_grad(dh, dout, dh_last, dh_rec, starts, batch_sizes, t, k);
      if (block.complete(t)) {  // the block's z^T · dgates, and the dgates' column sums
        Tensor block_dgates = dgates.narrow(1, 0, block.rows());
        Tensor block_z = z->narrow(1, block.first_row(), block.rows()).transpose(1, 2);
        if (block.first_summed()) {
          at::bmm_out(dw2_t, block_z, block_dgates);
          at::sum_out(bias_sums, block_dgates, 1);
        } else {
          dw2_t.baddbmm_(block_z, block_dgates);
          bias_sums.add_(block_dgates.sum(1));
        }
      }
    }
  });
  return {ring ? Tensor() : dgates, dz, dh, dh_rec.transpose(0, 1).reshape({batch, p}), dc, dw2_t, bias_sums};
}
