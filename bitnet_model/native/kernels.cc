// CPU kernels of the generation engine, called from JAX through XLA's FFI (bitnet_model/native/__init__.py
// builds this file on first use and registers the four handlers below).
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
//   thread pool. The integer products are exact in any order; each packed byte holds four rows' codes
//   c = t + 1 in {0, 1, 2}, multiplied unsigned by the signed activations, and the sum of the activations is
//   subtracted once per token (sum (c - 1) x = sum c x - sum x):
//     * AVX2 (any token count): VPMADDUBSW pairs of c * x into int16 (|pair| <= 2 * 2 * 128: no saturation),
//       summed in int16 over blocks of columns short enough not to overflow, then widened with VPMADDWD. One
//       token reads the packed bytes directly; from two on, a task unpacks its rows' codes once and runs tiles
//       of 4 outputs x 3 tokens over them.
//     * AVX-512 VNNI (few tokens; up to LUT_MIN_TOKENS on a CPU without AMX): each 64-byte load of a packed row
//       gives four rows of 64 codes (shift + mask) for VPDPBUSD, into tiles of 4 outputs x up to 4 tokens
//       whose 16 accumulators stay in registers (see vnni_rows). Both loops read each packed byte once: decode
//       is bound by memory bandwidth, 0.52 GB of weights per 2B4T token.
//     * AMX (many tokens): a panel of 32 output rows is unpacked once to signed int8 codes and multiplied
//       by every 32-token block of x with TDPBSSD (16 x 16 x 64 products per instruction).
//     * VNNI + table lookups (many tokens on a CPU without AMX): two thirds of the columns through VPDPBUSD
//       with one output per lane, a third through VPERMW lookups of 27-entry tables of three activations'
//       sums, the two interleaved so that the lookups run beside the VPDPBUSDs (see lut_products).
// bitnet_table_matmul: float32 h [N, H] x table [V, H] (bf16 bits as uint16, float32, or int8 codes of the
//   opt-in int8 head) -> f32 [N, V]: the tied output projection, reading the table once per call instead of
//   widening it to a float32 copy.
// bitnet_greedy_head: the argmax token of each h [N, H] against the table, as argmax(table_matmul) picks it,
//   from an int8 screen of the table and exact scores of the rows that can still win (see greedy_rows()).
// bitnet_table_rows: the embedding lookup, int32 ids [N] -> float32 rows [N, H] of a bf16 or float32 table.
//   The three table handlers also take a table read in place from a memory-mapped file (see TableView).
// bitnet_causal_attention: the prefill attention, float32 q [B, T, Hq, D], k and v [B, T, KV, D] and the rope
//   tables cos, sin [T, D] -> [B, T, Hq * D] and the rotated keys [B, T, KV, D] (see causal_attention()).
// bitnet_cached_attention: the same for new tokens after `start` cached positions, reading one layer of the
//   stacked caches [L, B, S, KV, D] in place (see cached_attention()).
//
// One library holds every instruction set: the kernels of each live in their own namespace (avx2, avx512)
// compiled under `#pragma GCC target`. What is one computation at every vector width (the quantizer and its
// prologue, the output table, RoPE, the attention's scores, softmax and P . V) is written once, in
// vector_kernels.inc, against a small traits struct per set (Avx2, Avx512: loads, stores, arithmetic,
// reductions, exp domain); each namespace includes it after its traits. Each set keeps its own ternary products
// (VPMADDUBSW, VPDPBUSD, AMX tiles) and key transpose. Everything else (capability checks, static initializers, threading,
// the loops that hand out work, the handlers) for plain x86-64. The handlers pick the kernels per call from
// g_level (Kernels below), so a CPU without AVX-512 never executes an AVX-512 instruction; GCC does not inline
// a function into one compiled for fewer instructions, so nothing crosses those lines.
//
// Work is split over XLA's intra-op thread pool: the calling thread and the helpers it schedules claim
// chunks from one atomic counter, so the call finishes even when no helper ever starts.

#include <immintrin.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <optional>
#include <thread>
#include <type_traits>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kValuesPerByte = 4;

// ------------------------------------------------------------------------------------------ capabilities

// What a CPU can run, each level including the ones below (LEVELS in __init__.py).
enum Level : int { kNone = 0, kAvx2 = 1, kAvx512Vnni = 2, kAmx = 3 };

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

// __builtin_cpu_supports also checks that the OS saves the wider registers (XGETBV), not only CPUID.
int cpu_level() {
  __builtin_cpu_init();
  if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("fma")) return kNone;
  if (!__builtin_cpu_supports("avx512f") || !__builtin_cpu_supports("avx512bw") ||
      !__builtin_cpu_supports("avx512vl") || !__builtin_cpu_supports("avx512vnni"))
    return kAvx2;
  return request_amx() ? kAmx : kAvx512Vnni;
}

const int kCpuLevel = cpu_level();
int g_level = kCpuLevel;  // the kernels in use: bitnet_native_configure() may lower it

// Below this many tokens the VNNI loop (no panel, no blocked copy of x) is faster than AMX tiles; the loader
// sets it (AMX_MIN_TOKENS in __init__.py, measured with benchmarks/bench_native.py).
int64_t g_amx_min_tokens = 8;
// From this many tokens the VNNI + table lookup products (lut_products) beat the VNNI loop where AMX does not
// take them (LUT_MIN_TOKENS in __init__.py, measured with benchmarks/bench_native.py).
int64_t g_lut_min_tokens = 32;

// --------------------------------------------------------------------------------------------- threading

// Runs body(item) for item in [0, items) on the calling thread and up to pool.num_threads() - 1 helpers: the
// pool has one thread per core and the caller takes a core too (one helper more was slower, BENCHMARKS.md's
// kernel notes: threads beyond the cores only add switches, each saving and restoring the 8 KB AMX tile state).
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

// This thread's scratch buffer `slot` (0: unpacked panels, 1: blocked tokens, 2: quantized x, 3: attention
// scores, 4: transposed keys, 5: one token's prologue, 6: rotated queries, 7: h split for a bf16 table, 8 and 9:
// the greedy screen's dots and bounds, 10 to 13: the table lookups' padded x, tables, panel and sums), at least
// `bytes` long, 64-byte aligned (aligned stores, tile rows on cache lines). Kept between calls: a fresh multi-MB allocation is a fresh mmap, and its page faults cost more
// than the product of a small projection.
int8_t* scratch(int slot, int64_t bytes) {
  struct Free {
    void operator()(int8_t* p) const { ::operator delete[](p, std::align_val_t(64)); }
  };
  thread_local std::unique_ptr<int8_t[], Free> buffers[14];
  thread_local int64_t sizes[14] = {};
  if (sizes[slot] < bytes) {
    buffers[slot].reset(static_cast<int8_t*>(::operator new[](bytes, std::align_val_t(64))));
    sizes[slot] = bytes;
  }
  return buffers[slot].get();
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
  const int32_t* sum;  // [N]: sum of the token's q (the code offset)
  int64_t N, K;
};

// What the engine computes from a layer's tensors before a BitLinear: optionally act(x) * up (the FFN's
// gated activation, x being the gate), then optionally RMSNorm (x / sqrt(mean(x^2) + eps) * weight). Done
// here, token by token on its way to the quantizer, it saves XLA's separate passes over [N, K] floats.
// Same formulas as engine.rms_norm and modeling._ACTIVATIONS in float32;
// the mean sums in another order than XLA's, so a normalized value can differ from XLA's by an ulp.
enum class Activation : int32_t { kNone = 0, kRelu2 = 1, kSilu = 2 };

struct Prologue {
  const float* up = nullptr;    // [N, K] with act != kNone
  const float* norm = nullptr;  // [K] RMSNorm weight, or none
  float eps = 0.0f;
  Activation act = Activation::kNone;
  bool none() const { return norm == nullptr && act == Activation::kNone; }
};

// Decode reads each weight byte once, straight from DRAM. From two tokens on the loops compute longer per byte,
// and a prefetch kPrefetchRows rows ahead keeps more misses in flight than the hardware prefetcher's one stream.
// One token's loop does so little per byte that the hardware prefetcher keeps up with the one contiguous stream of
// a large task (kStreamTaskBytes) on its own: there a software prefetch only adds loads (31 against 19 GB/s on the
// 2-core EPYC, BENCHMARKS.md's kernel notes).
constexpr int64_t kPrefetchRows = 4;
// While every token of a call passes each row in one go (Kernels::stream_tokens), a task is this many bytes of
// consecutive rows: the product then reads long contiguous streams, one per thread. Tasks of 8 rows (20 KB of a 2B4T
// row) handed out in turn left both threads hopping between short runs at 60% of the read bandwidth.
constexpr int64_t kStreamTaskBytes = 256 << 10;
constexpr int64_t kRowsPerTask = 8;  // packed rows per task otherwise (32 outputs; an AVX2 panel): 2B4T q_proj is 80 tasks

struct Task {  // a share of one call's products
  const Projection* p;
  int64_t first, count;  // row loops: packed rows [first, first + count); AMX: panels [first, first + count)
};

// --------------------------------------------------------------------------------------- attention shape

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
constexpr int64_t kKeyTile = 64;  // keys per score tile: their columns of kt stay in L1 while every row passes

// Row length (floats) of kt and of the score rows for n keys: n rounded up to 16, plus 16. The score loop
// walks D rows of kt at once; rows 2 KB apart (512 keys) all fall in the same few L1 sets and evict each
// other, one line more spreads them.
inline int64_t padded_row(int64_t n) { return (n + 15) / 16 * 16 + 16; }

// A table value as float32, exactly (a scalar table tail: see dot_row in vector_kernels.inc).
inline float widen(int8_t value) { return float(value); }
inline float widen(uint16_t bits) {  // a bf16 is the high half of its float32
  const uint32_t wide = uint32_t(bits) << 16;
  float value;
  std::memcpy(&value, &wide, sizeof value);
  return value;
}
inline float widen(float value) { return value; }

}  // namespace

// AVX2 + FMA (Intel Haswell on, AMD Zen): every kernel, for CPUs without AVX-512 (and, forced, on any).
#pragma GCC push_options
#pragma GCC target("avx2,fma")

namespace {
namespace avx2 {

// ------------------------------------------------------------------------------------------- vector type

// 2^e for integer e in [-126, 127]: the float with that exponent field.
inline __m256 pow2(__m256i e) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(e, _mm256_set1_epi32(127)), 23));
}

// 8 float32 lanes, for the kernels of vector_kernels.inc.
struct Avx2 {
  using F = __m256;
  using I = __m256i;     // 8 int32
  using Mask = __m256i;  // all-ones lanes are selected, as VMASKMOVPS takes them
  static constexpr int64_t kWidth = 8;
  // No masked loads of bytes or 16-bit words: a table row's last H % 8 columns are summed in scalar.
  static constexpr bool kMaskedTableLoads = false;
  static constexpr int64_t kScoreKeys = 16;  // 4 rows x 2 vectors of scores, 2 of keys, a broadcast: 11 registers
  static constexpr int kPvVectors = 4;  // 32 dims per P . V tile: 2 rows x 4 accumulators, 4 values, a broadcast

  // Lanes [0, n) (n clipped to 0..8): masked-off lanes load 0 and never fault.
  static Mask first_lanes(int64_t n) {
    const int32_t count = int32_t(std::clamp<int64_t>(n, 0, 8));
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(count), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }
  static F zero() { return _mm256_setzero_ps(); }
  static F set1(float v) { return _mm256_set1_ps(v); }
  static F loadu(const float* p) { return _mm256_loadu_ps(p); }
  static F load(const float* p, Mask m) { return _mm256_maskload_ps(p, m); }
  static F load_or(const float* p, Mask m, F fallback) {  // fallback's lanes where m is off
    return _mm256_blendv_ps(fallback, load(p, m), _mm256_castsi256_ps(m));
  }
  static void storeu(float* p, F v) { _mm256_storeu_ps(p, v); }
  static void store(float* p, Mask m, F v) { _mm256_maskstore_ps(p, m, v); }
  static F zero_outside(F v, Mask m) { return _mm256_and_ps(v, _mm256_castsi256_ps(m)); }

