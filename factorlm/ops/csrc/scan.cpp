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
// Gates of one step: k groups of B_t rows of 4·nk values in the internal order [i, f, o, g]
// (F-LSTM: k = 1); cell states and m in the layer's (rows, n) layout, cell j*nk + mm of row b at
// b*n + j*nk + mm.

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

// One step forward. Row (j, b) = group j, batch row b; its 4·nk pre-activations [i f o g] are
// pre[j*pre_group_stride + b*4*nk + ...] (the recurrent GEMM's result) + the bias
// bias[j*bias_group_stride + ...] + (kHasInput) the input-side term
// input[j*input_group_stride + b*4*nk + ...]. The activated gates are written to
// gates[j*gates_group_stride + b*4*nk + ...], which may be the same memory as pre or input:
// every element is read before it is written in the same iteration, and `omp simd` (not
// __restrict__) is what licenses the vectorisation. Likewise c may be c_prev (the inference scans
// update one (B, n) cell-state tile in place). Adding bias and input here rather than in the
// GEMM avoids addmm's β·C copy of a B×4n tile, and lets G-LSTM's GEMM write a small contiguous
// scratch (one MKL batched call; an in-place baddbmm_ into the strided input buffer falls back
// to one GEMM per group). Then c = σf·c_prev + σi·tanh g; m = σo·tanh(c). tanh(c) is not
// stored: the backward recomputes it from c, cheaper than writing and re-reading a (B, n) tile.
// c_prev, c and m have rows of n values (n >= k·nk: a chunk of groups may be a layer's part).
template <typename T, bool kHasInput>
void cell_forward(const T* pre, int64_t pre_group_stride, const T* input, int64_t input_group_stride, const T* bias,
                  int64_t bias_group_stride, T* gates, int64_t gates_group_stride, const T* c_prev, T* c, T* m,
                  int64_t k, int64_t batch, int64_t nk, int64_t n) {
  at::parallel_for(0, k * batch, row_grain(nk), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t j = row / batch, b = row % batch;
      const T* p = pre + j * pre_group_stride + b * 4 * nk;
      const T* x = kHasInput ? input + j * input_group_stride + b * 4 * nk : p;
      const T* __restrict__ bb = bias + j * bias_group_stride;
      T* gt = gates + j * gates_group_stride + b * 4 * nk;
      const int64_t off = b * n + j * nk;
      const T* cp = c_prev + off;  // may be c itself (inference keeps one cell-state tile): read, then written
      T* cc = c + off;
      T* __restrict__ mm_ = m + off;
#pragma omp simd
      for (int64_t q = 0; q < nk; ++q) {
        T zi = p[q] + bb[q], zf = p[nk + q] + bb[nk + q];
        T zo = p[2 * nk + q] + bb[2 * nk + q], zg = p[3 * nk + q] + bb[3 * nk + q];
        if (kHasInput) {
          zi += x[q];
          zf += x[nk + q];
          zo += x[2 * nk + q];
          zg += x[3 * nk + q];
        }
        const T i = sigmoid(zi), f = sigmoid(zf), o = sigmoid(zo), g = tanh_(zg);
        gt[q] = i;
        gt[nk + q] = f;
        gt[2 * nk + q] = o;
        gt[3 * nk + q] = g;
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
template <typename T>
void cell_backward(const T* gates, int64_t gates_group_stride, const T* c_prev, const T* c, const T* dm, T* dc,
                   T* dgates, int64_t dgates_group_stride, int64_t k, int64_t batch, int64_t nk) {
  const int64_t n = k * nk;
  at::parallel_for(0, k * batch, row_grain(nk), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t j = row / batch, b = row % batch;
      const T* __restrict__ gi = gates + j * gates_group_stride + b * 4 * nk;
      const T* __restrict__ gf = gi + nk;
      const T* __restrict__ go = gi + 2 * nk;
      const T* __restrict__ gg = gi + 3 * nk;
      T* __restrict__ di = dgates + j * dgates_group_stride + b * 4 * nk;
      T* __restrict__ df = di + nk;
      T* __restrict__ d_o = di + 2 * nk;
      T* __restrict__ dg = di + 3 * nk;
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
// Up to kSmallRows rows, with b row-major (K, N) and at most kSmallWeights elements (in cache),
// the product is this loop instead: each row of out is built from K contiguous, vectorised
// axpys over b's rows. Larger products, and weights in any other layout (the training path passes
// transposed views), go to ATen as before. Only the inference path caches its weights row-major.
constexpr int64_t kSmallRows = 4;
constexpr int64_t kSmallWeights = int64_t(1) << 17;  // = SMALL_WEIGHTS in factorlm/ops/_function.py

inline bool small_product(const Tensor& a, const Tensor& b, const Tensor& out) {
  return a.size(-2) <= kSmallRows && a.stride(-1) == 1 && out.stride(-1) == 1 && b.stride(-1) == 1 &&
         b.stride(-2) == b.size(-1) && b.size(-2) * b.size(-1) <= kSmallWeights;
}

// out (M, N) (+)= a (M, K)·b (K, N): rows of a and out at strides lda and ldo, b contiguous.
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

// out = a·b, or out += a·b with accumulate; a (M, K), b (K, N), out (M, N).
void matmul_into(Tensor& out, const Tensor& a, const Tensor& b, bool accumulate) {
  if (!small_product(a, b, out)) {
    if (accumulate) {
      out.addmm_(a, b);
    } else {
      at::mm_out(out, a, b);
    }
    return;
  }
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "small_rows_product", [&] {
    small_rows_product<scalar_t>(out.data_ptr<scalar_t>(), out.stride(0), a.data_ptr<scalar_t>(), a.stride(0),
                                 b.data_ptr<scalar_t>(), a.size(0), a.size(1), b.size(1), accumulate);
  });
}

// out = bmm(a, b), or out += bmm(a, b) with accumulate: a (k, M, K), b (k, K, N), out (k, M, N)
// contiguous; small products group by group.
void batched_matmul_into(Tensor& out, const Tensor& a, const Tensor& b, bool accumulate = false) {
  if (!small_product(a, b, out) || b.stride(0) != b.size(1) * b.size(2)) {
    if (accumulate) {
      out.baddbmm_(a, b);
    } else {
      at::bmm_out(out, a, b);
    }
    return;
  }
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "small_rows_product", [&] {
    for (int64_t j = 0; j < a.size(0); ++j) {
      small_rows_product<scalar_t>(out.data_ptr<scalar_t>() + j * out.stride(0), out.stride(1),
                                   a.data_ptr<scalar_t>() + j * a.stride(0), a.stride(1),
                                   b.data_ptr<scalar_t>() + j * b.stride(0), a.size(1), a.size(2), b.size(2),
                                   accumulate);
    }
  });
}

// Buffers of the whole sequence are tens of MB, and fresh memory costs a page fault per page and
// the kernel's zeroing on first touch, more or less of it depending on what ran before (glibc
// returns freed heap to the kernel): factorlm/ops/_memory.py says how much. Buffers of at least
// kPoolMinBytes (= POOL_MIN_BYTES there) come from its pool, shared with the PyTorch loop, which
// reuses them once nothing refers to them; smaller ones glibc's heap serves without faults. The
// call into Python costs a few µs, a handful of times per layer call, never for batch-1 tokens.
constexpr int64_t kPoolMinBytes = int64_t(1) << 20;

Tensor empty_buffer(at::IntArrayRef sizes, const Tensor& like) {
  const int64_t bytes = c10::multiply_integers(sizes) * like.element_size();
  if (bytes < kPoolMinBytes || !like.device().is_cpu()) return at::empty(sizes, like.options());
  // never destroyed: a py::object must not outlive the interpreter's shutdown
  static py::object* pooled_empty = new py::object(py::module_::import("factorlm.ops._memory").attr("empty"));
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

// dL/dh of the rows [following, size) of the step starting at row `start`, whose sequences end at that
// step: dout + dL/dh_T, and no recurrent term.
void ending_rows_grad(Tensor& dh, const Tensor& dout, const Tensor& dh_last, int64_t start, int64_t size,
                      int64_t following) {
  if (size <= following) return;
  Tensor rows = dh.narrow(0, start + following, size - following);
  at::add_out(rows, dout.narrow(0, start + following, size - following), dh_last.narrow(0, following, size - following));
}

}  // namespace

// x (N, p_in) the rows; u (N, r) = x·W1x^T, one GEMM over all rows, is turned in place into
// z = W1·[x; h] (a second buffer would cost page faults).
// keep = false (inference): nothing whole-sequence but out and z; gates and m are one step's scratch and
// the returned cells are (B, n), each sequence's c_T.
std::vector<Tensor> flstm_forward_scan(Tensor x, Tensor w1x_t, Tensor bias, Tensor w1h_t, Tensor w2_t,
                                       std::optional<Tensor> proj_t, Tensor h0, Tensor c0,
                                       std::vector<int64_t> batch_sizes, bool keep) {
  check_cpu(x, "x");
  c0 = c0.contiguous();
  Tensor u = empty_buffer({x.size(0), w1x_t.size(1)}, x);
  matmul_into(u, x, w1x_t, false);
  bias = bias.contiguous();
  const int64_t rows = u.size(0), batch = h0.size(0), n = w2_t.size(1) / 4, p = h0.size(1);
  const std::vector<int64_t> starts = step_starts(batch_sizes, batch, rows);
  const bool proj = proj_t.has_value();
  StateBuffers s = state_buffers(u, rows, batch, n, p, proj, c0, keep);
  Tensor gates = empty_buffer({keep ? rows : batch, 4 * n}, u);
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
      cell_forward<scalar_t, false>(g, 0, nullptr, 0, bias.data_ptr<scalar_t>(), 0, g, 0,
                                    previous_cells(c0, cells, at, n, keep, t), cells + at.c * n,
                                    m_t.data_ptr<scalar_t>(), 1, size, n, n);
      if (proj) matmul_into(out_t, m_t, *proj_t, false);
      h = out_t;
    }
  });
  return {s.out, kept(u, keep), kept(gates, keep), s.cells, kept(s.m, keep)};
}

