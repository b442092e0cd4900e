// The CPU kernel of `mace_grid.tp.rank_kernel`: grid_rank's and grid_chain's products, their VJP
// and the VJP's tangent (the second derivatives of force training), one pass per column vector.
//
// Per column (node x channel) with features a [D_in], factor weights w [corr R, L_in+1] (row
// k R + r: factor k of rank r) and round-trip weights d [R, K+1] (none for grid_rank), at grid
// point p:
//
//     F_l(p) = sum_m Y_lm(p) a_lm,   g_kr(p) = sum_l w_kr,l F_l(p)
//     p_1r = g_0r g_1r,   p_kr = left_kr g_kr,   left_kr = p_(k-1)r, except the chain's
//     left_2r = h_r = synthesis(d_r o projection(p_1r))    (on Y_km, k <= K; `round_trip`)
//     out[(k-1) R + r, L] = sum_p P_L(p) p_kr(p),   k = 1 .. corr-1
//
// Layouts (contiguous, columns last): a [D_in, N], w [corr R, L_in+1, N], d [R, K+1, N],
// out and grad [(corr-1) R, D_out, N]; the maps Y [G, D_in], P [D_out, G] with their
// transposes, and the round trip's A [2K+1, n_alpha], Lp and Ls [(K+1)^2, n_beta] (empty
// without one). Columns go in vectors of 32 bytes; a vector's grid-sized intermediates live in
// a per-thread scratch (L1/L2-sized), so nothing grid-sized is written to memory. Templated on
// the value type: `Vec` for the forward and VJP, `Dual` (value and tangent) for their
// forward-mode derivatives, the same code giving the second derivatives.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <optional>
#include <type_traits>
#include <vector>

namespace {

using at::Tensor;

template <typename T>
struct VecOf {
  typedef T type __attribute__((vector_size(32)));
};

// Two 32-byte vectors of columns: each scalar of the maps, broadcast once, multiplies both.
template <typename T>
struct Vec {
  typename VecOf<T>::type lo{}, hi{};
  Vec operator*(const Vec& o) const { return {lo * o.lo, hi * o.hi}; }
  Vec operator+(const Vec& o) const { return {lo + o.lo, hi + o.hi}; }
  Vec& operator+=(const Vec& o) {
    lo += o.lo;
    hi += o.hi;
    return *this;
  }
  friend Vec operator*(T s, const Vec& x) { return {s * x.lo, s * x.hi}; }
};
template <typename T>
constexpr int64_t kLanes = sizeof(Vec<T>) / sizeof(T);

// A value and its tangent (forward-mode derivative); `Vec` itself is the primal value type.
template <typename T>
struct Dual {
  Vec<T> v{}, t{};
  Dual operator*(const Dual& o) const { return {v * o.v, t * o.v + v * o.t}; }
  Dual operator+(const Dual& o) const { return {v + o.v, t + o.t}; }
  Dual& operator+=(const Dual& o) {
    v += o.v;
    t += o.t;
    return *this;
  }
  friend Dual operator*(T s, const Dual& x) { return {s * x.v, s * x.t}; }
};

template <typename T>
inline Vec<T> load_vec(const T* p, int64_t n) {
  Vec<T> x{};
  std::memcpy(&x, p, n * sizeof(T));
  return x;
}

template <typename T>
inline void store_vec(T* p, const Vec<T>& x, int64_t n) {
  std::memcpy(p, &x, n * sizeof(T));
}

// rows values [rows, N] (and their tangents, or zero) at columns col .. col + n into x[rows]
template <typename T>
inline void load(Vec<T>* x, const T* values, const T*, int64_t rows, int64_t N, int64_t col,
                 int64_t n) {
  for (int64_t i = 0; i < rows; ++i) x[i] = load_vec(values + i * N + col, n);
}

template <typename T>
inline void load(Dual<T>* x, const T* values, const T* tangents, int64_t rows, int64_t N,
                 int64_t col, int64_t n) {
  for (int64_t i = 0; i < rows; ++i) {
    x[i].v = load_vec(values + i * N + col, n);
    x[i].t = tangents ? load_vec(tangents + i * N + col, n) : Vec<T>{};
  }
}

// the primal (or the tangent) of x[rows] into out [rows, N]
template <typename V, typename T>
inline void store(T* out, const V* x, int64_t rows, int64_t N, int64_t col, int64_t n,
                  bool tangent = false) {
  for (int64_t i = 0; i < rows; ++i) {
    if constexpr (std::is_same_v<V, Dual<T>>)
      store_vec(out + i * N + col, tangent ? x[i].t : x[i].v, n);
    else
      store_vec(out + i * N + col, x[i], n);
  }
}

// sum_i term(i) in four interleaved partial sums: the long reductions over grid points would
// otherwise be one chain of dependent additions, bound by the adder's latency
template <typename V, typename F>
inline V sum_of(int64_t n, F&& term) {
  V s0{}, s1{}, s2{}, s3{};
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) {
    s0 += term(i);
    s1 += term(i + 1);
    s2 += term(i + 2);
    s3 += term(i + 3);
  }
  for (; i < n; ++i) s0 += term(i);
  return (s0 + s1) + (s2 + s3);
}