  static F add(F a, F b) { return _mm256_add_ps(a, b); }
  static F sub(F a, F b) { return _mm256_sub_ps(a, b); }
  static F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  static F div(F a, F b) { return _mm256_div_ps(a, b); }
  static F max(F a, F b) { return _mm256_max_ps(a, b); }
  static F min(F a, F b) { return _mm256_min_ps(a, b); }
  static F fmadd(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static F fnmadd(F a, F b, F c) { return _mm256_fnmadd_ps(a, b, c); }  // c - a b
  static F abs(F v) { return _mm256_and_ps(v, _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF))); }
  static F round(F v) { return _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }

  static I izero() { return _mm256_setzero_si256(); }
  static I iadd(I a, I b) { return _mm256_add_epi32(a, b); }
  static I to_int(F v) { return _mm256_cvtps_epi32(v); }
  // The first n (<= 8) of 8 int32 codes in [-128, 127] as int8 at dst.
  static void store_codes(int8_t* dst, I codes, int64_t n) {
    const __m128i words = _mm_packs_epi32(_mm256_castsi256_si128(codes), _mm256_extracti128_si256(codes, 1));
    const __m128i bytes = _mm_packs_epi16(words, words);
    if (n >= 8) {
      _mm_storel_epi64(reinterpret_cast<__m128i*>(dst), bytes);
      return;
    }
    alignas(16) int8_t all[16];
    _mm_store_si128(reinterpret_cast<__m128i*>(all), bytes);
    std::memcpy(dst, all, size_t(n));
  }

  static float reduce_add(F v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
  }
  static float reduce_max(F v) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
  }
  static int32_t reduce_add(I v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(1, 0, 3, 2)));
    return _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(2, 3, 0, 1))));
  }

  // For exp (vector_kernels.inc): its domain, beyond which e^x is 0 or inf in float32, and p * 2^n for an
  // integer-valued n in [-150, 128]. There is no VSCALEFPS: 2^n is applied as two factors that are each a
  // normal float, so a very negative x still gives 0 (or a subnormal) and a large one inf, as exp does.
  static F exp_domain(F x) { return _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-104.0f)), _mm256_set1_ps(89.0f)); }
  static F times_pow2(F p, F n) {
    const __m256i whole = _mm256_cvtps_epi32(n), half = _mm256_srai_epi32(whole, 1);
    return _mm256_mul_ps(_mm256_mul_ps(p, pow2(half)), pow2(_mm256_sub_epi32(whole, half)));
  }

  // Table rows as float32, exactly: a bf16 is the high half of its float32, an int8 code (the int8 head) a
  // small integer.
  static F load_table(const uint16_t* p) {
    return _mm256_castsi256_ps(
        _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
  }
  static F load_table(const float* p) { return _mm256_loadu_ps(p); }
  static F load_table(const int8_t* p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
  }
  // 2 * kWidth bf16 table values as kWidth lanes of column pairs, and the float32 of each pair's even and odd
  // column, exactly (see dot_pairs in vector_kernels.inc).
  static I load_pairs(const uint16_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
  static F even(I pairs) { return _mm256_castsi256_ps(_mm256_slli_epi32(pairs, 16)); }
  static F odd(I pairs) { return _mm256_castsi256_ps(_mm256_and_si256(pairs, _mm256_set1_epi32(int32_t(0xFFFF0000u)))); }
};

#include "vector_kernels.inc"


// ------------------------------------------------------------------------------------------ the product

// 32-byte steps summed in int16 before widening to int32: a VPMADDUBSW lane is c0 x0 + c1 x1 with c in
// {0, 1, 2} and x in [-128, 127], so in [-512, 508], and 64 of them stay within int16.
constexpr int64_t kStepsPerBlock = 64;
constexpr int64_t kBlockColumns = 32 * kStepsPerBlock;

// 32 bytes of which the first n (< 32) come from p, the rest 0 (a row's tail: reads nothing past it).
inline __m256i load_partial(const void* p, int64_t n) {
  alignas(32) uint8_t bytes[32] = {};
  std::memcpy(bytes, p, size_t(n));
  return _mm256_load_si256(reinterpret_cast<const __m256i*>(bytes));
}

// [sum of v[0], ..., sum of v[3]]
inline __m128i reduce4(const __m256i v[4]) {
  const __m256i h = _mm256_hadd_epi32(_mm256_hadd_epi32(v[0], v[1]), _mm256_hadd_epi32(v[2], v[3]));
  return _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
}

// out[token, 4r .. 4r + 4) from the four code sums of packed row r: ((acc - sum x) * (1/s)) * m, then
// + residual, the float operations of avx512::dequantize one by one.
inline void store_outputs(const Projection& p, const Activations& a, int64_t token, int64_t r, __m128i sums) {
  const int64_t at = token * p.R * kValuesPerByte + r * kValuesPerByte;
  const __m128i acc = _mm_sub_epi32(sums, _mm_set1_epi32(a.sum[token]));
  __m128 y = _mm_mul_ps(_mm_mul_ps(_mm_cvtepi32_ps(acc), _mm_set1_ps(a.inv_scale[token])), _mm_set1_ps(p.multiplier));
  if (p.residual) y = _mm_add_ps(_mm_loadu_ps(p.residual + at), y);
  _mm_storeu_ps(p.out + at, y);
}

// out[t, 4r + k] for packed rows [r0, r1) of `p` and token t (a decode step's), straight from the packed
// bytes: each byte read once, unpacked in registers.
void token_rows(const Projection& p, const Activations& a, int64_t r0, int64_t r1, int64_t t) {
  const int64_t K = a.K;
  const int8_t* x = a.q + t * K;
  const __m256i three = _mm256_set1_epi8(3), ones = _mm256_set1_epi16(1);
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* row = p.packed + r * K;
    __m256i wide[kValuesPerByte] = {};  // int32 sums
    for (int64_t b0 = 0; b0 < K; b0 += kBlockColumns) {
      const int64_t b1 = std::min(K, b0 + kBlockColumns);
      __m256i part[kValuesPerByte] = {};  // int16 sums of this block
      auto step = [&](__m256i bytes, __m256i x) {
        for (int k = 0; k < kValuesPerByte; ++k) {
          const __m256i codes = _mm256_and_si256(k ? _mm256_srli_epi16(bytes, 2 * k) : bytes, three);
          part[k] = _mm256_add_epi16(part[k], _mm256_maddubs_epi16(codes, x));
        }
      };
      int64_t i = b0;
      for (; i + 32 <= b1; i += 32) {  // no prefetch for one token: see kPrefetchRows
        step(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + i)),
             _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + i)));
      }
      if (i < b1) step(load_partial(row + i, b1 - i), load_partial(x + i, b1 - i));  // zeros: code 0 times 0
      for (int k = 0; k < kValuesPerByte; ++k) wide[k] = _mm256_add_epi32(wide[k], _mm256_madd_epi16(part[k], ones));
    }
    store_outputs(p, a, t, r, reduce4(wide));
  }
}

// sums[k][t] += int16 products over columns [0, n) (n a multiple of 32) of one packed row (the next ones
// `stride` bytes apart, for the prefetch) and two tokens' activations. Eight sums, two rows of x, the bytes,
// a code and the mask fit 16 registers: written out as variables and kept out of line, as GCC otherwise left
// sums on the stack.
__attribute__((noinline)) void pair_sums(const uint8_t* row, int64_t stride, const int8_t* x0, const int8_t* x1,
                                         int64_t n, __m256i sums[kValuesPerByte][2]) {
  __m256i s00 = sums[0][0], s01 = sums[0][1], s10 = sums[1][0], s11 = sums[1][1];
  __m256i s20 = sums[2][0], s21 = sums[2][1], s30 = sums[3][0], s31 = sums[3][1];
  const __m256i three = _mm256_set1_epi8(3);
  auto dot = [](__m256i sum, __m256i code, __m256i x) { return _mm256_add_epi16(sum, _mm256_maddubs_epi16(code, x)); };
  auto load = [](const void* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); };
  for (int64_t i = 0; i < n; i += 32) {
    _mm_prefetch(reinterpret_cast<const char*>(row + kPrefetchRows * stride + i), _MM_HINT_T0);
    __m256i bytes = load(row + i);
    const __m256i a = load(x0 + i), b = load(x1 + i);
    __m256i code = _mm256_and_si256(bytes, three);
    s00 = dot(s00, code, a), s01 = dot(s01, code, b);
    bytes = _mm256_srli_epi16(bytes, 2), code = _mm256_and_si256(bytes, three);
    s10 = dot(s10, code, a), s11 = dot(s11, code, b);
    bytes = _mm256_srli_epi16(bytes, 2), code = _mm256_and_si256(bytes, three);
    s20 = dot(s20, code, a), s21 = dot(s21, code, b);
    bytes = _mm256_srli_epi16(bytes, 2), code = _mm256_and_si256(bytes, three);
    s30 = dot(s30, code, a), s31 = dot(s31, code, b);
  }
  sums[0][0] = s00, sums[0][1] = s01, sums[1][0] = s10, sums[1][1] = s11;
  sums[2][0] = s20, sums[2][1] = s21, sums[3][0] = s30, sums[3][1] = s31;
}

// out[t, 4r + k] and out[t + 1, 4r + k] for packed rows [r0, r1): two tokens sharing each load and
// unpacking of the packed bytes.
void pair_rows(const Projection& p, const Activations& a, int64_t r0, int64_t r1, int64_t t) {
  const int64_t K = a.K, full = K / 32 * 32;
  const int8_t* x0 = a.q + t * K;
  const int8_t* x1 = x0 + K;
  alignas(32) int8_t tail[3][32] = {};  // the last K % 32 columns of the row and of x, zero padded
  std::memcpy(tail[1], x0 + full, size_t(K - full));
  std::memcpy(tail[2], x1 + full, size_t(K - full));
  const __m256i ones = _mm256_set1_epi16(1);
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* row = p.packed + r * K;
    __m256i wide[2][kValuesPerByte] = {};  // int32 sums [token][output]
    for (int64_t b0 = 0; b0 < K; b0 += kBlockColumns) {
      const int64_t n = std::min(full, b0 + kBlockColumns) - b0;
      __m256i part[kValuesPerByte][2] = {};
      pair_sums(row + b0, K, x0 + b0, x1 + b0, n, part);
      if (b0 + kBlockColumns >= K && full < K) {  // the last block's tail: code 0 times 0 past K
        std::memcpy(tail[0], row + full, size_t(K - full));
        pair_sums(reinterpret_cast<const uint8_t*>(tail[0]), 0, tail[1], tail[2], 32, part);
      }
      for (int k = 0; k < kValuesPerByte; ++k)
        for (int j = 0; j < 2; ++j) wide[j][k] = _mm256_add_epi32(wide[j][k], _mm256_madd_epi16(part[k][j], ones));
    }
    store_outputs(p, a, t, r, reduce4(wide[0]));
    store_outputs(p, a, t + 1, r, reduce4(wide[1]));
  }
}

// ----------------------------------------------------------------------- many tokens: unpacked codes

// From this many tokens a task unpacks its rows' codes once and runs every token past them: the unpacking
// (shifts and masks) is then shared by all tokens rather than by two; below it, writing and rereading the
// unpacked codes costs more than it saves (benchmarks/bench_native.py).
constexpr int64_t kPanelMinTokens = 16;

// Codes (uint8 0..2, 0 past K) of packed rows [r0, r1) as panel rows 4 (r - r0) + k, each Kp = K rounded up
// to 32 bytes long.
void unpack_panel(const uint8_t* packed, int64_t K, int64_t Kp, int64_t r0, int64_t r1, uint8_t* panel) {
  const __m256i three = _mm256_set1_epi8(3);
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* row = packed + r * K;
    uint8_t* dst = panel + (r - r0) * kValuesPerByte * Kp;
    for (int64_t i = 0; i < Kp; i += 32) {
      const __m256i bytes = i + 32 <= K ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + i))
                                        : load_partial(row + i, K - i);
      for (int k = 0; k < kValuesPerByte; ++k)
        _mm256_store_si256(reinterpret_cast<__m256i*>(dst + k * Kp + i),
                           _mm256_and_si256(_mm256_srli_epi16(bytes, 2 * k), three));
    }
  }
}

// int16 sums over columns [b0, b1) of four panel rows (`codes`, rows Kp apart) times three tokens' activations
// (x, rows K apart) -> sums[k][t]. Twelve sums, three rows of x and a code fill 16 registers: written out as
// variables and kept out of line, as GCC otherwise left most of the sums on the stack.
__attribute__((noinline)) void tile_sums(const uint8_t* codes, int64_t Kp, const int8_t* x0, const int8_t* x1,
                                         const int8_t* x2, int64_t b0, int64_t b1, __m256i sums[kValuesPerByte][3]) {
  __m256i s00 = _mm256_setzero_si256(), s01 = s00, s02 = s00, s10 = s00, s11 = s00, s12 = s00;
  __m256i s20 = s00, s21 = s00, s22 = s00, s30 = s00, s31 = s00, s32 = s00;
  auto dot = [](__m256i sum, __m256i code, __m256i x) { return _mm256_add_epi16(sum, _mm256_maddubs_epi16(code, x)); };
  auto load = [](const void* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); };
  for (int64_t i = b0; i < b1; i += 32) {
    const __m256i a = load(x0 + i), b = load(x1 + i), c = load(x2 + i);
    __m256i code = load(codes + i);
    s00 = dot(s00, code, a), s01 = dot(s01, code, b), s02 = dot(s02, code, c);
    code = load(codes + Kp + i);
    s10 = dot(s10, code, a), s11 = dot(s11, code, b), s12 = dot(s12, code, c);
    code = load(codes + 2 * Kp + i);
    s20 = dot(s20, code, a), s21 = dot(s21, code, b), s22 = dot(s22, code, c);
    code = load(codes + 3 * Kp + i);
    s30 = dot(s30, code, a), s31 = dot(s31, code, b), s32 = dot(s32, code, c);
  }
  sums[0][0] = s00, sums[0][1] = s01, sums[0][2] = s02, sums[1][0] = s10, sums[1][1] = s11, sums[1][2] = s12;
  sums[2][0] = s20, sums[2][1] = s21, sums[2][2] = s22, sums[3][0] = s30, sums[3][1] = s31, sums[3][2] = s32;
}

