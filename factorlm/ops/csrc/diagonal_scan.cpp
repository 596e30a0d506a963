// The element-wise time recurrence of the diagonal LSTM (IndyLSTM), in C++.
//
// Same two functions, signatures and buffer layouts as factorlm/ops/_scan_diagonal.py (read its
// docstring first). This source is compiled into the same module as scan.cpp, after it (one
// translation unit, factorlm/ops/_extension.py), and uses its vectorisable sigmoid / tanh_.
//
// The recurrence is element-wise: cell q of sequence b at step t reads only cell q of sequence b at
// step t-1. So, unlike the F-/G-LSTM scans, the loop over time runs INSIDE each task: a task is a
// block of consecutive sequences (and, when there are fewer sequences than threads, a run of their
// cells), and it walks all of its steps on its own, with no synchronisation between steps and one
// fork for the whole scan. Within a step a task reads and writes its sequences' rows, which are
// consecutive (step t's rows are starts[t] ... starts[t] + batch_sizes[t] - 1, sequence b at
// starts[t] + b), so each step is a few long contiguous streams. (A first version gave each task
// ONE sequence's run of 512 cells through all steps: its 2 KB pieces of rows a megabyte apart ran
// at a quarter of the copy bandwidth, half the speed of the PyTorch loop's whole-step kernels.)
//
// Coupled input and forget gates (CIFG): G = 3 gate blocks [i, g, o] instead of 4, read off the
// shapes (z (N, G·n), u (G, n), n from c0 / dc_last), the template flag Coupled: i = σ(a_i − b_f),
// c = c_prev + i·(g − c_prev); backward dL/da_i = dc·(g − c_prev)·i(1 − i), dL/dc_prev = dc·(1 − i).

namespace {

struct DiagonalRows {
  std::vector<int64_t> starts;  // first row of each step
  std::vector<int64_t> sizes;   // rows of each step (non-increasing)
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
  r.sizes = batch_sizes;
  return r;
}

// How the scan is split: sequence blocks of `per_block` sequences times column runs of `width`
// cells. Column runs only where there are fewer sequences than threads (e.g. batch 1), and never
// narrower than 64 cells.
struct DiagonalTasks {
  int64_t per_block, blocks, width, chunks;
};

DiagonalTasks diagonal_tasks(int64_t batch, int64_t n) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  DiagonalTasks k;
  k.per_block = (batch + threads - 1) / threads;
  k.blocks = (batch + k.per_block - 1) / k.per_block;
  k.chunks = std::max<int64_t>(1, std::min<int64_t>(threads / k.blocks, n / 64));
  k.width = (n + k.chunks - 1) / k.chunks;
  return k;
}

// Runs fn(b0, b1, q0, q1) for every task, in parallel: sequences [b0, b1), cells [q0, q1).
template <typename F>
void for_each_task(int64_t batch, int64_t n, const F& fn) {
  const DiagonalTasks k = diagonal_tasks(batch, n);
  at::parallel_for(0, k.blocks * k.chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t block = task / k.chunks, chunk = task % k.chunks;
      const int64_t b0 = block * k.per_block, q0 = chunk * k.width;
      fn(b0, std::min(batch, b0 + k.per_block), q0, std::min(n, q0 + k.width));
    }
  });
}

void check_diagonal(const Tensor& t, const char* name, const Tensor& like) {
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous() && t.scalar_type() == like.scalar_type(),
              "diagonal scan: ", name, " must be a contiguous CPU tensor of ", like.scalar_type());
}

// One row of the forward: g (G·n) pre-activations in, activated gates out; s the recurrent input,
// read as tanh(c_prev) when FromC (a layer with a projection, t > 0), else from sp. Coupled: G = 3,
// [i, g, o] (uf unused), forget_bias lowering i.
template <typename T, bool FromC, bool Coupled>
inline void forward_row(T* g, const T* ui, const T* uf, const T* ug, const T* uo, T forget_bias, const T* sp,
                        const T* cp, T* cc, T* mm_, int64_t n, int64_t q0, int64_t q1) {
  constexpr int64_t G = Coupled ? 3 : 4;
  const int64_t og = (G - 2) * n, oo = (G - 1) * n;  // where g and o sit in the row
#pragma omp simd
  for (int64_t q = q0; q < q1; ++q) {
    const T s = FromC ? tanh_(cp[q]) : sp[q];
    const T gg = tanh_(g[og + q] + ug[q] * s);
    const T o = sigmoid(g[oo + q] + uo[q] * s);
    T cv;
    if constexpr (Coupled) {
      const T i = sigmoid(g[q] + ui[q] * s - forget_bias);
      g[q] = i;
      cv = cp[q] + i * (gg - cp[q]);
    } else {
      const T i = sigmoid(g[q] + ui[q] * s);
      const T f = sigmoid(g[n + q] + uf[q] * s + forget_bias);
      g[q] = i;
      g[n + q] = f;
      cv = f * cp[q] + i * gg;
    }
    g[og + q] = gg;
    g[oo + q] = o;
    cc[q] = cv;
    mm_[q] = o * tanh_(cv);
  }
}

