// The CPU kernel of `mace_grid.conv_kernel`: the summed messages of mace's channel-wise
// convolution, their VJP and the VJP's tangent (the second derivatives of force training), each
// in one pass over the edges that writes nothing per edge but the per-edge results themselves.
//
// For edges e = j -> i and output rows o (input columns s_o .. s_o + d_o, columns of a
// ac_o .. ac_o + d_o, path k_o, place q_o), ax[e, o, c] = sum_m a[e, ac_o + m] x[j, s_o + m, c]:
//
//     out[i, q_o, c] = sum_{e: j -> i} r[e, k_o, c] ax[e, o, c]
//
// Layouts (all contiguous, channels last): x [n, D, C], a [E, K], r [B, P, C], grad [n, R, C],
// rows [R, 5] int64 (s, d, ac, k, q; the places q a permutation: the caller's layout of out, so
// that the next op reads it without a copy), bond [E] int64: edge e reads radial weights
// r[bond[e]] (the two directions of a bond share one row; B = E and bond a permutation where
// none do), and d/dr sums over a bond's edges.
//
// Each op is one pass over the edges: the forward and the VJP's tangent by receiver (edges
// sorted by receiver: `recv_order`, CSR `recv_ptr`; the messages and their tangent accumulated
// per receiver), the VJP by bond (`bond_order`, `bond_ptr`; d/dr accumulated per bond). The
// sender-side results (d/dx and its tangent, n x D x C: small) are added to the sender's rows
// from the same pass, into one zeroed copy per thread (`PerThread`), so no pass reads each
// receiver's R rows of g again per edge. Each receiver or bond is written by one thread, so the
// passes run in parallel (at::parallel_for) without atomics. The forward goes over channels in
// register-sized blocks, and per block the rows of one input irrep (a group, its dimension d a
// template parameter up to 7) share that irrep's d input rows held in registers. The per-edge
// sweeps (the VJP and the tangent) go over an edge's rows with the channels innermost, one
// vector at a time: a's sums over channels finish in registers, and each row's g, r and x are
// loaded once for every output that reads them.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#if defined(__AVX__)
#include <immintrin.h>  // add_lane_sums' horizontal adds; elsewhere lane by lane
#endif
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <optional>
#include <type_traits>
#include <vector>

