// The element-wise time recurrence of the diagonal LSTM (IndyLSTM), in C++.
//
// Same two functions, signatures and buffer layouts as factorlm/ops/_scan_diagonal.py (read its
// docstring first). This source is compiled into the same module as scan.cpp, after it (one
// translation unit, factorlm/ops/_extension.py), and uses its vectorisable sigmoid / tanh_.
//
// The recurrence is element-wise: cell q of sequence b at step t reads only cell q of sequence b at
// step t-1. So, unlike the F-/G-LSTM scans, the loop over time runs INSIDE each task: a task is
// one sequence b and a run of its cells, and it walks that sequence's steps t = 0 … len_b - 1 (a
// packed batch's sequence b is in the rows of the steps where batch_sizes[t] > b), with no
// synchronisation between steps and one fork for the whole scan. Sequence b's row at step t is
// starts[t] + b.

namespace {

// Cells per task: enough to amortise a task's per-step pointer arithmetic, few enough that a
// small batch still spreads over threads.
constexpr int64_t kDiagonalColumns = 512;

struct DiagonalRows {
  std::vector<int64_t> starts;   // first row of each step
  std::vector<int64_t> lengths;  // steps of each sequence (non-increasing)
};

DiagonalRows diagonal_rows(const std::vector<int64_t>& batch_sizes, int64_t batch, int64_t rows) {
  DiagonalRows r;
  r.starts.reserve(batch_sizes.size());
  int64_t start = 0, previous = batch;
  for (int64_t size : batch_sizes) {
    TORCH_CHECK(size >= 1 && size <= previous, "diagonal scan: batch_sizes must be positive and non-increasing, "
                "starting at most at the batch size ", batch);
    r.starts.push_back(start);
    start += size;
    previous = size;
  }
  TORCH_CHECK(start == rows, "diagonal scan: batch_sizes add up to ", start, " rows, the buffers have ", rows);
  r.lengths.assign(batch, 0);
  for (int64_t size : batch_sizes)
    for (int64_t b = 0; b < size; ++b) ++r.lengths[b];
  return r;
}

void check_diagonal(const Tensor& t, const char* name, const Tensor& like) {
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous() && t.scalar_type() == like.scalar_type(),
              "diagonal scan: ", name, " must be a contiguous CPU tensor of ", like.scalar_type());
}

template <typename T>
void diagonal_forward(T* gates, const T* u, T forget_bias, const T* s0, T* cells, T* m, const DiagonalRows& r,
                      int64_t batch, int64_t n, bool proj) {
  const int64_t chunks = (n + kDiagonalColumns - 1) / kDiagonalColumns;
  const T *ui = u, *uf = u + n, *ug = u + 2 * n, *uo = u + 3 * n;
  at::parallel_for(0, batch * chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / chunks, q0 = (task % chunks) * kDiagonalColumns;
      const int64_t q1 = std::min(n, q0 + kDiagonalColumns);
      for (int64_t t = 0; t < r.lengths[b]; ++t) {
        const int64_t row = r.starts[t] + b;
        T* g = gates + row * 4 * n;
        const T* cp = t == 0 ? cells + b * n : cells + (batch + r.starts[t - 1] + b) * n;
        const T* sp = t == 0 ? s0 + b * n : m + (r.starts[t - 1] + b) * n;  // read only without proj
        const bool from_c = proj && t > 0;
        T* cc = cells + (batch + row) * n;
        T* mm_ = m + row * n;
#pragma omp simd
        for (int64_t q = q0; q < q1; ++q) {
          const T s = from_c ? tanh_(cp[q]) : sp[q];
          const T i = sigmoid(g[q] + ui[q] * s);
          const T f = sigmoid(g[n + q] + uf[q] * s + forget_bias);
          const T gg = tanh_(g[2 * n + q] + ug[q] * s);
          const T o = sigmoid(g[3 * n + q] + uo[q] * s);
          g[q] = i;
          g[n + q] = f;
          g[2 * n + q] = gg;
          g[3 * n + q] = o;
          const T cv = f * cp[q] + i * gg;
          cc[q] = cv;
          mm_[q] = o * tanh_(cv);
        }
      }
    }
  });
}