// out for the four outputs of packed row r (`codes`: their panel rows) and the tokens [t0, t0 + 3) below N
// (a short group repeats its last token and stores it once). Reads up to 31 bytes past a token's row
// (Kp > K): the next token's or quantize_tokens' slack, times code 0.
void panel_row(const Projection& p, const Activations& a, const uint8_t* codes, int64_t Kp, int64_t r, int64_t t0) {
  const int64_t tokens = std::min<int64_t>(3, a.N - t0);
  const int8_t* x[3];
  for (int64_t t = 0; t < 3; ++t) x[t] = a.q + (t0 + std::min(t, tokens - 1)) * a.K;
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i wide[3][kValuesPerByte] = {};  // int32 sums [token][output]
  for (int64_t b0 = 0; b0 < Kp; b0 += kBlockColumns) {
    __m256i part[kValuesPerByte][3];
    tile_sums(codes, Kp, x[0], x[1], x[2], b0, std::min(Kp, b0 + kBlockColumns), part);
    for (int k = 0; k < kValuesPerByte; ++k)
      for (int t = 0; t < 3; ++t) wide[t][k] = _mm256_add_epi32(wide[t][k], _mm256_madd_epi16(part[k][t], ones));
  }
  for (int64_t t = 0; t < tokens; ++t) store_outputs(p, a, t0 + t, r, reduce4(wide[t]));
}

// All tokens through the task's rows, three at a time: the three rows of x stay in L1 while the task's rows
// pass, the panel (32 code rows) in L2.
void panel_task(const Projection& p, const Activations& a, int64_t r0, int64_t r1) {
  const int64_t Kp = (a.K + 31) / 32 * 32;
  uint8_t* panel = reinterpret_cast<uint8_t*>(scratch(0, kRowsPerTask * kValuesPerByte * Kp));
  unpack_panel(p.packed, a.K, Kp, r0, r1, panel);
  for (int64_t t = 0; t < a.N; t += 3)
    for (int64_t r = r0; r < r1; ++r) panel_row(p, a, panel + (r - r0) * kValuesPerByte * Kp, Kp, r, t);
}

void product_task(const Projection& p, const Activations& a, int64_t r0, int64_t r1) {
  if (a.N >= kPanelMinTokens) {
    panel_task(p, a, r0, r1);
    return;
  }
  int64_t t = 0;
  for (; t + 2 <= a.N; t += 2) pair_rows(p, a, r0, r1, t);
  if (t < a.N) token_rows(p, a, r0, r1, t);
}

// ---------------------------------------------------------------------------------- causal attention

// Keys [j0, j0 + 16) of kv head kv: rotated into k_out [B, T, KV, D], and transposed into kt[b, kv][d][j]
// (zeros past T). The transpose is T * D stores per kv head, next to the T^2 * D products of the scores.
void rotate_and_transpose_keys(const float* k, const float* cos, const float* sin, const AttentionShape& s, int64_t b,
                               int64_t kv, int64_t j0, float* k_out, float* kt) {
  float* dst = kt + (b * s.KV + kv) * s.D * s.Tp;
  for (int64_t j = j0; j < j0 + 16; ++j) {
    const int64_t at = ((b * s.T + j) * s.KV + kv) * s.D;
    if (j < s.T) rope_row<Avx2>(k + at, cos + j * s.D, sin + j * s.D, s.D, k_out + at);
    for (int64_t d = 0; d < s.D; ++d) dst[d * s.Tp + j] = j < s.T ? k_out[at + d] : 0.0f;
  }
}

}  // namespace avx2
}  // namespace

#pragma GCC pop_options

// AVX-512 VNNI, and AMX where the CPU has it: run only where g_level >= kAvx512Vnni.
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512vnni,amx-tile,amx-int8")

namespace {
namespace avx512 {

// ------------------------------------------------------------------------------------------- vector type

// 16 float32 lanes, for the kernels of vector_kernels.inc.
struct Avx512 {
  using F = __m512;
  using I = __m512i;  // 16 int32
  using Mask = __mmask16;
  static constexpr int64_t kWidth = 16;
  static constexpr bool kMaskedTableLoads = true;
  static constexpr int64_t kScoreKeys = kKeyTile;  // 4 rows x 4 vectors of scores, 4 of keys: 32 registers
  static constexpr int kPvVectors = 8;  // 128 dims per P . V tile

  static Mask first_lanes(int64_t n) { return n >= 16 ? Mask(0xFFFF) : Mask((1u << n) - 1); }
  static F zero() { return _mm512_setzero_ps(); }
  static F set1(float v) { return _mm512_set1_ps(v); }
  static F loadu(const float* p) { return _mm512_loadu_ps(p); }
  static F load(const float* p, Mask m) { return _mm512_maskz_loadu_ps(m, p); }
  static F load_or(const float* p, Mask m, F fallback) { return _mm512_mask_loadu_ps(fallback, m, p); }
  static void storeu(float* p, F v) { _mm512_storeu_ps(p, v); }
  static void store(float* p, Mask m, F v) { _mm512_mask_storeu_ps(p, m, v); }
  static F zero_outside(F v, Mask m) { return _mm512_maskz_mov_ps(m, v); }

  static F add(F a, F b) { return _mm512_add_ps(a, b); }
  static F sub(F a, F b) { return _mm512_sub_ps(a, b); }
  static F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  static F div(F a, F b) { return _mm512_div_ps(a, b); }
  static F max(F a, F b) { return _mm512_max_ps(a, b); }
  static F min(F a, F b) { return _mm512_min_ps(a, b); }
  static F fmadd(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static F fnmadd(F a, F b, F c) { return _mm512_fnmadd_ps(a, b, c); }
  static F abs(F v) { return _mm512_abs_ps(v); }
  static F round(F v) { return _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }

  static I izero() { return _mm512_setzero_si512(); }
  static I iadd(I a, I b) { return _mm512_add_epi32(a, b); }
  static I to_int(F v) { return _mm512_cvtps_epi32(v); }
  // The first n of 16 int32 codes in [-128, 127] as int8 at dst.
  static void store_codes(int8_t* dst, I codes, int64_t n) {
    _mm_mask_storeu_epi8(dst, first_lanes(n), _mm512_cvtsepi32_epi8(codes));
  }

  static float reduce_add(F v) { return _mm512_reduce_add_ps(v); }
  static float reduce_max(F v) { return _mm512_reduce_max_ps(v); }
  static int32_t reduce_add(I v) { return _mm512_reduce_add_epi32(v); }

  // For exp (vector_kernels.inc): below its domain e^x is 0 in float32 anyway; VSCALEFPS gives 0 for a very
  // negative n and inf for a large one, as exp does.
  static F exp_domain(F x) { return _mm512_max_ps(x, _mm512_set1_ps(-104.0f)); }
  static F times_pow2(F p, F n) { return _mm512_scalef_ps(p, n); }

  // Table rows as float32, exactly (see Avx2::load_table), whole or the lanes of a mask.
  static F load_table(const uint16_t* p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
  }
  static F load_table(const uint16_t* p, Mask m) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
  }
  static F load_table(const float* p) { return _mm512_loadu_ps(p); }
  static F load_table(const float* p, Mask m) { return _mm512_maskz_loadu_ps(m, p); }
  static F load_table(const int8_t* p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  }
  static F load_table(const int8_t* p, Mask m) { return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, p))); }
  static I load_pairs(const uint16_t* p) { return _mm512_loadu_si512(p); }  // see Avx2::load_pairs
  static F even(I pairs) { return _mm512_castsi512_ps(_mm512_slli_epi32(pairs, 16)); }
  static F odd(I pairs) { return _mm512_castsi512_ps(_mm512_and_si512(pairs, _mm512_set1_epi32(int32_t(0xFFFF0000u)))); }
};

#include "vector_kernels.inc"


// y = acc / s * multiplier for 16 outputs of one token, evaluated as XLA evaluates bitlinear.py's expression:
// its simplifier turns the division by a broadcast scale into a product with the reciprocal, (acc * (1/s)) * m
// (a true division differs by an ulp in many values).
inline __m512 dequantize(__m512i acc, float inv_scale, float multiplier) {
  return _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(acc), _mm512_set1_ps(inv_scale)), _mm512_set1_ps(multiplier));
}

// ---------------------------------------------------------------------------------- VNNI (few tokens)

// acc[4t + k] += the codes of bits 2k..2k+1 of `bytes` times x[t], for one block of 64 columns.
template <int NT>
inline void vnni_block(__m512i (&acc)[NT * kValuesPerByte], __m512i bytes, const __m512i (&x)[NT]) {
  const __m512i three = _mm512_set1_epi8(3);
  const __m512i c0 = _mm512_and_si512(bytes, three);
  const __m512i c1 = _mm512_and_si512(_mm512_srli_epi16(bytes, 2), three);
  const __m512i c2 = _mm512_and_si512(_mm512_srli_epi16(bytes, 4), three);
  const __m512i c3 = _mm512_and_si512(_mm512_srli_epi16(bytes, 6), three);
  for (int t = 0; t < NT; ++t) {
    acc[4 * t + 0] = _mm512_dpbusd_epi32(acc[4 * t + 0], c0, x[t]);
    acc[4 * t + 1] = _mm512_dpbusd_epi32(acc[4 * t + 1], c1, x[t]);
    acc[4 * t + 2] = _mm512_dpbusd_epi32(acc[4 * t + 2], c2, x[t]);
    acc[4 * t + 3] = _mm512_dpbusd_epi32(acc[4 * t + 3], c3, x[t]);
  }
}

// sums[4t + k] += the products of the last n < 64 columns (at `bytes`, and x + t * K): a function of its own,
// with accumulators of its own (see vnni_rows).
template <int NT>
__attribute__((noinline)) void vnni_tail(const uint8_t* bytes, const int8_t* x, int64_t K, int64_t n,
                                         int32_t (&sums)[NT * kValuesPerByte]) {
  const __mmask64 mask = (~0ULL) >> (64 - n);  // masked-off bytes load as 0: code 0 times activation 0
  __m512i acc[NT * kValuesPerByte], xs[NT];
  for (__m512i& sum : acc) sum = _mm512_setzero_si512();
  for (int t = 0; t < NT; ++t) xs[t] = _mm512_maskz_loadu_epi8(mask, x + t * K);
  vnni_block<NT>(acc, _mm512_maskz_loadu_epi8(mask, bytes), xs);
  for (int i = 0; i < NT * kValuesPerByte; ++i) sums[i] += _mm512_reduce_add_epi32(acc[i]);
}

// out[t, 4r + k] for packed rows [r0, r1) of `p` and the NT tokens from t0. The accumulators stay in registers
// only while nothing else shares the function with them: with the float epilogue reading them, or a second block
// loop for the last columns, GCC 12 kept a copy of every accumulator on the stack and stored all 16 per block of
// 4 tokens (up to 1.27x slower, BENCHMARKS.md's kernel notes). So the sums leave the accumulators before the
// epilogue, and the last K % 64 columns run in vnni_tail.
template <int NT>
void vnni_rows(const Projection& p, const Activations& a, int64_t r0, int64_t r1, int64_t t0) {
  const int64_t K = a.K, O = p.R * kValuesPerByte;
  const int8_t* x = a.q + t0 * K;
  const int64_t full = K & ~int64_t(63);
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* row = p.packed + r * K;
    __m512i acc[NT * kValuesPerByte];  // acc[4t + k]: token t0 + t, output 4r + k
    for (__m512i& sum : acc) sum = _mm512_setzero_si512();
    for (int64_t i = 0; i < full; i += 64) {
      if constexpr (NT > 1)  // see kPrefetchRows
        _mm_prefetch(reinterpret_cast<const char*>(row + kPrefetchRows * K + i), _MM_HINT_T0);
      __m512i xs[NT];
      for (int t = 0; t < NT; ++t) xs[t] = _mm512_loadu_si512(x + t * K + i);
      vnni_block<NT>(acc, _mm512_loadu_si512(row + i), xs);
    }
    int32_t sums[NT * kValuesPerByte];
    for (int i = 0; i < NT * kValuesPerByte; ++i) sums[i] = _mm512_reduce_add_epi32(acc[i]);
    if (full < K) vnni_tail<NT>(row + full, x + full, K, K - full, sums);
    for (int t = 0; t < NT; ++t) {
      const int64_t token = t0 + t;
      const float inv_scale = a.inv_scale[token];
      for (int k = 0; k < kValuesPerByte; ++k) {  // scalar dequantize()
        const int32_t sum = sums[4 * t + k] - a.sum[token];
        const int64_t at = token * O + r * kValuesPerByte + k;
        const float y = (float(sum) * inv_scale) * p.multiplier;
        p.out[at] = p.residual ? p.residual[at] + y : y;
      }
    }
  }
}