namespace {

using at::Tensor;

constexpr int64_t kMaxDim = 15;  // input irreps up to l = 7

// The rows that read one input irrep: input columns s .. s + d, rows row0 .. row0 + n, row t's
// columns of a at ac + t d.
struct Group {
  int64_t s, d, ac, row0, n;
};

struct Table {
  std::vector<Group> groups;
  std::vector<int64_t> path, place;  // per row: its path in r, its row in out and grad
};

// The table must stay inside x's D columns, a's K columns and r's P paths: the passes do not
// check their reads.
void check_table(const Table& tab, int64_t D, int64_t K, int64_t P) {
  for (const Group& g : tab.groups)
    TORCH_CHECK(g.s >= 0 && g.s + g.d <= D && g.ac >= 0 && g.ac + g.n * g.d <= K,
                "rows table outside x's ", D, " or a's ", K, " columns");
  for (int64_t k : tab.path) TORCH_CHECK(k >= 0 && k < P, "row path ", k, " outside ", P);
  const int64_t R = tab.place.size();
  std::vector<bool> seen(R, false);
  for (int64_t q : tab.place) {
    TORCH_CHECK(q >= 0 && q < R && !seen[q], "the rows' places are not a permutation of 0..", R);
    seen[q] = true;
  }
}

Table read_rows(const Tensor& rows) {
  TORCH_CHECK(rows.dim() == 2 && rows.size(1) == 5 && rows.scalar_type() == at::kLong,
              "rows must be an int64 [R, 5] table");
  auto t = rows.contiguous();
  const int64_t* p = t.data_ptr<int64_t>();
  Table out;
  for (int64_t o = 0; o < t.size(0); ++o) {
    const int64_t s = p[5 * o], d = p[5 * o + 1], ac = p[5 * o + 2];
    TORCH_CHECK(d >= 1 && d <= kMaxDim, "input dimension ", d, " outside 1..", kMaxDim);
    Group* last = out.groups.empty() ? nullptr : &out.groups.back();
    if (last && last->s == s && last->d == d && last->ac + last->n * d == ac)
      ++last->n;
    else
      out.groups.push_back({s, d, ac, o, 1});
    out.path.push_back(p[5 * o + 3]);
    out.place.push_back(p[5 * o + 4]);
  }
  return out;
}

// Channels are visited in blocks of kBlock<T> (two 32-byte vectors), so a row's values for
// a block stay in vector registers (GCC/Clang vector extensions: AVX where -march=native has
// it, pairs of SSE registers otherwise); the last C % kBlock channels take scalar code.
template <typename T>
struct VecOf {
  typedef T type __attribute__((vector_size(32)));
};
template <typename T>
using V = typename VecOf<T>::type;
template <typename T>
constexpr int64_t kLanes = 32 / sizeof(T);
constexpr int64_t kVecs = 2;
template <typename T>
constexpr int64_t kBlock = kVecs * kLanes<T>;

// One block of channel values: full (kVecs vectors) or the rest (n < kBlock scalars).
template <typename T, bool Full>
struct Lanes;

template <typename T>
struct Lanes<T, true> {
  V<T> v[kVecs];
  static Lanes load(const T* p, int64_t) {
    Lanes out;
    for (int q = 0; q < kVecs; ++q) std::memcpy(&out.v[q], p + q * kLanes<T>, sizeof(V<T>));
    return out;
  }
  static Lanes zero(int64_t) {
    Lanes out;
    for (int q = 0; q < kVecs; ++q) out.v[q] = V<T>{};
    return out;
  }
  void add_to(T* p) const {  // p[l] += this[l]
    for (int q = 0; q < kVecs; ++q) {
      V<T> t;
      std::memcpy(&t, p + q * kLanes<T>, sizeof(V<T>));
      t += v[q];
      std::memcpy(p + q * kLanes<T>, &t, sizeof(V<T>));
    }
  }
  void fma(T s, const Lanes& b) {  // this += s b
    for (int q = 0; q < kVecs; ++q) v[q] += s * b.v[q];
  }
  void fma(const Lanes& a, const Lanes& b) {  // this += a b
    for (int q = 0; q < kVecs; ++q) v[q] += a.v[q] * b.v[q];
  }
  T sum() const {
    V<T> t = v[0];
    for (int q = 1; q < kVecs; ++q) t += v[q];
    T s = 0;
    for (int64_t l = 0; l < kLanes<T>; ++l) s += t[l];
    return s;
  }
  Lanes operator*(const Lanes& b) const {
    Lanes out;
    for (int q = 0; q < kVecs; ++q) out.v[q] = v[q] * b.v[q];
    return out;
  }
  Lanes operator*(T s) const {
    Lanes out;
    for (int q = 0; q < kVecs; ++q) out.v[q] = v[q] * s;
    return out;
  }
};

template <typename T>
struct Lanes<T, false> {
  T v[kBlock<T>];
  int64_t n;
  static Lanes load(const T* p, int64_t n) {
    Lanes out;
    out.n = n;
    for (int64_t l = 0; l < n; ++l) out.v[l] = p[l];
    return out;
  }
  static Lanes zero(int64_t n) {
    Lanes out;
    out.n = n;
    for (int64_t l = 0; l < n; ++l) out.v[l] = 0;
    return out;
  }
  void add_to(T* p) const {
    for (int64_t l = 0; l < n; ++l) p[l] += v[l];
  }
  void fma(T s, const Lanes& b) {
    for (int64_t l = 0; l < n; ++l) v[l] += s * b.v[l];
  }
  void fma(const Lanes& a, const Lanes& b) {
    for (int64_t l = 0; l < n; ++l) v[l] += a.v[l] * b.v[l];
  }
  Lanes operator*(const Lanes& b) const {
    Lanes out = *this;
    for (int64_t l = 0; l < n; ++l) out.v[l] *= b.v[l];
    return out;
  }
  Lanes operator*(T s) const {
    Lanes out = *this;
    for (int64_t l = 0; l < n; ++l) out.v[l] *= s;
    return out;
  }
};

// body(Lanes type tag, c0, n) for each block of channels c0 .. c0 + n
template <typename T, typename F>
inline void channel_blocks(int64_t C, F&& body) {
  int64_t c0 = 0;
  for (; c0 + kBlock<T> <= C; c0 += kBlock<T>) body(Lanes<T, true>{}, c0, kBlock<T>);
  if (c0 < C) body(Lanes<T, false>{}, c0, C - c0);
}

// f(std::integral_constant d) for the input dimensions mace meets (l <= 3), else f(0): runtime
template <typename F>
inline void with_dim(int64_t d, F&& f) {
  switch (d) {
    case 1: return f(std::integral_constant<int64_t, 1>{});
    case 3: return f(std::integral_constant<int64_t, 3>{});
    case 5: return f(std::integral_constant<int64_t, 5>{});
    case 7: return f(std::integral_constant<int64_t, 7>{});
    default: return f(std::integral_constant<int64_t, 0>{});
  }
}

// body(dim, group, d) for each group: d is `dim` (an integral_constant) where with_dim knows the
// dimension, so that the body's loops over it unroll even where the body is not inlined, else
// the group's dimension
template <typename F>
inline void groups(const Table& tab, F&& body) {
  for (const Group& g : tab.groups)
    with_dim(g.d, [&](auto dim) {
      if constexpr (decltype(dim)::value != 0)
        body(dim, g, dim);
      else
        body(dim, g, g.d);
    });
}

// the d rows x[m * C + c0 ..] of a block
template <typename L, typename T>
inline void load_rows(L* xs, const T* x, int64_t d, int64_t C, int64_t n) {
  for (int64_t m = 0; m < d; ++m) xs[m] = L::load(x + m * C, n);
}

// sum_m a[m] xs[m]
template <typename L, typename T>
inline L combine(const T* __restrict a, const L* xs, int64_t d) {
  L y = xs[0] * a[0];
  for (int64_t m = 1; m < d; ++m) y.fma(a[m], xs[m]);
  return y;
}

// out[q] += the sum of s[q]'s lanes, for q < kLanes<T>: a transposing tree of horizontal adds
// on AVX (nine instructions for eight sums), lane by lane elsewhere.
template <typename T>
inline void add_lane_sums(const V<T>* s, T* out) {
#ifdef __AVX__
  if constexpr (std::is_same_v<T, float>) {
    const __m256 ab = _mm256_hadd_ps(_mm256_hadd_ps(s[0], s[1]), _mm256_hadd_ps(s[2], s[3]));
    const __m256 ef = _mm256_hadd_ps(_mm256_hadd_ps(s[4], s[5]), _mm256_hadd_ps(s[6], s[7]));
    const __m256 sums =
        _mm256_permute2f128_ps(ab, ef, 0x20) + _mm256_permute2f128_ps(ab, ef, 0x31);
    _mm256_storeu_ps(out, _mm256_loadu_ps(out) + sums);
    return;
  } else if constexpr (std::is_same_v<T, double>) {
    const __m256d ab = _mm256_hadd_pd(s[0], s[1]), cd = _mm256_hadd_pd(s[2], s[3]);
    const __m256d sums =
        _mm256_permute2f128_pd(ab, cd, 0x20) + _mm256_permute2f128_pd(ab, cd, 0x31);
    _mm256_storeu_pd(out, _mm256_loadu_pd(out) + sums);
    return;
  }
#endif
  for (int64_t q = 0; q < kLanes<T>; ++q)
    for (int64_t l = 0; l < kLanes<T>; ++l) out[q] += s[q][l];
}

// One vector of channels (unaligned load and store).
template <typename T>
inline V<T> vload(const T* p) {
  V<T> v;
  std::memcpy(&v, p, sizeof(V<T>));
  return v;
}
template <typename T>
inline void vstore(T* p, const V<T>& v) {
  std::memcpy(p, &v, sizeof(V<T>));
}

// Sums of vectors' lanes added to consecutive outputs, kLanes<T> at a time (add_lane_sums).
template <typename T>
struct LaneSums {
  T* out;
  V<T> pending[kLanes<T>];
  int64_t n = 0;
  explicit LaneSums(T* out_) : out(out_) {}
  void push(const V<T>& v) {
    pending[n++] = v;
    if (n == kLanes<T>) add_lane_sums<T>(pending, out), out += kLanes<T>, n = 0;
  }
  ~LaneSums() {
    for (int64_t q = 0; q < n; ++q)
      for (int64_t l = 0; l < kLanes<T>; ++l) out[q] += pending[q][l];
  }
};

// Per edge (receiver rows gi, sender rows xj, its a and r), the VJP's per-edge outputs in one
// sweep of the rows, so g, r and x are loaded once for all: d/da (WA: ga[t d + m] = sum_c
// g r x_m, into gae, zeroed), d/dr (WR: g (a x) added to each row's path, into gre) and d/dx
// (WX: a^T (g r) added to the sender's rows gxj, which stay in L1), rows outermost and
// channels innermost one vector at a time (a's sums over channels finish in registers).
template <typename T, bool WA, bool WR, bool WX>
void vjp_edge(const Table& tab, const T* __restrict gi, const T* __restrict re,
              const T* __restrict xj, const T* __restrict ae, int64_t C, T* __restrict gae,
              T* __restrict gre, T* __restrict gxj) {
  const int64_t *path = tab.path.data(), *place = tab.place.data();
  constexpr int64_t W = kLanes<T>;
  const int64_t Cv = C - C % W;
  groups(tab, [&](auto dim, const Group& gg, auto d) {
    constexpr int64_t Dc = decltype(dim)::value;
    const T* xg = xj + gg.s * C;
    T* gxg = WX ? gxj + gg.s * C : nullptr;
    LaneSums<T> sums(WA ? gae + gg.ac : nullptr);
    for (int64_t t = 0, o = gg.row0; t < gg.n; ++t, ++o) {
      const T *go = gi + place[o] * C, *ro = re + path[o] * C;
      T* gro = WR ? gre + path[o] * C : nullptr;
      T at[Dc ? Dc : kMaxDim];  // the row's a in registers: the stores below could alias ae
      for (int64_t m = 0; m < d; ++m) at[m] = ae[gg.ac + t * d + m];
      V<T> acc[Dc ? Dc : kMaxDim];
      if constexpr (WA)
        for (int64_t m = 0; m < d; ++m) acc[m] = V<T>{};
      for (int64_t c = 0; c < Cv; c += W) {
        const V<T> gc = vload(go + c);
        const V<T> u = gc * vload(ro + c);
        V<T> ax{};
        for (int64_t m = 0; m < d; ++m) {
          const V<T> xm = vload(xg + m * C + c);
          if constexpr (WA) acc[m] += u * xm;
          if constexpr (WR) ax += at[m] * xm;
          if constexpr (WX) vstore(gxg + m * C + c, vload(gxg + m * C + c) + at[m] * u);
        }
        if constexpr (WR) vstore(gro + c, vload(gro + c) + gc * ax);
      }
      for (int64_t c = Cv; c < C; ++c) {  // the last C % W channels, into lane 0
        const T u = go[c] * ro[c];
        T ax = 0;
        for (int64_t m = 0; m < d; ++m) {
          if constexpr (WA) acc[m][0] += u * xg[m * C + c];
          if constexpr (WR) ax += at[m] * xg[m * C + c];
          if constexpr (WX) gxg[m * C + c] += at[m] * u;
        }
        if constexpr (WR) gro[c] += go[c] * ax;
      }
      if constexpr (WA)
        for (int64_t m = 0; m < d; ++m) sums.push(acc[m]);
    }
  });
}

// Per edge, the tangent of the VJP's per-edge and receiver-side outputs along (v_x, v_a, v_r)
// (VX, VA, VR: which are given):
//   oa[t d + m] = sum_c g (v_r x_m + r v_x_m)          the tangent of (g r) x^T  (into oae)
//   or[path]   += g dax,  dax = v_a x + a v_x           the tangent of g (a x)     (into ore)
//   og[o]      += r dax + v_r (a x)                     the tangent of the messages (into ogi)
//   ox[m]      += v_a^T (g r) + a^T (g v_r)             the tangent of a^T (g r)   (into oxj)
// each where its pointer is not null (oae zeroed by the caller): two sweeps of the rows (oa's,
// then the rest), channels innermost one vector at a time.
template <typename T, bool VX, bool VA, bool VR>
void tangent_edge(const Table& tab, const T* __restrict gi, const T* __restrict re,
                  const T* __restrict vre, const T* __restrict xj, const T* __restrict vxj,
                  const T* __restrict ae, const T* __restrict vae, int64_t C, T* __restrict oae,
                  T* __restrict ore, T* __restrict ogi, T* __restrict oxj) {
  constexpr int64_t W = kLanes<T>;
  const int64_t *path = tab.path.data(), *place = tab.place.data();
  const int64_t Cv = C - C % W;
  constexpr bool DAX = VX || VA;  // the tangent of a x
  const bool wa = oae && (VX || VR), wr = ore && DAX, wg = ogi != nullptr,
             wx = oxj && (VA || VR);
  if (wa) {  // a's d sums over all channels per row: (g v_r) x_m + (g r) v_x_m
    groups(tab, [&](auto dim, const Group& gg, auto d) {
      constexpr int64_t Dc = decltype(dim)::value;
      const T* xg = xj + gg.s * C;
      const T* vxg = VX ? vxj + gg.s * C : nullptr;
      LaneSums<T> sums(oae + gg.ac);
      for (int64_t t = 0, o = gg.row0; t < gg.n; ++t, ++o) {
        const T *go = gi + place[o] * C, *ro = re + path[o] * C;
        const T* vro = VR ? vre + path[o] * C : nullptr;
        V<T> acc[Dc ? Dc : kMaxDim];
        for (int64_t m = 0; m < d; ++m) acc[m] = V<T>{};
        auto dot = [&](auto load, int64_t c, auto&& add) {
          const auto gc = load(go + c);
          const auto du = VR ? gc * load(vro + c) : gc, u = VX ? gc * load(ro + c) : gc;
          for (int64_t m = 0; m < d; ++m) {
            if constexpr (VR) add(m, du * load(xg + m * C + c));
            if constexpr (VX) add(m, u * load(vxg + m * C + c));
          }
        };
        for (int64_t c = 0; c < Cv; c += W)
          dot([](const T* p) { return vload(p); }, c, [&](int64_t m, V<T> v) { acc[m] += v; });
        for (int64_t c = Cv; c < C; ++c)  // the last C % W channels, into lane 0
          dot([](const T* p) { return *p; }, c, [&](int64_t m, T v) { acc[m][0] += v; });
        for (int64_t m = 0; m < d; ++m) sums.push(acc[m]);
      }
    });
  }
  if (!(wr || wg || wx)) return;
  groups(tab, [&](auto dim, const Group& gg, auto d) {
    const T* xg = xj + gg.s * C;
    const T* vxg = VX ? vxj + gg.s * C : nullptr;
    T* oxg = wx ? oxj + gg.s * C : nullptr;
    for (int64_t t = 0, o = gg.row0; t < gg.n; ++t, ++o) {
      const int64_t k = path[o];
      const T *go = gi + place[o] * C, *ro = re + k * C, *at = ae + gg.ac + t * d;
      const T* vro = VR ? vre + k * C : nullptr;
      const T* vat = VA ? vae + gg.ac + t * d : nullptr;
      T* oro = wr ? ore + k * C : nullptr;
      T* ogo = wg ? ogi + place[o] * C : nullptr;
      // dax = v_a x + a v_x; or += g dax; og += r dax + v_r (a x); ox += v_a (g r) + a (g v_r)
      auto row = [&](auto load, auto store, int64_t c) {
        using S = decltype(load(go + c));
        const S gc = load(go + c), rc = load(ro + c);
        S dax{}, ax{};
        for (int64_t m = 0; m < d; ++m) {
          const S xm = load(xg + m * C + c);
          if constexpr (VA) dax += vat[m] * xm;
          if constexpr (VX) dax += at[m] * load(vxg + m * C + c);
          if constexpr (VR) ax += at[m] * xm;
        }
        if constexpr (DAX)
          if (wr) store(oro + c, load(oro + c) + gc * dax);
        if (wg) {
          S dg = rc * dax;
          if constexpr (VR) dg += load(vro + c) * ax;
          store(ogo + c, load(ogo + c) + dg);
        }
        if (wx) {
          const S u = gc * rc, du = VR ? gc * load(vro + c) : u;
          for (int64_t m = 0; m < d; ++m) {
            S dx = load(oxg + m * C + c);
            if constexpr (VA) dx += vat[m] * u;
            if constexpr (VR) dx += at[m] * du;
            store(oxg + m * C + c, dx);
          }
        }
      };
      for (int64_t c = 0; c < Cv; c += W)
        row([](const T* p) { return vload(p); }, [](T* p, V<T> v) { vstore(p, v); }, c);
      for (int64_t c = Cv; c < C; ++c)
        row([](const T* p) { return *p; }, [](T* p, T v) { *p = v; }, c);
    }
  });
}

// For every node i in [0, n): start(i), then f(i, edge, next) for each of its edges (from
// `order`, its CSR `ptr`; next: the edge after it in that order, or -1). Nodes are split
// across threads; start lets a pass zero a node's accumulator while it is in cache.
template <typename S, typename F>
void per_node(const Tensor& order, const Tensor& ptr, S start, F f) {
  const int64_t* ord = order.data_ptr<int64_t>();
  const int64_t* p = ptr.data_ptr<int64_t>();
  const int64_t n = ptr.size(0) - 1;
  at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    const int64_t last = p[end];
    for (int64_t i = begin; i < end; ++i) {
      start(i);
      for (int64_t q = p[i]; q < p[i + 1]; ++q) f(i, ord[q], q + 1 < last ? ord[q + 1] : -1);
    }
  });
}

