// Host twin of the fused FP8 decode's arithmetic, built from the kernel's own headers
// (kernels/csrc/fp8_dequant.cuh, fp8_lane.h) with a host C++ compiler; driven by
// tests/kernels/test_fp8_twin.py.
//
//   fp8_twin dequant IN OUT N   N rows of 656 bytes (IN) -> N rows of 576 bf16 (OUT), converted the
//                               way the kernel does: 16-byte groups through dequant_16, RoPE as is.
//   fp8_twin dequant-folded ... the same with the one-multiply form wherever the scale allows it.
//   fp8_twin seesaw-slots IN OUT SCHEDULE   one page (64 rows of 656 bytes) through the seesaw kernel's
//                               in-place converter (seesaw_fp8_layout.h's index math): the 8 latent
//                               slots filled as TMA lands them, converted with SCHEDULE (rounds = one
//                               warp a tile in 8 rounds from the last; rounds2 (the default since s19) /
//                               rounds4 = 2 / 4 rounds an iteration (KVPAGER_FP8_CONVERT_ROUNDS)), then
//                               read back through the 128-byte swizzle into 64 rows of 512 bf16 (OUT).
//   fp8_twin fragments SEED     one page through every warp's and lane's fragments as the kernel
//                               builds them (Fp8Lane, k_step_b, dequant_16), with mma.m16n8k16 and
//                               movmatrix emulated from the PTX ISA's fragment layouts; checks S and
//                               P V against plain products in double. Prints "ok" or the mismatch.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "fp8_dequant.cuh"
#include "fp8_lane.h"
#include "seesaw_fp8_layout.h"

using namespace kvpager;

