// CPU kernels of the generation engine, called from JAX through XLA's FFI (bitnet_model/native/__init__.py
// builds this file on first use and registers the three handlers below).
//
// bitnet_bitlinear: BitLinear (bitnet_model/bitlinear.py) of one input through one or more projections of a
//   layer, bit for bit what XLA computes for the engine's reference path:
//     s = 127 / max(max|x|, 1e-5) per token, x_q = clip(round_half_even(x * s), -128, 127),
//     y = float(x_q @ T.T) / s * multiplier  (as XLA evaluates it: see dequantize()).
//   Inputs: float32 x [N, K], float32 up [N, K] and norm [K] (empty: none; see Prologue), float32 residual
//   [N, 4R] added to the only projection's output (empty: none), int32 layer [], then
//   per projection uint8 packed [L, R, K] (layer `layer` of a stack in the 2-bit "rows4" layout of
//   bitnet_model/packed.py: byte (r, i) holds T[4r + k, i] + 1 in bits 2k..2k+1) and float32 multipliers [L];
//   attributes eps (RMSNorm) and act (0 none, 1 relu2, 2 silu); one float32 output [N, 4R] per projection.
//   Quantizing once and running q/k/v (or gate/up) in one call shares the quantization and one pass of the
//   thread pool. The integer products are exact in any order:
//     * few tokens (decode): AVX-512 VNNI. Each 64-byte load of a packed row gives four rows of 64 codes
//       (shift + mask), and VPDPBUSD multiplies unsigned codes c = t + 1 by signed activations; the sum of
//       the activations is subtracted once per token (sum (c - 1) x = sum c x - sum x). Reads each packed
//       byte once: decode is bound by memory bandwidth, 0.52 GB of weights per 2B4T token.
//     * many tokens (prefill): AMX. A panel of 32 output rows is unpacked once to signed int8 codes and
//       multiplied by every 32-token block of x with TDPBSSD (16 x 16 x 64 products per instruction).
// bitnet_table_matmul: float32 h [N, H] x table [V, H] (bf16 bits as uint16, or float32) -> f32 [N, V]: the
//   tied output projection, reading the 16-bit table once per call instead of widening it to a float32 copy.
// bitnet_causal_attention: the prefill attention, float32 q [B, T, Hq, D], k and v [B, T, KV, D] and the rope
//   tables cos, sin [T, D] -> [B, T, Hq * D] and the rotated keys [B, T, KV, D] (see causal_attention()).
//
// Work is split over XLA's intra-op thread pool: the calling thread and the helpers it schedules claim
// chunks from one atomic counter, so the call finishes even when no helper ever starts.

#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kValuesPerByte = 4;

// ------------------------------------------------------------------------------------------ capabilities

bool cpu_has_vnni() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vnni");
}

// AMX needs the instructions (CPUID 7.0 EDX bits 24 tile, 25 int8) and the kernel's permission for this
// process to use the 8 KB tile state (Linux arch_prctl ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA).
bool request_amx() {
  unsigned eax, ebx, ecx, edx;
  __asm__ volatile("cpuid" : "=a"(eax), "=b"(ebx), "=c"(ecx), "=d"(edx) : "a"(7), "c"(0));
  const bool tile = (edx >> 24) & 1, int8 = (edx >> 25) & 1;
  if (!tile || !int8) return false;
  constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
}

const bool kHasVnni = cpu_has_vnni();
const bool kHasAmx = kHasVnni && request_amx();
bool g_use_amx = kHasAmx;  // bitnet_native_configure() may turn it off

}  // namespace

// Everything below runs only where bitnet_native_level() > 0 (the loader checks): compiled for AVX-512 VNNI and
// AMX; the capability checks above are not, so loading the library is safe on any x86-64 CPU.
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512vnni,amx-tile,amx-int8")

namespace {

// --------------------------------------------------------------------------------------------- threading

// Runs body(item) for item in [0, items) on the calling thread and up to pool.num_threads() - 1 helpers: the
// pool has one thread per core and the caller takes a core too (with one helper more, a 2B4T prefill of 128
// tokens took 389 against 308 ms at best on the 2-core machine; threads beyond the cores only add switches,
// each saving and restoring the 8 KB AMX tile state).
template <typename Body>
void parallel_for(ffi::ThreadPool& pool, int64_t items, Body body) {
  struct Shared {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
  };
  auto shared = std::make_shared<Shared>();
  auto run = [shared, items, body]() {
    for (int64_t item; (item = shared->next.fetch_add(1)) < items;) {
      body(item);
      shared->done.fetch_add(1, std::memory_order_release);
    }
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads() - 1, items - 1);
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule(decltype(run)(run));  // a copy: the task owns it
  run();
  // A helper may still be inside body(): wait for every item, not just for the counter to run out.
  while (shared->done.load(std::memory_order_acquire) < items) std::this_thread::yield();
}

// ------------------------------------------------------------------------------------------ float math

inline __mmask16 first_lanes(int64_t n) { return n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1); }

// e^x for 16 floats (softmax: scores minus their row maximum; SiLU: -gate): x = n ln2 + r with |r| <= ln2 / 2,
// e^r = 1 + r + r^2 P(r) with Cephes' expf polynomial, times 2^n by VSCALEFPS, which gives 0 for a very
// negative x and inf for a large one, as exp does. XLA's own exp is another approximation: the two agree to
// float rounding (the attention and SiLU tests bound it), not bit for bit.
inline __m512 exp_ps(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-104.0f));  // below this, e^x is 0 in float32 anyway
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);  // ln 2 in two parts: exact n * hi
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}

// ------------------------------------------------------------------------------------- one fused call

struct Projection {
  const uint8_t* packed;  // this layer's [R, K]
  int64_t R;              // packed rows: 4R outputs
  float multiplier;
  float* out;              // [N, 4R]
  const float* residual;   // [N, 4R] added to the output (the layer's residual stream), or null
};

struct Activations {  // x quantized once per call
  const int8_t* q;    // [N, K]
  const float* inv_scale;  // [N]: 1 / s of each token
  const int32_t* sum;  // [N]: sum of the token's q (the VNNI code offset)
  int64_t N, K;
};