inline void nothing(int64_t) {}

// per_node with each node's channel blocks outermost: start(i), then for each block of channels
// [c0, c0 + n) f(L tag, i, edge, next, c0, n) for each of i's edges. A node's accumulators for
// one block (its rows x one cache line) and an edge's lines of that block stay in L1, where all
// channels' accumulators of a node with many rows (18 KB at 71 rows x 64 channels) would not.
template <typename T, typename S, typename F>
void per_node_blocks(int64_t C, const Tensor& order, const Tensor& ptr, S start, F f) {
  const int64_t* ord = order.data_ptr<int64_t>();
  const int64_t* p = ptr.data_ptr<int64_t>();
  const int64_t n = ptr.size(0) - 1;
  at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      start(i);
      channel_blocks<T>(C, [&](auto tag, int64_t c0, int64_t nc) {
        for (int64_t q = p[i]; q < p[i + 1]; ++q)
          f(tag, i, ord[q], q + 1 < p[i + 1] ? ord[q + 1] : -1, c0, nc);
      });
    }
  });
}

// asks for one block of channels (one cache line at most) of each of the n rows p + t stride
template <typename T>
inline void prefetch_rows(const T* p, int64_t n, int64_t stride) {
  for (int64_t t = 0; t < n; ++t) __builtin_prefetch(p + t * stride);
}

