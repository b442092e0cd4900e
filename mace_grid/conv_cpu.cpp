// The CPU kernel of `mace_grid.conv_kernel`: the summed messages of mace's channel-wise
// convolution, their VJP and the VJP's tangent (the second derivatives of force training), each
// in one pass over the edges with no per-edge temporaries beyond one row of channels.
//
// For edges e = j -> i and output rows o (input columns s_o .. s_o + d_o, columns of a
// ac_o .. ac_o + d_o, path k_o), with ax[e, o, c] = sum_m a[e, ac_o + m] x[j, s_o + m, c]:
//
//     out[i, o, c] = sum_{e: j -> i} r[e, k_o, c] ax[e, o, c]
//
// Layouts (all contiguous, channels last): x [n, D, C], a [E, K], r [E, P, C], grad [n, R, C],
// rows [R, 4] int64 (s, d, ac, k). Receiver-side results (out, its tangent and everything per
// edge) are computed per receiver from edges sorted by receiver (`recv_order`, CSR `recv_ptr`);
// sender-side results (d/dx and its tangent) per sender from edges sorted by sender. Each node
// is written by one thread, so the passes run in parallel (at::parallel_for) without atomics.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <optional>
#include <vector>

namespace {

using at::Tensor;

struct Row {
  int64_t s, d, ac, k;
};

std::vector<Row> read_rows(const Tensor& rows) {
  TORCH_CHECK(rows.dim() == 2 && rows.size(1) == 4 && rows.scalar_type() == at::kLong,
              "rows must be an int64 [R, 4] table");
  auto t = rows.contiguous();
  const int64_t* p = t.data_ptr<int64_t>();
  std::vector<Row> out(t.size(0));
  for (int64_t o = 0; o < t.size(0); ++o) out[o] = {p[4 * o], p[4 * o + 1], p[4 * o + 2], p[4 * o + 3]};
  return out;
}

// y[c] = sum_m a[m] x[m * C + c]
template <typename T>
inline void matvec(const T* __restrict a, const T* __restrict x, int64_t d, int64_t C,
                   T* __restrict y) {
  for (int64_t c = 0; c < C; ++c) y[c] = a[0] * x[c];
  for (int64_t m = 1; m < d; ++m) {
    const T am = a[m];
    const T* __restrict xm = x + m * C;
    for (int64_t c = 0; c < C; ++c) y[c] += am * xm[c];
  }
}

// y[c] += sum_m a[m] x[m * C + c]
template <typename T>
inline void matvec_add(const T* __restrict a, const T* __restrict x, int64_t d, int64_t C,
                       T* __restrict y) {
  for (int64_t m = 0; m < d; ++m) {
    const T am = a[m];
    const T* __restrict xm = x + m * C;
    for (int64_t c = 0; c < C; ++c) y[c] += am * xm[c];
  }
}

// x[m * C + c] += a[m] u[c]
template <typename T>
inline void outer_add(const T* __restrict a, const T* __restrict u, int64_t d, int64_t C,
                      T* __restrict x) {
  for (int64_t m = 0; m < d; ++m) {
    const T am = a[m];
    T* __restrict xm = x + m * C;
    for (int64_t c = 0; c < C; ++c) xm[c] += am * u[c];
  }
}

// out[m] (+)= sum_c u[c] x[m * C + c]
template <typename T>
inline void dots(const T* __restrict u, const T* __restrict x, int64_t d, int64_t C,
                 T* __restrict out, bool add) {
  for (int64_t m = 0; m < d; ++m) {
    const T* __restrict xm = x + m * C;
    T acc = 0;
    for (int64_t c = 0; c < C; ++c) acc += u[c] * xm[c];
    out[m] = add ? out[m] + acc : acc;
  }
}

// Calls f(node, edge) for every edge of every node in [0, n) (edges of a node from `order`,
// its CSR `ptr`), nodes split across threads.
template <typename F>
void per_node(const Tensor& order, const Tensor& ptr, F f) {
  const int64_t* ord = order.data_ptr<int64_t>();
  const int64_t* p = ptr.data_ptr<int64_t>();
  const int64_t n = ptr.size(0) - 1;
  at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i)
      for (int64_t q = p[i]; q < p[i + 1]; ++q) f(i, ord[q]);
  });
}

void check(const Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous() && t.dim() == dim, name,
              " must be a contiguous CPU tensor of dimension ", dim);
}