void vnni_task(const Projection& p, const Activations& a, int64_t r0, int64_t r1) {
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
// sets over and over.

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
      _mm_prefetch(reinterpret_cast<const char*>(packed + (r + kPrefetchRows) * K + i), _MM_HINT_T0);  // see kPrefetchRows
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

// The products of a call with AMX tiles, x already quantized in `a`.
void amx_products(ffi::ThreadPool& pool, std::vector<Projection>& projections, const Activations& a) {
  const int64_t N = a.N, K = a.K;
  const int8_t* q = a.q;
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
  std::vector<Task> tasks;
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


// ----------------------------------------------------------------- VNNI + table lookups (many tokens, no AMX)

// From g_lut_min_tokens tokens on, where AMX does not take the products. The VNNI loop's ceiling is VPDPBUSD's
// one instruction (64 MACs) per cycle, but Zen 4 issues a VPERMW + VPADDW pair beside every three VPDPBUSDs at
// no cost to them (BENCHMARKS.md, "VNNI + table lookups"). So a third of the columns are summed by table lookup
// instead (as T-MAC and bitnet.cpp's TL kernels do, here exactly): for three columns a, b, c of a token, entry i of a
// 32-entry int16 table is d0(i) x[a] + d1(i) x[b] + d2(i) x[c] for the base-3 digits d of i < 27, so a row
// whose codes there are (c0, c1, c2) reads its three products at index c0 + 3 c1 + 9 c2, and one VPERMW looks
// up 32 rows at once (96 MACs). The codes are the same c = t + 1 as the VNNI columns', and the sum of the
// activations is subtracted once per token as there.
//
// Both need an output row per vector lane, not the packed layout's four rows per byte: a task unpacks its rows
// once per call into a panel (see unpack_chunk) that every token then reads.
//   * Blocks of 16 packed rows (64 outputs): VNNI lane l of group g (16 int32 lanes) is output 16 g + l, its
//     four bytes four consecutive columns, multiplied by one token's four activations broadcast; a lookup's 32
//     int16 lanes are outputs 32 h + l of half h.
//   * A superstep is 3 VNNI steps of 4 columns (12 columns, 48 VPDPBUSD for 4 tokens) and 2 table groups (6
//     columns, 16 VPERMW for 4 tokens): 1 KB of panel, 768 bytes of codes then 4 x 64 bytes of indices.
//     With S supersteps the first 12 S columns go through VNNI, the last 6 S through tables (zero padded).
//   * A chunk is 16 supersteps: a 16 KB panel that stays in L1 while every group of 4 tokens passes it, with
//     32 lookups per int16 sum (32 x 762 < 2^15) before the sums are widened into the int32 accumulators.
//     Per chunk the accumulators of each (block, 4 tokens) go to memory and back: 1 KB against 3072 VPDPBUSD.
constexpr int64_t kLutBlockRows = 16;            // packed rows of a block: 64 outputs
constexpr int64_t kSuperstepBytes = 1024;        // of panel: 3 x 4 x 64 bytes of codes, 4 x 64 of indices
constexpr int64_t kIndexOffset = 768;            // where a superstep's indices start
constexpr int64_t kChunkSteps = 16;              // supersteps of a chunk
constexpr int64_t kChunkColumns = 18 * kChunkSteps;  // 192 VNNI + 96 table columns
constexpr int64_t kChunkPanel = kChunkSteps * kSuperstepBytes;
constexpr int64_t kTableBytes = 64;              // one table: 32 int16 entries
constexpr int64_t kChunkTables = 2 * kChunkSteps * kTableBytes;  // one token's tables of a chunk: 2 KB
constexpr int64_t kAccumulatorBytes = 16 * 64;   // 4 tokens x 4 groups of int32 sums
constexpr int64_t kLutSlabTokens = 128;          // tokens per pass over the weights (see lut_products)

struct LutShape {
  int64_t chunks;  // of kChunkSteps supersteps
  int64_t Kv;      // columns [0, Kv) through VNNI, [Kv, Kp) through tables
  int64_t Kp;      // the padded width, 18 supersteps' columns
  explicit LutShape(int64_t K)
      : chunks((K + kChunkColumns - 1) / kChunkColumns), Kv(12 * kChunkSteps * chunks), Kp(kChunkColumns * chunks) {}
};

// Packed rows r0 + 4 g .. r0 + 4 g + 3 at columns [c0, c0 + n) (zero past K or R), transposed in each 128-bit
// lane: lane m of w[k] holds dword 4 m + k of the four rows.
template <int n>
inline void group_columns(const uint8_t* packed, int64_t R, int64_t K, int64_t r0, int g, int64_t c0, __m512i w[4]) {
  const int64_t valid = std::clamp<int64_t>(K - c0, 0, n);
  const __mmask64 mask = valid == 0 ? 0 : (~0ULL) >> (64 - valid);
  __m512i z[4];
  for (int q = 0; q < 4; ++q) {
    const int64_t r = r0 + 4 * g + q;
    if (r >= R) z[q] = _mm512_setzero_si512();
    else if (valid == 64) z[q] = _mm512_loadu_si512(packed + r * K + c0);  // masked loads ran slower (Zen 4)
    else z[q] = _mm512_maskz_loadu_epi8(mask, packed + r * K + c0);
  }
  const __m512i lo01 = _mm512_unpacklo_epi32(z[0], z[1]), hi01 = _mm512_unpackhi_epi32(z[0], z[1]);
  const __m512i lo23 = _mm512_unpacklo_epi32(z[2], z[3]), hi23 = _mm512_unpackhi_epi32(z[2], z[3]);
  w[0] = _mm512_unpacklo_epi64(lo01, lo23), w[1] = _mm512_unpackhi_epi64(lo01, lo23);
  w[2] = _mm512_unpacklo_epi64(hi01, hi23), w[3] = _mm512_unpackhi_epi64(hi01, hi23);
}

// Step d (columns c0 + 4 d .. c0 + 4 d + 3) of group_columns' w as 16 output lanes: output 16 g + l is packed row
// 4 g + l / 4 at bits 2 (l % 4), so lane l takes dword d of row l / 4 (lane d / 4 of w[d % 4]) shifted by 2 (l % 4).
inline __m512i step_codes(const __m512i w[4], int d) {
  const int m = d / 4;
  const __m512i spread = _mm512_add_epi32(_mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0),
                                          _mm512_set1_epi32(4 * m));
  const __m512i shift = _mm512_set_epi32(6, 4, 2, 0, 6, 4, 2, 0, 6, 4, 2, 0, 6, 4, 2, 0);
  const __m512i row = _mm512_permutexvar_epi32(spread, w[d % 4]);
  return _mm512_and_si512(_mm512_srlv_epi32(row, shift), _mm512_set1_epi8(3));
}

// Chunk c of the block of packed rows from r0 as its panel. Superstep s holds at s KB + 256 k + 64 g the codes
// of its VNNI step k (columns 192 c + 12 s + 4 k ..) for group g, then at s KB + 768 + 128 (G % 2) + 64 h the
// indices of table group G = 2 s or 2 s + 1 for half h. Table group G reads the columns
// Kv + 96 c + 12 (G / 4) + G % 4 + {0, 4, 8}: byte G % 4 of three consecutive steps of the table columns.
// Every loop over steps is unrolled, so that each store's place in the panel is a constant: with the steps
// counted at run time, the scalar arithmetic of those places, not the vector work, set the pace.
void unpack_chunk(const uint8_t* packed, int64_t R, int64_t K, const LutShape& shape, int64_t r0, int64_t c,
                  uint8_t* panel) {
#pragma GCC unroll 3
  for (int i = 0; i < 3; ++i)  // the 192 VNNI columns: 48 steps
    for (int g = 0; g < 4; ++g) {
      __m512i w[4];
      group_columns<64>(packed, R, K, r0, g, 192 * c + 64 * i, w);
#pragma GCC unroll 16
      for (int d = 0; d < 16; ++d) {
        const int step = 16 * i + d;
        _mm512_store_si512(panel + (step / 3) * kSuperstepBytes + (step % 3) * 256 + g * 64, step_codes(w, d));
      }
    }
  // The 96 table columns: 24 steps; index[u][g] byte j of lane l: c0 + 3 c1 + 9 c2 of output 16 g + l in table
  // group 4 u + j, from steps 3 u, 3 u + 1, 3 u + 2 (c <= 2: every sum stays in its byte).
  __m512i index[8][4];
  const int64_t first = shape.Kv + 96 * c;
  for (int g = 0; g < 4; ++g) {
    __m512i lo[4], hi[4];
    group_columns<64>(packed, R, K, r0, g, first, lo);
    group_columns<32>(packed, R, K, r0, g, first + 64, hi);
#pragma GCC unroll 8
    for (int u = 0; u < 8; ++u) {
      __m512i code[3];
      for (int e = 0; e < 3; ++e)
        code[e] = 3 * u + e < 16 ? step_codes(lo, 3 * u + e) : step_codes(hi, 3 * u + e - 16);
      const __m512i upper = _mm512_add_epi8(code[1], _mm512_add_epi8(code[2], _mm512_add_epi8(code[2], code[2])));
      index[u][g] = _mm512_add_epi8(code[0], _mm512_add_epi8(upper, _mm512_add_epi8(upper, upper)));
    }
  }
  // Table group G = 4 u + j, half h: int16 lane m is output 32 h + m, byte j of lane m % 16 of
  // index[u][2 h + m / 16]. VPERMT2W picks the word that holds it (bit 5 of a control word picks the second
  // source), then a shift or a mask leaves that byte alone in the lane (VBMI's byte permute would do it at once,
  // but the AVX-512 level does not require VBMI: Cascade Lake has VNNI without it).
#pragma GCC unroll 4
  for (int j = 0; j < 4; ++j) {
    alignas(64) int16_t control[32];
    for (int m = 0; m < 32; ++m) control[m] = int16_t((m / 16) * 32 + 2 * (m % 16) + j / 2);
    const __m512i pick = _mm512_load_si512(control);
    for (int u = 0; u < 8; ++u)
      for (int h = 0; h < 2; ++h) {
        const int G = 4 * u + j;
        const __m512i words = _mm512_permutex2var_epi16(index[u][2 * h], pick, index[u][2 * h + 1]);
        _mm512_store_si512(panel + (G / 2) * kSuperstepBytes + kIndexOffset + ((G % 2) * 2 + h) * 64,
                           j % 2 ? _mm512_srli_epi16(words, 8) : _mm512_and_si512(words, _mm512_set1_epi16(0xff)));
      }
  }
}

// PREFETCHT0 of the line at p, as an asm statement: GCC 12 compiled prefetch_chunk, a function of nothing but
// _mm_prefetch, to nothing (objdump showed no prefetch in lut_slab), which first looked like prefetches that
// Zen 4 drops on a TLB miss; they do work here, on 4 KB pages too (BENCHMARKS.md).
inline void prefetch_line(const char* p) { __asm__ volatile("prefetcht0 %0" : : "m"(*p)); }

// The packed bytes unpack_chunk reads for chunk c of packed rows [r0, r1), on their way into L1: prefetches only
// (a real load would hold up retirement for its whole trip to DRAM).
void prefetch_chunk(const uint8_t* packed, int64_t R, int64_t K, const LutShape& shape, int64_t r0, int64_t r1,
                    int64_t c) {
  for (int64_t r = r0; r < std::min(R, r1); ++r) {
    const char* row = reinterpret_cast<const char*>(packed + r * K);
    const int64_t first = shape.Kv + 96 * c, last = std::min(K, first + 96) - 1;  // 96 bytes: 2 or 3 lines
    for (int64_t i = 192 * c; i < std::min(K, 192 * (c + 1)); i += 64) prefetch_line(row + i);
    for (int64_t i = first; i <= last; i += 64) prefetch_line(row + i);
    if (last >= first) prefetch_line(row + last);
  }
}

// Token t's row of x [N, K] zero padded to xp [N, Kp], and its tables: tables[(c N + t) * 32 + G], 32 int16 each.
void lut_token(const int8_t* x, int64_t K, const LutShape& shape, int64_t N, int64_t t, int8_t* xp, int16_t* tables) {
  int8_t* row = xp + t * shape.Kp;
  std::memcpy(row, x + t * K, K);
  std::memset(row + K, 0, shape.Kp - K);
  alignas(64) int16_t digits[3][32];
  for (int i = 0; i < 32; ++i) {  // entries 27..31 are never looked up
    digits[0][i] = i < 27 ? i % 3 : 0;
    digits[1][i] = i < 27 ? i / 3 % 3 : 0;
    digits[2][i] = i < 27 ? i / 9 : 0;
  }
  const __m512i d0 = _mm512_load_si512(digits[0]), d1 = _mm512_load_si512(digits[1]);
  const __m512i d2 = _mm512_load_si512(digits[2]);
  for (int64_t c = 0; c < shape.chunks; ++c)
    for (int G = 0; G < 2 * kChunkSteps; ++G) {
      const int8_t* a = row + shape.Kv + 96 * c + 12 * (G / 4) + G % 4;
      const __m512i entries = _mm512_add_epi16(_mm512_add_epi16(_mm512_mullo_epi16(d0, _mm512_set1_epi16(a[0])),
                                                                _mm512_mullo_epi16(d1, _mm512_set1_epi16(a[4]))),
                                               _mm512_mullo_epi16(d2, _mm512_set1_epi16(a[8])));
      _mm512_store_si512(tables + ((c * N + t) * 2 * kChunkSteps + G) * 32, entries);
    }
}

// One chunk for 4 tokens: acc (int32 [4 tokens][4 groups][16]) += the chunk's products. zmm(4t + g): token t,
// group g; zmm(16 + 4h + t): token t's int16 lookup sums of half h; zmm24-27 one step's codes, zmm28 a broadcast
// token, zmm29 indices, zmm30 a lookup. Written out in assembly: the same loop in intrinsics (chunk_tokens<4>)
// ran 1.44x slower, GCC 12 keeping copies of the 24 accumulators on the stack.
#define LUT_CODES(at) \
  "vmovdqa64 " #at "+0(%[panel]), %%zmm24\n\t" "vmovdqa64 " #at "+64(%[panel]), %%zmm25\n\t" \
  "vmovdqa64 " #at "+128(%[panel]), %%zmm26\n\t" "vmovdqa64 " #at "+192(%[panel]), %%zmm27\n\t"
#define LUT_TOKEN(x, a0, a1, a2, a3) \
  "vpbroadcastd " x ", %%zmm28\n\t" \
  "vpdpbusd %%zmm28, %%zmm24, %%zmm" #a0 "\n\t" "vpdpbusd %%zmm28, %%zmm25, %%zmm" #a1 "\n\t" \
  "vpdpbusd %%zmm28, %%zmm26, %%zmm" #a2 "\n\t" "vpdpbusd %%zmm28, %%zmm27, %%zmm" #a3 "\n\t"
#define LUT_STEP(at, x) \
  LUT_CODES(at) \
  LUT_TOKEN(#x "(%[x0])", 0, 1, 2, 3) LUT_TOKEN(#x "(%[x0],%[k],1)", 4, 5, 6, 7) \
  LUT_TOKEN(#x "(%[x0],%[k],2)", 8, 9, 10, 11) LUT_TOKEN(#x "(%[x3])", 12, 13, 14, 15)
#define LUT_LOOKUP(index, table, a0, a1, a2, a3) \
  "vmovdqa64 " #index "(%[panel]), %%zmm29\n\t" \
  "vpermw " #table "+0(%[tables]), %%zmm29, %%zmm30\n\t" "vpaddw %%zmm30, %%zmm" #a0 ", %%zmm" #a0 "\n\t" \
  "vpermw " #table "+2048(%[tables]), %%zmm29, %%zmm30\n\t" "vpaddw %%zmm30, %%zmm" #a1 ", %%zmm" #a1 "\n\t" \
  "vpermw " #table "+4096(%[tables]), %%zmm29, %%zmm30\n\t" "vpaddw %%zmm30, %%zmm" #a2 ", %%zmm" #a2 "\n\t" \
  "vpermw " #table "+6144(%[tables]), %%zmm29, %%zmm30\n\t" "vpaddw %%zmm30, %%zmm" #a3 ", %%zmm" #a3 "\n\t"
#define LUT_WIDEN(sums, g0, g1) \
  "vpmovsxwd %%ymm" #sums ", %%zmm30\n\t" "vpaddd %%zmm30, %%zmm" #g0 ", %%zmm" #g0 "\n\t" \
  "vextracti64x4 $1, %%zmm" #sums ", %%ymm30\n\t" "vpmovsxwd %%ymm30, %%zmm30\n\t" \
  "vpaddd %%zmm30, %%zmm" #g1 ", %%zmm" #g1 "\n\t"

void chunk4(const uint8_t* panel, const int8_t* x, int64_t Kp, const int16_t* tables, int32_t* acc) {
  static_assert(kChunkTables == 2048 && kSuperstepBytes == 1024 && kIndexOffset == 768, "offsets in the assembly");
  const int8_t* x3 = x + 3 * Kp;
  int64_t left;
  __asm__ volatile(
      "vmovdqa64 0(%[acc]), %%zmm0\n\t" "vmovdqa64 64(%[acc]), %%zmm1\n\t" "vmovdqa64 128(%[acc]), %%zmm2\n\t"
      "vmovdqa64 192(%[acc]), %%zmm3\n\t" "vmovdqa64 256(%[acc]), %%zmm4\n\t" "vmovdqa64 320(%[acc]), %%zmm5\n\t"
      "vmovdqa64 384(%[acc]), %%zmm6\n\t" "vmovdqa64 448(%[acc]), %%zmm7\n\t" "vmovdqa64 512(%[acc]), %%zmm8\n\t"
      "vmovdqa64 576(%[acc]), %%zmm9\n\t" "vmovdqa64 640(%[acc]), %%zmm10\n\t" "vmovdqa64 704(%[acc]), %%zmm11\n\t"
      "vmovdqa64 768(%[acc]), %%zmm12\n\t" "vmovdqa64 832(%[acc]), %%zmm13\n\t" "vmovdqa64 896(%[acc]), %%zmm14\n\t"
      "vmovdqa64 960(%[acc]), %%zmm15\n\t"
      "vpxord %%zmm16, %%zmm16, %%zmm16\n\t" "vpxord %%zmm17, %%zmm17, %%zmm17\n\t"
      "vpxord %%zmm18, %%zmm18, %%zmm18\n\t" "vpxord %%zmm19, %%zmm19, %%zmm19\n\t"
      "vpxord %%zmm20, %%zmm20, %%zmm20\n\t" "vpxord %%zmm21, %%zmm21, %%zmm21\n\t"
      "vpxord %%zmm22, %%zmm22, %%zmm22\n\t" "vpxord %%zmm23, %%zmm23, %%zmm23\n\t"
      "movl $16, %k[left]\n\t"
      "1:\n\t"
      // Lookups between the VNNI steps: all lookups after all steps ran at 59 cycles a superstep instead of 49
      // (Zen 4, data in L1), the scheduler not reaching far enough ahead to pair them.
      LUT_STEP(0, 0) LUT_LOOKUP(768, 0, 16, 17, 18, 19)       // table group 2 s, half 0
      LUT_STEP(256, 4) LUT_LOOKUP(832, 0, 20, 21, 22, 23)     // half 1
      LUT_STEP(512, 8) LUT_LOOKUP(896, 64, 16, 17, 18, 19)    // table group 2 s + 1
      LUT_LOOKUP(960, 64, 20, 21, 22, 23)
      "addq $1024, %[panel]\n\t" "addq $12, %[x0]\n\t" "addq $12, %[x3]\n\t" "addq $128, %[tables]\n\t"
      "decl %k[left]\n\t" "jnz 1b\n\t"
      LUT_WIDEN(16, 0, 1) LUT_WIDEN(17, 4, 5) LUT_WIDEN(18, 8, 9) LUT_WIDEN(19, 12, 13)
      LUT_WIDEN(20, 2, 3) LUT_WIDEN(21, 6, 7) LUT_WIDEN(22, 10, 11) LUT_WIDEN(23, 14, 15)
      "vmovdqa64 %%zmm0, 0(%[acc])\n\t" "vmovdqa64 %%zmm1, 64(%[acc])\n\t" "vmovdqa64 %%zmm2, 128(%[acc])\n\t"
      "vmovdqa64 %%zmm3, 192(%[acc])\n\t" "vmovdqa64 %%zmm4, 256(%[acc])\n\t" "vmovdqa64 %%zmm5, 320(%[acc])\n\t"
      "vmovdqa64 %%zmm6, 384(%[acc])\n\t" "vmovdqa64 %%zmm7, 448(%[acc])\n\t" "vmovdqa64 %%zmm8, 512(%[acc])\n\t"
      "vmovdqa64 %%zmm9, 576(%[acc])\n\t" "vmovdqa64 %%zmm10, 640(%[acc])\n\t" "vmovdqa64 %%zmm11, 704(%[acc])\n\t"
      "vmovdqa64 %%zmm12, 768(%[acc])\n\t" "vmovdqa64 %%zmm13, 832(%[acc])\n\t" "vmovdqa64 %%zmm14, 896(%[acc])\n\t"
      "vmovdqa64 %%zmm15, 960(%[acc])\n\t"
      : [panel] "+r"(panel), [x0] "+r"(x), [x3] "+r"(x3), [tables] "+r"(tables), [left] "=&r"(left)
      : [k] "r"(Kp), [acc] "r"(acc)
      : "memory", "cc", "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10",
        "xmm11", "xmm12", "xmm13", "xmm14", "xmm15", "xmm16", "xmm17", "xmm18", "xmm19", "xmm20", "xmm21", "xmm22",
        "xmm23", "xmm24", "xmm25", "xmm26", "xmm27", "xmm28", "xmm29", "xmm30");
}
#undef LUT_CODES
#undef LUT_TOKEN
#undef LUT_STEP
#undef LUT_LOOKUP
#undef LUT_WIDEN

// chunk4's arithmetic for the last T < 4 tokens of a call, in intrinsics (few registers: no spills).
template <int T>
void chunk_tokens(const uint8_t* panel, const int8_t* x, int64_t Kp, const int16_t* tables, int32_t* acc) {
  __m512i sums[T][4], lookups[T][2];
  for (int t = 0; t < T; ++t)
    for (int g = 0; g < 4; ++g) sums[t][g] = _mm512_load_si512(acc + (4 * t + g) * 16);
  for (auto& token : lookups) token[0] = token[1] = _mm512_setzero_si512();
  for (int64_t s = 0; s < kChunkSteps; ++s) {
    const uint8_t* at = panel + s * kSuperstepBytes;
    for (int k = 0; k < 3; ++k)
      for (int g = 0; g < 4; ++g) {
        const __m512i codes = _mm512_load_si512(at + k * 256 + g * 64);
        for (int t = 0; t < T; ++t) {
          int32_t four;
          std::memcpy(&four, x + t * Kp + 12 * s + 4 * k, 4);
          sums[t][g] = _mm512_dpbusd_epi32(sums[t][g], codes, _mm512_set1_epi32(four));
        }
      }
    for (int G = 0; G < 2; ++G)
      for (int h = 0; h < 2; ++h) {
        const __m512i index = _mm512_load_si512(at + kIndexOffset + (2 * G + h) * 64);
        for (int t = 0; t < T; ++t) {
          const __m512i table = _mm512_load_si512(tables + t * (kChunkTables / 2) + (2 * s + G) * 32);
          lookups[t][h] = _mm512_add_epi16(lookups[t][h], _mm512_permutexvar_epi16(index, table));
        }
      }
  }
  for (int t = 0; t < T; ++t)
    for (int h = 0; h < 2; ++h) {
      sums[t][2 * h] = _mm512_add_epi32(sums[t][2 * h], _mm512_cvtepi16_epi32(_mm512_castsi512_si256(lookups[t][h])));
      const __m512i high = _mm512_cvtepi16_epi32(_mm512_extracti64x4_epi64(lookups[t][h], 1));
      sums[t][2 * h + 1] = _mm512_add_epi32(sums[t][2 * h + 1], high);
    }
  for (int t = 0; t < T; ++t)
    for (int g = 0; g < 4; ++g) _mm512_store_si512(acc + (4 * t + g) * 16, sums[t][g]);
}

// out[t0 .. t0 + T, 64 outputs of the block from r0] from the accumulators of chunk4's layout. Whole lines go out
// as non-temporal stores: nothing reads them again in this call, and a plain store first reads each line it
// writes (1.3 to 3.5 MB an output at 128 tokens, more than L2 holds).
void lut_outputs(const Projection& p, const Activations& a, const int32_t* acc, int64_t T, int64_t r0, int64_t t0) {
  const int64_t O = p.R * kValuesPerByte;
  for (int64_t t = 0; t < T; ++t) {
    const int64_t token = t0 + t;
    for (int g = 0; g < 4 && r0 * kValuesPerByte + 16 * g < O; ++g) {
      const int64_t o = r0 * kValuesPerByte + 16 * g, at = token * O + o;
      const __mmask16 lanes = Avx512::first_lanes(O - o);
      const __m512i sum = _mm512_sub_epi32(_mm512_load_si512(acc + (4 * t + g) * 16), _mm512_set1_epi32(a.sum[token]));
      __m512 y = dequantize(sum, a.inv_scale[token], p.multiplier);
      if (p.residual) y = _mm512_add_ps(_mm512_maskz_loadu_ps(lanes, p.residual + at), y);  // as XLA's x + y
      if (lanes == 0xffff && reinterpret_cast<uintptr_t>(p.out + at) % 64 == 0) _mm512_stream_ps(p.out + at, y);
      else _mm512_mask_storeu_ps(p.out + at, lanes, y);
    }
  }
}

// The products of tokens through VNNI and table lookups, x already quantized in `a` (see lut_products).
void lut_slab(ffi::ThreadPool& pool, std::vector<Projection>& projections, const Activations& a) {
  const int64_t N = a.N, K = a.K, groups = (N + 3) / 4;
  const LutShape shape(K);
  int8_t* xp = scratch(10, N * shape.Kp + 64);
  int16_t* tables = reinterpret_cast<int16_t*>(scratch(11, shape.chunks * N * kChunkTables));
  parallel_for(pool, N, [=, &a](int64_t t) { lut_token(a.q, K, shape, N, t, xp, tables); });
  // A task is a group of blocks: per chunk, every block's panel and every token group, so each chunk's tables
  // (N x 2 KB) serve the whole group from L2. Groups as large as keeps at least four per thread (two left a
  // thread idle at the end of a call: a 2B4T layer 1.05x slower at 128 tokens).
  int64_t blocks = 0;
  for (const Projection& p : projections) blocks += (p.R + kLutBlockRows - 1) / kLutBlockRows;
  const int64_t per_group = std::clamp<int64_t>(blocks / (4 * (pool.num_threads() + 1)), 1, 8);
  std::vector<Task> tasks;
  for (const Projection& p : projections) {
    const int64_t own = (p.R + kLutBlockRows - 1) / kLutBlockRows;
    for (int64_t first = 0; first < own; first += per_group)
      tasks.push_back({&p, first, std::min(per_group, own - first)});
  }
  const Task* list = tasks.data();
  parallel_for(pool, int64_t(tasks.size()), [=, &a, &shape](int64_t i) {
    const Task& task = list[i];
    const Projection& p = *task.p;
    uint8_t* panel = reinterpret_cast<uint8_t*>(scratch(12, kChunkPanel));
    int32_t* acc = reinterpret_cast<int32_t*>(scratch(13, task.count * groups * kAccumulatorBytes));
    std::memset(acc, 0, task.count * groups * kAccumulatorBytes);
    for (int64_t c = 0; c < shape.chunks; ++c)
      for (int64_t j = 0; j < task.count; ++j) {
        const int64_t r0 = (task.first + j) * kLutBlockRows;
        unpack_chunk(p.packed, p.R, K, shape, r0, c, panel);
        // The next block's rows are fetched while this one runs, a few rows per token group: all 80-odd lines at
        // once left most of them still missing when unpacked (more misses than the core keeps in flight).
        const bool next = j + 1 < task.count || c + 1 < shape.chunks;
        const int64_t next_r0 = j + 1 < task.count ? r0 + kLutBlockRows : task.first * kLutBlockRows;
        const int64_t next_c = j + 1 < task.count ? c : c + 1;
        const int16_t* chunk_tables = tables + c * N * (kChunkTables / 2);
        int32_t* block_acc = acc + j * groups * (kAccumulatorBytes / 4);
        for (int64_t g = 0; g < groups; ++g) {
          if (next)
            prefetch_chunk(p.packed, p.R, K, shape, next_r0 + kLutBlockRows * g / groups,
                           next_r0 + kLutBlockRows * (g + 1) / groups, next_c);
          const int8_t* x = xp + 4 * g * shape.Kp + 192 * c;
          const int16_t* token_tables = chunk_tables + 4 * g * (kChunkTables / 2);
          int32_t* sums = block_acc + g * (kAccumulatorBytes / 4);
          switch (std::min<int64_t>(4, N - 4 * g)) {
            case 4: chunk4(panel, x, shape.Kp, token_tables, sums); break;
            case 3: chunk_tokens<3>(panel, x, shape.Kp, token_tables, sums); break;
            case 2: chunk_tokens<2>(panel, x, shape.Kp, token_tables, sums); break;
            default: chunk_tokens<1>(panel, x, shape.Kp, token_tables, sums); break;
          }
        }
      }
    for (int64_t j = 0; j < task.count; ++j)
      for (int64_t g = 0; g < groups; ++g)
        lut_outputs(p, a, acc + (j * groups + g) * (kAccumulatorBytes / 4), std::min<int64_t>(4, N - 4 * g),
                    (task.first + j) * kLutBlockRows, 4 * g);
    _mm_sfence();  // the non-temporal stores are weakly ordered: done before parallel_for counts the task done
  });
}

// The products of a call through VNNI and table lookups, x already quantized in `a`: in slabs of at most
// kLutSlabTokens tokens, whose tables of one chunk (2 KB a token) stay in L2 while the tasks read them (at 512
// tokens in one slab the lookups gained nothing over the VNNI loop). Each slab unpacks the weights again.
void lut_products(ffi::ThreadPool& pool, const std::vector<Projection>& projections, const Activations& a) {
  const int64_t slabs = (a.N + kLutSlabTokens - 1) / kLutSlabTokens;
  const int64_t per_slab = ((a.N + slabs - 1) / slabs + 3) & ~int64_t(3);  // whole groups of 4 tokens
  for (int64_t t0 = 0; t0 < a.N; t0 += per_slab) {
    const int64_t n = std::min(per_slab, a.N - t0);
    std::vector<Projection> shifted = projections;
    for (Projection& p : shifted) {
      p.out += t0 * p.R * kValuesPerByte;
      if (p.residual) p.residual += t0 * p.R * kValuesPerByte;
    }
    lut_slab(pool, shifted, {a.q + t0 * a.K, a.inv_scale + t0, a.sum + t0, n, a.K});
  }
}

// ---------------------------------------------------------------------------------- causal attention

// Keys [j0, j0 + 16) of kv head kv: rotated into k_out [B, T, KV, D] (what the cache keeps), and transposed,
// kt[b, kv][d][j] = k_out[b, j, kv, d] (zeros past T), one 16 x 16 transpose per 16 dims.
void rotate_and_transpose_keys(const float* k, const float* cos, const float* sin, const AttentionShape& s, int64_t b,
                               int64_t kv, int64_t j0, float* k_out, float* kt) {
  for (int64_t j = j0; j < std::min(s.T, j0 + 16); ++j) {
    const int64_t at = ((b * s.T + j) * s.KV + kv) * s.D;
    rope_row<Avx512>(k + at, cos + j * s.D, sin + j * s.D, s.D, k_out + at);
  }
  float* dst = kt + (b * s.KV + kv) * s.D * s.Tp;
  for (int64_t d0 = 0; d0 < s.D; d0 += 16) {
    const __mmask16 dims = Avx512::first_lanes(s.D - d0);
    __m512i rows[16];
    for (int64_t j = 0; j < 16; ++j)
      rows[j] = j0 + j < s.T ? _mm512_castps_si512(_mm512_maskz_loadu_ps(dims, k_out + ((b * s.T + j0 + j) * s.KV + kv) * s.D + d0))
                             : _mm512_setzero_si512();
    transpose16(rows);
    for (int64_t d = 0; d < 16 && d0 + d < s.D; ++d) _mm512_storeu_si512(dst + (d0 + d) * s.Tp + j0, rows[d]);
  }
}


}  // namespace avx512
}  // namespace

#pragma GCC pop_options

namespace {

// -------------------------------------------------------------------------- the kernels of each level

// What the loops below call: one table per instruction set, picked per call from g_level. The loops that
// hand out work stay plain x86-64 code, whatever runs inside.
struct Kernels {
  void (*prologue_row)(const float* x, const Prologue& pr, int64_t K, int64_t t, float* y);
  void (*quantize_row)(const float* row, int64_t K, int8_t* q, float* inv_scale, int32_t* sum);
  void (*product_task)(const Projection& p, const Activations& a, int64_t r0, int64_t r1);  // packed rows [r0, r1)
  int64_t stream_tokens;  // up to this many tokens pass each row once (the tasks then stream: kStreamTaskBytes)
  void (*bf16_table_rows)(const float* h, int64_t N, int64_t H, const uint16_t* table, int64_t V, int64_t v0,
                          int64_t v1, float* out);
  void (*f32_table_rows)(const float* h, int64_t N, int64_t H, const float* table, int64_t V, int64_t v0,
                         int64_t v1, float* out);
  void (*i8_table_rows)(const float* h, int64_t N, int64_t H, const int8_t* table, int64_t V, int64_t v0,
                        int64_t v1, float* out);
  void (*rope_row)(const float* x, const float* cos, const float* sin, int64_t D, float* y);
  void (*rotate_and_transpose_keys)(const float* k, const float* cos, const float* sin, const AttentionShape& s,
                                    int64_t b, int64_t kv, int64_t j0, float* k_out, float* kt);
  void (*score_tile)(const float* const* rows, const float* kt, int64_t Tp, int64_t D, int64_t j0, int64_t keys,
                     float scale, float* const* out);
  void (*softmax_row)(float* p, int64_t n);
  void (*pv_rows)(const float* const* p, int rows, const float* v, int64_t stride, int64_t n, int64_t D,
                  float* const* out);
  void (*key_scores)(const float* const* q, int rows, const float* keys, int64_t stride, int64_t n, int64_t D,
                     float scale, float* const* out);
};

// The AVX-512 table takes AVX2's key_scores: decode reads few keys per query (the cache of one layer), and
// 8 lanes per key row are enough.
constexpr Kernels kAvx2Kernels{
    avx2::prologue_row<avx2::Avx2>, avx2::quantize_row<avx2::Avx2>, avx2::product_task, 2,
    avx2::table_rows<avx2::Avx2, uint16_t>, avx2::table_rows<avx2::Avx2, float>, avx2::table_rows<avx2::Avx2, int8_t>,
    avx2::rope_row<avx2::Avx2>, avx2::rotate_and_transpose_keys, avx2::score_tile<avx2::Avx2>,
    avx2::softmax_row<avx2::Avx2>, avx2::pv_rows<avx2::Avx2>, avx2::key_scores<avx2::Avx2>};
constexpr Kernels kAvx512Kernels{
    avx512::prologue_row<avx512::Avx512>, avx512::quantize_row<avx512::Avx512>, avx512::vnni_task, 4,
    avx512::table_rows<avx512::Avx512, uint16_t>, avx512::table_rows<avx512::Avx512, float>,
    avx512::table_rows<avx512::Avx512, int8_t>, avx512::rope_row<avx512::Avx512>, avx512::rotate_and_transpose_keys,
    avx512::score_tile<avx512::Avx512>, avx512::softmax_row<avx512::Avx512>, avx512::pv_rows<avx512::Avx512>,
    avx2::key_scores<avx2::Avx2>};

const Kernels& kernels(int level) { return level >= kAvx512Vnni ? kAvx512Kernels : kAvx2Kernels; }

// ------------------------------------------------------------------------------------------- BitLinear

// x [N, K] through the prologue into int8 codes in the calling thread's scratch (helpers only read it while
// this call runs), 1 / s and the code sum of each token into inv_scale, sum [N].
Activations quantize_tokens(ffi::ThreadPool& pool, const Kernels& k, const float* x, const Prologue& prologue,
                            int64_t N, int64_t K, float* inv_scale, int32_t* sum) {
  int8_t* q = scratch(2, N * K + 32);  // 32 bytes of slack: see avx2::panel_row
  constexpr int64_t kQuantizeTokens = 16;
  parallel_for(pool, (N + kQuantizeTokens - 1) / kQuantizeTokens, [=, &prologue, &k](int64_t chunk) {
    float* y = prologue.none() ? nullptr : reinterpret_cast<float*>(scratch(5, K * int64_t(sizeof(float))));
    for (int64_t t = chunk * kQuantizeTokens; t < std::min(N, (chunk + 1) * kQuantizeTokens); ++t) {
      if (y != nullptr) k.prologue_row(x, prologue, K, t, y);
      k.quantize_row(y != nullptr ? y : x + t * K, K, q + t * K, inv_scale + t, sum + t);
    }
  });
  return {q, inv_scale, sum, N, K};
}

// All projections of one call: one task list, so small ones (k/v) share the threads with big ones.
void bitlinear(ffi::ThreadPool& pool, int level, const float* x, const Prologue& prologue,
               std::vector<Projection>& projections, int64_t N, int64_t K) {
  const Kernels& k = kernels(level);
  std::vector<float> inv_scale(N);
  std::vector<int32_t> sum(N);
  const Activations a = quantize_tokens(pool, k, x, prologue, N, K, inv_scale.data(), sum.data());
  if (level == kAmx && N >= g_amx_min_tokens) {
    avx512::amx_products(pool, projections, a);
    return;
  }
  if (level >= kAvx512Vnni && N >= g_lut_min_tokens) {
    avx512::lut_products(pool, projections, a);
    return;
  }
  const int64_t rows = N <= k.stream_tokens ? std::max(kRowsPerTask, kStreamTaskBytes / K) : kRowsPerTask;
  std::vector<Task> tasks;
  for (const Projection& p : projections)
    for (int64_t r = 0; r < p.R; r += rows) tasks.push_back({&p, r, std::min(rows, p.R - r)});
  const Task* list = tasks.data();
  parallel_for(pool, int64_t(tasks.size()), [=, &a, &k](int64_t i) {
    k.product_task(*list[i].p, a, list[i].first, list[i].first + list[i].count);
  });
}

// --------------------------------------------------------------------------------------- output table

constexpr int64_t kTableRowsPerChunk = 512;  // 2.6 MB of a 2B4T bf16 table per chunk, 251 chunks

template <typename T>
void table_matmul(ffi::ThreadPool& pool, const float* h, int64_t N, int64_t H, const T* table, int64_t V,
                  float* out, void (*table_rows)(const float*, int64_t, int64_t, const T*, int64_t, int64_t,
                                                 int64_t, float*)) {
  parallel_for(pool, (V + kTableRowsPerChunk - 1) / kTableRowsPerChunk, [=](int64_t chunk) {
    table_rows(h, N, H, table, V, chunk * kTableRowsPerChunk, std::min(V, (chunk + 1) * kTableRowsPerChunk), out);
  });
}

// ------------------------------------------------------------------------------------ greedy output row

// The argmax of h[t] . table[v] over v, the same token as the full product and an argmax of it (the first
// of equal maxima, a NaN before anything), reading only an int8 copy of the table and a few exact rows.
//
// The screen: codes[v] = round(table[v] / scales[v]) and bounds[v] >= max_i |table[v][i] - scales[v] *
// codes[v][i]| (engine.screen_rows). With the kernel's float32 dot d_v = fl(h . codes[v]) and a_v = s_v d_v
// (exact in double), the exact logit E_v (this kernel's own fl(h . table[v])) lies within e_v of a_v:
//   |E_v - h.table[v]| <= g ||h||_1 max|table[v]| <= g ||h||_1 (127 s_v + bounds[v])   (the float sum of E_v)
//   |h.table[v] - s_v h.codes[v]| <= ||h||_1 bounds[v]                                  (the screen's rounding)
//   |s_v h.codes[v] - a_v| <= s_v g ||h||_1 127                                          (the float sum of d_v)
// with g = gamma(H + 16) = n u / (1 - n u), u = 2^-24: every product of a dot passes through at most H + 16
// roundings (lane sums, the reduction tree, a scalar tail), whatever the width. Rows whose interval
// [a_v - e_v, a_v + e_v] lies wholly below the best lower bound of any row cannot be the argmax (nor tie
// with it); the rest are re-scored exactly by the same row kernel as table_matmul, so the winner's logit is
// bit for bit the full product's. A row that could overflow float32, has a non-finite scale or bound, or an h
// that is not finite, is always re-scored.
struct ScreenedRows {
  const int8_t* codes;   // [V, H]
  const float* scales;   // [V]
  const float* bounds;   // [V]
};

template <typename T>
void greedy_rows(ffi::ThreadPool& pool, const Kernels& k, const float* h, int64_t N, int64_t H, const T* table,
                 int64_t V, const ScreenedRows& screen,
                 void (*exact_rows)(const float*, int64_t, int64_t, const T*, int64_t, int64_t, int64_t, float*),
                 int32_t* tokens, int32_t* candidates) {
  const double u = std::ldexp(1.0, -24), n = double(H + 16), g = n * u / (1.0 - n * u);
  // The double arithmetic of the bounds rounded outward: relative to e and, for a +- e, to |a|.
  constexpr double kSafe = 1.0 + 1e-12;
  constexpr double kUnderflow = 1e-30;  // subnormal products: at most 2^-150 each, far below this in all
  const double largest = 0.25 * double(std::numeric_limits<float>::max());
  std::vector<double> norm1(N);
  for (int64_t t = 0; t < N; ++t) {
    for (int64_t i = 0; i < H; ++i) norm1[t] += std::fabs(double(h[t * H + i]));
    norm1[t] *= kSafe;
  }
  // One pass over the codes: each chunk's dots, then its rows' upper bounds and its best lower bound.
  const int64_t chunks = (V + kTableRowsPerChunk - 1) / kTableRowsPerChunk;
  std::vector<double> chunk_low(N * chunks);
  // N * V floats and doubles each step (1.5 MB for 2B4T): kept between calls, as fresh ones fault in every page
  float* dot = reinterpret_cast<float*>(scratch(8, N * V * int64_t(sizeof(float))));
  double* up = reinterpret_cast<double*>(scratch(9, N * V * int64_t(sizeof(double))));
  double* best = chunk_low.data();
  const double* l1 = norm1.data();
  parallel_for(pool, chunks, [=, &k, &screen](int64_t chunk) {
    const int64_t v0 = chunk * kTableRowsPerChunk, v1 = std::min(V, v0 + kTableRowsPerChunk);
    k.i8_table_rows(h, N, H, screen.codes, V, v0, v1, dot);
    for (int64_t t = 0; t < N; ++t) {
      double low = -INFINITY;
      for (int64_t v = v0; v < v1; ++v) {
        const double s = screen.scales[v], b = screen.bounds[v], reach = l1[t] * (127.0 * s + b);
        const double a = s * double(dot[t * V + v]);  // exact: two float32 factors
        double e = INFINITY;  // a row that could overflow, or a non-finite factor: always re-scored
        if (std::isfinite(reach) && reach * (1.0 + g) < largest)
          e = (l1[t] * b + g * reach + g * s * 127.0 * l1[t]) * kSafe + std::fabs(a) * 1e-15 + kUnderflow;
        up[t * V + v] = std::isfinite(e) ? a + e : INFINITY;
        if (std::isfinite(e)) low = std::max(low, a - e);
      }
      best[t * chunks + chunk] = low;
    }
  });
  std::vector<int64_t> rows;
  std::vector<float> exact;
  for (int64_t t = 0; t < N; ++t) {
    const double best_low = *std::max_element(best + t * chunks, best + (t + 1) * chunks);
    rows.clear();
    for (int64_t v = 0; v < V; ++v)
      if (up[t * V + v] >= best_low) rows.push_back(v);
    exact.resize(rows.size());
    const float* ht = h + t * H;
    const int64_t* list = rows.data();
    const int64_t count = int64_t(rows.size());
    float* scored = exact.data();
    constexpr int64_t kRowsPerTask = 64;
    parallel_for(pool, (count + kRowsPerTask - 1) / kRowsPerTask, [=](int64_t task) {
      for (int64_t i = task * kRowsPerTask; i < std::min(count, (task + 1) * kRowsPerTask); ++i)
        exact_rows(ht, 1, H, table + list[i] * H, 1, 0, 1, scored + i);
    });
    int64_t winner = rows[0];  // never empty: the row with the best lower bound is a candidate
    float top = exact[0];
    for (int64_t i = 0; i < count; ++i) {
      if (std::isnan(exact[i])) {  // as XLA's argmax: the first NaN wins
        winner = rows[i];
        break;
      }
      if (exact[i] > top) top = exact[i], winner = rows[i];
    }
    tokens[t] = int32_t(winner);
    candidates[t] = int32_t(count);
  }
}

// ---------------------------------------------------------------------------------- causal attention

// One task: queries [t0, t1) of batch row b for the G heads of kv head `kv`. Score row g * (t1 - t0) + i
// belongs to head kv * G + g, query t0 + i.
void attention_block(const Kernels& k, const float* q, const float* cos, const float* sin, const float* kt,
                     const float* v, const AttentionShape& s, int64_t b, int64_t kv, int64_t t0, int64_t t1,
                     float* out) {
  const int64_t G = s.Hq / s.KV, Tq = t1 - t0, rows = G * Tq, keys = (t1 + 15) / 16 * 16, row = padded_row(t1);
  float* scores = reinterpret_cast<float*>(scratch(3, rows * row * int64_t(sizeof(float))));
  float* rotated = reinterpret_cast<float*>(scratch(6, rows * s.D * int64_t(sizeof(float))));
  const float* kth = kt + (b * s.KV + kv) * s.D * s.Tp;
  for (int64_t r = 0; r < rows; ++r) {  // this block's queries, rotated
    const int64_t t = t0 + r % Tq;
    k.rope_row(q + ((b * s.T + t) * s.Hq + kv * G + r / Tq) * s.D, cos + t * s.D, sin + t * s.D, s.D,
               rotated + r * s.D);
  }
  auto q_row = [&](int64_t r) { return rotated + r * s.D; };
  auto score_row = [&](int64_t r) { return scores + r * row; };
  for (int64_t j0 = 0; j0 < keys; j0 += kKeyTile) {
    const int64_t tile = std::min(kKeyTile, keys - j0);
    for (int64_t r0 = 0; r0 < rows; r0 += 4) {
      const float* qr[4];
      float* sr[4];
      for (int64_t i = 0; i < 4; ++i) {  // a short last group repeats its last row
        const int64_t r = std::min(r0 + i, rows - 1);
        qr[i] = q_row(r), sr[i] = score_row(r);
      }
      int64_t last = 0;  // the group's latest query: keys after it are masked for every row
      for (int64_t i = 0; i < 4; ++i) last = std::max(last, std::min(r0 + i, rows - 1) % Tq);
      if (j0 <= t0 + last) k.score_tile(qr, kth, s.Tp, s.D, j0, tile, s.scale, sr);
    }
  }
  for (int64_t r = 0; r < rows; ++r) k.softmax_row(score_row(r), t0 + r % Tq + 1);
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
      k.pv_rows(p, 2, vh, stride, n, s.D, o);
    }
    if (g < G) {
      const float* p[1] = {score_row(g * Tq + i)};
      float* o[1] = {out_row(g * Tq + i)};
      k.pv_rows(p, 1, vh, stride, n, s.D, o);
    }
  }
}

