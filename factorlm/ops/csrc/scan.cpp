// The time recurrence of factorlm's fast F-LSTM / G-LSTM paths, in C++.
//
// Same four functions, signatures and buffer layouts as factorlm/ops/_scan_torch.py (read its
// docstring first): GEMMs go through ATen (MKL / oneDNN), the pointwise gate math of one step
// is ONE fused, vectorised loop instead of ~8 (forward) and ~20 (backward) tensor ops, and the
// loop over time runs here, so a step costs a few ATen calls instead of dozens of Python ones.
//
// Gates of one step: a (k, B, 4, nk) tile in the internal order [i, f, o, g]; cell states,
// tanh(c) and m in the layer's (B, n) layout, cell j*nk + mm of row b at b*n + j*nk + mm.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
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

// One step forward. gates (k, B, 4, nk) holds the recurrent GEMM's result; the input-side term
// (bias, or G-LSTM's precomputed Wih·x + b) is added here rather than copied into the GEMM output
// first (addmm's beta·C copy of a B×4n tile costs as much as this whole loop's memory traffic):
// group j, row b's addend is at addend + j*addend_group_stride + b*addend_row_stride.
// Then gates are activated in place; c = σf·c_prev + σi·tanh g; tanh_c = tanh(c); m = σo·tanh_c.
template <typename T>
void cell_forward(T* gates, const T* addend, int64_t addend_group_stride, int64_t addend_row_stride,
                  const T* c_prev, T* c, T* tanh_c, T* m, int64_t k, int64_t batch, int64_t nk) {
  const int64_t n = k * nk;
  at::parallel_for(0, k * batch, row_grain(nk), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t j = row / batch, b = row % batch;
      T* __restrict__ gi = gates + row * 4 * nk;
      T* __restrict__ gf = gi + nk;
      T* __restrict__ go = gi + 2 * nk;
      T* __restrict__ gg = gi + 3 * nk;
      const T* __restrict__ ai = addend + j * addend_group_stride + b * addend_row_stride;
      const T* __restrict__ af = ai + nk;
      const T* __restrict__ ao = ai + 2 * nk;
      const T* __restrict__ ag = ai + 3 * nk;
      const int64_t off = b * n + j * nk;
      const T* __restrict__ cp = c_prev + off;
      T* __restrict__ cc = c + off;
      T* __restrict__ tc = tanh_c + off;
      T* __restrict__ mm_ = m + off;
#pragma omp simd
      for (int64_t q = 0; q < nk; ++q) {
        const T i = sigmoid(gi[q] + ai[q]), f = sigmoid(gf[q] + af[q]);
        const T o = sigmoid(go[q] + ao[q]), g = tanh_(gg[q] + ag[q]);
        gi[q] = i;
        gf[q] = f;
        go[q] = o;
        gg[q] = g;
        const T cv = f * cp[q] + i * g;
        const T t = tanh_(cv);
        cc[q] = cv;
        tc[q] = t;
        mm_[q] = o * t;
      }
    }
  });
}