template <typename T>
struct Maps {
  int64_t G, D_in, L1, D_out, Q, K1, corr, R, J;
  int64_t M, n_alpha, n_beta;  // the round trip's azimuthal orders 2K + 1 and the grid
  const T *Y, *Yt, *P, *Pt, *A, *Lp, *Ls;
  std::vector<int64_t> k_of_q, m_of_q;  // degree k and row m + K of A of each (k, m)
  bool chain() const { return K1 > 0; }
};

// One column vector's intermediates.
template <typename V>
struct Scratch {
  std::vector<V> F, g, gg, gF, left, adj, c, e, X;
  template <typename T>
  explicit Scratch(const Maps<T>& m)
      : F(m.G * m.L1),
        g(m.G * m.J),
        gg(m.G * m.J),
        gF(m.G * m.L1),
        left(m.G * std::max<int64_t>(m.corr - 1, 1)),
        adj(m.G),
        c(std::max<int64_t>(m.R * m.Q, 1)),
        e(std::max<int64_t>(m.Q, 1)),
        X(std::max<int64_t>(m.M * m.n_beta, 1)) {}
};

// F_l and the factors g at every point
template <typename T, typename V>
void evaluate(const Maps<T>& m, const V* a, const V* w, Scratch<V>& s) {
  for (int64_t p = 0; p < m.G; ++p) {
    const T* y = m.Y + p * m.D_in;
    V* F = &s.F[p * m.L1];
    for (int64_t l = 0; l < m.L1; ++l) {
      V f{};
      for (int64_t i = l * l; i < (l + 1) * (l + 1); ++i) f += y[i] * a[i];
      F[l] = f;
    }
    for (int64_t j = 0; j < m.J; ++j) {
      V x{};
      for (int64_t l = 0; l < m.L1; ++l) x += w[j * m.L1 + l] * F[l];
      s.g[p * m.J + j] = x;
    }
  }
}

// The chain's round trip, separably (points alpha-major, p = i_alpha n_beta + i_beta): the
// azimuth transform X_m(b) = sum_a A[m, a] x(a, b), then per (k, m) the polar sums
// c_km = sum_b Lp[km, b] X_m(b) (Lp: Legendre part times polar quadrature weight), and back:
// Z_m(b) = sum_k Ls[km, b] d_k c_km (Ls: Legendre part), x(a, b) = n_alpha sum_m A[m, a] Z_m(b).

// X [M, n_beta] = A x
template <typename T, typename V>
void to_frequencies(const Maps<T>& m, const V* x, V* X) {
  for (int64_t i = 0; i < m.M * m.n_beta; ++i) X[i] = V{};
  for (int64_t mi = 0; mi < m.M; ++mi)
    for (int64_t a = 0; a < m.n_alpha; ++a) {
      const T s = m.A[mi * m.n_alpha + a];
      for (int64_t b = 0; b < m.n_beta; ++b) X[mi * m.n_beta + b] += s * x[a * m.n_beta + b];
    }
}

