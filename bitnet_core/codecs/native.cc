// The conversions' hot loops (bitnet_core/codecs/native.py compiles this file on first use and calls it through
// ctypes, which releases the GIL: the Python side splits the rows over the cores). Each function is the numpy
// code it replaces, byte for byte (tests/test_native_codecs.py compares them at every level this CPU runs):
//
// bitnet_hf2bit_to_rows: hf2bit.to_rows (HF bytes [R, in] -> [4, R, in/128, 32], each 4x4 matrix of 2-bit
//   fields transposed by the same two rounds of delta swaps as _bits.transpose_fields), for rows [r0, r1).
//   numpy makes 24 passes over the tensor for them; here one pass keeps the four bytes in registers.
// bitnet_tq2_0_blocks: tq.tq2_0_from_hf2bit's blocks from to_rows' bytes: each block's 64 code bytes, then its
//   f16 `d`: `one`, or +0 for a block of zero codes only (every byte 0x55).
// bitnet_hf2bit_to_rows4: rows4.from_hf2bit (HF bytes [R, in] -> rows4 bytes [R, in]: HF rows 4q + j, j = 0..3,
//   hold in field k what rows4 row k*R/4 + q holds in field j: the same 4x4 transpose), for q in [q0, q1).
// bitnet_hf2bit_to_trits: trits.from_hf2bit (HF bytes [R, in] -> five base-3 digits per byte), output bytes
//   [j0, j1): the digits in order are field k of every HF byte, for k = 0..3 (the flattened codes' row blocks),
//   then digit 1 up to a multiple of five; byte j = sum of 3^m * digit 5j + m. numpy spread the digits over a
//   buffer 4x the input first.
// bitnet_has_code3: _bits.has_code3 (any 2-bit field equal to 3).
// bitnet_bf16_to_f16: bf16 -> f16 bits rounded to nearest even, as ml_dtypes casts, for values whose magnitude
//   bits (sign cleared) are below `limit`; returns 1 if any value is not (the caller then takes its checked
//   float32 way), 0 otherwise. bf16 -> f32 is exact (a shift), and the f32 -> f16 rounding is VCVTPS2PH's
//   (AVX-512F, or F16C with AVX2) or f32_to_f16 below.
//
// `level` picks the instructions: 0 scalar (any CPU), 1 AVX2 (+F16C), 2 AVX-512 (F, BW); bitnet_codecs_level()
// says the highest this CPU runs. Vector code is compiled under `#pragma GCC target` and only called at a
// level the CPU has.

#include <algorithm>
#include <cstdint>
#include <cstring>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace {

// ------------------------------------------------------------------------------------------------ scalar

// float32 -> float16 bits, rounded to nearest even, for finite values below 65520 in magnitude (the callers'
// limit keeps the rest away).
inline uint16_t f32_to_f16(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof bits);
  const uint32_t sign = (bits >> 16) & 0x8000u, magnitude = bits & 0x7FFFFFFFu;
  if (magnitude < 0x38800000u) {  // below 2^-14: a float16 subnormal, in units of 2^-24
    float scaled;
    std::memcpy(&scaled, &magnitude, sizeof scaled);
    scaled *= 16777216.0f;  // exact: a power of two, and the result is below 2^10
    return uint16_t(sign | uint32_t(__builtin_nearbyintf(scaled)));  // the default rounding: to nearest even
  }
  // Normal: drop 13 mantissa bits, rounding to nearest even (a carry into the exponent is the right result).
  const uint32_t rounded = magnitude + 0x0FFFu + ((magnitude >> 13) & 1u);
  return uint16_t(sign | ((rounded - 0x38000000u) >> 13));
}

inline uint16_t bf16_to_f16_one(uint16_t bf16) {
  const uint32_t bits = uint32_t(bf16) << 16;
  float value;
  std::memcpy(&value, &bits, sizeof value);
  return f32_to_f16(value);
}

int bf16_to_f16_scalar(const uint16_t* src, uint16_t* dst, int64_t n, uint16_t limit, int64_t from) {
  int beyond = 0;
  for (int64_t i = from; i < n; ++i) {
    beyond |= (src[i] & 0x7FFF) >= limit;
    dst[i] = bf16_to_f16_one(src[i]);  // beyond the limit: any bits (the caller discards them)
  }
  return beyond;
}

// The delta swap of _bits._delta_swap on 8 bytes at once: the bits of `a` selected by mask << shift <-> the
// bits of `b` selected by mask.
inline void delta_swap(uint64_t& a, uint64_t& b, int shift, uint64_t mask) {
  const uint64_t t = ((a >> shift) ^ b) & mask;
  b ^= t;
  a ^= t << shift;
}