void causal_attention(ffi::ThreadPool& pool, const Kernels& k, const float* q, const float* kin, const float* v,
                      const float* cos, const float* sin, const AttentionShape& s, float* out, float* k_out) {
  float* kt = reinterpret_cast<float*>(scratch(4, s.B * s.KV * s.D * s.Tp * int64_t(sizeof(float))));
  const int64_t key_blocks = (s.T + 15) / 16;
  parallel_for(pool, s.B * s.KV * key_blocks, [=, &s, &k](int64_t item) {
    k.rotate_and_transpose_keys(kin, cos, sin, s, item / (s.KV * key_blocks), item / key_blocks % s.KV,
                                item % key_blocks * 16, k_out, kt);
  });
  // Later query blocks read more keys: hand them out first, so the last tasks to finish are the short ones.
  const int64_t blocks = (s.T + kQueryBlock - 1) / kQueryBlock;
  parallel_for(pool, s.B * s.KV * blocks, [=, &s, &k](int64_t item) {
    const int64_t block = blocks - 1 - item / (s.B * s.KV), rest = item % (s.B * s.KV);
    const int64_t t0 = block * kQueryBlock;
    attention_block(k, q, cos, sin, kt, v, s, rest / s.KV, rest % s.KV, t0, std::min(s.T, t0 + kQueryBlock), out);
  });
}