// x = n_alpha A^T Z
template <typename T, typename V>
void to_azimuths(const Maps<T>& m, const V* Z, V* x) {
  for (int64_t a = 0; a < m.n_alpha; ++a)
    for (int64_t b = 0; b < m.n_beta; ++b) {
      V acc{};
      for (int64_t mi = 0; mi < m.M; ++mi) acc += m.A[mi * m.n_alpha + a] * Z[mi * m.n_beta + b];
      x[a * m.n_beta + b] = T(m.n_alpha) * acc;
    }
}

// out[km] = sum_b L[km, b] X_m(b)
template <typename T, typename V>
void polar_sums(const Maps<T>& m, const T* L, const V* X, V* out) {
  for (int64_t q = 0; q < m.Q; ++q) {
    const T* row = L + q * m.n_beta;
    const V* Xm = X + m.m_of_q[q] * m.n_beta;
    V acc{};
    for (int64_t b = 0; b < m.n_beta; ++b) acc += row[b] * Xm[b];
    out[q] = acc;
  }
}

// Z_m(b) = sum_k L[km, b] e[km]
template <typename T, typename V>
void polar_synthesis(const Maps<T>& m, const T* L, const V* e, V* Z) {
  for (int64_t i = 0; i < m.M * m.n_beta; ++i) Z[i] = V{};
  for (int64_t q = 0; q < m.Q; ++q) {
    const T* row = L + q * m.n_beta;
    V* Zm = Z + m.m_of_q[q] * m.n_beta;
    for (int64_t b = 0; b < m.n_beta; ++b) Zm[b] += row[b] * e[q];
  }
}

// x <- synthesis(d o c), c = projection(x): the weighted round trip of the pair product x [G]
template <typename T, typename V>
void round_trip(const Maps<T>& m, V* x, const V* d, V* c, Scratch<V>& s) {
  to_frequencies(m, x, s.X.data());
  polar_sums(m, m.Lp, s.X.data(), c);
  for (int64_t q = 0; q < m.Q; ++q) s.e[q] = d[m.k_of_q[q]] * c[q];
  polar_synthesis(m, m.Ls, s.e.data(), s.X.data());
  to_azimuths(m, s.X.data(), x);
}

// x <- the round trip's transpose applied to x (an adjoint of its output); grad_d += t o c with
// t the synthesis' transpose applied to x
template <typename T, typename V>
void round_trip_adjoint(const Maps<T>& m, V* x, const V* d, const V* c, V* grad_d,
                        Scratch<V>& s) {
  for (int64_t i = 0; i < m.M * m.n_beta; ++i) s.X[i] = V{};
  for (int64_t mi = 0; mi < m.M; ++mi)  // n_alpha A x: the transpose of to_azimuths
    for (int64_t a = 0; a < m.n_alpha; ++a) {
      const T w = T(m.n_alpha) * m.A[mi * m.n_alpha + a];
      for (int64_t b = 0; b < m.n_beta; ++b) s.X[mi * m.n_beta + b] += w * x[a * m.n_beta + b];
    }
  polar_sums(m, m.Ls, s.X.data(), s.e.data());
  for (int64_t q = 0; q < m.Q; ++q) {
    const int64_t k = m.k_of_q[q];
    grad_d[k] += s.e[q] * c[q];
    s.e[q] = d[k] * s.e[q];
  }
  polar_synthesis(m, m.Lp, s.e.data(), s.X.data());
  for (int64_t a = 0; a < m.n_alpha; ++a)  // A^T Z: the transpose of to_frequencies
    for (int64_t b = 0; b < m.n_beta; ++b) {
      V acc{};
      for (int64_t mi = 0; mi < m.M; ++mi)
        acc += m.A[mi * m.n_alpha + a] * s.X[mi * m.n_beta + b];
      x[a * m.n_beta + b] = acc;
    }
}

// o[L] = sum_p P_L(p) x(p): the projection of a product on the output harmonics
template <typename T, typename V>
void project(const Maps<T>& m, const V* x, V* o) {
  for (int64_t L = 0; L < m.D_out; ++L) {
    const T* row = m.P + L * m.G;
    o[L] = sum_of<V>(m.G, [&](int64_t p) { return row[p] * x[p]; });
  }
}