// One token x [K]: s = 127 / max(max|x|, 1e-5), q = clip(round_half_even(x * s), -128, 127), as
// bitlinear.quantize_activations computes it in float32; returns 1 / s and the sum of q through the pointers.
void quantize_row(const float* row, int64_t K, int8_t* q, float* inv_scale, int32_t* sum) {
  const int64_t full = K & ~int64_t(15);
  const __mmask16 tail = (K - full) ? __mmask16((1u << (K - full)) - 1) : 0;
  const __m512 lo = _mm512_set1_ps(-128.0f), hi = _mm512_set1_ps(127.0f);
  __m512 amax = _mm512_setzero_ps();
  for (int64_t i = 0; i < full; i += 16) amax = _mm512_max_ps(amax, _mm512_abs_ps(_mm512_loadu_ps(row + i)));
  if (tail) amax = _mm512_max_ps(amax, _mm512_abs_ps(_mm512_maskz_loadu_ps(tail, row + full)));
  const float s = 127.0f / std::max(_mm512_reduce_max_ps(amax), 1e-5f);
  const __m512 sv = _mm512_set1_ps(s);
  __m512i total = _mm512_setzero_si512();
  auto one = [&](__m512 v, __mmask16 m, int8_t* dst) {
    const __m512 r = _mm512_roundscale_ps(_mm512_mul_ps(v, sv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512i codes = _mm512_cvtps_epi32(_mm512_min_ps(_mm512_max_ps(r, lo), hi));
    total = _mm512_add_epi32(total, codes);
    _mm_mask_storeu_epi8(dst, m, _mm512_cvtsepi32_epi8(codes));
  };
  for (int64_t i = 0; i < full; i += 16) one(_mm512_loadu_ps(row + i), 0xFFFF, q + i);
  if (tail) one(_mm512_maskz_loadu_ps(tail, row + full), tail, q + full);
  *inv_scale = 1.0f / s;
  *sum = _mm512_reduce_add_epi32(total);
}

// What the engine computes from a layer's tensors before a BitLinear: optionally act(x) * up (the FFN's
// gated activation, x being the gate), then optionally RMSNorm (x / sqrt(mean(x^2) + eps) * weight). Done
// here, token by token on its way to the quantizer, it saves XLA's separate passes over [N, K] floats
// (2B4T, 512 tokens: ~3 ms per layer). Same formulas as engine.rms_norm and modeling._ACTIVATIONS in float32;
// the mean sums in another order than XLA's, so a normalized value can differ from XLA's by an ulp.
enum class Activation : int32_t { kNone = 0, kRelu2 = 1, kSilu = 2 };

struct Prologue {
  const float* up = nullptr;    // [N, K] with act != kNone
  const float* norm = nullptr;  // [K] RMSNorm weight, or none
  float eps = 0.0f;
  Activation act = Activation::kNone;
  bool none() const { return norm == nullptr && act == Activation::kNone; }
};

inline __m512 activate(__m512 gate, Activation act) {
  if (act == Activation::kRelu2) {
    const __m512 r = _mm512_max_ps(gate, _mm512_setzero_ps());
    return _mm512_mul_ps(r, r);
  }  // silu: x * sigmoid(x) = x / (1 + e^-x)
  return _mm512_div_ps(gate, _mm512_add_ps(_mm512_set1_ps(1.0f), exp_ps(_mm512_sub_ps(_mm512_setzero_ps(), gate))));
}

// Token t's input to the quantizer in y [K].
void prologue_row(const float* x, const Prologue& pr, int64_t K, int64_t t, float* y) {
  const float* row = x + t * K;
  const float* up = pr.up ? pr.up + t * K : nullptr;
  __m512 squares = _mm512_setzero_ps();
  for (int64_t i = 0; i < K; i += 16) {
    const __mmask16 lanes = first_lanes(K - i);
    __m512 v = _mm512_maskz_loadu_ps(lanes, row + i);
    if (pr.act != Activation::kNone) v = _mm512_mul_ps(activate(v, pr.act), _mm512_maskz_loadu_ps(lanes, up + i));
    squares = _mm512_fmadd_ps(v, v, squares);
    _mm512_mask_storeu_ps(y + i, lanes, v);
  }
  if (pr.norm == nullptr) return;
  const float r = 1.0f / std::sqrt(_mm512_reduce_add_ps(squares) / float(K) + pr.eps);
  const __m512 rv = _mm512_set1_ps(r);
  for (int64_t i = 0; i < K; i += 16) {
    const __mmask16 lanes = first_lanes(K - i);
    const __m512 v = _mm512_mul_ps(_mm512_mul_ps(_mm512_maskz_loadu_ps(lanes, y + i), rv),
                                   _mm512_maskz_loadu_ps(lanes, pr.norm + i));
    _mm512_mask_storeu_ps(y + i, lanes, v);
  }
}

// y = acc / s * multiplier for 16 outputs of one token, evaluated as XLA evaluates bitlinear.py's expression:
// its simplifier turns the division by a broadcast scale into a product with the reciprocal, (acc * (1/s)) * m
// (1 ulp apart from a true division in ~20% of values; measured against XLA's CPU output).
inline __m512 dequantize(__m512i acc, float inv_scale, float multiplier) {
  return _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(acc), _mm512_set1_ps(inv_scale)), _mm512_set1_ps(multiplier));
}

// ---------------------------------------------------------------------------------- VNNI (few tokens)

constexpr int64_t kPrefetchRows = 4;

// out[t, 4r + k] for packed rows [r0, r1) of `p` and the NT tokens from t0.
template <int NT>
void vnni_rows(const Projection& p, const Activations& a, int64_t r0, int64_t r1, int64_t t0) {
  const int64_t K = a.K, O = p.R * kValuesPerByte;
  const int8_t* x = a.q + t0 * K;
  const __m512i three = _mm512_set1_epi8(3);
  const int64_t full = K & ~int64_t(63);
  const __mmask64 tail_mask = (K - full) ? ((~0ULL) >> (64 - (K - full))) : 0;
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* row = p.packed + r * K;
    __m512i acc[NT][kValuesPerByte];
    for (int t = 0; t < NT; ++t)
      for (int k = 0; k < kValuesPerByte; ++k) acc[t][k] = _mm512_setzero_si512();
    auto step = [&](__m512i bytes, auto load_x) {
      const __m512i c0 = _mm512_and_si512(bytes, three);
      const __m512i c1 = _mm512_and_si512(_mm512_srli_epi16(bytes, 2), three);
      const __m512i c2 = _mm512_and_si512(_mm512_srli_epi16(bytes, 4), three);
      const __m512i c3 = _mm512_and_si512(_mm512_srli_epi16(bytes, 6), three);
      for (int t = 0; t < NT; ++t) {
        const __m512i xv = load_x(t);
        acc[t][0] = _mm512_dpbusd_epi32(acc[t][0], c0, xv);
        acc[t][1] = _mm512_dpbusd_epi32(acc[t][1], c1, xv);
        acc[t][2] = _mm512_dpbusd_epi32(acc[t][2], c2, xv);
        acc[t][3] = _mm512_dpbusd_epi32(acc[t][3], c3, xv);
      }
    };
    for (int64_t i = 0; i < full; i += 64) {
      // Decode reads each weight byte once, straight from DRAM: a prefetch kPrefetchRows rows ahead keeps more
      // misses in flight than the hardware prefetcher's one stream (9 -> 22 GB/s per core, measured).
      _mm_prefetch(reinterpret_cast<const char*>(row + kPrefetchRows * K + i), _MM_HINT_T0);
      step(_mm512_loadu_si512(row + i), [&](int t) { return _mm512_loadu_si512(x + t * K + i); });
    }
    if (tail_mask)  // masked-off bytes load as 0: code 0 times activation 0
      step(_mm512_maskz_loadu_epi8(tail_mask, row + full),
           [&](int t) { return _mm512_maskz_loadu_epi8(tail_mask, x + t * K + full); });
    for (int t = 0; t < NT; ++t) {
      const int64_t token = t0 + t;
      const float inv_scale = a.inv_scale[token];
      for (int k = 0; k < kValuesPerByte; ++k) {  // scalar dequantize()
        const int32_t sum = _mm512_reduce_add_epi32(acc[t][k]) - a.sum[token];
        const int64_t at = token * O + r * kValuesPerByte + k;
        const float y = (float(sum) * inv_scale) * p.multiplier;
        p.out[at] = p.residual ? p.residual[at] + y : y;
      }
    }
  }
}