// ---------------------------------------------------------------------------------- cached attention

// Decode: T new tokens at positions start.. of batch rows that hold `start` earlier positions in the cache.
// q [B, T, Hq, D], new k and v [B, T, KV, D], cos and sin [T, D]; the cache keys and values of all layers
// [L, B, S, KV, D] are read in place at layer `layer` (no copy of a slice). Query t of head h attends to the
// cache slots [0, start) of kv head h / G and to the new keys 0..t: softmax over both, then P . V as the cache
// part plus the new part (engine.attention's two sums). The new keys come back rotated, for the cache.
struct CachedShape {
  int64_t B, T, Hq, KV, D, S, layer, start;
  float scale;
};

void cached_attention(ffi::ThreadPool& pool, const Kernels& k, const float* q, const float* kin, const float* v,
                      const float* cos, const float* sin, const float* cache_k, const float* cache_v,
                      const CachedShape& s, float* out, float* k_out) {
  for (int64_t row = 0; row < s.B * s.T * s.KV; ++row) {  // [b, t, kv]: T * KV rows of D, next to nothing
    const int64_t t = row / s.KV % s.T;
    k.rope_row(kin + row * s.D, cos + t * s.D, sin + t * s.D, s.D, k_out + row * s.D);
  }
  const int64_t G = s.Hq / s.KV, pairs = (G + 1) / 2, stride = s.KV * s.D;
  // One task: two heads of one kv head at one query (they share every key and value load).
  parallel_for(pool, s.B * s.T * s.KV * pairs, [=, &s, &k](int64_t item) {
    const int64_t pair = item % pairs, kv = item / pairs % s.KV, t = item / (pairs * s.KV) % s.T;
    const int64_t b = item / (pairs * s.KV * s.T);
    const int rows = int(std::min<int64_t>(2, G - 2 * pair));
    const int64_t n = s.start + t + 1, row = padded_row(n);
    float* scores = reinterpret_cast<float*>(scratch(3, 2 * row * int64_t(sizeof(float))));
    float* rotated = reinterpret_cast<float*>(scratch(6, 3 * s.D * int64_t(sizeof(float))));
    float* fresh = rotated + 2 * s.D;  // P . V of the new tokens, one head at a time
    const float* qr[2];
    float* sr[2];
    float* sr_new[2];
    float* o[2];
    for (int r = 0; r < rows; ++r) {
      const int64_t h = kv * G + 2 * pair + r;
      k.rope_row(q + ((b * s.T + t) * s.Hq + h) * s.D, cos + t * s.D, sin + t * s.D, s.D, rotated + r * s.D);
      qr[r] = rotated + r * s.D, sr[r] = scores + r * row, sr_new[r] = sr[r] + s.start;
      o[r] = out + ((b * s.T + t) * s.Hq + h) * s.D;
    }
    const int64_t cached = ((s.layer * s.B + b) * s.S) * stride + kv * s.D;  // slot 0 of this kv head
    const float* new_k = k_out + b * s.T * stride + kv * s.D;
    const float* new_v = v + b * s.T * stride + kv * s.D;
    k.key_scores(qr, rows, cache_k + cached, stride, s.start, s.D, s.scale, sr);
    k.key_scores(qr, rows, new_k, stride, t + 1, s.D, s.scale, sr_new);
    for (int r = 0; r < rows; ++r) k.softmax_row(sr[r], n);
    k.pv_rows(sr, rows, cache_v + cached, stride, s.start, s.D, o);
    for (int r = 0; r < rows; ++r) {
      const float* p[1] = {sr_new[r]};
      float* f[1] = {fresh};
      k.pv_rows(p, 1, new_v, stride, t + 1, s.D, f);
      for (int64_t d = 0; d < s.D; ++d) o[r][d] += fresh[d];
    }
  });
}