constexpr uint64_t kLow4 = 0x0F0F0F0F0F0F0F0Full, kLow2Pairs = 0x3333333333333333ull;

// _bits.transpose_fields on 8 bytes of each of four planes: field j of v[i] <-> field i of v[j].
inline void transpose_fields(uint64_t (&v)[4]) {
  delta_swap(v[0], v[2], 4, kLow4);  // the off-diagonal 2x2 blocks, then each 2x2 block
  delta_swap(v[1], v[3], 4, kLow4);
  delta_swap(v[0], v[1], 2, kLow2Pairs);
  delta_swap(v[2], v[3], 2, kLow2Pairs);
}

void to_rows_scalar(const uint8_t* packed, int64_t R, int64_t n_in, int reverse, uint8_t* out, int64_t r0,
                    int64_t r1) {
  const int64_t row_bytes = n_in / 4, plane = R * row_bytes;
  for (int64_t r = r0; r < r1; ++r)
    for (int64_t j = 0; j < n_in / 128; ++j)
      for (int64_t p = 0; p < 32; p += 8) {
        const uint8_t* in = packed + r * n_in + 128 * j + p;
        uint64_t v[4];
        for (int g = 0; g < 4; ++g) std::memcpy(&v[g], in + 32 * (reverse ? 3 - g : g), 8);
        transpose_fields(v);
        uint8_t* o = out + r * row_bytes + 32 * j + p;
        for (int k = 0; k < 4; ++k) std::memcpy(o + k * plane, &v[k], 8);
      }
}

void tq2_0_blocks(const uint8_t* qs, int64_t blocks, uint16_t one, uint8_t* out) {
  constexpr int64_t kCodeBytes = 64;
  for (int64_t b = 0; b < blocks; ++b) {
    const uint8_t* in = qs + b * kCodeBytes;
    uint8_t* block = out + b * (kCodeBytes + 2);
    uint64_t differ = 0;
    for (int64_t i = 0; i < kCodeBytes; i += 8) {
      uint64_t w;
      std::memcpy(&w, in + i, 8);
      differ |= w ^ 0x5555555555555555ull;
      std::memcpy(block + i, &w, 8);
    }
    const uint16_t d = differ ? one : 0;
    std::memcpy(block + kCodeBytes, &d, 2);  // little endian, as every GGUF field
  }
}

// Digit n of the HF bytes `packed` (n_bytes of them): field n / n_bytes of byte n % n_bytes; past the last
// digit, the padding digit 1.
inline uint32_t hf_digit(const uint8_t* packed, int64_t n_bytes, int64_t n) {
  if (n >= 4 * n_bytes) return 1;
  return (packed[n % n_bytes] >> (2 * (n / n_bytes))) & 3u;
}

// Bytes [at, at + n), n <= 8, of the four rows in[j], their 4x4 matrices of fields transposed into rows out[k].
inline void transpose_rows_scalar(const uint8_t* const in[4], uint8_t* const out[4], int64_t at, int64_t n) {
  uint64_t v[4] = {0, 0, 0, 0};
  for (int j = 0; j < 4; ++j) std::memcpy(&v[j], in[j] + at, n);
  transpose_fields(v);
  for (int k = 0; k < 4; ++k) std::memcpy(out[k] + at, &v[k], n);
}

void to_rows4_scalar(const uint8_t* packed, int64_t R, int64_t n_in, uint8_t* out, int64_t q0, int64_t q1,
                     int64_t from) {
  for (int64_t q = q0; q < q1; ++q) {
    const uint8_t* in[4];
    uint8_t* to[4];
    for (int j = 0; j < 4; ++j) in[j] = packed + (4 * q + j) * n_in, to[j] = out + (j * (R / 4) + q) * n_in;
    for (int64_t i = from; i < n_in; i += 8) transpose_rows_scalar(in, to, i, std::min<int64_t>(8, n_in - i));
  }
}