// One step backward. gates: activated (k, B, 4, nk); dm = dL/dm_t (B, n); dc: dL/dc_t from later
// steps, turned in place into dL/dc_{t-1}; dgates: pre-activation gradients, group j's rows at
// dgates + j*group_stride + b*4*nk.
template <typename T>
void cell_backward(const T* gates, const T* c_prev, const T* tanh_c, const T* dm, T* dc, T* dgates,
                   int64_t group_stride, int64_t k, int64_t batch, int64_t nk) {
  const int64_t n = k * nk;
  at::parallel_for(0, k * batch, row_grain(nk), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t j = row / batch, b = row % batch;
      const T* __restrict__ gi = gates + row * 4 * nk;
      const T* __restrict__ gf = gi + nk;
      const T* __restrict__ go = gi + 2 * nk;
      const T* __restrict__ gg = gi + 3 * nk;
      T* __restrict__ di = dgates + j * group_stride + b * 4 * nk;
      T* __restrict__ df = di + nk;
      T* __restrict__ d_o = di + 2 * nk;
      T* __restrict__ dg = di + 3 * nk;
      const int64_t off = b * n + j * nk;
      const T* __restrict__ cp = c_prev + off;
      const T* __restrict__ tc = tanh_c + off;
      const T* __restrict__ dmv = dm + off;
      T* __restrict__ dcv = dc + off;
#pragma omp simd
      for (int64_t q = 0; q < nk; ++q) {
        const T i = gi[q], f = gf[q], o = go[q], g = gg[q], t = tc[q], d = dmv[q];
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

void check_cpu(const Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "factorlm scan: ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble,
              "factorlm scan: ", name, " must be float32 or float64, got ", t.scalar_type());
}

// (B, m) -> (k, B, m/k) view: group j's column slice of every row.
Tensor grouped(const Tensor& t, int64_t k) {
  return t.view({t.size(0), k, t.size(1) / k}).transpose(0, 1);
}

struct StateBuffers {
  Tensor out, cells, tanh_c, m;
};

StateBuffers state_buffers(const Tensor& like, int64_t steps, int64_t batch, int64_t n, int64_t p, bool proj,
                           const Tensor& c0) {
  StateBuffers s;
  s.out = at::empty({steps, batch, p}, like.options());
  s.cells = at::empty({steps + 1, batch, n}, like.options());
  s.cells[0].copy_(c0);
  s.tanh_c = at::empty({steps, batch, n}, like.options());
  s.m = proj ? at::empty({steps, batch, n}, like.options()) : s.out;
  return s;
}

}  // namespace

std::vector<Tensor> flstm_forward_scan(Tensor u, Tensor bias, Tensor w1h_t, Tensor w2_t, std::optional<Tensor> proj_t,
                                       Tensor h0, Tensor c0) {
  check_cpu(u, "u");
  bias = bias.contiguous();
  const int64_t steps = u.size(0), batch = u.size(1), n = w2_t.size(1) / 4, p = h0.size(1);
  const bool proj = proj_t.has_value();
  StateBuffers s = state_buffers(u, steps, batch, n, p, proj, c0);
  Tensor z = at::empty_like(u);
  Tensor gates = at::empty({steps, batch, 4 * n}, u.options());
  Tensor h = h0;
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "flstm_forward_scan", [&] {
    for (int64_t t = 0; t < steps; ++t) {
      Tensor z_t = z[t], gates_t = gates[t], m_t = s.m[t], out_t = s.out[t];
      at::addmm_out(z_t, u[t], h, w1h_t);
      at::mm_out(gates_t, z_t, w2_t);
      cell_forward<scalar_t>(gates_t.data_ptr<scalar_t>(), bias.data_ptr<scalar_t>(), 0, 0,
                             s.cells[t].data_ptr<scalar_t>(),
                             s.cells[t + 1].data_ptr<scalar_t>(), s.tanh_c[t].data_ptr<scalar_t>(),
                             m_t.data_ptr<scalar_t>(), 1, batch, n);
      if (proj) at::mm_out(out_t, m_t, *proj_t);
      h = out_t;
    }
  });
  return {s.out, z, gates, s.cells, s.tanh_c, s.m};
}

std::vector<Tensor> flstm_backward_scan(Tensor dout, Tensor dh_last, Tensor dc_last, Tensor gates, Tensor cells,
                                        Tensor tanh_c, Tensor w1h, Tensor w2, std::optional<Tensor> proj) {
  check_cpu(gates, "gates");
  const int64_t steps = gates.size(0), batch = gates.size(1), n = gates.size(2) / 4;
  Tensor dgates = at::empty_like(gates);
  Tensor dz = at::empty({steps, batch, w2.size(1)}, gates.options());
  Tensor dh = at::empty_like(dout);
  Tensor dm = proj.has_value() ? at::empty({batch, n}, gates.options()) : Tensor();
  Tensor dh0 = at::empty({batch, w1h.size(1)}, gates.options());
  Tensor dc = dc_last.clone();
  Tensor dh_end = dh[steps - 1];
  at::add_out(dh_end, dout[steps - 1], dh_last);
  AT_DISPATCH_FLOATING_TYPES(gates.scalar_type(), "flstm_backward_scan", [&] {
    for (int64_t t = steps - 1; t >= 0; --t) {
      Tensor dh_t = dh[t], dgates_t = dgates[t], dz_t = dz[t];
      if (proj.has_value()) at::mm_out(dm, dh_t, *proj);
      const Tensor& dm_t = proj.has_value() ? dm : dh_t;
      cell_backward<scalar_t>(gates[t].data_ptr<scalar_t>(), cells[t].data_ptr<scalar_t>(),
                              tanh_c[t].data_ptr<scalar_t>(), dm_t.data_ptr<scalar_t>(), dc.data_ptr<scalar_t>(),
                              dgates_t.data_ptr<scalar_t>(), 0, 1, batch, n);
      at::mm_out(dz_t, dgates_t, w2);
      if (t > 0) {
        Tensor dh_prev = dh[t - 1];
        at::addmm_out(dh_prev, dout[t - 1], dz_t, w1h);  // dL/dh_{t-1} = dout_{t-1} + dz_t·W1h
      } else {
        at::mm_out(dh0, dz_t, w1h);
      }
    }
  });
  return {dgates, dz, dh, dh0, dc};
}