std::vector<Tensor> flstm_backward_scan(Tensor dout, Tensor dh_last, Tensor dc_last, Tensor gates, Tensor cells,
                                        Tensor w1h, Tensor w2, std::optional<Tensor> proj,
                                        std::vector<int64_t> batch_sizes) {
  check_cpu(gates, "gates");
  const int64_t rows = gates.size(0), n = gates.size(1) / 4, batch = dh_last.size(0);
  const std::vector<int64_t> starts = step_starts(batch_sizes, batch, rows);
  const int64_t steps = static_cast<int64_t>(batch_sizes.size());
  Tensor dgates = empty_buffer(gates.sizes(), gates);
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
      Tensor dh_t = dh.narrow(0, start, size), dgates_t = dgates.narrow(0, start, size), dz_t = dz.narrow(0, start, size);
      Tensor dm_t = dh_t;
      if (proj.has_value()) {
        dm_t = dm.narrow(0, 0, size);
        at::mm_out(dm_t, dh_t, *proj);
      }
      cell_backward<scalar_t>(gates.data_ptr<scalar_t>() + start * 4 * n, 0, c + cells_before(starts, batch, t) * n,
                              c + (batch + start) * n, dm_t.data_ptr<scalar_t>(), dc.data_ptr<scalar_t>(),
                              dgates_t.data_ptr<scalar_t>(), 0, 1, size, n);
      at::mm_out(dz_t, dgates_t, w2);
      if (t > 0) {  // dL/dh_{t-1} = dout_{t-1} + dz_t·W1h for the rows that go on; + dL/dh_T for those that end
        const int64_t before = starts[t - 1];
        Tensor dh_prev = dh.narrow(0, before, size);
        at::addmm_out(dh_prev, dout.narrow(0, before, size), dz_t, w1h);
        ending_rows_grad(dh, dout, dh_last, before, batch_sizes[t - 1], size);
      } else {
        at::mm_out(dh0, dz_t, w1h);
      }
    }
  });
  return {dgates, dz, dh, dh0, dc};
}