constexpr int64_t kVnniRows = 8;  // packed rows per task (32 outputs): q_proj of 2B4T is 80 tasks

void vnni_task(const Projection& p, const Activations& a, int64_t chunk) {
  const int64_t r0 = chunk * kVnniRows, r1 = std::min(p.R, r0 + kVnniRows);
  int64_t t = 0;
  for (; t + 4 <= a.N; t += 4) vnni_rows<4>(p, a, r0, r1, t);
  switch (a.N - t) {
    case 3: vnni_rows<3>(p, a, r0, r1, t); break;
    case 2: vnni_rows<2>(p, a, r0, r1, t); break;
    case 1: vnni_rows<1>(p, a, r0, r1, t); break;
    default: break;
  }
}

// ----------------------------------------------------------------------------------- AMX (many tokens)

struct alignas(64) TileConfig {
  uint8_t palette_id = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

constexpr int64_t kTile = 16;        // rows of a tile; 64 bytes of int8 (or 16 int32) per row
constexpr int64_t kPanelRows = 32;   // output rows per panel: two A tiles
constexpr int64_t kTokenBlock = 32;  // tokens per step: two B tiles
constexpr int64_t kStep = 64;        // input columns per tile product
constexpr int64_t kMaxGroupPanels = 8;       // panels per AMX task: at most 256 output rows ...
constexpr int64_t kMaxGroupBytes = 1 << 20;  // ... and at most half the L2 of one core
// TDPBSSD: C[m][n] += sum_j A[m][4k + j] * B[k][4n + j]. A = the codes of 16 output rows x 64 columns (rows4
// unpacks to exactly that), B = 16 tokens in groups of 4 activations (B[k][4n + j] = x[n, 4k + j]: a 16 x 16
// dword transpose of x, done once per call), C = out.T for 16 outputs x 16 tokens, transposed on the way out.
// (Putting x in A and the codes in B saves the transposes of x and of C but transposes every 1 KB of codes,
// which at 128 tokens cost more than the products.) Both operands are laid out so that the tiles of one k step
// are 2 KB of consecutive bytes: tile loads with a stride of a whole row (2.5-7 KB) hit the same few cache
// sets over and over and ran 2-4x slower.

// 16 x 16 dwords: r[i] dword j -> r[j] dword i (32-bit, 64-bit interleaves, then two 128-bit lane shuffles).
inline void transpose16(__m512i r[16]) {
  __m512i a[16], b[16];
  for (int i = 0; i < 16; i += 2) {
    a[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    a[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {  // b[i + c], lane L: column 4L + c of rows i..i+3
    b[i] = _mm512_unpacklo_epi64(a[i], a[i + 2]);
    b[i + 1] = _mm512_unpackhi_epi64(a[i], a[i + 2]);
    b[i + 2] = _mm512_unpacklo_epi64(a[i + 1], a[i + 3]);
    b[i + 3] = _mm512_unpackhi_epi64(a[i + 1], a[i + 3]);
  }
  for (int c = 0; c < 4; ++c) {
    const __m512i q0 = _mm512_shuffle_i32x4(b[c], b[4 + c], 0x44), q1 = _mm512_shuffle_i32x4(b[c], b[4 + c], 0xEE);
    const __m512i q2 = _mm512_shuffle_i32x4(b[8 + c], b[12 + c], 0x44);
    const __m512i q3 = _mm512_shuffle_i32x4(b[8 + c], b[12 + c], 0xEE);
    r[c] = _mm512_shuffle_i32x4(q0, q2, 0x88);
    r[4 + c] = _mm512_shuffle_i32x4(q0, q2, 0xDD);
    r[8 + c] = _mm512_shuffle_i32x4(q1, q3, 0x88);
    r[12 + c] = _mm512_shuffle_i32x4(q1, q3, 0xDD);
  }
}

// The 32 tokens of block `block` of x [N, K] as B tiles: per k step two [16][64] tiles (tokens 0-15, 16-31),
// row k holding dword n = x[n, 4k .. 4k + 3] (zero padding: tokens past N, columns past K).
void block_tokens(const int8_t* x, int64_t N, int64_t K, int64_t Kp, int64_t block, int8_t* xb) {
  int8_t* dst = xb + block * Kp * kTokenBlock;
  for (int64_t i = 0; i < Kp; i += kStep) {
    const int64_t n = std::min<int64_t>(kStep, K - i);
    for (int64_t half = 0; half < 2; ++half) {
      __m512i rows[kTile];
      for (int64_t t = 0; t < kTile; ++t) {
        const int64_t token = block * kTokenBlock + half * kTile + t;
        const __mmask64 mask = (token < N && n > 0) ? (~0ULL) >> (64 - n) : 0;
        rows[t] = _mm512_maskz_loadu_epi8(mask, x + token * K + i);
      }
      transpose16(rows);
      int8_t* tile = dst + (i / kStep) * kTokenBlock * kStep + half * kTile * kStep;
      for (int64_t k = 0; k < kTile; ++k) _mm512_store_si512(tile + k * kStep, rows[k]);
    }
  }
}

// Signed int8 codes of packed rows [r0, r0 + 8) as A tiles: per k step [32][64], row o holding the codes of
// output 4 r0 + o (rows past R and columns past K: 0).
void unpack_panel(const uint8_t* packed, int64_t R, int64_t K, int64_t Kp, int64_t r0, int8_t* panel) {
  const __m512i three = _mm512_set1_epi8(3), one = _mm512_set1_epi8(1);
  for (int64_t p = 0; p < kPanelRows / kValuesPerByte; ++p) {
    const int64_t r = r0 + p;
    for (int64_t i = 0; i < Kp; i += kStep) {
      const int64_t n = std::min<int64_t>(kStep, K - i);
      const __mmask64 mask = (r < R && n > 0) ? ((~0ULL) >> (64 - n)) : 0;
      _mm_prefetch(reinterpret_cast<const char*>(packed + (r + kPrefetchRows) * K + i), _MM_HINT_T0);  // see vnni_rows
      const __m512i bytes = _mm512_maskz_loadu_epi8(mask, packed + r * K + i);
      int8_t* block = panel + (i / kStep) * kPanelRows * kStep;
      for (int k = 0; k < kValuesPerByte; ++k) {  // code - 1 where a byte was loaded, 0 in the padding
        const __m512i code = _mm512_and_si512(_mm512_srli_epi16(bytes, 2 * k), three);
        _mm512_store_si512(block + (p * kValuesPerByte + k) * kStep, _mm512_maskz_sub_epi8(mask, code, one));
      }
    }
  }
}

// Configures the 8 tiles as 16 rows x 64 bytes for the calling thread, releases them when it goes.
struct TileScope {
  TileScope() {
    TileConfig config;
    for (int i = 0; i < 8; ++i) config.rows[i] = kTile, config.colsb[i] = 64;
    _tile_loadconfig(&config);
  }
  ~TileScope() { _tile_release(); }
};

// out[t0 .. t0 + 32, o0 .. o0 + 32] (clipped to [N, O]) from one unpacked panel and one block of tokens.
void amx_block(const int8_t* panel, const int8_t* tokens, int64_t Kp, const Projection& p, const Activations& a,
               int64_t t0, int64_t o0) {
  const int64_t O = p.R * kValuesPerByte, N = a.N;
  _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
  for (int64_t k0 = 0; k0 < Kp; k0 += kStep) {
    const int64_t offset = (k0 / kStep) * kTokenBlock * kStep;  // kTokenBlock == kPanelRows
    _tile_loadd(4, panel + offset, kStep);                   // outputs 0-15
    _tile_loadd(5, panel + offset + kTile * kStep, kStep);   // outputs 16-31
    _tile_loadd(6, tokens + offset, kStep);                  // tokens 0-15
    _tile_loadd(7, tokens + offset + kTile * kStep, kStep);  // tokens 16-31
    _tile_dpbssd(0, 4, 6);
    _tile_dpbssd(1, 4, 7);
    _tile_dpbssd(2, 5, 6);
    _tile_dpbssd(3, 5, 7);
  }
  // Tile 2i + j holds outputs o0 + 16i .., tokens t0 + 16j ..; transposed, its rows are rows of out [N, O].
  alignas(64) int32_t spill[kTile * kTile];
  auto store = [&](int64_t i_out, int64_t j_tok, auto store_tile) {
    const int64_t col = o0 + i_out * kTile, row = t0 + j_tok * kTile;
    if (row >= N || col >= O) return;
    store_tile(spill);
    __m512i rows[kTile];
    for (int64_t i = 0; i < kTile; ++i) rows[i] = _mm512_load_si512(spill + i * kTile);
    transpose16(rows);
    const __mmask16 cols = col + kTile <= O ? 0xFFFF : __mmask16((1u << (O - col)) - 1);
    for (int64_t i = 0; i < kTile && row + i < N; ++i) {
      const int64_t at = (row + i) * O + col;
      __m512 y = dequantize(rows[i], a.inv_scale[row + i], p.multiplier);
      if (p.residual) y = _mm512_add_ps(_mm512_maskz_loadu_ps(cols, p.residual + at), y);  // as XLA's x + y
      _mm512_mask_storeu_ps(p.out + at, cols, y);
    }
  };
  store(0, 0, [](int32_t* dst) { _tile_stored(0, dst, 64); });
  store(0, 1, [](int32_t* dst) { _tile_stored(1, dst, 64); });
  store(1, 0, [](int32_t* dst) { _tile_stored(2, dst, 64); });
  store(1, 1, [](int32_t* dst) { _tile_stored(3, dst, 64); });
}

// This thread's scratch buffer `slot` (0: unpacked panels, 1: blocked tokens, 2: quantized x, 3: attention
// scores, 4: transposed keys, 5: one token's prologue, 6: rotated queries), at least `bytes` long, 64-byte
// aligned (aligned stores, tile rows on cache lines). Kept between calls: a fresh multi-MB allocation is a
// fresh mmap, and its page faults cost more than the product of a small projection.
int8_t* scratch(int slot, int64_t bytes) {
  struct Free {
    void operator()(int8_t* p) const { ::operator delete[](p, std::align_val_t(64)); }
  };
  thread_local std::unique_ptr<int8_t[], Free> buffers[7];
  thread_local int64_t sizes[7] = {0, 0, 0, 0, 0, 0, 0};
  if (sizes[slot] < bytes) {
    buffers[slot].reset(static_cast<int8_t*>(::operator new[](bytes, std::align_val_t(64))));
    sizes[slot] = bytes;
  }
  return buffers[slot].get();
}

// Below this many tokens the VNNI loop (no panel, no blocked copy of x) is faster than AMX tiles; the loader
// sets it (AMX_MIN_TOKENS in __init__.py, measured with benchmarks/bench_native.py).
int64_t g_amx_min_tokens = 8;

// All projections of one call: one task list, so small ones (k/v: 20 panels) share the threads with big ones.
void bitlinear(ffi::ThreadPool& pool, const float* x, const Prologue& prologue, std::vector<Projection>& projections,
               int64_t N, int64_t K) {
  int8_t* q = scratch(2, N * K);  // the calling thread's; helpers only read it while this call runs
  std::vector<float> inv_scale(N);
  std::vector<int32_t> sum(N);
  constexpr int64_t kQuantizeTokens = 16;
  float* scale_ptr = inv_scale.data();
  int32_t* sum_ptr = sum.data();
  parallel_for(pool, (N + kQuantizeTokens - 1) / kQuantizeTokens, [=, &prologue](int64_t chunk) {
    float* y = prologue.none() ? nullptr : reinterpret_cast<float*>(scratch(5, K * int64_t(sizeof(float))));
    for (int64_t t = chunk * kQuantizeTokens; t < std::min(N, (chunk + 1) * kQuantizeTokens); ++t) {
      if (y != nullptr) prologue_row(x, prologue, K, t, y);
      quantize_row(y != nullptr ? y : x + t * K, K, q + t * K, scale_ptr + t, sum_ptr + t);
    }
  });
  const Activations a{q, scale_ptr, sum_ptr, N, K};
  struct Task {
    const Projection* p;
    int64_t first, count;  // VNNI: chunk index; AMX: panels [first, first + count)
  };
  std::vector<Task> tasks;
  if (!(g_use_amx && N >= g_amx_min_tokens)) {
    for (const Projection& p : projections)
      for (int64_t c = 0; c < (p.R + kVnniRows - 1) / kVnniRows; ++c) tasks.push_back({&p, c, 1});
    const Task* list = tasks.data();
    parallel_for(pool, int64_t(tasks.size()), [=, &a](int64_t i) { vnni_task(*list[i].p, a, list[i].first); });
    return;
  }
  const int64_t Kp = (K + kStep - 1) / kStep * kStep, Np = (N + kTokenBlock - 1) / kTokenBlock * kTokenBlock;
  int8_t* xb = scratch(1, Np * Kp);
  parallel_for(pool, Np / kTokenBlock, [=](int64_t block) { block_tokens(q, N, K, Kp, block, xb); });
  // A task unpacks a group of panels and runs every token block over all of them: the group stays in L2
  // while x streams past it once per group rather than once per panel (at 512 tokens x no longer fits L2:
  // one panel per task ran at half the speed). Groups as large as keeps at least two per thread.
  int64_t panels = 0;
  for (const Projection& p : projections) panels += (p.R * kValuesPerByte + kPanelRows - 1) / kPanelRows;
  const int64_t largest = std::max<int64_t>(1, std::min(kMaxGroupPanels, kMaxGroupBytes / (kPanelRows * Kp)));
  const int64_t per_group = std::clamp<int64_t>(panels / (2 * (pool.num_threads() + 1)), 1, largest);
  for (const Projection& p : projections) {
    const int64_t own = (p.R * kValuesPerByte + kPanelRows - 1) / kPanelRows;
    for (int64_t first = 0; first < own; first += per_group) tasks.push_back({&p, first, std::min(per_group, own - first)});
  }
  const Task* list = tasks.data();
  parallel_for(pool, int64_t(tasks.size()), [=, &a](int64_t i) {
    const Task& task = list[i];
    const int64_t panel_bytes = kPanelRows * Kp;
    int8_t* group = scratch(0, task.count * panel_bytes);
    for (int64_t j = 0; j < task.count; ++j)
      unpack_panel(task.p->packed, task.p->R, K, Kp, (task.first + j) * (kPanelRows / kValuesPerByte),
                   group + j * panel_bytes);
    TileScope tiles;
    for (int64_t t0 = 0; t0 < Np; t0 += kTokenBlock)
      for (int64_t j = 0; j < task.count; ++j)
        amx_block(group + j * panel_bytes, xb + t0 * Kp, Kp, *task.p, a, t0, (task.first + j) * kPanelRows);
  });
}


// --------------------------------------------------------------------------------------- output table

inline __m512 load_row(const uint16_t* p) {
  // a bf16 is the high half of its float32: exact
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}
inline __m512 load_row_tail(const uint16_t* p, __mmask16 m) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}
inline __m512 load_row(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load_row_tail(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }

// out[t, v] = dot(h[t], table[v]) for table rows [v0, v1), four rows at a time (each row read once).
template <typename T>
void table_rows(const float* h, int64_t N, int64_t H, const T* table, int64_t V, int64_t v0, int64_t v1,
                float* out) {
  const int64_t full = H & ~int64_t(15);
  const __mmask16 tail = (H - full) ? __mmask16((1u << (H - full)) - 1) : 0;
  int64_t v = v0;
  for (; v + 4 <= v1; v += 4) {
    const T* rows = table + v * H;
    for (int64_t t = 0; t < N; ++t) {
      const float* ht = h + t * H;
      __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
      for (int64_t i = 0; i < full; i += 16) {
        if (t == 0)  // the rows of three blocks ahead, as in vnni_rows (10.4 -> 11.9 GB/s per core, measured)
          for (int j = 12; j < 16; ++j) _mm_prefetch(reinterpret_cast<const char*>(rows + j * H + i), _MM_HINT_T0);
        const __m512 hv = _mm512_loadu_ps(ht + i);
        a0 = _mm512_fmadd_ps(hv, load_row(rows + i), a0);
        a1 = _mm512_fmadd_ps(hv, load_row(rows + H + i), a1);
        a2 = _mm512_fmadd_ps(hv, load_row(rows + 2 * H + i), a2);
        a3 = _mm512_fmadd_ps(hv, load_row(rows + 3 * H + i), a3);
      }
      if (tail) {
        const __m512 hv = _mm512_maskz_loadu_ps(tail, ht + full);
        a0 = _mm512_fmadd_ps(hv, load_row_tail(rows + full, tail), a0);
        a1 = _mm512_fmadd_ps(hv, load_row_tail(rows + H + full, tail), a1);
        a2 = _mm512_fmadd_ps(hv, load_row_tail(rows + 2 * H + full, tail), a2);
        a3 = _mm512_fmadd_ps(hv, load_row_tail(rows + 3 * H + full, tail), a3);
      }
      float* o = out + t * V + v;
      o[0] = _mm512_reduce_add_ps(a0), o[1] = _mm512_reduce_add_ps(a1);
      o[2] = _mm512_reduce_add_ps(a2), o[3] = _mm512_reduce_add_ps(a3);
    }
  }
  for (; v < v1; ++v) {
    const T* row = table + v * H;
    for (int64_t t = 0; t < N; ++t) {
      __m512 a = _mm512_setzero_ps();
      for (int64_t i = 0; i < full; i += 16) a = _mm512_fmadd_ps(_mm512_loadu_ps(h + t * H + i), load_row(row + i), a);
      if (tail) a = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(tail, h + t * H + full), load_row_tail(row + full, tail), a);
      out[t * V + v] = _mm512_reduce_add_ps(a);
    }
  }
}

template <typename T>
void table_matmul(ffi::ThreadPool& pool, const float* h, int64_t N, int64_t H, const T* table, int64_t V,
                  float* out) {
  constexpr int64_t kRowsPerChunk = 512;  // 2.6 MB of a 2B4T bf16 table per chunk, 251 chunks
  parallel_for(pool, (V + kRowsPerChunk - 1) / kRowsPerChunk, [=](int64_t chunk) {
    table_rows<T>(h, N, H, table, V, chunk * kRowsPerChunk, std::min(V, (chunk + 1) * kRowsPerChunk), out);
  });
}


// ---------------------------------------------------------------------------------- causal attention

// The prefill attention of the engine (apply_rope, then engine._attention without a cache): q [B, T, Hq, D],
// k and v [B, T, KV, D] -> out [B, T, Hq * D], queries and keys first rotated by position (cos, sin [T, D]),
// query head h reading kv head h / G (G = Hq / KV), query t attending to keys 0..t: softmax((q . k) * scale)
// . v, the softmax as jax.nn.softmax computes it (exp(s - max) times 1 / sum). The rotated keys are an output
// too: the cache keeps them. Keys are first rotated and transposed per kv head (kt [D][Tp]) so scores come
// from broadcast q times contiguous keys. Then one task is a block of kQueryBlock queries of the G heads that
// share a kv head: their scores against the keys up to the block's last query, then each row's softmax over
// its own keys, then P . V.
struct AttentionShape {
  int64_t B, T, Hq, KV, D, Tp;  // Tp: the row length of kt, padded_row(T)
  float scale;
};

constexpr int64_t kQueryBlock = 16;

// Row length (floats) of kt and of the score rows for n keys: n rounded up to 16, plus 16. The score loop
// walks D rows of kt at once; rows 2 KB apart (512 keys) all fall in the same few L1 sets and evict each
// other, one line more spreads them (10.1 -> 7.7 ms for a 2B4T layer at 512 tokens, measured).
inline int64_t padded_row(int64_t n) { return (n + 15) / 16 * 16 + 16; }

// y = x * cos + rotate_half(x) * sin for one head row x [D] at one position (modeling.apply_rope: the NeoX
// layout, rotate_half(x) = [-x[D/2:], x[:D/2]]), in float32 products and sums as XLA evaluates it.
void rope_row(const float* x, const float* cos, const float* sin, int64_t D, float* y) {
  const int64_t half = D / 2;
  for (int64_t i = 0; i < half; i += 16) {
    const __mmask16 lanes = first_lanes(half - i);
    const __m512 a = _mm512_maskz_loadu_ps(lanes, x + i), b = _mm512_maskz_loadu_ps(lanes, x + half + i);
    const __m512 lo = _mm512_add_ps(_mm512_mul_ps(a, _mm512_maskz_loadu_ps(lanes, cos + i)),
                                    _mm512_mul_ps(_mm512_sub_ps(_mm512_setzero_ps(), b), _mm512_maskz_loadu_ps(lanes, sin + i)));
    const __m512 hi = _mm512_add_ps(_mm512_mul_ps(b, _mm512_maskz_loadu_ps(lanes, cos + half + i)),
                                    _mm512_mul_ps(a, _mm512_maskz_loadu_ps(lanes, sin + half + i)));
    _mm512_mask_storeu_ps(y + i, lanes, lo);
    _mm512_mask_storeu_ps(y + half + i, lanes, hi);
  }
}

// Keys [j0, j0 + 16) of kv head kv: rotated into k_out [B, T, KV, D] (what the cache keeps), and transposed,
// kt[b, kv][d][j] = k_out[b, j, kv, d] (zeros past T), one 16 x 16 transpose per 16 dims.
void rotate_and_transpose_keys(const float* k, const float* cos, const float* sin, const AttentionShape& s, int64_t b,
                               int64_t kv, int64_t j0, float* k_out, float* kt) {
  for (int64_t j = j0; j < std::min(s.T, j0 + 16); ++j) {
    const int64_t at = ((b * s.T + j) * s.KV + kv) * s.D;
    rope_row(k + at, cos + j * s.D, sin + j * s.D, s.D, k_out + at);
  }
  float* dst = kt + (b * s.KV + kv) * s.D * s.Tp;
  for (int64_t d0 = 0; d0 < s.D; d0 += 16) {
    const __mmask16 dims = first_lanes(s.D - d0);
    __m512i rows[16];
    for (int64_t j = 0; j < 16; ++j)
      rows[j] = j0 + j < s.T ? _mm512_castps_si512(_mm512_maskz_loadu_ps(dims, k_out + ((b * s.T + j0 + j) * s.KV + kv) * s.D + d0))
                             : _mm512_setzero_si512();
    transpose16(rows);
    for (int64_t d = 0; d < 16 && d0 + d < s.D; ++d) _mm512_storeu_si512(dst + (d0 + d) * s.Tp + j0, rows[d]);
  }
}

// scores[r][j0 .. j0 + 16 NV) = (q_r . k_j) * scale for the 4 rows from `rows` (pointers to q rows).
template <int NV>
void score_tile(const float* const* rows, const float* kt, int64_t Tp, int64_t D, int64_t j0, float scale,
                float* const* out) {
  __m512 acc[4][NV];
  for (int i = 0; i < 4; ++i)
    for (int v = 0; v < NV; ++v) acc[i][v] = _mm512_setzero_ps();
  for (int64_t d = 0; d < D; ++d) {
    __m512 key[NV];
    for (int v = 0; v < NV; ++v) key[v] = _mm512_loadu_ps(kt + d * Tp + j0 + 16 * v);
    for (int i = 0; i < 4; ++i) {
      const __m512 qd = _mm512_set1_ps(rows[i][d]);
      for (int v = 0; v < NV; ++v) acc[i][v] = _mm512_fmadd_ps(qd, key[v], acc[i][v]);
    }
  }
  const __m512 sv = _mm512_set1_ps(scale);
  for (int i = 0; i < 4; ++i)
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(out[i] + j0 + 16 * v, _mm512_mul_ps(acc[i][v], sv));
}

// p[0 .. n) = softmax(scores[0 .. n)) in place.
void softmax_row(float* p, int64_t n) {
  __m512 top = _mm512_set1_ps(-INFINITY);
  for (int64_t j = 0; j < n; j += 16) top = _mm512_max_ps(top, _mm512_mask_loadu_ps(top, first_lanes(n - j), p + j));
  const __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(top));
  __m512 total = _mm512_setzero_ps();
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 lanes = first_lanes(n - j);
    const __m512 e = _mm512_maskz_mov_ps(lanes, exp_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(lanes, p + j), m)));
    total = _mm512_add_ps(total, e);
    _mm512_mask_storeu_ps(p + j, lanes, e);
  }
  const __m512 inv = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(total));
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 lanes = first_lanes(n - j);
    _mm512_mask_storeu_ps(p + j, lanes, _mm512_mul_ps(_mm512_maskz_loadu_ps(lanes, p + j), inv));
  }
}

