// Which keys a query row sees, shared by the CPU and CUDA kernels. With causal masking, a sliding
// window and packed documents, the visible keys of row i are always one interval [lo_i, hi_i), and
// lo_i, hi_i never decrease with i: a tile loop needs only the interval's ends, and the rows that
// see a block of keys are found by binary search.
#pragma once

#include <stdint.h>

#include "common/host_device.h"

namespace fl::attention {

struct Masking {
  int64_t len_q = 0, len_k = 0;
  const int32_t* cu_seqlens = nullptr;  // packed documents (len_q == len_k), or nullptr
  int64_t documents = 0;
  bool causal = true;
  int64_t window = 0;  // 0: no window
};

struct RowSpan {
  int64_t lo, hi;  // visible keys [lo, hi)
  int64_t pos;     // the row's position in its document (key index it is aligned with)
};

FL_HD RowSpan row_span(const Masking& m, int64_t row) {
  int64_t start = 0, end = m.len_k, pos = row + (m.len_k - m.len_q);
  if (m.cu_seqlens != nullptr) {  // the document d with cu[d] <= row < cu[d + 1]
    int64_t first = 0, last = m.documents - 1;
    while (first < last) {
      const int64_t mid = (first + last + 1) / 2;
      if (m.cu_seqlens[mid] <= row) first = mid; else last = mid - 1;
    }
    // Clamped into [0, len_k]: offsets that were never checked (a CUDA graph, torch.compile) give
    // wrong rows, never reads outside k and v.
    const int64_t len = m.len_k;
    start = m.cu_seqlens[first];
    start = start < 0 ? 0 : (start > row ? row : start);
    end = m.cu_seqlens[first + 1];
    end = end > len ? len : (end <= row ? row + 1 : end);
    pos = row - start;
  }
  const int64_t at = start + pos;
  RowSpan span;
  span.pos = pos;
  span.lo = m.window > 0 && at - m.window + 1 > start ? at - m.window + 1 : start;
  if (m.causal) {
    span.hi = at + 1;
  } else {
    span.hi = m.window > 0 && at + m.window < end ? at + m.window : end;
  }
  return span;
}

// Rows [first, last) whose interval meets keys [k0, k1): hi_i > k0 and lo_i < k1.
FL_HD void rows_seeing_keys(const Masking& m, int64_t k0, int64_t k1, int64_t& first, int64_t& last) {
  int64_t lo = 0, hi = m.len_q;  // first row with hi_i > k0
  while (lo < hi) {
    const int64_t mid = (lo + hi) / 2;
    if (row_span(m, mid).hi > k0) hi = mid; else lo = mid + 1;
  }
  first = lo;
  hi = m.len_q;  // first row with lo_i >= k1
  while (lo < hi) {
    const int64_t mid = (lo + hi) / 2;
    if (row_span(m, mid).lo >= k1) hi = mid; else lo = mid + 1;
  }
  last = lo;
}

}  // namespace fl::attention