// The handlers decode XLA's buffers and call the kernels of the level in use.

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
  if (N > 0) bitlinear(pool, g_level, x.typed_data(), prologue, projections, N, K);
  return ffi::Error::Success();
}

// A table [V, H] as the table handlers receive it: an array [V, H] of its own element type (kind 0, offset 0), or
// a table read in place from a memory-mapped file (bitnet_model/tables.py): a uint8 array from a 64-byte aligned
// address, the table `offset` bytes into it, its element type `kind` (1: bf16 bits, 2: float32) and rows `rows`.
struct TableView {
  const void* data = nullptr;
  ffi::DataType type = ffi::DataType::INVALID;
  int64_t V = 0, H = 0;
};

std::optional<TableView> table_view(const ffi::AnyBuffer& table, int64_t offset, int32_t kind, int64_t rows) {
  const auto td = table.dimensions();
  const auto* base = static_cast<const uint8_t*>(table.untyped_data());
  if (kind == 0) {
    if (td.size() != 2 || offset != 0) return std::nullopt;
    return TableView{base, table.element_type(), td[0], td[1]};
  }
  const ffi::DataType type = kind == 1 ? ffi::U16 : kind == 2 ? ffi::F32 : ffi::DataType::INVALID;
  const int64_t size = kind == 1 ? 2 : 4;
  if (type == ffi::DataType::INVALID || table.element_type() != ffi::U8 || td.size() != 1 || rows <= 0 ||
      offset < 0 || (td[0] - offset) % (rows * size) != 0 || td[0] - offset <= 0)
    return std::nullopt;
  return TableView{base + offset, type, rows, (td[0] - offset) / (rows * size)};
}