template <typename T, typename V>
void forward_column(const Maps<T>& m, const V* a, const V* w, const V* d, V* out,
                    Scratch<V>& s) {
  evaluate(m, a, w, s);
  V* cur = s.left.data();
  for (int64_t r = 0; r < m.R; ++r) {
    for (int64_t p = 0; p < m.G; ++p) cur[p] = s.g[p * m.J + r];
    for (int64_t k = 1; k < m.corr; ++k) {
      if (k == 2 && m.chain()) round_trip(m, cur, d + r * m.K1, s.c.data(), s);
      for (int64_t p = 0; p < m.G; ++p) cur[p] = cur[p] * s.g[p * m.J + k * m.R + r];
      project(m, cur, out + ((k - 1) * m.R + r) * m.D_out);
    }
  }
}

// adj <- (adj or 0) + P^T grad[(k-1) R + r]
template <typename T, typename V>
void add_projected(const Maps<T>& m, const V* grad, int64_t k, int64_t r, V* adj, bool first) {
  const V* gr = grad + ((k - 1) * m.R + r) * m.D_out;
  for (int64_t p = 0; p < m.G; ++p) {
    const T* row = m.Pt + p * m.D_out;
    V acc = first ? V{} : adj[p];
    for (int64_t L = 0; L < m.D_out; ++L) acc += row[L] * gr[L];
    adj[p] = acc;
  }
}

// The VJP of the column's products at grad; with out (else null) also their values, which
// the tangent pass needs (one evaluation of the factors for both).
template <typename T, typename V>
void vjp_column(const Maps<T>& m, const V* a, const V* w, const V* d, const V* grad, V* grad_a,
                V* grad_w, V* grad_d, V* out, Scratch<V>& s) {
  evaluate(m, a, w, s);
  const int64_t G = m.G, J = m.J, R = m.R;
  for (int64_t i = 0; i < R * m.K1; ++i) grad_d[i] = V{};
  for (int64_t r = 0; r < R; ++r) {
    V* c = s.c.data() + r * m.Q;
    // left[k-1]: what factor k multiplies, k = 1 .. corr-1
    for (int64_t p = 0; p < G; ++p) s.left[p] = s.g[p * J + r];
    for (int64_t k = 1; k + 1 < m.corr; ++k) {
      const V* src = &s.left[(k - 1) * G];
      V* dst = &s.left[k * G];
      for (int64_t p = 0; p < G; ++p) dst[p] = src[p] * s.g[p * J + k * R + r];
      if (out) project(m, dst, out + ((k - 1) * R + r) * m.D_out);
      if (k == 1 && m.chain()) round_trip(m, dst, d + r * m.K1, c, s);
    }
    V* adj = s.adj.data();
    if (out) {  // the last product, projected
      const int64_t k = m.corr - 1;
      const V* left = &s.left[(k - 1) * G];
      for (int64_t p = 0; p < G; ++p) adj[p] = left[p] * s.g[p * J + k * R + r];
      project(m, adj, out + ((k - 1) * R + r) * m.D_out);
    }
    add_projected(m, grad, m.corr - 1, r, adj, true);
    for (int64_t k = m.corr - 1; k >= 1; --k) {
      const V* left = &s.left[(k - 1) * G];
      for (int64_t p = 0; p < G; ++p) s.gg[p * J + k * R + r] = adj[p] * left[p];
      if (k == 1) {
        for (int64_t p = 0; p < G; ++p) s.gg[p * J + r] = adj[p] * s.g[p * J + R + r];
        break;
      }
      for (int64_t p = 0; p < G; ++p) adj[p] = adj[p] * s.g[p * J + k * R + r];
      if (k == 2 && m.chain()) round_trip_adjoint(m, adj, d + r * m.K1, c, grad_d + r * m.K1, s);
      add_projected(m, grad, k - 1, r, adj, false);
    }
  }
  for (int64_t j = 0; j < J; ++j)
    for (int64_t l = 0; l < m.L1; ++l)
      grad_w[j * m.L1 + l] =
          sum_of<V>(G, [&](int64_t p) { return s.gg[p * J + j] * s.F[p * m.L1 + l]; });
  for (int64_t p = 0; p < G; ++p)
    for (int64_t l = 0; l < m.L1; ++l) {
      V acc{};
      for (int64_t j = 0; j < J; ++j) acc += w[j * m.L1 + l] * s.gg[p * J + j];
      s.gF[p * m.L1 + l] = acc;
    }
  for (int64_t l = 0; l < m.L1; ++l)
    for (int64_t i = l * l; i < (l + 1) * (l + 1); ++i) {
      const T* row = m.Yt + i * G;
      grad_a[i] = sum_of<V>(G, [&](int64_t p) { return row[p] * s.gF[p * m.L1 + l]; });
    }
}