// A G-LSTM step's gate products are narrow (p/k deep) and their output large (B·4n values: 4 MB
// at B = 128, n = 2048), so they and the gate loop are bound by memory. Computing the input side
// for all rows up front (one bmm into a (k, N, 4nk) buffer) left the gate loop waiting on that
// buffer's loads from memory, two fifths of its time. Per step, chunk by chunk of groups whose
// products fit kGateChunkBytes, both products (input and recurrent) are summed into a scratch the
// gate loop then reads from L2: the same GEMM work in twice as many calls, but the only
// whole-sequence traffic left is the activated gates written for the backward. G-LSTM k=8 p=256
// n=2048 B=128, forward 73-77 -> 67-70 ms (one core, AVX-512 Xeon). Small steps (batch-1 generation) stay
// one chunk for all groups.
constexpr int64_t kGateChunkBytes = int64_t(1) << 20;

// How many groups a chunk holds when each group's products are group_bytes.
inline int64_t gate_chunk(int64_t k, int64_t group_bytes) {
  return std::max<int64_t>(1, std::min<int64_t>(k, kGateChunkBytes / std::max<int64_t>(1, group_bytes)));
}

// x (N, p_in) the rows, wih_t (k, p_in/k, 4nk), whh_t (k, p/k, 4nk). Returns out (N, p), the
// activated gates (k, N, 4nk) (keep; else undefined), cells and m as in flstm_forward_scan.
// keep = false (inference): gates are one step's scratch; cells (B, n) and m (B, n) as in
// flstm_forward_scan.
std::vector<Tensor> glstm_forward_scan(Tensor x, Tensor wih_t, Tensor bias, Tensor whh_t, std::optional<Tensor> proj_t,
                                       Tensor h0, Tensor c0, std::vector<int64_t> batch_sizes, bool keep) {
  check_cpu(x, "x");
  c0 = c0.contiguous();
  const int64_t k = wih_t.size(0), rows = x.size(0), four_nk = wih_t.size(2), nk = four_nk / 4, n = nk * k;
  const int64_t batch = h0.size(0), p = h0.size(1), pk = p / k, pk_in = x.size(1) / k;
  Tensor gates = empty_buffer({k, keep ? rows : batch, four_nk}, x);
  bias = bias.contiguous();
  const std::vector<int64_t> starts = step_starts(batch_sizes, batch, rows);
  const int64_t group_stride = gates.stride(0);
  const bool proj = proj_t.has_value();
  StateBuffers s = state_buffers(x, rows, batch, n, p, proj, c0, keep);
  const int64_t chunk = gate_chunk(k, batch * four_nk * x.element_size());
  Tensor pre_store = at::empty({chunk * batch * four_nk}, x.options());
  Tensor h = h0;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "glstm_forward_scan", [&] {
    scalar_t* cells = s.cells.data_ptr<scalar_t>();
    for (size_t t = 0; t < batch_sizes.size(); ++t) {
      const int64_t start = starts[t], size = batch_sizes[t];
      const StepRows at = step_rows(starts, batch, t, keep, proj);
      Tensor m_t = s.m.narrow(0, at.m, size), out_t = s.out.narrow(0, start, size);
      const scalar_t* c_prev = previous_cells(c0, cells, at, n, keep, t);
      Tensor x_t = x.narrow(0, start, size), h_t = h.narrow(0, 0, size);
      for (int64_t j = 0; j < k; j += chunk) {
        const int64_t kc = std::min(chunk, k - j);
        Tensor pre = pre_store.narrow(0, 0, kc * size * four_nk).view({kc, size, four_nk});  // contiguous
        batched_matmul_into(pre, grouped(x_t.narrow(1, j * pk_in, kc * pk_in), kc), wih_t.narrow(0, j, kc));
        batched_matmul_into(pre, grouped(h_t.narrow(1, j * pk, kc * pk), kc), whh_t.narrow(0, j, kc), true);
        scalar_t* g = gates.data_ptr<scalar_t>() + j * group_stride + (keep ? start : 0) * four_nk;
        cell_forward<scalar_t, false>(pre.data_ptr<scalar_t>(), size * four_nk, nullptr, 0,
                                      bias.data_ptr<scalar_t>() + j * four_nk, four_nk, g, group_stride,
                                      c_prev + j * nk, cells + at.c * n + j * nk, m_t.data_ptr<scalar_t>() + j * nk,
                                      kc, size, nk, n);
      }
      if (proj) matmul_into(out_t, m_t, *proj_t, false);
      h = out_t;
    }
  });
  return {s.out, kept(gates, keep), s.cells, kept(s.m, keep)};
}