template <typename T, bool Coupled>
void diagonal_forward(T* gates, const T* u, T forget_bias, const T* s0, T* cells, T* m, const DiagonalRows& r,
                      int64_t batch, int64_t n, bool proj) {
  constexpr int64_t G = Coupled ? 3 : 4;
  const T *ui = u, *uf = u + n, *ug = u + (G - 2) * n, *uo = u + (G - 1) * n;
  for_each_task(batch, n, [&](int64_t b0, int64_t b1, int64_t q0, int64_t q1) {
    for (size_t t = 0; t < r.sizes.size(); ++t) {
      const int64_t end = std::min(b1, r.sizes[t]);
      if (end <= b0) break;  // the block's sequences have all ended
      for (int64_t b = b0; b < end; ++b) {
        const int64_t row = r.starts[t] + b;
        const int64_t prev = t == 0 ? b : batch + r.starts[t - 1] + b;  // c_{t-1}'s row of cells
        const T* sp = t == 0 ? s0 + b * n : m + (r.starts[t - 1] + b) * n;
        T* g = gates + row * G * n;
        T* cc = cells + (batch + row) * n;
        if (proj && t > 0)
          forward_row<T, true, Coupled>(g, ui, uf, ug, uo, forget_bias, sp, cells + prev * n, cc, m + row * n, n, q0,
                                        q1);
        else
          forward_row<T, false, Coupled>(g, ui, uf, ug, uo, forget_bias, sp, cells + prev * n, cc, m + row * n, n, q0,
                                         q1);
      }
    }
  });
}

// One row of the backward; dcb / dsb: the sequence's carried dL/dc and dL/ds, updated in place.
// ToC: s_{t-1} = tanh(c_{t-1}) (a layer with a projection, t > 0), so dL/ds goes to dL/dc_{t-1};
// else it is kept in dsb (dL/dm_{t-1}, or dL/ds0 at t = 0).
template <typename T, bool Proj, bool ToC, bool Coupled>
inline void backward_row(const T* g, const T* ui, const T* uf, const T* ug, const T* uo, const T* dmr, const T* cp,
                         const T* cc, T* d, T* dcb, T* dsb, int64_t n, int64_t q0, int64_t q1) {
  constexpr int64_t G = Coupled ? 3 : 4;
  const int64_t og = (G - 2) * n, oo = (G - 1) * n;
#pragma omp simd
  for (int64_t q = q0; q < q1; ++q) {
    const T i = g[q], gg = g[og + q], o = g[oo + q];
    const T f = Coupled ? T(1) - i : g[n + q];
    const T dmt = Proj ? dmr[q] : dmr[q] + dsb[q];
    const T tc = tanh_(cc[q]);
    const T dct = dcb[q] + dmt * o * (T(1) - tc * tc);
    // coupled: c = c_prev + i·(g − c_prev), so dc/di = g − c_prev
    const T di = dct * (Coupled ? gg - cp[q] : gg) * i * (T(1) - i);
    const T dg = dct * i * (T(1) - gg * gg);
    const T d_o = dmt * tc * o * (T(1) - o);
    d[q] = di;
    T sg = ui[q] * di + ug[q] * dg + uo[q] * d_o;
    if constexpr (!Coupled) {
      const T df = dct * cp[q] * f * (T(1) - f);
      d[n + q] = df;
      sg += uf[q] * df;
    }
    d[og + q] = dg;
    d[oo + q] = d_o;
    if (ToC) {
      const T tp = tanh_(cp[q]);
      dcb[q] = dct * f + sg * (T(1) - tp * tp);
    } else {
      dcb[q] = dct * f;
      dsb[q] = sg;
    }
  }
}