// Asks for the cache lines of p[0 .. count) ahead of use: an edge's radial weights and edge
// matrices are read once, from memory, in an order (channel blocks of each path) the hardware
// prefetcher does not follow, so the next edge's are requested while this one computes.
template <typename T>
inline void prefetch(const T* p, int64_t count) {
  const char* c = reinterpret_cast<const char*>(p);
  for (int64_t b = 0; b < count * int64_t(sizeof(T)); b += 64) __builtin_prefetch(c + b);
}

// Shapes of one edge order (its values, from mace_grid.conv_kernel._csr, are trusted).
void check_order(const Tensor& x, const Tensor& a, const Tensor& index, const Tensor& order,
                 const Tensor& ptr) {
  const int64_t E = a.size(0);
  TORCH_CHECK(index.numel() == E && order.numel() == E && ptr.numel() == x.size(0) + 1,
              "edge tensors disagree: ", E, " edge matrices, ", index.numel(), " indices, ",
              order.numel(), " ordered, ", ptr.numel(), " pointers for ", x.size(0), " nodes");
}

// Shapes of the edges' senders and receivers (values, from mace_grid.conv_kernel._graph,
// trusted).
void check_edges(const Tensor& a, const Tensor& senders, const Tensor& receivers) {
  const int64_t E = a.size(0);
  TORCH_CHECK(senders.numel() == E && receivers.numel() == E, "edge tensors disagree: ", E,
              " edge matrices, ", senders.numel(), " senders, ", receivers.numel(),
              " receivers");
}