// out rows (NR of them, same query position: n keys each) = p . v over dims [c0, c0 + 16 NV), the last vector
// `tail`-masked; v rows are `stride` floats apart.
template <int NR, int NV>
void pv_tile(const float* const* p, const float* v, int64_t stride, int64_t n, int64_t c0, __mmask16 tail,
             float* const* out) {
  __m512 acc[NR][NV];
  for (int r = 0; r < NR; ++r)
    for (int i = 0; i < NV; ++i) acc[r][i] = _mm512_setzero_ps();
  for (int64_t j = 0; j < n; ++j) {
    const float* row = v + j * stride + c0;
    __m512 val[NV];
    for (int i = 0; i < NV; ++i) val[i] = _mm512_maskz_loadu_ps(i == NV - 1 ? tail : __mmask16(0xFFFF), row + 16 * i);
    for (int r = 0; r < NR; ++r) {
      const __m512 pj = _mm512_set1_ps(p[r][j]);
      for (int i = 0; i < NV; ++i) acc[r][i] = _mm512_fmadd_ps(pj, val[i], acc[r][i]);
    }
  }
  for (int r = 0; r < NR; ++r)
    for (int i = 0; i < NV; ++i)
      _mm512_mask_storeu_ps(out[r] + c0 + 16 * i, i == NV - 1 ? tail : __mmask16(0xFFFF), acc[r][i]);
}