Tensor conv_forward(const Tensor& x, const Tensor& a, const Tensor& r, const Tensor& senders,
                    const Tensor& recv_order, const Tensor& recv_ptr, const Tensor& rows_t) {
  check(x, "x", 3);
  check(a, "a", 2);
  check(r, "r", 3);
  const auto rows = read_rows(rows_t);
  const int64_t R = rows.size(), D = x.size(1), C = x.size(2), K = a.size(1), P = r.size(1);
  auto out = at::zeros({x.size(0), R, C}, x.options());
  const int64_t* snd = senders.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "conv_forward", [&] {
    const scalar_t *xp = x.data_ptr<scalar_t>(), *ap = a.data_ptr<scalar_t>(),
                   *rp = r.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    per_node(recv_order, recv_ptr, [&](int64_t i, int64_t e) {
      thread_local std::vector<scalar_t> tmp;
      tmp.resize(C);
      const scalar_t* xj = xp + snd[e] * D * C;
      for (int64_t o = 0; o < R; ++o) {
        const Row& w = rows[o];
        matvec(ap + e * K + w.ac, xj + w.s * C, w.d, C, tmp.data());
        const scalar_t* re = rp + (e * P + w.k) * C;
        scalar_t* oi = op + (i * R + o) * C;
        for (int64_t c = 0; c < C; ++c) oi[c] += re[c] * tmp[c];
      }
    });
  });
  return out;
}

// (grad_x, grad_a, grad_r) for the upstream gradient g; undefined where not wanted.
std::tuple<Tensor, Tensor, Tensor> conv_vjp(const Tensor& x, const Tensor& a, const Tensor& r,
                                            const Tensor& g, const Tensor& senders,
                                            const Tensor& receivers, const Tensor& recv_order,
                                            const Tensor& recv_ptr, const Tensor& send_order,
                                            const Tensor& send_ptr, const Tensor& rows_t,
                                            bool want_x, bool want_a, bool want_r) {
  check(x, "x", 3);
  check(a, "a", 2);
  check(r, "r", 3);
  check(g, "grad", 3);
  const auto rows = read_rows(rows_t);
  const int64_t R = rows.size(), D = x.size(1), C = x.size(2), K = a.size(1), P = r.size(1);
  Tensor gx = want_x ? at::zeros_like(x) : Tensor();
  Tensor ga = want_a ? at::zeros_like(a) : Tensor();
  Tensor gr = want_r ? at::zeros_like(r) : Tensor();
  const int64_t *snd = senders.data_ptr<int64_t>(), *rcv = receivers.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "conv_vjp", [&] {
    const scalar_t *xp = x.data_ptr<scalar_t>(), *ap = a.data_ptr<scalar_t>(),
                   *rp = r.data_ptr<scalar_t>(), *gp = g.data_ptr<scalar_t>();
    if (want_a || want_r) {  // per edge: <u, x> per column of a, <g, a x> per path
      scalar_t* gap = want_a ? ga.data_ptr<scalar_t>() : nullptr;
      scalar_t* grp = want_r ? gr.data_ptr<scalar_t>() : nullptr;
      per_node(recv_order, recv_ptr, [&](int64_t i, int64_t e) {
        thread_local std::vector<scalar_t> tmp;
        tmp.resize(C);
        const scalar_t* xj = xp + snd[e] * D * C;
        for (int64_t o = 0; o < R; ++o) {
          const Row& w = rows[o];
          const scalar_t* gi = gp + (i * R + o) * C;
          const scalar_t* re = rp + (e * P + w.k) * C;
          if (want_a) {
            for (int64_t c = 0; c < C; ++c) tmp[c] = gi[c] * re[c];
            dots(tmp.data(), xj + w.s * C, w.d, C, gap + e * K + w.ac, false);
          }
          if (want_r) {
            matvec(ap + e * K + w.ac, xj + w.s * C, w.d, C, tmp.data());
            scalar_t* ge = grp + (e * P + w.k) * C;
            for (int64_t c = 0; c < C; ++c) ge[c] += gi[c] * tmp[c];
          }
        }
      });
    }
    if (want_x) {  // per sender: a^T (g r)
      scalar_t* gxp = gx.data_ptr<scalar_t>();
      per_node(send_order, send_ptr, [&](int64_t j, int64_t e) {
        thread_local std::vector<scalar_t> u;
        u.resize(C);
        const int64_t i = rcv[e];
        for (int64_t o = 0; o < R; ++o) {
          const Row& w = rows[o];
          const scalar_t* gi = gp + (i * R + o) * C;
          const scalar_t* re = rp + (e * P + w.k) * C;
          for (int64_t c = 0; c < C; ++c) u[c] = gi[c] * re[c];
          outer_add(ap + e * K + w.ac, u.data(), w.d, C, gxp + (j * D + w.s) * C);
        }
      });
    }
  });
  return {gx, ga, gr};
}