// Shapes of the bonds (values, from mace_grid.conv_kernel._graph, trusted): one per edge, rows
// of r; their CSR where given.
void check_bonds(const Tensor& a, const Tensor& r, const Tensor& bond,
                 const Tensor* order = nullptr, const Tensor* ptr = nullptr) {
  const int64_t E = a.size(0), B = r.size(0);
  TORCH_CHECK(bond.numel() == E && B <= E && (B > 0 || E == 0) &&
                  (!order || (order->numel() == E && ptr->numel() == B + 1)),
              "bond tensors disagree: ", E, " edges, ", bond.numel(), " bonds of edges, ", B,
              " radial weight rows");
}

void check(const Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous() && t.dim() == dim, name,
              " must be a contiguous CPU tensor of dimension ", dim);
}

// x, a and r checked, and the rows table read and checked against them
Table checked_table(const Tensor& x, const Tensor& a, const Tensor& r, const Tensor& rows) {
  check(x, "x", 3);
  check(a, "a", 2);
  check(r, "r", 3);
  Table tab = read_rows(rows);
  check_table(tab, x.size(1), a.size(1), r.size(1));
  return tab;
}

// f(B1, B2, B3): three runtime bools as compile-time ones (std::bool_constant; not all false)
template <typename F>
inline void with_bools(bool b1, bool b2, bool b3, F&& f) {
  using Y = std::true_type;
  using N = std::false_type;
  const int code = b1 * 4 + b2 * 2 + b3;
  switch (code) {
    case 1: return f(N{}, N{}, Y{});
    case 2: return f(N{}, Y{}, N{});
    case 3: return f(N{}, Y{}, Y{});
    case 4: return f(Y{}, N{}, N{});
    case 5: return f(Y{}, N{}, Y{});
    case 6: return f(Y{}, Y{}, N{});
    default: return f(Y{}, Y{}, Y{});
  }
}