template <typename T, bool Coupled>
void diagonal_backward(const T* dm, T* dc, T* ds, const T* gates, const T* cells, const T* u, T* dpre,
                       const DiagonalRows& r, int64_t batch, int64_t n, bool proj) {
  constexpr int64_t G = Coupled ? 3 : 4;
  const T *ui = u, *uf = u + n, *ug = u + (G - 2) * n, *uo = u + (G - 1) * n;
  // dc[b] holds dL/dc_T and ds[b] zero until sequence b's last step; after each step they hold
  // dL/dc_{t-1} and dL/ds_{t-1}. Steps in reverse: a sequence enters at its own last step.
  for_each_task(batch, n, [&](int64_t b0, int64_t b1, int64_t q0, int64_t q1) {
    for (int64_t t = static_cast<int64_t>(r.sizes.size()) - 1; t >= 0; --t) {
      const int64_t end = std::min(b1, r.sizes[t]);
      for (int64_t b = b0; b < end; ++b) {
        const int64_t row = r.starts[t] + b;
        const T* cp = cells + (t == 0 ? b : batch + r.starts[t - 1] + b) * n;
        const T* g = gates + row * G * n;
        const T* cc = cells + (batch + row) * n;
        T* d = dpre + row * G * n;
        T *dcb = dc + b * n, *dsb = ds + b * n;
        if (!proj)
          backward_row<T, false, false, Coupled>(g, ui, uf, ug, uo, dm + row * n, cp, cc, d, dcb, dsb, n, q0, q1);
        else if (t > 0)
          backward_row<T, true, true, Coupled>(g, ui, uf, ug, uo, dm + row * n, cp, cc, d, dcb, dsb, n, q0, q1);
        else
          backward_row<T, true, false, Coupled>(g, ui, uf, ug, uo, dm + row * n, cp, cc, d, dcb, dsb, n, q0, q1);
      }
    }
  });
}

}  // namespace

// z (N, G·n) is overwritten with the activated gates and returned as the first result; G (4, or 3
// for coupled gates) = z's columns / c0's.
std::vector<Tensor> diagonal_forward_scan(Tensor z, Tensor u, double forget_bias, Tensor s0, Tensor c0,
                                          std::vector<int64_t> batch_sizes, bool proj) {
  check_diagonal(z, "z", z);
  check_diagonal(u, "u", z);
  check_diagonal(s0, "s0", z);
  check_diagonal(c0, "c0", z);
  TORCH_CHECK(c0.dim() == 2 && c0.size(1) > 0, "diagonal scan: c0 must be (B, n)");
  const int64_t rows = z.size(0), n = c0.size(1), gates = z.size(1) / n, batch = c0.size(0);
  TORCH_CHECK((gates == 3 || gates == 4) && z.size(1) == gates * n && u.numel() == gates * n &&
                  s0.sizes() == c0.sizes(),
              "diagonal scan: z (N, G·n), u (G, n), s0 and c0 (B, n) disagree (G = 4, or 3 with coupled gates)");
  const DiagonalRows r = diagonal_rows(batch_sizes, batch, rows);
  Tensor cells = at::empty({batch + rows, n}, z.options());
  cells.narrow(0, 0, batch).copy_(c0);
  Tensor m = at::empty({rows, n}, z.options());
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "diagonal_forward_scan", [&] {
    auto run = gates == 3 ? diagonal_forward<scalar_t, true> : diagonal_forward<scalar_t, false>;
    run(z.data_ptr<scalar_t>(), u.data_ptr<scalar_t>(), static_cast<scalar_t>(forget_bias), s0.data_ptr<scalar_t>(),
        cells.data_ptr<scalar_t>(), m.data_ptr<scalar_t>(), r, batch, n, proj);
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
  TORCH_CHECK(dc_last.dim() == 2 && dc_last.size(1) > 0, "diagonal scan: dc_last must be (B, n)");
  const int64_t rows = gates.size(0), n = dc_last.size(1), num_gates = gates.size(1) / n, batch = dc_last.size(0);
  TORCH_CHECK((num_gates == 3 || num_gates == 4) && gates.size(1) == num_gates * n && dm.size(0) == rows &&
                  dm.size(1) == n && cells.size(0) == batch + rows && cells.size(1) == n && u.numel() == num_gates * n,
              "diagonal scan: dm (N, n), cells (B + N, n), u (G, n) disagree with gates (N, G·n) (G = 4, or 3 "
              "with coupled gates)");
  const DiagonalRows r = diagonal_rows(batch_sizes, batch, rows);
  Tensor dpre = at::empty({rows, num_gates * n}, gates.options());
  Tensor dc = dc_last.clone();
  Tensor ds = at::zeros({batch, n}, gates.options());
  AT_DISPATCH_FLOATING_TYPES(gates.scalar_type(), "diagonal_backward_scan", [&] {
    auto run = num_gates == 3 ? diagonal_backward<scalar_t, true> : diagonal_backward<scalar_t, false>;
    run(dm.data_ptr<scalar_t>(), dc.data_ptr<scalar_t>(), ds.data_ptr<scalar_t>(), gates.data_ptr<scalar_t>(),
        cells.data_ptr<scalar_t>(), u.data_ptr<scalar_t>(), dpre.data_ptr<scalar_t>(), r, batch, n, proj);
  });
  return {dpre, ds, dc};
}