void check_input(const Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous() && t.dim() == dim, name,
              " must be a contiguous CPU tensor of dimension ", dim);
}

template <typename T>
Maps<T> read_maps(at::TensorList maps, const Tensor& a, const Tensor& w, const Tensor& d,
                  int64_t corr) {
  TORCH_CHECK(maps.size() == 7, "maps must be Y, Y^T, P, P^T, A, Lp, Ls");
  check_input(a, "a", 2);
  check_input(w, "w", 3);
  check_input(d, "d", 3);
  for (const Tensor& t : maps) {
    check_input(t, "each map", 2);
    TORCH_CHECK(t.scalar_type() == a.scalar_type(), "the maps must have a's dtype");
  }
  TORCH_CHECK(w.scalar_type() == a.scalar_type() && d.scalar_type() == a.scalar_type(),
              "a, w and d must share a dtype");
  Maps<T> m;
  m.G = maps[0].size(0);
  m.D_in = a.size(0);
  m.L1 = w.size(1);
  m.D_out = maps[2].size(0);
  m.R = d.size(0);
  m.K1 = d.size(1);
  m.Q = m.K1 * m.K1;
  m.M = 2 * m.K1 - 1;
  m.corr = corr;
  m.J = corr * m.R;
  const int64_t N = a.size(1);
  TORCH_CHECK(corr >= 2 && m.D_in == m.L1 * m.L1 && w.size(0) == m.J && w.size(2) == N &&
                  d.size(2) == N,
              "inconsistent shapes: a ", a.sizes(), ", w ", w.sizes(), ", d ", d.sizes(),
              ", correlation ", corr);
  TORCH_CHECK(maps[0].size(1) == m.D_in && maps[1].size(0) == m.D_in && maps[1].size(1) == m.G &&
                  maps[2].size(1) == m.G && maps[3].size(0) == m.G &&
                  maps[3].size(1) == m.D_out,
              "Y [G, D_in] and P [D_out, G] (and their transposes) do not match");
  m.n_alpha = maps[4].size(1);
  m.n_beta = maps[5].size(1);
  if (m.chain()) {
    TORCH_CHECK(corr >= 3, "a round trip needs correlation >= 3");
    TORCH_CHECK(maps[4].size(0) == m.M && m.n_alpha * m.n_beta == m.G &&
                    maps[5].size(0) == m.Q && maps[6].size(0) == m.Q &&
                    maps[6].size(1) == m.n_beta,
                "A [2K+1, n_alpha], Lp and Ls [(K+1)^2, n_beta] do not match d's degrees "
                "and the grid");
  }
  m.Y = maps[0].data_ptr<T>();
  m.Yt = maps[1].data_ptr<T>();
  m.P = maps[2].data_ptr<T>();
  m.Pt = maps[3].data_ptr<T>();
  m.A = maps[4].data_ptr<T>();
  m.Lp = maps[5].data_ptr<T>();
  m.Ls = maps[6].data_ptr<T>();
  for (int64_t k = 0; k < m.K1; ++k)
    for (int64_t q = -k; q <= k; ++q) {
      m.k_of_q.push_back(k);
      m.m_of_q.push_back(q + m.K1 - 1);
    }
  return m;
}

// body(col, n, scratch) for each vector of columns, in parallel
template <typename V, typename T, typename F>
void columns(const Maps<T>& m, int64_t N, F&& body) {
  const int64_t vectors = (N + kLanes<T> - 1) / kLanes<T>;
  at::parallel_for(0, vectors, 4, [&](int64_t begin, int64_t end) {
    Scratch<V> s(m);
    for (int64_t v = begin; v < end; ++v) {
      const int64_t col = v * kLanes<T>;
      body(col, std::min(kLanes<T>, N - col), s);
    }
  });
}