std::vector<Tensor> glstm_forward_scan(Tensor ax, Tensor whh_t, std::optional<Tensor> proj_t, Tensor h0, Tensor c0) {
  check_cpu(ax, "ax");
  TORCH_CHECK(ax.stride(2) == 1 && ax.stride(1) == ax.size(2), "factorlm scan: ax rows must be contiguous");
  const int64_t k = ax.size(0), four_nk = ax.size(2), nk = four_nk / 4, n = nk * k;
  const int64_t batch = h0.size(0), p = h0.size(1), steps = ax.size(1) / batch;
  const bool proj = proj_t.has_value();
  StateBuffers s = state_buffers(ax, steps, batch, n, p, proj, c0);
  Tensor gates = at::empty({steps, k, batch, four_nk}, ax.options());
  Tensor h = h0;
  AT_DISPATCH_FLOATING_TYPES(ax.scalar_type(), "glstm_forward_scan", [&] {
    for (int64_t t = 0; t < steps; ++t) {
      Tensor gates_t = gates[t], m_t = s.m[t], out_t = s.out[t];
      at::bmm_out(gates_t, grouped(h, k), whh_t);
      cell_forward<scalar_t>(gates_t.data_ptr<scalar_t>(), ax.data_ptr<scalar_t>() + t * batch * four_nk,
                             ax.stride(0), four_nk, s.cells[t].data_ptr<scalar_t>(),
                             s.cells[t + 1].data_ptr<scalar_t>(), s.tanh_c[t].data_ptr<scalar_t>(),
                             m_t.data_ptr<scalar_t>(), k, batch, nk);
      if (proj) at::mm_out(out_t, m_t, *proj_t);
      h = out_t;
    }
  });
  return {s.out, gates, s.cells, s.tanh_c, s.m};
}

std::vector<Tensor> glstm_backward_scan(Tensor dout, Tensor dh_last, Tensor dc_last, Tensor gates, Tensor cells,
                                        Tensor tanh_c, Tensor whh, std::optional<Tensor> proj) {
  check_cpu(gates, "gates");
  const int64_t steps = gates.size(0), k = gates.size(1), batch = gates.size(2), four_nk = gates.size(3);
  const int64_t nk = four_nk / 4, n = nk * k, p = dout.size(2);
  Tensor dgates = at::empty({k, steps, batch, four_nk}, gates.options());
  Tensor dh = at::empty_like(dout);
  Tensor dm = proj.has_value() ? at::empty({batch, n}, gates.options()) : Tensor();
  Tensor dh_rec = at::empty({k, batch, p / k}, gates.options());
  Tensor dc = dc_last.clone();
  Tensor dh_end = dh[steps - 1];
  at::add_out(dh_end, dout[steps - 1], dh_last);
  AT_DISPATCH_FLOATING_TYPES(gates.scalar_type(), "glstm_backward_scan", [&] {
    for (int64_t t = steps - 1; t >= 0; --t) {
      Tensor dh_t = dh[t];
      if (proj.has_value()) at::mm_out(dm, dh_t, *proj);
      const Tensor& dm_t = proj.has_value() ? dm : dh_t;
      Tensor dgates_t = dgates.select(1, t);  // (k, B, 4nk), batch stride T·B·4nk
      cell_backward<scalar_t>(gates[t].data_ptr<scalar_t>(), cells[t].data_ptr<scalar_t>(),
                              tanh_c[t].data_ptr<scalar_t>(), dm_t.data_ptr<scalar_t>(), dc.data_ptr<scalar_t>(),
                              dgates_t.data_ptr<scalar_t>(), steps * batch * four_nk, k, batch, nk);
      at::bmm_out(dh_rec, dgates_t, whh);
      if (t > 0) {
        Tensor dh_prev = grouped(dh[t - 1], k);
        at::add_out(dh_prev, grouped(dout[t - 1], k), dh_rec);
      }
    }
  });
  return {dgates, dh, dh_rec.transpose(0, 1).reshape({batch, p}), dc};
}