// The tangent of (conv_vjp, conv_forward) along (v_x, v_a, v_r): (out_x, out_a, out_r,
// out_grad), undefined where not needed; see `_ConvVJP.backward`.
std::tuple<Tensor, Tensor, Tensor, Tensor> conv_vjp_tangent(
    const Tensor& x, const Tensor& a, const Tensor& r, const Tensor& g,
    const std::optional<Tensor>& v_x_, const std::optional<Tensor>& v_a_,
    const std::optional<Tensor>& v_r_, const Tensor& senders, const Tensor& receivers,
    const Tensor& recv_order, const Tensor& recv_ptr, const Tensor& send_order,
    const Tensor& send_ptr, const Tensor& rows_t, bool need_x, bool need_a, bool need_r,
    bool need_g) {
  check(x, "x", 3);
  check(a, "a", 2);
  check(r, "r", 3);
  check(g, "grad", 3);
  const Tensor v_x = v_x_.value_or(Tensor()), v_a = v_a_.value_or(Tensor()),
               v_r = v_r_.value_or(Tensor());
  if (v_x.defined()) check(v_x, "v_x", 3);
  if (v_a.defined()) check(v_a, "v_a", 2);
  if (v_r.defined()) check(v_r, "v_r", 3);
  const auto rows = read_rows(rows_t);
  const int64_t R = rows.size(), D = x.size(1), C = x.size(2), K = a.size(1), P = r.size(1);
  Tensor ox = need_x ? at::zeros_like(x) : Tensor();
  Tensor oa = need_a ? at::zeros_like(a) : Tensor();
  Tensor orr = need_r ? at::zeros_like(r) : Tensor();
  Tensor og = need_g ? at::zeros({x.size(0), R, C}, x.options()) : Tensor();
  const bool has_vx = v_x.defined(), has_va = v_a.defined(), has_vr = v_r.defined();
  const bool has_dax = has_vx || has_va;  // the tangent of a x
  const int64_t *snd = senders.data_ptr<int64_t>(), *rcv = receivers.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "conv_vjp_tangent", [&] {
    const scalar_t *xp = x.data_ptr<scalar_t>(), *ap = a.data_ptr<scalar_t>(),
                   *rp = r.data_ptr<scalar_t>(), *gp = g.data_ptr<scalar_t>();
    const scalar_t* vxp = has_vx ? v_x.data_ptr<scalar_t>() : nullptr;
    const scalar_t* vap = has_va ? v_a.data_ptr<scalar_t>() : nullptr;
    const scalar_t* vrp = has_vr ? v_r.data_ptr<scalar_t>() : nullptr;
    const bool edge_pass = (need_a && (has_vx || has_vr)) || (need_r && has_dax) ||
                           (need_g && (has_dax || has_vr));
    if (edge_pass) {
      scalar_t* oap = need_a ? oa.data_ptr<scalar_t>() : nullptr;
      scalar_t* orp = need_r ? orr.data_ptr<scalar_t>() : nullptr;
      scalar_t* ogp = need_g ? og.data_ptr<scalar_t>() : nullptr;
      per_node(recv_order, recv_ptr, [&](int64_t i, int64_t e) {
        thread_local std::vector<scalar_t> buf;
        buf.resize(2 * C);
        scalar_t *t1 = buf.data(), *t2 = buf.data() + C;
        const int64_t j = snd[e];
        const scalar_t* xj = xp + j * D * C;
        const scalar_t* vxj = has_vx ? vxp + j * D * C : nullptr;
        for (int64_t o = 0; o < R; ++o) {
          const Row& w = rows[o];
          const scalar_t* gi = gp + (i * R + o) * C;
          const scalar_t* re = rp + (e * P + w.k) * C;
          const scalar_t* vre = has_vr ? vrp + (e * P + w.k) * C : nullptr;
          const scalar_t* ae = ap + e * K + w.ac;
          if (need_a) {  // tangent of u x^T: (g v_r) x^T + (g r) v_x^T
            if (has_vr) {
              for (int64_t c = 0; c < C; ++c) t1[c] = gi[c] * vre[c];
              dots(t1, xj + w.s * C, w.d, C, oap + e * K + w.ac, false);
            }
            if (has_vx) {
              for (int64_t c = 0; c < C; ++c) t1[c] = gi[c] * re[c];
              dots(t1, vxj + w.s * C, w.d, C, oap + e * K + w.ac, has_vr);
            }
          }
          if (has_dax && (need_r || need_g)) {  // t1 = v_a x + a v_x
            if (has_va) {
              matvec(vap + e * K + w.ac, xj + w.s * C, w.d, C, t1);
              if (has_vx) matvec_add(ae, vxj + w.s * C, w.d, C, t1);
            } else {
              matvec(ae, vxj + w.s * C, w.d, C, t1);
            }
            if (need_r) {
              scalar_t* oe = orp + (e * P + w.k) * C;
              for (int64_t c = 0; c < C; ++c) oe[c] += gi[c] * t1[c];
            }
          }
          if (need_g) {  // tangent of the messages: (dax) r + (a x) v_r
            scalar_t* oi = ogp + (i * R + o) * C;
            if (has_dax)
              for (int64_t c = 0; c < C; ++c) oi[c] += t1[c] * re[c];
            if (has_vr) {
              matvec(ae, xj + w.s * C, w.d, C, t2);
              for (int64_t c = 0; c < C; ++c) oi[c] += t2[c] * vre[c];
            }
          }
        }
      });
    }
    if (need_x && (has_va || has_vr)) {  // tangent of a^T u: v_a^T (g r) + a^T (g v_r)
      scalar_t* oxp = ox.data_ptr<scalar_t>();
      per_node(send_order, send_ptr, [&](int64_t j, int64_t e) {
        thread_local std::vector<scalar_t> u;
        u.resize(C);
        const int64_t i = rcv[e];
        for (int64_t o = 0; o < R; ++o) {
          const Row& w = rows[o];
          const scalar_t* gi = gp + (i * R + o) * C;
          scalar_t* xo = oxp + (j * D + w.s) * C;
          if (has_va) {
            const scalar_t* re = rp + (e * P + w.k) * C;
            for (int64_t c = 0; c < C; ++c) u[c] = gi[c] * re[c];
            outer_add(vap + e * K + w.ac, u.data(), w.d, C, xo);
          }
          if (has_vr) {
            const scalar_t* vre = vrp + (e * P + w.k) * C;
            for (int64_t c = 0; c < C; ++c) u[c] = gi[c] * vre[c];
            outer_add(ap + e * K + w.ac, u.data(), w.d, C, xo);
          }
        }
      });
    }
  });
  return {ox, oa, orr, og};
}

}  // namespace