// A sender-side output (d/dx and its tangent) written from a pass that is not by sender: each
// thread adds into a zeroed copy of its own (the output itself for the first), and `sum` adds
// the copies in thread order. x is small beside the per-edge data, so the copies are cheap,
// and no second pass over the edges (by sender, reading each receiver's R rows of g per edge)
// is needed.
struct PerThread {
  Tensor out, copies;  // copies [threads - 1, n, D, C]
  explicit PerThread(const Tensor& like) : out(at::zeros_like(like)) {
    const int64_t threads = at::get_num_threads();
    if (threads > 1) {
      std::vector<int64_t> shape{threads - 1};
      shape.insert(shape.end(), like.sizes().begin(), like.sizes().end());
      copies = at::zeros(shape, like.options());
    }
  }
  template <typename T>
  T* mine() {
    const int64_t t = at::get_thread_num();
    if (t == 0) return out.data_ptr<T>();
    TORCH_CHECK(copies.defined() && t <= copies.size(0), "thread ", t, " has no copy");
    return copies.data_ptr<T>() + (t - 1) * out.numel();
  }
  Tensor sum() {
    if (copies.defined()) out += copies.sum(0);
    return out;
  }
};

Tensor conv_forward(const Tensor& x, const Tensor& a, const Tensor& r, const Tensor& senders,
                    const Tensor& recv_order, const Tensor& recv_ptr, const Tensor& rows_t,
                    const Tensor& bond) {
  const Table tab = checked_table(x, a, r, rows_t);
  const int64_t R = tab.path.size(), D = x.size(1), C = x.size(2), K = a.size(1), P = r.size(1);
  check_order(x, a, senders, recv_order, recv_ptr);
  check_bonds(a, r, bond);
  auto out = at::empty({x.size(0), R, C}, x.options());  // zeroed per receiver
  const int64_t *snd = senders.data_ptr<int64_t>(), *bnd = bond.data_ptr<int64_t>();
  const int64_t *path = tab.path.data(), *place = tab.place.data();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "conv_forward", [&] {
    using T = scalar_t;
    const T *xp = x.data_ptr<T>(), *ap = a.data_ptr<T>(), *rp = r.data_ptr<T>();
    T* op = out.data_ptr<T>();
    auto zero = [&](int64_t i) { std::fill_n(op + i * R * C, R * C, T(0)); };
    per_node_blocks<T>(C, recv_order, recv_ptr, zero, [&](auto tag, int64_t i, int64_t e,
                                                          int64_t next, int64_t c0, int64_t n) {
      using L = decltype(tag);
      const T *xj = xp + snd[e] * D * C + c0, *ae = ap + e * K, *re = rp + bnd[e] * P * C + c0;
      T* oi = op + i * R * C + c0;
      if (next >= 0) prefetch_rows(rp + bnd[next] * P * C + c0, P, C), prefetch(ap + next * K, K);
      groups(tab, [&](auto dim, const Group& g, auto d) {
        constexpr int64_t Dc = decltype(dim)::value;
        L xs[Dc ? Dc : kMaxDim];
        load_rows(xs, xj + g.s * C, d, C, n);
        for (int64_t t = 0, o = g.row0; t < g.n; ++t, ++o)
          (L::load(re + path[o] * C, n) * combine(ae + g.ac + t * d, xs, d)).add_to(oi + place[o] * C);
      });
    });
  });
  return out;
}