void hf2bit_to_trits(const uint8_t* packed, int64_t n_bytes, uint8_t* out, int64_t j0, int64_t j1) {
  // Five digits of one plane k in bytes 0..4 of a little-endian word (field k of 5 consecutive HF bytes, masked
  // to 2 bits each), times kPlaces, put d0 + 3 d1 + 9 d2 + 27 d3 + 81 d4 in bits 32..39: every partial sum
  // stays under 256, so no carry reaches bit 40 and nothing from above bit 39 lands in the byte.
  constexpr uint64_t kPlaces = 81ull | 27ull << 8 | 9ull << 16 | 3ull << 24 | 1ull << 32;
  constexpr uint64_t kFields = 0x0303030303ull;  // the low 2 bits of bytes 0..4
  auto one_by_one = [&](int64_t j) {  // bytes across two planes, near the input's end, or of padding
    uint32_t byte = 0;
    for (int m = 4; m >= 0; --m) byte = 3 * byte + hf_digit(packed, n_bytes, 5 * j + m);
    out[j] = uint8_t(byte);
  };
  int64_t j = j0;
  for (int k = 0; k < 4 && j < j1; ++k) {
    // bytes whose five digits lie in plane k with the 8-byte load inside the input: 5j >= k n, 5j + 8 <= (k + 1) n
    const int64_t first = (k * n_bytes + 4) / 5, end = std::max(first, ((k + 1) * n_bytes - 8) / 5 + 1);
    for (; j < std::min(first, j1); ++j) one_by_one(j);
    const uint8_t* at = packed + (5 * j - k * n_bytes);
    for (; j < std::min(end, j1); ++j, at += 5) {
      uint64_t w;
      std::memcpy(&w, at, 8);
      out[j] = uint8_t((((w >> (2 * k)) & kFields) * kPlaces) >> 32);
    }
  }
  for (; j < j1; ++j) one_by_one(j);
}

int has_code3_scalar(const uint8_t* p, int64_t n, int64_t from) {
  uint64_t found = 0;
  int64_t i = from;
  for (; i + 8 <= n; i += 8) {
    uint64_t w;
    std::memcpy(&w, p + i, 8);
    found |= w & (w >> 1) & 0x5555555555555555ull;
  }
  for (; i < n; ++i) found |= p[i] & (p[i] >> 1) & 0x55;
  return found != 0;
}

#if defined(__x86_64__)

// ---------------------------------------------------------------------------------------------- AVX2

#pragma GCC push_options
#pragma GCC target("avx2,f16c")

// The byte-wise delta swap on 32 bytes. AVX2 shifts 16-bit lanes; the bits a shift carries across a byte
// boundary are the ones the mask (0x0F after a shift by 4, 0x33 after 2) then clears, and the masked bits
// shifted back up stay inside their byte.
inline void delta_swap(__m256i& a, __m256i& b, int shift, __m256i mask) {
  const __m256i t = _mm256_and_si256(_mm256_xor_si256(_mm256_srli_epi16(a, shift), b), mask);
  b = _mm256_xor_si256(b, t);
  a = _mm256_xor_si256(a, _mm256_slli_epi16(t, shift));
}

inline void transpose_fields(__m256i (&v)[4]) {
  const __m256i low4 = _mm256_set1_epi8(0x0F), low2_pairs = _mm256_set1_epi8(0x33);
  delta_swap(v[0], v[2], 4, low4);
  delta_swap(v[1], v[3], 4, low4);
  delta_swap(v[0], v[1], 2, low2_pairs);
  delta_swap(v[2], v[3], 2, low2_pairs);
}

void to_rows_avx2(const uint8_t* packed, int64_t R, int64_t n_in, int reverse, uint8_t* out, int64_t r0,
                  int64_t r1) {
  const int64_t row_bytes = n_in / 4, plane = R * row_bytes;
  for (int64_t r = r0; r < r1; ++r)
    for (int64_t j = 0; j < n_in / 128; ++j) {  // one 128-value chunk: its 4 groups of 32 bytes
      const uint8_t* in = packed + r * n_in + 128 * j;
      __m256i v[4];
      for (int g = 0; g < 4; ++g)
        v[g] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(in + 32 * (reverse ? 3 - g : g)));
      transpose_fields(v);
      uint8_t* o = out + r * row_bytes + 32 * j;
      for (int k = 0; k < 4; ++k) _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + k * plane), v[k]);
    }
}

void to_rows4_avx2(const uint8_t* packed, int64_t R, int64_t n_in, uint8_t* out, int64_t q0, int64_t q1) {
  const int64_t whole = n_in - n_in % 32;
  for (int64_t q = q0; q < q1; ++q)
    for (int64_t i = 0; i < whole; i += 32) {
      __m256i v[4];
      for (int j = 0; j < 4; ++j)
        v[j] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(packed + (4 * q + j) * n_in + i));
      transpose_fields(v);
      for (int k = 0; k < 4; ++k)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + (k * (R / 4) + q) * n_in + i), v[k]);
    }
  if (whole < n_in) to_rows4_scalar(packed, R, n_in, out, q0, q1, whole);
}