namespace {

constexpr int kLanes = 32;

double bf16_value(uint32_t h) { return bf16_bits_to_float(h & 0xFFFFu); }

// e4m3fn from its definition (bias 7, 3 mantissa bits, subnormals, 0x7F / 0xFF NaN), independent
// of the bit moves under test.
double e4m3_value(uint8_t b) {
  const int sign = b >> 7, exp = (b >> 3) & 15, mant = b & 7;
  if (exp == 15 && mant == 7) return NAN;
  const double mag = exp == 0 ? std::ldexp(mant / 8.0, -6) : std::ldexp(1.0 + mant / 8.0, exp - 7);
  return sign ? -mag : mag;
}

uint32_t load_u32(const uint8_t* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

void dequant_row(const uint8_t* row, uint16_t* out, bool folded) {
  for (int c = 0; c < kHeadDimV; c += kChunkBytes) {
    uint32_t x[4], w[8];
    for (int i = 0; i < 4; ++i) x[i] = load_u32(row + c + 4 * i);
    float scale;
    std::memcpy(&scale, row + kFp8ScalesOffset + 4 * (c / kFp8GroupSize), 4);
    if (folded && fp8_scale_folds(scale))
      dequant_16<true>(x, scale, w);
    else
      dequant_16<false>(x, scale, w);
    for (int k = 0; k < 8; ++k) {
      out[c + 2 * k] = uint16_t(w[k] & 0xFFFFu);
      out[c + 2 * k + 1] = uint16_t(w[k] >> 16);
    }
  }
  std::memcpy(out + kHeadDimV, row + kFp8RopeOffset, 2 * kRopeDim);
}

int run_dequant(const char* in_path, const char* out_path, long n, bool folded) {
  std::vector<uint8_t> in(size_t(n) * kFp8TokenBytes);
  std::vector<uint16_t> out(size_t(n) * kHeadDim);
  FILE* f = std::fopen(in_path, "rb");
  if (!f || std::fread(in.data(), 1, in.size(), f) != in.size()) return 2;
  std::fclose(f);
  for (long r = 0; r < n; ++r) dequant_row(&in[size_t(r) * kFp8TokenBytes], &out[size_t(r) * kHeadDim], folded);
  f = std::fopen(out_path, "wb");
  if (!f || std::fwrite(out.data(), 2, out.size(), f) != out.size()) return 2;
  std::fclose(f);
  return 0;
}

// ---- mma.m16n8k16 and movmatrix on per-lane registers (PTX ISA fragment layouts) ----------------

using Regs4 = uint32_t[kLanes][4];
using Regs2 = uint32_t[kLanes][2];
using Acc = double[kLanes][4];

double half_of(uint32_t reg, int e) { return bf16_value(e ? reg >> 16 : reg); }

// D += A B: A from a[lane][0..3], B from b[lane][0..1], D in d[lane][0..3].
void mma(const Regs4& a, const Regs2& b, Acc& d) {
  double A[16][16], B[16][8];
  for (int lane = 0; lane < kLanes; ++lane) {
    const int g = lane / 4, t = lane % 4;
    for (int e = 0; e < 2; ++e) {
      A[g][2 * t + e] = half_of(a[lane][0], e);
      A[g + 8][2 * t + e] = half_of(a[lane][1], e);
      A[g][2 * t + 8 + e] = half_of(a[lane][2], e);
      A[g + 8][2 * t + 8 + e] = half_of(a[lane][3], e);
      B[2 * t + e][g] = half_of(b[lane][0], e);
      B[2 * t + 8 + e][g] = half_of(b[lane][1], e);
    }
  }
  for (int lane = 0; lane < kLanes; ++lane) {
    const int g = lane / 4, t = lane % 4;
    for (int i = 0; i < 4; ++i) {
      const int row = g + 8 * (i / 2), col = 2 * t + i % 2;
      double s = 0;
      for (int k = 0; k < 16; ++k) s += A[row][k] * B[k][col];
      d[lane][i] += s;
    }
  }
}

// movmatrix.m8n8.trans.b16: lane holds row lane / 4, columns 2 (lane % 4) + {0, 1}, in and out.
void movmatrix_trans(const uint32_t (&in)[kLanes], uint32_t (&out)[kLanes]) {
  uint16_t m[8][8];
  for (int lane = 0; lane < kLanes; ++lane) {
    m[lane / 4][2 * (lane % 4)] = uint16_t(in[lane] & 0xFFFFu);
    m[lane / 4][2 * (lane % 4) + 1] = uint16_t(in[lane] >> 16);
  }
  for (int lane = 0; lane < kLanes; ++lane) {
    const int r = lane / 4, c = 2 * (lane % 4);
    out[lane] = uint32_t(m[c][r]) | (uint32_t(m[c + 1][r]) << 16);
  }
}

uint32_t pack(uint16_t lo, uint16_t hi) { return uint32_t(lo) | (uint32_t(hi) << 16); }

bool close(double got, double want, double scale, const char* what, int i, int j) {
  if (std::fabs(got - want) <= 1e-9 * scale) return true;
  std::printf("MISMATCH %s[%d][%d]: got %.17g want %.17g\n", what, i, j, got, want);
  return false;
}

int run_fragments(unsigned seed) {
  std::mt19937 rng(seed);
  // A page of 64 rows: e4m3 bytes (no NaN codes), power-of-two scales, bf16 RoPE; 16 Q rows; P.
  std::vector<uint8_t> page(size_t(kPageSize) * kFp8TokenBytes);
  for (int r = 0; r < kPageSize; ++r) {
    uint8_t* row = &page[size_t(r) * kFp8TokenBytes];
    for (int c = 0; c < kHeadDimV; ++c) {
      uint8_t b;
      do b = uint8_t(rng() & 0xFF); while ((b & 0x7F) == 0x7F);
      row[c] = b;
    }
    for (int grp = 0; grp < kHeadDimV / kFp8GroupSize; ++grp) {
      const float scale = std::ldexp(1.0f, int(rng() % 24) - 13);
      std::memcpy(row + kFp8ScalesOffset + 4 * grp, &scale, 4);
    }
    for (int c = 0; c < kRopeDim; ++c) {
      const uint16_t h = uint16_t(float_to_bf16_bits(std::normal_distribution<float>(0.f, 2.f)(rng)));
      std::memcpy(row + kFp8RopeOffset + 2 * c, &h, 2);
    }
  }
  std::vector<uint16_t> q(size_t(kMmaM) * kHeadDim), p(size_t(kMmaM) * kPageSize);
  for (auto& h : q) h = uint16_t(float_to_bf16_bits(std::normal_distribution<float>(0.f, 1.f)(rng)));
  for (auto& h : p) h = uint16_t(float_to_bf16_bits(std::uniform_real_distribution<float>(0.f, 1.f)(rng)));

  // Plain products in double: K from the format's definition.
  std::vector<double> K(size_t(kPageSize) * kHeadDim);
  for (int r = 0; r < kPageSize; ++r) {
    const uint8_t* row = &page[size_t(r) * kFp8TokenBytes];
    for (int c = 0; c < kHeadDimV; ++c) {
      float scale;
      std::memcpy(&scale, row + kFp8ScalesOffset + 4 * (c / kFp8GroupSize), 4);
      K[size_t(r) * kHeadDim + c] = e4m3_value(row[c]) * scale;
    }
    for (int c = 0; c < kRopeDim; ++c) {
      uint16_t h;
      std::memcpy(&h, row + kFp8RopeOffset + 2 * c, 2);
      K[size_t(r) * kHeadDim + kHeadDimV + c] = bf16_value(h);
    }
  }
  double S_want[kMmaM][kPageSize] = {}, S_got[kMmaM][kPageSize] = {};
  double O_want[kMmaM][kHeadDimV] = {}, O_got[kMmaM][kHeadDimV] = {};
  for (int i = 0; i < kMmaM; ++i)
    for (int j = 0; j < kPageSize; ++j)
      for (int c = 0; c < kHeadDim; ++c) S_want[i][j] += bf16_value(q[i * kHeadDim + c]) * K[j * kHeadDim + c];
  for (int i = 0; i < kMmaM; ++i)
    for (int c = 0; c < kHeadDimV; ++c)
      for (int j = 0; j < kPageSize; ++j) O_want[i][c] += bf16_value(p[i * kPageSize + j]) * K[j * kHeadDim + c];

  // Q in A-fragment order, as load_q_fragments stores it.
  std::vector<uint32_t> q_frag(size_t(Fp8Lane::kSteps) * kLanes * 4);
  for (int step = 0; step < Fp8Lane::kSteps; ++step)
    for (int lane = 0; lane < kLanes; ++lane)
      for (int i = 0; i < 4; ++i) {
        const Fp8Lane ln = Fp8Lane::of(0, lane);
        const uint16_t* src = &q[ln.q_row(i) * kHeadDim + ln.q_col(step, i)];
        q_frag[(size_t(step) * kLanes + lane) * 4 + i] = pack(src[0], src[1]);
      }

  constexpr int kKeyTiles = kPageSize / kMmaN;
  constexpr int kWords = kFp8LaneBytes / 2;
  for (int warp = 0; warp < kNumWarps; ++warp) {
    // Each lane's dequantized block and RoPE words, as dequant_block / the RoPE loads make them.
    static uint32_t kv[kLanes][kKeyTiles][kWords], rope[kLanes][Fp8Lane::kRopeReads][4];
    for (int lane = 0; lane < kLanes; ++lane) {
      const Fp8Lane ln = Fp8Lane::of(warp, lane);
      for (int n = 0; n < kKeyTiles; ++n) {
        const uint8_t* row = &page[size_t(ln.key_row(n)) * kFp8TokenBytes];
        uint32_t x[4];
        for (int i = 0; i < 4; ++i) x[i] = load_u32(row + ln.latent_byte() + 4 * i);
        float scale;
        std::memcpy(&scale, row + ln.scale_byte(), 4);
        dequant_16<false>(x, scale, kv[lane][n]);
      }
      for (int j = 0; j < Fp8Lane::kRopeReads; ++j)
        for (int i = 0; i < 4; ++i)
          rope[lane][j][i] = load_u32(&page[size_t(ln.rope_row()) * kFp8TokenBytes + ln.rope_byte(j) + 4 * i]);
    }
    // S partial (score_partial): latent steps over every key tile, RoPE steps for key tile `warp`.
    static Acc s[kKeyTiles];
    static Acc r;
    std::memset(s, 0, sizeof(s));
    std::memset(r, 0, sizeof(r));
    Regs4 a;
    Regs2 b;
    for (int step = 0; step < Fp8Lane::kLaneSteps; ++step)
      for (int n = 0; n < kKeyTiles; ++n) {
        for (int lane = 0; lane < kLanes; ++lane) {
          std::memcpy(a[lane], &q_frag[(size_t(Fp8Lane::latent_step(warp, step)) * kLanes + lane) * 4], 16);
          k_step_b(step, kv[lane][n], b[lane]);
        }
        mma(a, b, s[n]);
      }
    for (int j = 0; j < Fp8Lane::kRopeReads; ++j)
      for (int step = 0; step < Fp8Lane::kRopeSteps; ++step) {
        for (int lane = 0; lane < kLanes; ++lane) {
          std::memcpy(a[lane], &q_frag[(size_t(Fp8Lane::rope_step(j, step)) * kLanes + lane) * 4], 16);
          k_step_b(step, rope[lane][j], b[lane]);
        }
        mma(a, b, r);
      }
    for (int lane = 0; lane < kLanes; ++lane) {
      const int g = lane / 4, t = lane % 4;
      for (int i = 0; i < 4; ++i) {
        const int row = g + 8 * (i / 2), key = 2 * t + i % 2;
        for (int n = 0; n < kKeyTiles; ++n) S_got[row][n * kMmaN + key] += s[n][lane][i];
        S_got[row][warp * kMmaN + key] += r[lane][i];
      }
    }
    // P V (accumulate_pv): P's A fragment of k-step `step` (keys 16 step + 0..15) in the standard
    // layout (ldmatrix), V's B fragment by movmatrix from kv of key tiles 2 step, 2 step + 1.
    static Acc o[kWords];
    std::memset(o, 0, sizeof(o));
    for (int step = 0; step < kPageSize / kMmaK; ++step) {
      for (int lane = 0; lane < kLanes; ++lane) {
        const int g = lane / 4, t = lane % 4, k0 = step * kMmaK + 2 * t;
        a[lane][0] = pack(p[g * kPageSize + k0], p[g * kPageSize + k0 + 1]);
        a[lane][1] = pack(p[(g + 8) * kPageSize + k0], p[(g + 8) * kPageSize + k0 + 1]);
        a[lane][2] = pack(p[g * kPageSize + k0 + 8], p[g * kPageSize + k0 + 9]);
        a[lane][3] = pack(p[(g + 8) * kPageSize + k0 + 8], p[(g + 8) * kPageSize + k0 + 9]);
      }
      for (int m = 0; m < kWords; ++m) {
        uint32_t in0[kLanes], in1[kLanes], b0[kLanes], b1[kLanes];
        for (int lane = 0; lane < kLanes; ++lane) {
          in0[lane] = kv[lane][2 * step][m];
          in1[lane] = kv[lane][2 * step + 1][m];
        }
        movmatrix_trans(in0, b0);
        movmatrix_trans(in1, b1);
        for (int lane = 0; lane < kLanes; ++lane) {
          b[lane][0] = b0[lane];
          b[lane][1] = b1[lane];
        }
        mma(a, b, o[m]);
      }
    }
    for (int lane = 0; lane < kLanes; ++lane) {
      const Fp8Lane ln = Fp8Lane::of(warp, lane);
      for (int m = 0; m < kWords; ++m)
        for (int i = 0; i < 4; ++i) O_got[ln.g + 8 * (i / 2)][ln.out_col(m) + i % 2] += o[m][lane][i];
    }
  }

  double s_scale = 0, o_scale = 0;
  for (auto& row : S_want)
    for (double v : row) s_scale = std::fmax(s_scale, std::fabs(v));
  for (auto& row : O_want)
    for (double v : row) o_scale = std::fmax(o_scale, std::fabs(v));
  for (int i = 0; i < kMmaM; ++i) {
    for (int j = 0; j < kPageSize; ++j)
      if (!close(S_got[i][j], S_want[i][j], s_scale, "S", i, j)) return 1;
    for (int c = 0; c < kHeadDimV; ++c)
      if (!close(O_got[i][c], O_want[i][c], o_scale, "O", i, c)) return 1;
  }
  std::printf("ok\n");
  return 0;
}


// ---- the seesaw kernel's in-place converter (seesaw_fp8.cuh) ----------------------------------------

constexpr int kLatentTiles = kHeadDimV / kBlockCols;  // 8

// One lane's conversion of its 16 FP8 bytes x of `row` into the slot (the kernel's store order).
void convert_lane(uint8_t* slot, int row, int chunk, const uint32_t (&x)[4], float scale, bool folded) {
  uint32_t w[8];
  if (folded)
    dequant_16<true>(x, scale, w);
  else
    dequant_16<false>(x, scale, w);
  for (int half = 0; half < 2; ++half)
    std::memcpy(slot + bf16_dst_offset(row, 2 * chunk + half), &w[4 * half], kChunkBytes);
}

float scale_at(const std::vector<uint8_t>& slots, int first, int row, int group) {
  float v;
  std::memcpy(&v, &slots[size_t(first) * kPageTileBytes + fp8_scale_offset(row, group)], 4);
  return v;
}

// A warp folds only if every scale its lanes use does (the kernel's __all_sync).
bool warp_folds(const std::vector<float>& scales) {
  for (float v : scales)
    if (!fp8_scale_folds(v)) return false;
  return true;
}

void read_lane(const uint8_t* slot, int row, int chunk, uint32_t (&x)[4]) {
  for (int i = 0; i < 4; ++i) x[i] = load_u32(slot + fp8_src_offset(row, chunk) + 4 * i);
}

// Default: warp w converts tile first + w; all warps read their rows' scales before any write (the
// kernel's named barrier); then rounds 7 .. 0, `per_iter` of them an iteration (1, or 2 / 4 for
// KVPAGER_FP8_CONVERT_ROUNDS), every lane of the warp reading the iteration's rounds before any of its
// writes (what the kernel's round order plus __syncwarp guarantee).
void convert_rounds(std::vector<uint8_t>& slots, int first, int per_iter) {
  float scale[4][kLanes][8];
  bool folds[4];
  for (int w = 0; w < 4; ++w) {
    std::vector<float> used;
    for (int lane = 0; lane < kLanes; ++lane)
      for (int k = 0; k < 8; ++k) {
        scale[w][lane][k] = scale_at(slots, first, round_row(k, lane), fp8_scale_group(first + w));
        used.push_back(scale[w][lane][k]);
      }
    folds[w] = warp_folds(used);
  }
  for (int w = 0; w < 4; ++w) {
    uint8_t* slot = &slots[size_t(first + w) * kPageTileBytes];
    for (int k0 = 7; k0 >= 0; k0 -= per_iter) {
      uint32_t x[4][kLanes][4];
      for (int r = 0; r < per_iter; ++r)
        for (int lane = 0; lane < kLanes; ++lane)
          read_lane(slot, round_row(k0 - r, lane), converter_chunk(lane), x[r][lane]);
      for (int r = 0; r < per_iter; ++r)
        for (int lane = 0; lane < kLanes; ++lane)
          convert_lane(slot, round_row(k0 - r, lane), converter_chunk(lane), x[r][lane], scale[w][lane][k0 - r],
                       folds[w]);
    }
  }
}

int run_seesaw_slots(const char* in_path, const char* out_path, const char* schedule) {
  std::vector<uint8_t> page(size_t(kPageSize) * kFp8TokenBytes);
  FILE* f = std::fopen(in_path, "rb");
  if (!f || std::fread(page.data(), 1, page.size(), f) != page.size()) return 2;
  std::fclose(f);
  // The slots as the TMA copies leave them (written from the copies' definitions, not the helpers):
  // tile t's 64 bytes of row r at r * 64 (no swizzle), the page's scales [64][4 floats] at 4096 in
  // the slots of tiles 0 and 4; the rest of each slot holds stale data.
  std::vector<uint8_t> slots(size_t(kLatentTiles) * kPageTileBytes, 0xA5);
  for (int t = 0; t < kLatentTiles; ++t)
    for (int r = 0; r < kPageSize; ++r) {
      const uint8_t* row = &page[size_t(r) * kFp8TokenBytes];
      std::memcpy(&slots[size_t(t) * kPageTileBytes + r * kBlockCols], row + t * kBlockCols, kBlockCols);
      if (t % 4 == 0) std::memcpy(&slots[size_t(t) * kPageTileBytes + 4096 + r * 16], row + kFp8ScalesOffset, 16);
    }
  const std::string sched = schedule;
  for (int first : {0, 4}) {
    if (sched == "rounds")
      convert_rounds(slots, first, 1);
    else if (sched == "rounds2" || sched == "rounds4")
      convert_rounds(slots, first, sched.back() - '0');
    else
      return 2;
  }
  // Read back through wgmma's 128-byte swizzle (its definition: 16-byte chunk k of row r at chunk
  // k ^ (r % 8) of the row's 128 bytes).
  std::vector<uint16_t> out(size_t(kPageSize) * kHeadDimV);
  for (int r = 0; r < kPageSize; ++r)
    for (int c = 0; c < kHeadDimV; ++c) {
      const int t = c / kBlockCols, k = (c % kBlockCols) / 8, e = c % 8;
      std::memcpy(&out[size_t(r) * kHeadDimV + c], &slots[size_t(t) * kPageTileBytes + r * 128 + ((k ^ (r % 8)) * 16) + 2 * e], 2);
    }
  f = std::fopen(out_path, "wb");
  if (!f || std::fwrite(out.data(), 2, out.size(), f) != out.size()) return 2;
  std::fclose(f);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc == 5 && std::strcmp(argv[1], "dequant") == 0) return run_dequant(argv[2], argv[3], std::atol(argv[4]), false);
  if (argc == 5 && std::strcmp(argv[1], "dequant-folded") == 0)
    return run_dequant(argv[2], argv[3], std::atol(argv[4]), true);
  if (argc == 3 && std::strcmp(argv[1], "fragments") == 0) return run_fragments(unsigned(std::atol(argv[2])));
  if (argc == 5 && std::strcmp(argv[1], "seesaw-slots") == 0) return run_seesaw_slots(argv[2], argv[3], argv[4]);
  std::fprintf(stderr,
               "usage: fp8_twin dequant|dequant-folded IN OUT N | fp8_twin fragments SEED | "
               "fp8_twin seesaw-slots IN OUT rounds|rounds2|rounds4\n");
  return 2;
}