// (grad_x, grad_a, grad_r) for the upstream gradient g; undefined where not wanted. One pass
// over the edges by bond: d/da per edge, d/dr summed over the bond's edges, d/dx added to
// the sender's rows (`PerThread`).
std::tuple<Tensor, Tensor, Tensor> conv_vjp(const Tensor& x, const Tensor& a, const Tensor& r,
                                            const Tensor& g, const Tensor& senders,
                                            const Tensor& receivers, const Tensor& rows_t,
                                            bool want_x, bool want_a, bool want_r,
                                            const Tensor& bond, const Tensor& bond_order,
                                            const Tensor& bond_ptr) {
  check(g, "grad", 3);
  const Table tab = checked_table(x, a, r, rows_t);
  const int64_t R = tab.path.size(), D = x.size(1), C = x.size(2), K = a.size(1), P = r.size(1);
  check_edges(a, senders, receivers);
  check_bonds(a, r, bond, &bond_order, &bond_ptr);
  std::optional<PerThread> gx;
  if (want_x) gx.emplace(x);
  Tensor ga = want_a ? at::empty_like(a) : Tensor();  // per edge: zeroed per edge
  Tensor gr = want_r ? at::empty_like(r) : Tensor();  // per bond: zeroed per bond
  const int64_t *snd = senders.data_ptr<int64_t>(), *rcv = receivers.data_ptr<int64_t>(),
                *bnd = bond.data_ptr<int64_t>();
  if (want_x || want_a || want_r) {
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "conv_vjp", [&] {
      using T = scalar_t;
      const T *xp = x.data_ptr<T>(), *ap = a.data_ptr<T>(), *rp = r.data_ptr<T>(),
              *gp = g.data_ptr<T>();
      T* gap = want_a ? ga.data_ptr<T>() : nullptr;
      T* grp = want_r ? gr.data_ptr<T>() : nullptr;
      auto zero = [&](int64_t b) {
        if (want_r) std::fill_n(grp + b * P * C, P * C, T(0));
      };
      auto sweep = [&](auto wa_, auto wr_, auto wx_) {
        constexpr bool WA = decltype(wa_)::value, WR = decltype(wr_)::value,
                       WX = decltype(wx_)::value;
        per_node(bond_order, bond_ptr, zero, [&](int64_t b, int64_t e, int64_t next) {
          const int64_t j = snd[e];
          if (next >= 0 && (WA || WX)) prefetch(rp + bnd[next] * P * C, P * C);  // d/dr reads no r
          if (next >= 0) prefetch(ap + next * K, K);
          T* gae = WA ? gap + e * K : nullptr;
          if constexpr (WA) std::fill_n(gae, K, T(0));
          vjp_edge<T, WA, WR, WX>(tab, gp + rcv[e] * R * C, rp + b * P * C, xp + j * D * C,
                                  ap + e * K, C, gae, WR ? grp + b * P * C : nullptr,
                                  WX ? gx->mine<T>() + j * D * C : nullptr);
        });
      };
      with_bools(want_a, want_r, want_x, sweep);
    });
  }
  return {want_x ? gx->sum() : Tensor(), ga, gr};
}