template <int NR>
void pv_rows(const float* const* p, const float* v, int64_t stride, int64_t n, int64_t D, float* const* out) {
  for (int64_t c0 = 0; c0 < D; c0 += 128) {
    const int64_t width = std::min<int64_t>(128, D - c0), nv = (width + 15) / 16;
    const __mmask16 tail = first_lanes(width - 16 * (nv - 1));
    switch (nv) {
      case 1: pv_tile<NR, 1>(p, v, stride, n, c0, tail, out); break;
      case 2: pv_tile<NR, 2>(p, v, stride, n, c0, tail, out); break;
      case 3: pv_tile<NR, 3>(p, v, stride, n, c0, tail, out); break;
      case 4: pv_tile<NR, 4>(p, v, stride, n, c0, tail, out); break;
      case 5: pv_tile<NR, 5>(p, v, stride, n, c0, tail, out); break;
      case 6: pv_tile<NR, 6>(p, v, stride, n, c0, tail, out); break;
      case 7: pv_tile<NR, 7>(p, v, stride, n, c0, tail, out); break;
      default: pv_tile<NR, 8>(p, v, stride, n, c0, tail, out); break;
    }
  }
}

// One task: queries [t0, t1) of batch row b for the G heads of kv head `kv`. Score row g * (t1 - t0) + i
// belongs to head kv * G + g, query t0 + i.
void attention_block(const float* q, const float* cos, const float* sin, const float* kt, const float* v,
                     const AttentionShape& s, int64_t b, int64_t kv, int64_t t0, int64_t t1, float* out) {
  const int64_t G = s.Hq / s.KV, Tq = t1 - t0, rows = G * Tq, keys = (t1 + 15) / 16 * 16, row = padded_row(t1);
  float* scores = reinterpret_cast<float*>(scratch(3, rows * row * int64_t(sizeof(float))));
  float* rotated = reinterpret_cast<float*>(scratch(6, rows * s.D * int64_t(sizeof(float))));
  const float* kth = kt + (b * s.KV + kv) * s.D * s.Tp;
  for (int64_t r = 0; r < rows; ++r) {  // this block's queries, rotated
    const int64_t t = t0 + r % Tq;
    rope_row(q + ((b * s.T + t) * s.Hq + kv * G + r / Tq) * s.D, cos + t * s.D, sin + t * s.D, s.D, rotated + r * s.D);
  }
  auto q_row = [&](int64_t r) { return rotated + r * s.D; };
  auto score_row = [&](int64_t r) { return scores + r * row; };
  // Scores, 64 keys at a time (the keys' 64 columns of kt stay in L1 while every row passes).
  for (int64_t j0 = 0; j0 < keys; j0 += 64) {
    const int64_t nv = std::min<int64_t>(4, (keys - j0) / 16);
    for (int64_t r0 = 0; r0 < rows; r0 += 4) {
      const float* qr[4];
      float* sr[4];
      for (int64_t i = 0; i < 4; ++i) {  // a short last group repeats its last row
        const int64_t r = std::min(r0 + i, rows - 1);
        qr[i] = q_row(r), sr[i] = score_row(r);
      }
      int64_t last = 0;  // the group's latest query: keys after it are masked for every row
      for (int64_t i = 0; i < 4; ++i) last = std::max(last, std::min(r0 + i, rows - 1) % Tq);
      if (j0 > t0 + last) continue;
      switch (nv) {
        case 1: score_tile<1>(qr, kth, s.Tp, s.D, j0, s.scale, sr); break;
        case 2: score_tile<2>(qr, kth, s.Tp, s.D, j0, s.scale, sr); break;
        case 3: score_tile<3>(qr, kth, s.Tp, s.D, j0, s.scale, sr); break;
        default: score_tile<4>(qr, kth, s.Tp, s.D, j0, s.scale, sr); break;
      }
    }
  }
  for (int64_t r = 0; r < rows; ++r) softmax_row(score_row(r), t0 + r % Tq + 1);
  // P . V, two heads of the same query (same number of keys) at a time.
  const float* vh = v + (b * s.T * s.KV + kv) * s.D;
  const int64_t stride = s.KV * s.D;
  auto out_row = [&](int64_t r) { return out + ((b * s.T + t0 + r % Tq) * s.Hq + kv * G + r / Tq) * s.D; };
  for (int64_t i = 0; i < Tq; ++i) {
    const int64_t n = t0 + i + 1;
    int64_t g = 0;
    for (; g + 2 <= G; g += 2) {
      const float* p[2] = {score_row(g * Tq + i), score_row((g + 1) * Tq + i)};
      float* o[2] = {out_row(g * Tq + i), out_row((g + 1) * Tq + i)};
      pv_rows<2>(p, vh, stride, n, s.D, o);
    }
    if (g < G) {
      const float* p[1] = {score_row(g * Tq + i)};
      float* o[1] = {out_row(g * Tq + i)};
      pv_rows<1>(p, vh, stride, n, s.D, o);
    }
  }
}