// wih (k, 4nk, p_in/k), given when dL/dx is wanted: then each step's one bmm multiplies its dgates
// by [W_hh | W_ih] (k, 4nk, pk + p_in/k), giving dL/dh_{t-1} and the step's rows of dL/dx together
// while the step's dgates are still in cache. Computing dL/dx afterwards, as one bmm over all rows,
// read the whole (k, N, 4nk) dgates back from memory: G-LSTM k=8 p=256 n=2048 B=128, the two
// products took 25.5 ms per backward that way and 19.8 ms this way; k=2 87.8 -> 69.0 ms.
std::vector<Tensor> glstm_backward_scan(Tensor dout, Tensor dh_last, Tensor dc_last, Tensor gates, Tensor cells,
                                        Tensor whh, std::optional<Tensor> wih, std::optional<Tensor> proj,
                                        std::vector<int64_t> batch_sizes) {
  check_cpu(gates, "gates");
  TORCH_CHECK(gates.is_contiguous(), "factorlm scan: gates must be contiguous");
  const int64_t k = gates.size(0), rows = gates.size(1), four_nk = gates.size(2), nk = four_nk / 4, n = nk * k;
  const int64_t batch = dh_last.size(0), p = dh_last.size(1), pk = p / k;
  const std::vector<int64_t> starts = step_starts(batch_sizes, batch, rows);
  const int64_t steps = static_cast<int64_t>(batch_sizes.size());
  const int64_t group_stride = gates.stride(0);
  const bool input_grad = wih.has_value();
  const int64_t pk_in = input_grad ? wih->size(2) : 0, width = pk + pk_in;
  Tensor weights = input_grad ? at::cat({whh, *wih}, 2) : whh;  // (k, 4nk, pk + pk_in)
  Tensor dx = input_grad ? empty_buffer({rows, k * pk_in}, gates) : Tensor();
  Tensor dgates = empty_buffer(gates.sizes(), gates);
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
      Tensor dh_t = dh.narrow(0, start, size);
      Tensor dm_t = dh_t;
      if (proj.has_value()) {
        dm_t = dm.narrow(0, 0, size);
        at::mm_out(dm_t, dh_t, *proj);
      }
      Tensor dgates_t = dgates.narrow(1, start, size);  // (k, B_t, 4nk)
      cell_backward<scalar_t>(gates.data_ptr<scalar_t>() + start * four_nk, group_stride,
                              c + cells_before(starts, batch, t) * n, c + (batch + start) * n,
                              dm_t.data_ptr<scalar_t>(), dc.data_ptr<scalar_t>(), dgates_t.data_ptr<scalar_t>(),
                              group_stride, k, size, nk);
      Tensor products = rec_store.narrow(0, 0, k * size * width).view({k, size, width});
      at::bmm_out(products, dgates_t, weights);
      dh_rec = products.narrow(2, 0, pk);
      if (input_grad) grouped(dx.narrow(0, start, size), k).copy_(products.narrow(2, pk, pk_in));
      if (t > 0) {
        const int64_t before = starts[t - 1];
        Tensor dh_prev = grouped(dh.narrow(0, before, size), k);
        at::add_out(dh_prev, grouped(dout.narrow(0, before, size), k), dh_rec);
        ending_rows_grad(dh, dout, dh_last, before, batch_sizes[t - 1], size);
      }
    }
  });
  return {dgates, dh, dh_rec.transpose(0, 1).reshape({batch, p}), dc, dx};
}