Tensor rank_forward(const Tensor& a, const Tensor& w, const Tensor& d, at::TensorList maps,
                    int64_t corr) {
  Tensor out;
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "rank_forward", [&] {
    using V = Vec<scalar_t>;
    const Maps<scalar_t> m = read_maps<scalar_t>(maps, a, w, d, corr);
    const int64_t N = a.size(1), rows = (corr - 1) * m.R;
    out = at::empty({rows, m.D_out, N}, a.options());
    const scalar_t *pa = a.data_ptr<scalar_t>(), *pw = w.data_ptr<scalar_t>(),
                   *pd = d.data_ptr<scalar_t>();
    scalar_t* po = out.data_ptr<scalar_t>();
    columns<V>(m, N, [&](int64_t col, int64_t n, Scratch<V>& s) {
      std::vector<V> va(m.D_in), vw(m.J * m.L1), vd(m.R * m.K1), vo(rows * m.D_out);
      load(va.data(), pa, pa, m.D_in, N, col, n);
      load(vw.data(), pw, pw, m.J * m.L1, N, col, n);
      load(vd.data(), pd, pd, m.R * m.K1, N, col, n);
      forward_column(m, va.data(), vw.data(), vd.data(), vo.data(), s);
      store(po, vo.data(), rows * m.D_out, N, col, n);
    });
  });
  return out;
}

std::tuple<Tensor, Tensor, Tensor> rank_vjp(const Tensor& a, const Tensor& w, const Tensor& d,
                                            const Tensor& grad, at::TensorList maps,
                                            int64_t corr) {
  Tensor grad_a = at::empty_like(a), grad_w = at::empty_like(w), grad_d = at::empty_like(d);
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "rank_vjp", [&] {
    using V = Vec<scalar_t>;
    const Maps<scalar_t> m = read_maps<scalar_t>(maps, a, w, d, corr);
    const int64_t N = a.size(1), rows = (corr - 1) * m.R;
    check_input(grad, "grad", 3);
    TORCH_CHECK(grad.size(0) == rows && grad.size(1) == m.D_out && grad.size(2) == N &&
                    grad.scalar_type() == a.scalar_type(),
                "grad must be [", rows, ", ", m.D_out, ", ", N, "] of a's dtype");
    const scalar_t *pa = a.data_ptr<scalar_t>(), *pw = w.data_ptr<scalar_t>(),
                   *pd = d.data_ptr<scalar_t>(), *pg = grad.data_ptr<scalar_t>();
    scalar_t *ga = grad_a.data_ptr<scalar_t>(), *gw = grad_w.data_ptr<scalar_t>(),
             *gd = grad_d.data_ptr<scalar_t>();
    columns<V>(m, N, [&](int64_t col, int64_t n, Scratch<V>& s) {
      std::vector<V> va(m.D_in), vw(m.J * m.L1), vd(m.R * m.K1), vg(rows * m.D_out);
      std::vector<V> oa(m.D_in), ow(m.J * m.L1), od(m.R * m.K1);
      load(va.data(), pa, pa, m.D_in, N, col, n);
      load(vw.data(), pw, pw, m.J * m.L1, N, col, n);
      load(vd.data(), pd, pd, m.R * m.K1, N, col, n);
      load(vg.data(), pg, pg, rows * m.D_out, N, col, n);
      vjp_column(m, va.data(), vw.data(), vd.data(), vg.data(), oa.data(), ow.data(), od.data(),
                 static_cast<V*>(nullptr), s);
      store(ga, oa.data(), m.D_in, N, col, n);
      store(gw, ow.data(), m.J * m.L1, N, col, n);
      store(gd, od.data(), m.R * m.K1, N, col, n);
    });
  });
  return {grad_a, grad_w, grad_d};
}

const void* tangent_ptr(const std::optional<Tensor>& t, const Tensor& like, const char* name) {
  if (!t.has_value() || !t->defined()) return nullptr;
  check_input(*t, name, like.dim());
  TORCH_CHECK(t->sizes() == like.sizes() && t->scalar_type() == like.scalar_type(), name,
              " must match its primal's shape and dtype");
  return t->data_ptr();
}