// The tangent of (conv_vjp, conv_forward) along (v_x, v_a, v_r): (out_x, out_a, out_r,
// out_grad), undefined where not needed; see `_ConvVJP.backward`. One pass over the edges by
// receiver (out_grad accumulated per receiver), out_x added to the senders' rows
// (`PerThread`), out_r summed over each bond's edges: into its row directly where one thread
// runs the pass (or each bond has one edge), else per edge and then per bond.
std::tuple<Tensor, Tensor, Tensor, Tensor> conv_vjp_tangent(
    const Tensor& x, const Tensor& a, const Tensor& r, const Tensor& g,
    const std::optional<Tensor>& v_x_, const std::optional<Tensor>& v_a_,
    const std::optional<Tensor>& v_r_, const Tensor& senders, const Tensor& recv_order,
    const Tensor& recv_ptr, const Tensor& rows_t, bool need_x, bool need_a, bool need_r,
    bool need_g, const Tensor& bond, const Tensor& bond_order, const Tensor& bond_ptr) {
  check(g, "grad", 3);
  const Tensor v_x = v_x_.value_or(Tensor()), v_a = v_a_.value_or(Tensor()),
               v_r = v_r_.value_or(Tensor());
  if (v_x.defined()) check(v_x, "v_x", 3);
  if (v_a.defined()) check(v_a, "v_a", 2);
  if (v_r.defined()) check(v_r, "v_r", 3);
  const Table tab = checked_table(x, a, r, rows_t);
  const int64_t R = tab.path.size(), D = x.size(1), C = x.size(2), K = a.size(1), P = r.size(1);
  check_order(x, a, senders, recv_order, recv_ptr);
  check_bonds(a, r, bond, &bond_order, &bond_ptr);
  if (v_r.defined()) check_bonds(a, v_r, bond);
  const int64_t E = a.size(0), B = r.size(0);
  const bool has_vx = v_x.defined(), has_va = v_a.defined(), has_vr = v_r.defined();
  const bool has_dax = has_vx || has_va;  // the tangent of a x
  const bool write_a = need_a && (has_vx || has_vr), write_r = need_r && has_dax;
  const bool write_x = need_x && (has_va || has_vr), write_g = need_g && (has_dax || has_vr);
  // d/dr accumulated into each bond's row, or per edge (zeroed per edge) and summed after
  const bool direct_r = B == E || at::get_num_threads() == 1;
  std::optional<PerThread> ox;
  if (write_x) ox.emplace(x);
  Tensor oa = need_a ? (write_a ? at::empty_like(a) : at::zeros_like(a)) : Tensor();
  Tensor orr = need_r ? (write_r && direct_r ? at::empty_like(r) : at::zeros_like(r)) : Tensor();
  Tensor per_edge_r = write_r && !direct_r ? at::empty({E, P, C}, r.options()) : orr;
  Tensor og = need_g ? (write_g ? at::empty({x.size(0), R, C}, x.options())
                                : at::zeros({x.size(0), R, C}, x.options()))
                     : Tensor();
  const int64_t *snd = senders.data_ptr<int64_t>(), *bnd = bond.data_ptr<int64_t>();
  if (write_a || write_r || write_g || write_x) {
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "conv_vjp_tangent", [&] {
      using T = scalar_t;
      const T *xp = x.data_ptr<T>(), *ap = a.data_ptr<T>(), *rp = r.data_ptr<T>(),
              *gp = g.data_ptr<T>();
      const T* vxp = has_vx ? v_x.data_ptr<T>() : nullptr;
      const T* vap = has_va ? v_a.data_ptr<T>() : nullptr;
      const T* vrp = has_vr ? v_r.data_ptr<T>() : nullptr;
      T* oap = write_a ? oa.data_ptr<T>() : nullptr;
      T* orp = write_r ? per_edge_r.data_ptr<T>() : nullptr;
      T* ogp = write_g ? og.data_ptr<T>() : nullptr;
      // each row of d/dr zeroed where its first edge comes (in cache), not all rows up front:
      // per edge, or per bond on one thread (every bond has an edge)
      std::vector<char> touched(write_r && direct_r && B < E ? B : 0, 0);
      auto zero = [&](int64_t i) {
        if (write_g) std::fill_n(ogp + i * R * C, R * C, T(0));
      };
      with_bools(has_vx, has_va, has_vr, [&](auto vx_, auto va_, auto vr_) {
        constexpr bool VX = decltype(vx_)::value, VA = decltype(va_)::value,
                       VR = decltype(vr_)::value;
        per_node(recv_order, recv_ptr, zero, [&](int64_t i, int64_t e, int64_t next) {
          const int64_t j = snd[e], b = bnd[e];
          if (next >= 0) {
            prefetch(ap + next * K, K), prefetch(rp + bnd[next] * P * C, P * C);
            if (VR) prefetch(vrp + bnd[next] * P * C, P * C);
            if (VA) prefetch(vap + next * K, K);
          }
          T* oae = write_a ? oap + e * K : nullptr;
          T* ore = write_r ? orp + (direct_r ? b : e) * P * C : nullptr;
          if (write_a) std::fill_n(oae, K, T(0));
          if (write_r && (touched.empty() || !touched[b])) {
            std::fill_n(ore, P * C, T(0));
            if (!touched.empty()) touched[b] = 1;
          }
          tangent_edge<T, VX, VA, VR>(tab, gp + i * R * C, rp + b * P * C,
                                      VR ? vrp + b * P * C : nullptr, xp + j * D * C,
                                      VX ? vxp + j * D * C : nullptr, ap + e * K,
                                      VA ? vap + e * K : nullptr, C, oae, ore,
                                      write_g ? ogp + i * R * C : nullptr,
                                      write_x ? ox->mine<T>() + j * D * C : nullptr);
        });
      });
      if (write_r && !direct_r) {  // per bond: the sum of its edges' d/dr
        T* out = orr.data_ptr<T>();
        per_node(bond_order, bond_ptr, nothing, [&](int64_t b, int64_t e, int64_t) {
          T* ob = out + b * P * C;
          const T* oe = orp + e * P * C;
          for (int64_t q = 0; q < P * C; ++q) ob[q] += oe[q];
        });
      }
    });
  }
  return {need_x ? (write_x ? ox->sum() : at::zeros_like(x)) : Tensor(), oa, orr, og};
}

}  // namespace

// Schemas, and CPU kernels (below autograd and Python dispatch, so a TorchDispatchMode such as
// mace_grid.tp.work's counter sees each call).
TORCH_LIBRARY(mace_grid_conv, m) {
  m.def(
      "forward(Tensor x, Tensor a, Tensor r, Tensor senders, Tensor recv_order, "
      "Tensor recv_ptr, Tensor rows, Tensor bond) -> Tensor");
  m.def(
      "vjp(Tensor x, Tensor a, Tensor r, Tensor grad, Tensor senders, Tensor receivers, "
      "Tensor rows, bool want_x, bool want_a, bool want_r, Tensor bond, Tensor bond_order, "
      "Tensor bond_ptr) -> (Tensor, Tensor, Tensor)");
  m.def(
      "vjp_tangent(Tensor x, Tensor a, Tensor r, Tensor grad, Tensor? v_x, Tensor? v_a, "
      "Tensor? v_r, Tensor senders, Tensor recv_order, Tensor recv_ptr, Tensor rows, "
      "bool need_x, bool need_a, bool need_r, bool need_g, Tensor bond, Tensor bond_order, "
      "Tensor bond_ptr) -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(mace_grid_conv, CPU, m) {
  m.impl("forward", &conv_forward);
  m.impl("vjp", &conv_vjp);
  m.impl("vjp_tangent", &conv_vjp_tangent);
}