void causal_attention(ffi::ThreadPool& pool, const float* q, const float* k, const float* v, const float* cos,
                      const float* sin, const AttentionShape& s, float* out, float* k_out) {
  float* kt = reinterpret_cast<float*>(scratch(4, s.B * s.KV * s.D * s.Tp * int64_t(sizeof(float))));
  const int64_t key_blocks = (s.T + 15) / 16;
  parallel_for(pool, s.B * s.KV * key_blocks, [=, &s](int64_t item) {
    rotate_and_transpose_keys(k, cos, sin, s, item / (s.KV * key_blocks), item / key_blocks % s.KV,
                              item % key_blocks * 16, k_out, kt);
  });
  // Later query blocks read more keys: hand them out first, so the last tasks to finish are the short ones.
  const int64_t blocks = (s.T + kQueryBlock - 1) / kQueryBlock;
  parallel_for(pool, s.B * s.KV * blocks, [=, &s](int64_t item) {
    const int64_t block = blocks - 1 - item / (s.B * s.KV), rest = item % (s.B * s.KV);
    const int64_t t0 = block * kQueryBlock;
    attention_block(q, cos, sin, kt, v, s, rest / s.KV, rest % s.KV, t0, std::min(s.T, t0 + kQueryBlock), out);
  });
}


}  // namespace