// After a kernel read a few rows of a table read in place: drop its pages from the process's resident set again
// (madvise MADV_DONTNEED; they are clean file pages, a later read faults them back in from the page cache). A
// fault maps up to 64 KB of cached pages around it (fault-around, which MADV_RANDOM does not stop), so the ~130
// rows the greedy screen re-scores per step mapped ~16 MB more each step until the whole table was resident.
// The range's page tables are mostly empty: dropping them is a short walk, not a pass over the table.
void release_table_pages(const TableView& t, int32_t kind) {
  if (kind == 0) return;  // a table of XLA's own memory
  const int64_t page = sysconf(_SC_PAGESIZE), size = t.type == ffi::U16 ? 2 : 4;
  const uintptr_t begin = reinterpret_cast<uintptr_t>(t.data) / page * page;
  const uintptr_t end = reinterpret_cast<uintptr_t>(t.data) + t.V * t.H * size;
  madvise(reinterpret_cast<void*>(begin), end - begin, MADV_DONTNEED);
}

ffi::Error TableMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> h, ffi::AnyBuffer table,
                       ffi::ResultBuffer<ffi::F32> out, int64_t offset, int32_t kind, int64_t rows) {
  const auto hd = h.dimensions();
  const std::optional<TableView> t = table_view(table, offset, kind, rows);
  if (hd.size() != 2 || !t || hd[1] != t->H)
    return ffi::Error::InvalidArgument("bitnet_table_matmul: expects h [N, H] and table [V, H]");
  const int64_t N = hd[0], H = hd[1], V = t->V;
  if (t->type == ffi::U16)
    table_matmul(pool, h.typed_data(), N, H, static_cast<const uint16_t*>(t->data), V, out->typed_data(),
                 kernels(g_level).bf16_table_rows);
  else if (t->type == ffi::F32)
    table_matmul(pool, h.typed_data(), N, H, static_cast<const float*>(t->data), V, out->typed_data(),
                 kernels(g_level).f32_table_rows);
  else if (t->type == ffi::S8)
    table_matmul(pool, h.typed_data(), N, H, static_cast<const int8_t*>(t->data), V, out->typed_data(),
                 kernels(g_level).i8_table_rows);
  else
    return ffi::Error::InvalidArgument("bitnet_table_matmul: table must be uint16 (bf16 bits), float32 or int8");
  return ffi::Error::Success();
}

ffi::Error GreedyHead(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> h, ffi::AnyBuffer table,
                      ffi::Buffer<ffi::S8> codes, ffi::Buffer<ffi::F32> scales, ffi::Buffer<ffi::F32> bounds,
                      ffi::ResultBuffer<ffi::S32> tokens, ffi::ResultBuffer<ffi::S32> candidates, int64_t offset,
                      int32_t kind, int64_t rows) {
  const auto hd = h.dimensions(), cd = codes.dimensions();
  const std::optional<TableView> t = table_view(table, offset, kind, rows);
  if (hd.size() != 2 || !t || hd[1] != t->H || cd.size() != 2 || cd[0] != t->V || cd[1] != t->H)
    return ffi::Error::InvalidArgument("bitnet_greedy_head: expects h [N, H], table and codes [V, H]");
  const int64_t N = hd[0], H = hd[1], V = t->V;
  if (V == 0 || scales.element_count() != V || bounds.element_count() != V || tokens->element_count() != N ||
      candidates->element_count() != N)
    return ffi::Error::InvalidArgument("bitnet_greedy_head: expects V > 0, scales and bounds [V], outputs [N]");
  const ScreenedRows screen{codes.typed_data(), scales.typed_data(), bounds.typed_data()};
  const Kernels& k = kernels(g_level);
  if (t->type == ffi::U16)
    greedy_rows(pool, k, h.typed_data(), N, H, static_cast<const uint16_t*>(t->data), V, screen,
                k.bf16_table_rows, tokens->typed_data(), candidates->typed_data());
  else if (t->type == ffi::F32)
    greedy_rows(pool, k, h.typed_data(), N, H, static_cast<const float*>(t->data), V, screen,
                k.f32_table_rows, tokens->typed_data(), candidates->typed_data());
  else
    return ffi::Error::InvalidArgument("bitnet_greedy_head: table must be uint16 (bf16 bits) or float32");
  release_table_pages(*t, kind);
  return ffi::Error::Success();
}

// The embedding lookup of a table read in place: rows ids [N] of the table -> float32 [N, H], exactly (a bf16 is
// the high half of its float32). An id outside [0, V) is clamped into it rather than read past the table (the
// engine's never are: prompts are checked, and new tokens come from the table's rows).
ffi::Error TableRows(ffi::Buffer<ffi::S32> ids, ffi::AnyBuffer table, ffi::ResultBuffer<ffi::F32> out,
                     int64_t offset, int32_t kind, int64_t rows) {
  const std::optional<TableView> t = table_view(table, offset, kind, rows);
  const int64_t N = ids.element_count();
  if (!t || t->V == 0 || out->element_count() != N * t->H || (t->type != ffi::U16 && t->type != ffi::F32))
    return ffi::Error::InvalidArgument("bitnet_table_rows: expects ids [N], a bf16 or float32 table [V, H], out [N, H]");
  const int64_t H = t->H;
  float* y = out->typed_data();
  for (int64_t n = 0; n < N; ++n) {
    const int64_t row = std::clamp<int64_t>(ids.typed_data()[n], 0, t->V - 1);
    if (t->type == ffi::U16) {
      const uint16_t* src = static_cast<const uint16_t*>(t->data) + row * H;
      for (int64_t i = 0; i < H; ++i) y[n * H + i] = widen(src[i]);
    } else {
      std::memcpy(y + n * H, static_cast<const float*>(t->data) + row * H, size_t(H) * sizeof(float));
    }
  }
  release_table_pages(*t, kind);
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
    causal_attention(pool, kernels(g_level), q.typed_data(), k.typed_data(), v.typed_data(), cos.typed_data(), sin.typed_data(), s,
                     out->typed_data(), k_out->typed_data());
  return ffi::Error::Success();
}

ffi::Error CachedAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                           ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::F32> cos, ffi::Buffer<ffi::F32> sin,
                           ffi::Buffer<ffi::F32> cache_k, ffi::Buffer<ffi::F32> cache_v, ffi::Buffer<ffi::S32> layer,
                           ffi::Buffer<ffi::S32> start, ffi::ResultBuffer<ffi::F32> out,
                           ffi::ResultBuffer<ffi::F32> k_out) {
  const auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions(), cd = cache_k.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || vd.size() != 4 || cd.size() != 5)
    return ffi::Error::InvalidArgument("bitnet_cached_attention: expects q [B, T, Hq, D], k, v [B, T, KV, D], "
                                       "caches [L, B, S, KV, D]");
  const int64_t B = qd[0], T = qd[1], Hq = qd[2], D = qd[3], KV = kd[2], L = cd[0], S = cd[2];
  for (int i : {0, 1, 3})
    if (kd[i] != qd[i] || vd[i] != qd[i])
      return ffi::Error::InvalidArgument("bitnet_cached_attention: q, k and v differ in batch, length or head size");
  const auto vcd = cache_v.dimensions();
  if (vd[2] != KV || KV == 0 || Hq % KV != 0 || cd[1] != B || cd[3] != KV || cd[4] != D || vcd.size() != 5 ||
      !std::equal(vcd.begin(), vcd.end(), cd.begin()) || out->element_count() != B * T * Hq * D ||
      k_out->element_count() != k.element_count())
    return ffi::Error::InvalidArgument("bitnet_cached_attention: heads, caches or outputs do not match q, k, v");
  if (D % 2 != 0 || cos.element_count() != T * D || sin.element_count() != T * D)
    return ffi::Error::InvalidArgument("bitnet_cached_attention: expects an even D and cos, sin [T, D]");
  const int64_t l = layer.typed_data()[0], at = start.typed_data()[0];
  if (l < 0 || l >= L || at < 0 || at > S)
    return ffi::Error::InvalidArgument("bitnet_cached_attention: layer or start out of range");
  const CachedShape s{B, T, Hq, KV, D, S, l, at, static_cast<float>(1.0 / std::sqrt(double(D)))};
  if (B * T * Hq * D > 0)
    cached_attention(pool, kernels(g_level), q.typed_data(), k.typed_data(), v.typed_data(), cos.typed_data(),
                     sin.typed_data(), cache_k.typed_data(), cache_v.typed_data(), s, out->typed_data(),
                     k_out->typed_data());
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
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("offset")
                                  .Attr<int32_t>("kind")
                                  .Attr<int64_t>("rows"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(bitnet_table_rows, TableRows, ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("offset")
                                  .Attr<int32_t>("kind")
                                  .Attr<int64_t>("rows"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(bitnet_greedy_head, GreedyHead, ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Attr<int64_t>("offset")
                                  .Attr<int32_t>("kind")
                                  .Attr<int64_t>("rows"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(bitnet_causal_attention, CausalAttention, ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());


XLA_FFI_DEFINE_HANDLER_SYMBOL(bitnet_cached_attention, CachedAttention, ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

// What this CPU can run (a Level): 0 none (the engine keeps XLA's own products), 1 AVX2 + FMA, 2 AVX-512
// VNNI, 3 AVX-512 VNNI and AMX.
extern "C" int bitnet_native_level() { return kCpuLevel; }

// The loader, tests and benchmarks: run the kernels of `level` (at most the CPU's; AMX from amx_min_tokens
// tokens on, the table lookups from lut_min_tokens, where each is > 0). Returns the level now in use.
extern "C" int bitnet_native_configure(int level, long amx_min_tokens, long lut_min_tokens) {
  g_level = std::clamp(level, int(kNone), kCpuLevel);
  if (amx_min_tokens > 0) g_amx_min_tokens = amx_min_tokens;
  if (lut_min_tokens > 0) g_lut_min_tokens = lut_min_tokens;
  return g_level;
}
