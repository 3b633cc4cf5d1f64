// Trial (-DKVPAGER_FP8_WS_TMA_LATENT, off by default; docs/fp8-cache.md "s24"): the ws kernel's
// converters take a page's latent bytes from a shared-memory stage that TMA fills, instead of
// loading them from global memory into registers two pages ahead.
//
// Why: the s24 trace put the converters' period at ~3,370 cycles a page against the consumer's
// ~2,600, and ~750 of it on issuing eight 16-byte register loads a thread. Here one thread issues
// the page's 8 TMA copies (the FP8 seesaw's latent map: 64 tokens x 64 bytes a copy), and every
// converter thread reads its 8 chunks from the stage with shared loads. The stage is one page
// (32 KB, the room of the fp32 output stage, which moves into the Q tiles: the consumer's
// store_output); with the page being converted held in registers, the copies run one page ahead.
//
// Per page n (loop unrolled by two, so each page's block-table id and valid rows sit in fixed
// registers): wait stage_full, read the stage (rows past the sequence end as zeros), arrive on
// stage_empty; thread 0 waits stage_empty and issues page n + 1's copies; convert page n as before
// (convert_page); issue page n + 2's scales and RoPE (cp.async, as before).
// Trace stamps of a converter (fp8_trace.py): 4 page n's bytes landed, 5 page n + 1's copies
// issued (thread 0; the others pass by), then 0, 1, 2 as in convert_page, 3 side issued.
#pragma once
// Included by decode_fp8_ws_kernel.cuh inside namespace kvpager::fp8ws, after convert_page.

// One thread: page `id`'s eight latent tiles into the stage, completing on stage_full.
__device__ __forceinline__ void load_latent_stage(Plan& s, const Fp8PageMaps& maps, int id, int hk) {
  const uint64_t hint = static_cast<uint64_t>(cute::TMA::CacheHintSm90::EVICT_FIRST);
  TileBarrier::arrive_and_expect_tx(&s.stage_full, sizeof(s.latent_stage));
#pragma unroll
  for (int t = 0; t < T::kLatentTiles; ++t)
    cute::SM90_TMA_LOAD_4D::copy(&maps.latent, &s.stage_full, hint, s.latent_stage[t], t * kBlockCols, 0, hk, id);
}

// Page n's latent chunks of this thread, from the stage into registers (the same rows and chunks as
// load_latent: row latent_row(j), 16 bytes at lane * 16, i.e. tile lane / 4), then its arrival on
// stage_empty. Rows past the sequence end read as zeros (the copies brought whatever the pool has).
__device__ __forceinline__ void read_latent_stage(Plan& s, int ct, uint32_t n, int valid_rows,
                                                  uint4 (&latent)[T::kRowsPerWarp]) {
  const int warp = ct / 32, lane = ct % 32;
  TileBarrier::wait(&s.stage_full, n & 1);
  FP8WS_TRACE(1 + warp / 7, n, 4);
  const uint8_t* tile = &s.latent_stage[lane / 4][0][(lane % 4) * kChunkBytes];
#pragma unroll
  for (int j = 0; j < T::kRowsPerWarp; ++j) {
    const int r = latent_row(warp, lane, j);
    latent[j] = r < valid_rows ? *reinterpret_cast<const uint4*>(tile + r * kBlockCols) : make_uint4(0, 0, 0, 0);
  }
  PageBarrier::arrive(&s.stage_empty);
}

// Both converter warpgroups, every page (the staged counterpart of convert()).
__device__ __forceinline__ void convert_staged(Plan& s, const DecodeParams& p, const Fp8PageMaps& maps, int part,
                                               int hk) {
  const int ct = threadIdx.x - T::kWarpgroupThreads;
  PageCursor ahead(p, part);
  uint4 latent[T::kRowsPerWarp];
  int id0 = 0, id1 = 0, valid0 = 0, valid1 = 0;  // block-table id and valid rows of the two pages in turn
  uint32_t loaded = 0;                           // pages whose scales and RoPE are issued
  // L2 prefetch: thread 0 prefetches each page when its scales and RoPE are issued, a page before
  // its stage copies (KVPAGER_FP8_PREFETCH > 0; a second cursor further ahead spills here).
  const bool prefetch = ct == 0 && p.fp8_prefetch_pages > 0;
  // The next page's scales and RoPE by cp.async (slot loaded % 4), its id and valid rows into (id, valid).
  auto side = [&](int& id, int& valid) {
    if (!ahead.more) {
      cute::cp_async_fence();  // an empty group, so convert_page's wait<1> always leaves page n + 1's
      return;
    }
    const PageRef ref(p, ahead, hk);
    if (prefetch) prefetch_l2_bulk(ref.base, uint32_t((kPageSize - 1) * p.k_token_stride + kFp8TokenBytes));
    load_scales_and_rope(p, ref, ct, s.scales[loaded % T::kScaleSlots], s.rope[loaded % T::kRopeSlots]);
    id = ahead.id;
    valid = ref.valid_rows;
    ++loaded;
    ahead.next();
  };
  // Page n (its id and rows in (id, valid)); page n + 1's id is next_id.
  auto step = [&](uint32_t n, int& id, int& valid, int next_id) {
    read_latent_stage(s, ct, n, valid, latent);
    if (ct == 0 && n + 1 < loaded) {
      PageBarrier::wait(&s.stage_empty, n & 1);  // every converter thread has read page n
      load_latent_stage(s, maps, next_id, hk);
    }
    FP8WS_TRACE(1 + ct / 224, n, 5);
    convert_page(s, p, ct, n, latent);
    side(id, valid);  // page n + 2 takes page n's registers
  };
  side(id0, valid0);
  if (ct == 0 && loaded > 0) load_latent_stage(s, maps, id0, hk);
  side(id1, valid1);
  for (uint32_t n = 0; n < loaded; n += 2) {
    step(n, id0, valid0, id1);
    FP8WS_TRACE(1 + ct / 224, n, 3);
    if (n + 1 == loaded) break;
    step(n + 1, id1, valid1, id0);
    FP8WS_TRACE(1 + ct / 224, n + 1, 3);
  }
}