template <typename T>
void diagonal_backward(const T* dm, T* dc, T* ds, const T* gates, const T* cells, const T* u, T* dpre,
                       const DiagonalRows& r, int64_t batch, int64_t n, bool proj) {
  const int64_t chunks = (n + kDiagonalColumns - 1) / kDiagonalColumns;
  const T *ui = u, *uf = u + n, *ug = u + 2 * n, *uo = u + 3 * n;
  at::parallel_for(0, batch * chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / chunks, q0 = (task % chunks) * kDiagonalColumns;
      const int64_t q1 = std::min(n, q0 + kDiagonalColumns);
      // dc[b] holds dL/dc_T (the sequence's last step) and ds[b] zero on entry; after each step
      // they hold dL/dc_{t-1} and dL/ds_{t-1}
      T* dcb = dc + b * n;
      T* dsb = ds + b * n;
      for (int64_t t = r.lengths[b] - 1; t >= 0; --t) {
        const int64_t row = r.starts[t] + b;
        const T* g = gates + row * 4 * n;
        const T* cp = t == 0 ? cells + b * n : cells + (batch + r.starts[t - 1] + b) * n;
        const T* cc = cells + (batch + row) * n;
        const T* dmr = dm + row * n;
        T* d = dpre + row * 4 * n;
        const bool to_c = proj && t > 0;
#pragma omp simd
        for (int64_t q = q0; q < q1; ++q) {
          const T i = g[q], f = g[n + q], gg = g[2 * n + q], o = g[3 * n + q];
          const T dmt = proj ? dmr[q] : dmr[q] + dsb[q];
          const T tc = tanh_(cc[q]);
          const T dct = dcb[q] + dmt * o * (T(1) - tc * tc);
          const T di = dct * gg * i * (T(1) - i);
          const T df = dct * cp[q] * f * (T(1) - f);
          const T dg = dct * i * (T(1) - gg * gg);
          const T d_o = dmt * tc * o * (T(1) - o);
          d[q] = di;
          d[n + q] = df;
          d[2 * n + q] = dg;
          d[3 * n + q] = d_o;
          const T sg = ui[q] * di + uf[q] * df + ug[q] * dg + uo[q] * d_o;
          T dcp = dct * f;
          if (to_c) {  // s_{t-1} = tanh(c_{t-1})
            const T tp = tanh_(cp[q]);
            dcp += sg * (T(1) - tp * tp);
          } else {  // s_{t-1} = m_{t-1}, or s0
            dsb[q] = sg;
          }
          dcb[q] = dcp;
        }
      }
    }
  });
}

}  // namespace

// z (N, 4n) is overwritten with the activated gates and returned as the first result.
std::vector<Tensor> diagonal_forward_scan(Tensor z, Tensor u, double forget_bias, Tensor s0, Tensor c0,
                                          std::vector<int64_t> batch_sizes, bool proj) {
  check_diagonal(z, "z", z);
  check_diagonal(u, "u", z);
  check_diagonal(s0, "s0", z);
  check_diagonal(c0, "c0", z);
  const int64_t rows = z.size(0), n = z.size(1) / 4, batch = c0.size(0);
  TORCH_CHECK(z.size(1) == 4 * n && u.numel() == 4 * n && c0.size(1) == n && s0.sizes() == c0.sizes(),
              "diagonal scan: z (N, 4n), u (4, n), s0 and c0 (B, n) disagree");
  const DiagonalRows r = diagonal_rows(batch_sizes, batch, rows);
  Tensor cells = at::empty({batch + rows, n}, z.options());
  cells.narrow(0, 0, batch).copy_(c0);
  Tensor m = at::empty({rows, n}, z.options());
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "diagonal_forward_scan", [&] {
    diagonal_forward<scalar_t>(z.data_ptr<scalar_t>(), u.data_ptr<scalar_t>(), static_cast<scalar_t>(forget_bias),
                               s0.data_ptr<scalar_t>(), cells.data_ptr<scalar_t>(), m.data_ptr<scalar_t>(), r, batch,
                               n, proj);
  });
  return {z, cells, m};
}

std::vector<Tensor> diagonal_backward_scan(Tensor dm, Tensor dc_last, Tensor gates, Tensor cells, Tensor u,
                                           std::vector<int64_t> batch_sizes, bool proj) {
  check_diagonal(gates, "gates", gates);
  check_diagonal(dm, "dm", gates);
  check_diagonal(dc_last, "dc_last", gates);
  check_diagonal(cells, "cells", gates);
  check_diagonal(u, "u", gates);
  const int64_t rows = gates.size(0), n = gates.size(1) / 4, batch = dc_last.size(0);
  TORCH_CHECK(dm.size(0) == rows && dm.size(1) == n && cells.size(0) == batch + rows && cells.size(1) == n &&
                  u.numel() == 4 * n,
              "diagonal scan: dm (N, n), cells (B + N, n), u (4, n) disagree with gates (N, 4n)");
  const DiagonalRows r = diagonal_rows(batch_sizes, batch, rows);
  Tensor dpre = at::empty({rows, 4 * n}, gates.options());
  Tensor dc = dc_last.clone();
  Tensor ds = at::zeros({batch, n}, gates.options());
  AT_DISPATCH_FLOATING_TYPES(gates.scalar_type(), "diagonal_backward_scan", [&] {
    diagonal_backward<scalar_t>(dm.data_ptr<scalar_t>(), dc.data_ptr<scalar_t>(), ds.data_ptr<scalar_t>(),
                                gates.data_ptr<scalar_t>(), cells.data_ptr<scalar_t>(), u.data_ptr<scalar_t>(),
                                dpre.data_ptr<scalar_t>(), r, batch, n, proj);
  });
  return {dpre, ds, dc};
}