// Schemas, and CPU kernels (below autograd and Python dispatch, so a TorchDispatchMode such as
// mace_grid.tp.work's counter sees each call).
TORCH_LIBRARY(mace_grid_conv, m) {
  m.def(
      "forward(Tensor x, Tensor a, Tensor r, Tensor senders, Tensor recv_order, "
      "Tensor recv_ptr, Tensor rows) -> Tensor");
  m.def(
      "vjp(Tensor x, Tensor a, Tensor r, Tensor grad, Tensor senders, Tensor receivers, "
      "Tensor recv_order, Tensor recv_ptr, Tensor send_order, Tensor send_ptr, Tensor rows, "
      "bool want_x, bool want_a, bool want_r) -> (Tensor, Tensor, Tensor)");
  m.def(
      "vjp_tangent(Tensor x, Tensor a, Tensor r, Tensor grad, Tensor? v_x, Tensor? v_a, "
      "Tensor? v_r, Tensor senders, Tensor receivers, Tensor recv_order, Tensor recv_ptr, "
      "Tensor send_order, Tensor send_ptr, Tensor rows, bool need_x, bool need_a, bool need_r, "
      "bool need_g) -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(mace_grid_conv, CPU, m) {
  m.impl("forward", &conv_forward);
  m.impl("vjp", &conv_vjp);
  m.impl("vjp_tangent", &conv_vjp_tangent);
}
