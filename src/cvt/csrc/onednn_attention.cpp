// Float32 CPU attention, softmax(scale * q k^T) v, for `cvt.fast.use_onednn_attention`.
//
// The flash-attention scheme of PyTorch's own CPU kernel (blocks of queries against blocks of keys, with a
// running maximum and sum per query, so that the score matrix is never written out whole), but each block product
// is a oneDNN brgemm micro-kernel. PyTorch's kernel multiplies its float32 blocks with MKL's sgemm, which on AMD
// CPUs runs about half as fast (BENCHMARKS.md).
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/native/CPUBlas.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kQueryBlock = 64;  // a task: this many queries of one image and head
constexpr int64_t kKeyBlock = 512;   // keys per block product; the block's scores stay in the L2 cache

// Turn one row of raw scores into exp(scale * s - new_max) in place, where new_max is the larger of `row_max`
// and the row's scaled maximum; update `row_max` and `row_sum`, and return the factor exp(old - new maximum)
// by which the earlier blocks' output must shrink.
float softmax_block_row(float* s, int64_t cols, float scale, float& row_max, float& row_sum) {
  Vec vmax(-std::numeric_limits<float>::infinity());
  int64_t c = 0;
  for (; c + Vec::size() <= cols; c += Vec::size()) vmax = at::vec::maximum(vmax, Vec::loadu(s + c));
  float block_max = at::vec::vec_reduce_all<float>([](Vec& x, Vec& y) { return at::vec::maximum(x, y); }, vmax);
  for (; c < cols; ++c) block_max = std::max(block_max, s[c]);
  const float new_max = std::max(row_max, block_max * scale);  // scale > 0, checked by the caller
  const Vec vscale(scale), vshift(new_max);
  Vec vsum(0.f);
  for (c = 0; c + Vec::size() <= cols; c += Vec::size()) {
    const Vec p = (Vec::loadu(s + c) * vscale - vshift).exp_u20();
    p.store(s + c);
    vsum = vsum + p;
  }
  float sum = at::vec::vec_reduce_all<float>([](Vec& x, Vec& y) { return x + y; }, vsum);
  for (; c < cols; ++c) {
    s[c] = std::exp(s[c] * scale - new_max);
    sum += s[c];
  }
  const float shrink = std::exp(row_max - new_max);
  row_sum = row_sum * shrink + sum;
  row_max = new_max;
  return shrink;
}

// A view with unit stride along the last dimension, as the block products read rows.
at::Tensor unit_stride_rows(const at::Tensor& t) { return t.stride(3) == 1 ? t : t.contiguous(); }

// q (B, H, N, D), k and v (B, H, M, D). Returns (B, H, N, D) as a view of a (B, N, H, D) tensor, so that merging
// the heads afterwards is free.
at::Tensor onednn_attention(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in, double scale) {
  TORCH_CHECK(q_in.dim() == 4 && k_in.dim() == 4 && v_in.dim() == 4,
              "onednn_attention: q, k, v must be (B, H, tokens, D)");
  TORCH_CHECK(q_in.scalar_type() == at::kFloat && k_in.scalar_type() == at::kFloat &&
              v_in.scalar_type() == at::kFloat, "onednn_attention: float32 only");
  const at::Tensor q = unit_stride_rows(q_in), k = unit_stride_rows(k_in), v = unit_stride_rows(v_in);
  TORCH_CHECK(k.sizes() == v.sizes() && q.size(0) == k.size(0) && q.size(1) == k.size(1) && q.size(3) == k.size(3),
              "onednn_attention: q, k, v shapes disagree");
  TORCH_CHECK(scale > 0, "onednn_attention: the scale must be positive");
  const int64_t B = q.size(0), H = q.size(1), N = q.size(2), D = q.size(3), M = k.size(2);
  at::Tensor out = at::empty({B, N, H, D}, q.options());
  if (out.numel() == 0) return out.transpose(1, 2);
  TORCH_CHECK(M > 0, "onednn_attention: no keys");
  const at::Tensor kt = k.transpose(2, 3).contiguous();  // (B, H, D, M): q k^T's right-hand side, row-major
  const float* q_data = q.data_ptr<float>();
  const float* kt_data = kt.data_ptr<float>();
  const float* v_data = v.data_ptr<float>();
  float* out_data = out.data_ptr<float>();
  const float fscale = static_cast<float>(scale);
  const int64_t key_block = std::min(kKeyBlock, M);
  const int64_t query_blocks = (N + kQueryBlock - 1) / kQueryBlock;

  at::parallel_for(0, B * H * query_blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(kQueryBlock * key_block), acc(kQueryBlock * D), row_max(kQueryBlock),
        row_sum(kQueryBlock);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / (H * query_blocks), h = task / query_blocks % H;
      const int64_t i0 = task % query_blocks * kQueryBlock, rows = std::min(kQueryBlock, N - i0);
      const float* q0 = q_data + b * q.stride(0) + h * q.stride(1) + i0 * q.stride(2);
      const float* kt0 = kt_data + (b * H + h) * D * M;
      const float* v0 = v_data + b * v.stride(0) + h * v.stride(1);
      std::fill(row_max.begin(), row_max.end(), -std::numeric_limits<float>::infinity());
      std::fill(row_sum.begin(), row_sum.end(), 0.f);
      for (int64_t j0 = 0; j0 < M; j0 += key_block) {
        const int64_t cols = std::min(key_block, M - j0);
        at::native::cpublas::brgemm(rows, cols, D, q.stride(2), M, cols, /*add_C=*/false, q0, kt0 + j0,
                                    scores.data(), /*is_vnni=*/false);
        for (int64_t r = 0; r < rows; ++r) {
          const float shrink = softmax_block_row(scores.data() + r * cols, cols, fscale, row_max[r], row_sum[r]);
          if (j0 > 0) {
            float* a = acc.data() + r * D;
            for (int64_t d = 0; d < D; ++d) a[d] *= shrink;
          }
        }
        // The first key block writes the output block, the later ones add to it.
        at::native::cpublas::brgemm(rows, D, cols, cols, v.stride(2), D, /*add_C=*/j0 > 0, scores.data(),
                                    v0 + j0 * v.stride(2), acc.data(), /*is_vnni=*/false);
      }
      for (int64_t r = 0; r < rows; ++r) {
        float* o = out_data + ((b * N + i0 + r) * H + h) * D;
        const float inverse_sum = 1.f / row_sum[r];
        for (int64_t d = 0; d < D; ++d) o[d] = acc[r * D + d] * inverse_sum;
      }
    }
    at::native::cpublas::brgemm_release(/*is_vnni=*/false);
  });
  return out.transpose(1, 2);
}

}  // namespace

TORCH_LIBRARY(cvt, m) { m.def("onednn_attention(Tensor q, Tensor k, Tensor v, float scale) -> Tensor"); }

TORCH_LIBRARY_IMPL(cvt, CPU, m) { m.impl("onednn_attention", &onednn_attention); }
