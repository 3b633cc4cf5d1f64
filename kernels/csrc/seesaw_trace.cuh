// Timeline of one CTA of the seesaw kernel (build with -DKVPAGER_TRACE, e.g.
// KVPAGER_NVCC_EXTRA=-DKVPAGER_TRACE): each consumer warpgroup's issuer, and on an FP8 cache the
// converter's first thread, records clock64() at named points; seesaw_trace_dump (a kernel of its
// own, launched after the decode: a printf in the decode kernel makes ptxas serialize its wgmmas)
// prints them for scripts/seesaw_trace.py. Without the define, every stamp compiles to nothing.
#pragma once
#include <cstdint>
#include <cstdio>

namespace kvpager {
namespace seesaw {

enum TraceEvent {
  kEvStart, kEvSegment, kEvQ, kEvFirstS, kEvPair, kEvLoopEnd, kEvEpilogue, kEvEnd,
  kEvMax,          // page maxima of S computed
  kEvScaleIn,      // the other warpgroup's scale read (WG0: scale1, WG1: scale0)
  kEvP,            // P exponentiated and packed (WG1: also stored for WG0)
  kEvPvIssued,     // own P V issued
  kEvPvDone,       // own P V complete
  kEvPStored,      // WG0: P0' stored and handed off
  kEvPIn,          // the other's P ready
  kEvRemoteIssued, // P_other V issued
  kEvSEarly,       // WG0: next S0's first five tiles issued (their TMA waits included)
  kEvRemoteDone,   // P_other V complete
  kEvSIssued,      // next S fully issued (TMA waits included)
  kEvRefill0,      // this warpgroup's refill of buffer 0 issued (its issuer's TMA instructions done)
  kEvRefill1,      // same, buffer 1
  kEvCvLanded,     // converter: + step (0-3) of the pair's groups: the group's first tile has landed
  kEvCvDone = kEvCvLanded + 4,  // converter: + step: the group's last tile is converted
  kEvEpiSync = kEvCvDone + 4,   // epilogue: both warpgroups past the pairs (the first sync)
  kEvEpiRowSum,                 // epilogue: the row sums exchanged
  kEvEpiStaged,                 // epilogue: the output tile staged in shared memory (after its sync)
  kEvEpiScaled,                 // epilogue: lse stored, O normalised
  kEvEpiPass,                   // epilogue: + pass (0, 1): this thread's output stores issued (staged
                                // or, split, the fp32 partial); two passes in an EPILOGUE_TWICE build
};
constexpr int kTraceStreams = 3;  // WG0, WG1, the converter (as "wg 2")

// The converter's stamps: its first thread, in the traced CTA only (set under KVPAGER_TRACE).
struct ConverterTrace {
  bool trace = false;
  int trace_n = 0;
  int wg = 2;
};

#ifdef KVPAGER_TRACE
constexpr int kTraceMax = 1024;
static __device__ unsigned long long g_trace[kTraceStreams][kTraceMax];  // static: one per translation unit
static __device__ int g_trace_n[kTraceStreams];
// c: any object with `trace` (bool: this thread records), `trace_n` (int, mutable) and `wg` (stream).
#define SEESAW_TRACE(c, event)                                                                     \
  do {                                                                                             \
    namespace ss = ::kvpager::seesaw;                                                             \
    if ((c).trace && (c).trace_n < ss::kTraceMax) {                                                \
      ss::g_trace[(c).wg][(c).trace_n++] = (uint64_t(event) << 48) | (clock64() & 0xffffffffffffull); \
      ss::g_trace_n[(c).wg] = (c).trace_n;                                                         \
    }                                                                                              \
  } while (0)
#else
#define SEESAW_TRACE(c, event) \
  do {                         \
  } while (0)
#endif

}  // namespace seesaw

#ifdef KVPAGER_TRACE
// Prints the traced CTA's timeline (scripts/seesaw_trace.py reads it).
static __global__ void seesaw_trace_dump() {
  for (int wg = 0; wg < seesaw::kTraceStreams; ++wg)
    for (int i = 0; i < seesaw::g_trace_n[wg]; ++i)
      printf("SEESAW wg %d #%d event %d cycle %llu\n", wg, i, int(seesaw::g_trace[wg][i] >> 48),
             (unsigned long long)(seesaw::g_trace[wg][i] & 0xffffffffffffull));
}
#endif

}  // namespace kvpager