#pragma GCC pop_options

// The handlers decode XLA's buffers (compiled for any x86-64) and call the kernels above.
namespace {

ffi::Error Bitlinear(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> up,
                     ffi::Buffer<ffi::F32> norm, ffi::Buffer<ffi::F32> residual, ffi::Buffer<ffi::S32> layer,
                     ffi::RemainingArgs args,
                     ffi::RemainingRets rets, float eps, int32_t act) {
  const auto xd = x.dimensions();
  if (xd.size() != 2) return ffi::Error::InvalidArgument("bitnet_bitlinear: x must be [N, K]");
  const int64_t N = xd[0], K = xd[1], l = layer.typed_data()[0];
  Prologue prologue;  // an empty up / norm: none
  if (act < 0 || act > 2) return ffi::Error::InvalidArgument("bitnet_bitlinear: act must be 0 (none), 1 (relu2), 2 (silu)");
  prologue.act = static_cast<Activation>(act);
  if (prologue.act != Activation::kNone) {
    if (up.element_count() != N * K) return ffi::Error::InvalidArgument("bitnet_bitlinear: up must be [N, K] like x");
    prologue.up = up.typed_data();
  }
  if (norm.element_count() > 0) {
    if (norm.element_count() != K) return ffi::Error::InvalidArgument("bitnet_bitlinear: norm must be [K]");
    prologue.norm = norm.typed_data(), prologue.eps = eps;
  }
  if (args.size() == 0 || args.size() != 2 * rets.size())
    return ffi::Error::InvalidArgument("bitnet_bitlinear: expects a (packed, multipliers) pair per output");
  std::vector<Projection> projections;
  for (size_t i = 0; i < rets.size(); ++i) {
    auto packed = args.get<ffi::Buffer<ffi::U8>>(2 * i);
    auto multipliers = args.get<ffi::Buffer<ffi::F32>>(2 * i + 1);
    auto out = rets.get<ffi::Buffer<ffi::F32>>(i);
    if (!packed || !multipliers || !out)
      return ffi::Error::InvalidArgument("bitnet_bitlinear: packed must be uint8, multipliers and outputs float32");
    const auto pd = packed->dimensions(), od = (*out)->dimensions();
    if (pd.size() != 3 || pd[2] != K || multipliers->element_count() != pd[0] || od.size() != 2 || od[0] != N ||
        od[1] != pd[1] * kValuesPerByte)
      return ffi::Error::InvalidArgument("bitnet_bitlinear: expects packed [L, R, K], multipliers [L], out [N, 4R]");
    if (l < 0 || l >= pd[0]) return ffi::Error::InvalidArgument("bitnet_bitlinear: layer out of range");
    projections.push_back({packed->typed_data() + l * pd[1] * K, pd[1], multipliers->typed_data()[l],
                           (*out)->typed_data(), nullptr});
  }
  if (residual.element_count() > 0) {
    if (projections.size() != 1 || residual.element_count() != N * projections[0].R * kValuesPerByte)
      return ffi::Error::InvalidArgument("bitnet_bitlinear: a residual [N, 4R] goes with one projection");
    projections[0].residual = residual.typed_data();
  }
  if (N > 0) bitlinear(pool, x.typed_data(), prologue, projections, N, K);
  return ffi::Error::Success();
}

ffi::Error TableMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> h, ffi::AnyBuffer table,
                       ffi::ResultBuffer<ffi::F32> out) {
  const auto hd = h.dimensions(), td = table.dimensions();
  if (hd.size() != 2 || td.size() != 2 || hd[1] != td[1])
    return ffi::Error::InvalidArgument("bitnet_table_matmul: expects h [N, H] and table [V, H]");
  const int64_t N = hd[0], H = hd[1], V = td[0];
  if (table.element_type() == ffi::U16)
    table_matmul(pool, h.typed_data(), N, H, static_cast<const uint16_t*>(table.untyped_data()), V,
                 out->typed_data());
  else if (table.element_type() == ffi::F32)
    table_matmul(pool, h.typed_data(), N, H, static_cast<const float*>(table.untyped_data()), V,
                 out->typed_data());
  else
    return ffi::Error::InvalidArgument("bitnet_table_matmul: table must be uint16 (bf16 bits) or float32");
  return ffi::Error::Success();
}