// The tangents along (v_a, v_w, v_d) (None: zero) of the VJP's outputs (grad held fixed), and
// with need_out that of the forward's output (the VJP's derivative in grad).
std::tuple<Tensor, Tensor, Tensor, Tensor> rank_vjp_tangent(
    const Tensor& a, const Tensor& w, const Tensor& d, const Tensor& grad,
    const std::optional<Tensor>& v_a, const std::optional<Tensor>& v_w,
    const std::optional<Tensor>& v_d, at::TensorList maps, int64_t corr, bool need_inputs,
    bool need_out) {
  Tensor t_a, t_w, t_d, t_out;
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "rank_vjp_tangent", [&] {
    using V = Dual<scalar_t>;
    const Maps<scalar_t> m = read_maps<scalar_t>(maps, a, w, d, corr);
    const int64_t N = a.size(1), rows = (corr - 1) * m.R;
    check_input(grad, "grad", 3);
    TORCH_CHECK(grad.size(0) == rows && grad.size(1) == m.D_out && grad.size(2) == N &&
                    grad.scalar_type() == a.scalar_type(),
                "grad must be [", rows, ", ", m.D_out, ", ", N, "] of a's dtype");
    const auto* ta = static_cast<const scalar_t*>(tangent_ptr(v_a, a, "v_a"));
    const auto* tw = static_cast<const scalar_t*>(tangent_ptr(v_w, w, "v_w"));
    const auto* td = static_cast<const scalar_t*>(tangent_ptr(v_d, d, "v_d"));
    const scalar_t *pa = a.data_ptr<scalar_t>(), *pw = w.data_ptr<scalar_t>(),
                   *pd = d.data_ptr<scalar_t>(), *pg = grad.data_ptr<scalar_t>();
    if (need_inputs) {
      t_a = at::empty_like(a);
      t_w = at::empty_like(w);
      t_d = at::empty_like(d);
    }
    if (need_out) t_out = at::empty_like(grad);
    columns<V>(m, N, [&](int64_t col, int64_t n, Scratch<V>& s) {
      std::vector<V> va(m.D_in), vw(m.J * m.L1), vd(m.R * m.K1), vg(rows * m.D_out);
      load(va.data(), pa, ta, m.D_in, N, col, n);
      load(vw.data(), pw, tw, m.J * m.L1, N, col, n);
      load(vd.data(), pd, td, m.R * m.K1, N, col, n);
      std::vector<V> vo(need_out ? rows * m.D_out : 0);
      if (need_inputs) {
        std::vector<V> oa(m.D_in), ow(m.J * m.L1), od(m.R * m.K1);
        load(vg.data(), pg, static_cast<const scalar_t*>(nullptr), rows * m.D_out, N, col, n);
        vjp_column(m, va.data(), vw.data(), vd.data(), vg.data(), oa.data(), ow.data(),
                   od.data(), need_out ? vo.data() : nullptr, s);
        store(t_a.data_ptr<scalar_t>(), oa.data(), m.D_in, N, col, n, true);
        store(t_w.data_ptr<scalar_t>(), ow.data(), m.J * m.L1, N, col, n, true);
        store(t_d.data_ptr<scalar_t>(), od.data(), m.R * m.K1, N, col, n, true);
      } else if (need_out) {
        forward_column(m, va.data(), vw.data(), vd.data(), vo.data(), s);
      }
      if (need_out) store(t_out.data_ptr<scalar_t>(), vo.data(), rows * m.D_out, N, col, n, true);
    });
  });
  return {t_a, t_w, t_d, t_out};
}

}  // namespace

TORCH_LIBRARY(mace_grid_rank, m) {
  m.def("forward(Tensor a, Tensor w, Tensor d, Tensor[] maps, int correlation) -> Tensor");
  m.def(
      "vjp(Tensor a, Tensor w, Tensor d, Tensor grad, Tensor[] maps, int correlation) -> "
      "(Tensor, Tensor, Tensor)");
  m.def(
      "vjp_tangent(Tensor a, Tensor w, Tensor d, Tensor grad, Tensor? v_a, Tensor? v_w, "
      "Tensor? v_d, Tensor[] maps, int correlation, bool need_inputs, bool need_out) -> "
      "(Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(mace_grid_rank, CPU, m) {
  m.impl("forward", &rank_forward);
  m.impl("vjp", &rank_vjp);
  m.impl("vjp_tangent", &rank_vjp_tangent);
}