int has_code3_avx2(const uint8_t* p, int64_t n) {
  __m256i found = _mm256_setzero_si256();
  const __m256i low_bits = _mm256_set1_epi8(0x55);
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i));
    found = _mm256_or_si256(found, _mm256_and_si256(_mm256_and_si256(v, _mm256_srli_epi16(v, 1)), low_bits));
  }
  return !_mm256_testz_si256(found, found) || has_code3_scalar(p, n, i);
}

int bf16_to_f16_avx2(const uint16_t* src, uint16_t* dst, int64_t n, uint16_t limit) {
  __m256i beyond = _mm256_setzero_si256();
  const __m256i magnitude = _mm256_set1_epi16(0x7FFF), highest = _mm256_set1_epi16(int16_t(limit - 1));
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i));
    // magnitude > limit - 1, signed 16-bit compare: magnitudes are at most 0x7FFF
    beyond = _mm256_or_si256(beyond, _mm256_cmpgt_epi16(_mm256_and_si256(v, magnitude), highest));
    const __m256i lo = _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm256_castsi256_si128(v)), 16);
    const __m256i hi = _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm256_extracti128_si256(v, 1)), 16);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i),
                     _mm256_cvtps_ph(_mm256_castsi256_ps(lo), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i + 8),
                     _mm256_cvtps_ph(_mm256_castsi256_ps(hi), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  return !_mm256_testz_si256(beyond, beyond) || bf16_to_f16_scalar(src, dst, n, limit, i);
}

#pragma GCC pop_options

// ------------------------------------------------------------------------------------------- AVX-512

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw")

int bf16_to_f16_avx512(const uint16_t* src, uint16_t* dst, int64_t n, uint16_t limit) {
  __mmask32 beyond = 0;
  const __m512i magnitude = _mm512_set1_epi16(0x7FFF), bound = _mm512_set1_epi16(int16_t(limit));
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    const __m512i v = _mm512_loadu_si512(src + i);
    beyond |= _mm512_cmpge_epu16_mask(_mm512_and_si512(v, magnitude), bound);
    const __m512i lo = _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(v)), 16);
    const __m512i hi = _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(v, 1)), 16);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i),
                        _mm512_cvtps_ph(_mm512_castsi512_ps(lo), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i + 16),
                        _mm512_cvtps_ph(_mm512_castsi512_ps(hi), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  return beyond != 0 || bf16_to_f16_scalar(src, dst, n, limit, i);
}

#pragma GCC pop_options

#endif  // __x86_64__

}  // namespace

extern "C" {

int bitnet_codecs_level() {
#if defined(__x86_64__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")) return 2;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c")) return 1;
#endif
  return 0;
}

void bitnet_hf2bit_to_rows(const uint8_t* packed, int64_t R, int64_t n_in, int reverse, uint8_t* out, int64_t r0,
                           int64_t r1, int level) {
#if defined(__x86_64__)
  if (level >= 1) return to_rows_avx2(packed, R, n_in, reverse, out, r0, r1);  // 32 bytes are one group
#endif
  to_rows_scalar(packed, R, n_in, reverse, out, r0, r1);
}

void bitnet_hf2bit_to_rows4(const uint8_t* packed, int64_t R, int64_t n_in, uint8_t* out, int64_t q0, int64_t q1,
                            int level) {
#if defined(__x86_64__)
  if (level >= 1) return to_rows4_avx2(packed, R, n_in, out, q0, q1);
#endif
  to_rows4_scalar(packed, R, n_in, out, q0, q1, 0);
}

void bitnet_hf2bit_to_trits(const uint8_t* packed, int64_t n_bytes, uint8_t* out, int64_t j0, int64_t j1) {
  hf2bit_to_trits(packed, n_bytes, out, j0, j1);
}

void bitnet_tq2_0_blocks(const uint8_t* qs, int64_t blocks, uint16_t one, uint8_t* out) {
  tq2_0_blocks(qs, blocks, one, out);
}

int bitnet_has_code3(const uint8_t* p, int64_t n, int level) {
#if defined(__x86_64__)
  if (level >= 1) return has_code3_avx2(p, n);
#endif
  return has_code3_scalar(p, n, 0);
}

int bitnet_bf16_to_f16(const uint16_t* src, uint16_t* dst, int64_t n, uint16_t limit, int level) {
#if defined(__x86_64__)
  if (level >= 2) return bf16_to_f16_avx512(src, dst, n, limit);
  if (level == 1) return bf16_to_f16_avx2(src, dst, n, limit);
#endif
  return bf16_to_f16_scalar(src, dst, n, limit, 0);
}

}  // extern "C"