ffi::Error CausalAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                           ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::F32> cos, ffi::Buffer<ffi::F32> sin,
                           ffi::ResultBuffer<ffi::F32> out, ffi::ResultBuffer<ffi::F32> k_out) {
  const auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions(), od = out->dimensions();
  if (qd.size() != 4 || kd.size() != 4 || vd.size() != 4 || od.size() != 3)
    return ffi::Error::InvalidArgument("bitnet_causal_attention: expects q [B, T, Hq, D], k, v [B, T, KV, D]");
  const int64_t B = qd[0], T = qd[1], Hq = qd[2], D = qd[3], KV = kd[2];
  for (int i : {0, 1, 3})
    if (kd[i] != qd[i] || vd[i] != qd[i])
      return ffi::Error::InvalidArgument("bitnet_causal_attention: q, k and v differ in batch, length or head size");
  if (vd[2] != KV || KV == 0 || Hq % KV != 0 || od[0] != B || od[1] != T || od[2] != Hq * D)
    return ffi::Error::InvalidArgument("bitnet_causal_attention: heads must be a multiple of kv heads, out [B, T, Hq * D]");
  if (D % 2 != 0 || cos.element_count() != T * D || sin.element_count() != T * D ||
      k_out->element_count() != k.element_count())
    return ffi::Error::InvalidArgument("bitnet_causal_attention: expects an even D, cos and sin [T, D], k_out like k");
  const AttentionShape s{B, T, Hq, KV, D, padded_row(T), static_cast<float>(1.0 / std::sqrt(double(D)))};
  if (B * T * Hq * D > 0)
    causal_attention(pool, q.typed_data(), k.typed_data(), v.typed_data(), cos.typed_data(), sin.typed_data(), s,
                     out->typed_data(), k_out->typed_data());
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(bitnet_bitlinear, Bitlinear, ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .RemainingArgs()
                                  .RemainingRets()
                                  .Attr<float>("eps")
                                  .Attr<int32_t>("act"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(bitnet_table_matmul, TableMatmul, ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(bitnet_causal_attention, CausalAttention, ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());


// What this CPU can run: 0 none (the engine keeps XLA's own products), 1 AVX-512 VNNI, 2 VNNI and AMX.
extern "C" int bitnet_native_level() { return kHasVnni ? (kHasAmx ? 2 : 1) : 0; }

// Tests and benchmarks: force the VNNI loop (use_amx 0) or let AMX take prefill, and move the crossover.
extern "C" void bitnet_native_configure(int use_amx, long amx_min_tokens) {
  g_use_amx = use_amx && kHasAmx;
  if (amx_min_tokens > 0) g_amx_min_tokens = amx_min_tokens;
}
