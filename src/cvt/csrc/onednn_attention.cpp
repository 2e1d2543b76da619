// Float32 CPU attention, softmax(scale * q k^T) v, and its gradients, for `cvt.fast.use_onednn_attention`.
//
// The flash-attention scheme of PyTorch's own CPU kernels (blocks of queries against blocks of keys, with a
// running maximum and sum per query, so that the score matrix is never written out whole; the backward pass
// recomputes the scores from the log-sum-exp the forward pass keeps), but each block product is a oneDNN brgemm
// micro-kernel. PyTorch's kernels multiply their float32 blocks with MKL's sgemm, which on AMD CPUs runs about
// half as fast (BENCHMARKS.md).
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

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "onednn_attention: q, k, v must be (B, H, tokens, D)");
  TORCH_CHECK(q.scalar_type() == at::kFloat && k.scalar_type() == at::kFloat && v.scalar_type() == at::kFloat,
              "onednn_attention: float32 only");
  TORCH_CHECK(k.sizes() == v.sizes() && q.size(0) == k.size(0) && q.size(1) == k.size(1) && q.size(3) == k.size(3),
              "onednn_attention: q, k, v shapes disagree");
  TORCH_CHECK(k.size(2) > 0, "onednn_attention: no keys");
  TORCH_CHECK(scale > 0, "onednn_attention: the scale must be positive");
}

// (B, H, tokens, D) as a view of a new (B, tokens, H, D) tensor, so that merging the heads afterwards is free.
at::Tensor heads_last(const at::Tensor& like) {
  return at::empty({like.size(0), like.size(2), like.size(1), like.size(3)}, like.options()).transpose(1, 2);
}

// (B, H, D, M) row-major: the transposed keys or values, a block product's right-hand side.
at::Tensor transposed_rows(const at::Tensor& t) { return t.transpose(2, 3).contiguous(); }

// q (B, H, N, D), k and v (B, H, M, D). Returns the output (B, H, N, D) and, for the backward pass, each
// query's log-sum-exp of its scaled scores (B, H, N).
std::tuple<at::Tensor, at::Tensor> onednn_attention(const at::Tensor& q_in, const at::Tensor& k_in,
                                                    const at::Tensor& v_in, double scale) {
  check_inputs(q_in, k_in, v_in, scale);
  const at::Tensor q = unit_stride_rows(q_in), k = unit_stride_rows(k_in), v = unit_stride_rows(v_in);
  const int64_t B = q.size(0), H = q.size(1), N = q.size(2), D = q.size(3), M = k.size(2);
  at::Tensor out = heads_last(q), logsumexp = at::empty({B, H, N}, q.options());
  if (out.numel() == 0) return {out, logsumexp};
  const at::Tensor kt = transposed_rows(k);
  const float* q_data = q.data_ptr<float>();
  const float* kt_data = kt.data_ptr<float>();
  const float* v_data = v.data_ptr<float>();
  float* out_data = out.data_ptr<float>();
  float* lse_data = logsumexp.data_ptr<float>();
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
        lse_data[(b * H + h) * N + i0 + r] = row_max[r] + std::log(row_sum[r]);
      }
    }
    at::native::cpublas::brgemm_release(/*is_vnni=*/false);
  });
  return {out, logsumexp};
}

// Gradients of `onednn_attention` with respect to q, k and v. Per image and head (one task), for each block of
// queries: the probabilities P = exp(scale * q k^T - logsumexp), dP = dout v^T, dS = P * (dP - rowsum(dout * out)),
// dq = scale * dS k, and the key and value gradients summed over the blocks as dk^T += scale * q^T dS and
// dv^T += dout^T P, so that every block product reads plain rows (only the small q and dout blocks are
// transposed).
std::tuple<at::Tensor, at::Tensor, at::Tensor> onednn_attention_backward(
    const at::Tensor& grad_out_in, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& out_in, const at::Tensor& logsumexp, double scale) {
  check_inputs(q_in, k_in, v_in, scale);
  const at::Tensor q = unit_stride_rows(q_in), k = unit_stride_rows(k_in), grad_out = unit_stride_rows(grad_out_in),
                   out = unit_stride_rows(out_in), lse = logsumexp.contiguous();
  const int64_t B = q.size(0), H = q.size(1), N = q.size(2), D = q.size(3), M = k.size(2);
  at::Tensor grad_q = heads_last(q), grad_k = heads_last(k), grad_v = heads_last(k);
  if (grad_q.numel() == 0) {  // no queries: nothing reaches the keys and values
    grad_k.zero_();
    grad_v.zero_();
    return {grad_q, grad_k, grad_v};
  }
  const at::Tensor kt = transposed_rows(k), vt = transposed_rows(v_in);
  const float fscale = static_cast<float>(scale);
  const float *q_data = q.data_ptr<float>(), *k_data = k.data_ptr<float>(), *kt_data = kt.data_ptr<float>(),
              *vt_data = vt.data_ptr<float>(), *do_data = grad_out.data_ptr<float>(),
              *out_data = out.data_ptr<float>(), *lse_data = lse.data_ptr<float>();
  float *dq_data = grad_q.data_ptr<float>(), *dk_data = grad_k.data_ptr<float>(), *dv_data = grad_v.data_ptr<float>();

  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> probs(kQueryBlock * M), dscores(kQueryBlock * M), q_t(D * kQueryBlock),
        do_t(D * kQueryBlock), dq(kQueryBlock * D), dk_t(D * M), dv_t(D * M);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / H, h = task % H;
      const float* kt0 = kt_data + task * D * M;
      const float* vt0 = vt_data + task * D * M;
      const float* k0 = k_data + b * k.stride(0) + h * k.stride(1);
      for (int64_t i0 = 0; i0 < N; i0 += kQueryBlock) {
        const int64_t rows = std::min(kQueryBlock, N - i0);
        const float* q0 = q_data + b * q.stride(0) + h * q.stride(1) + i0 * q.stride(2);
        const float* do0 = do_data + b * grad_out.stride(0) + h * grad_out.stride(1) + i0 * grad_out.stride(2);
        const float* out0 = out_data + b * out.stride(0) + h * out.stride(1) + i0 * out.stride(2);
        at::native::cpublas::brgemm(rows, M, D, q.stride(2), M, M, false, q0, kt0, probs.data(), false);
        at::native::cpublas::brgemm(rows, M, D, grad_out.stride(2), M, M, false, do0, vt0, dscores.data(), false);
        for (int64_t r = 0; r < rows; ++r) {
          const float* o = out0 + r * out.stride(2);
          const float* g = do0 + r * grad_out.stride(2);
          float dot = 0.f;
          for (int64_t d = 0; d < D; ++d) dot += o[d] * g[d];
          const Vec vscale(fscale), vshift(lse_data[task * N + i0 + r]), vdot(dot);
          float* p = probs.data() + r * M;
          float* ds = dscores.data() + r * M;
          int64_t c = 0;
          for (; c + Vec::size() <= M; c += Vec::size()) {
            const Vec pc = (Vec::loadu(p + c) * vscale - vshift).exp_u20();
            pc.store(p + c);
            (pc * (Vec::loadu(ds + c) - vdot)).store(ds + c);
          }
          for (; c < M; ++c) {
            p[c] = std::exp(p[c] * fscale - lse_data[task * N + i0 + r]);
            ds[c] = p[c] * (ds[c] - dot);
          }
          for (int64_t d = 0; d < D; ++d) {
            q_t[d * rows + r] = q0[r * q.stride(2) + d];
            do_t[d * rows + r] = g[d];
          }
        }
        const bool add = i0 > 0;
        at::native::cpublas::brgemm(D, M, rows, rows, M, M, add, do_t.data(), probs.data(), dv_t.data(), false);
        at::native::cpublas::brgemm(D, M, rows, rows, M, M, add, q_t.data(), dscores.data(), dk_t.data(), false);
        at::native::cpublas::brgemm(rows, D, M, M, k.stride(2), D, false, dscores.data(), k0, dq.data(), false);
        for (int64_t r = 0; r < rows; ++r) {
          float* dst = dq_data + ((b * N + i0 + r) * H + h) * D;
          for (int64_t d = 0; d < D; ++d) dst[d] = dq[r * D + d] * fscale;
        }
      }
      for (int64_t j = 0; j < M; ++j) {
        float* dk = dk_data + ((b * M + j) * H + h) * D;
        float* dv = dv_data + ((b * M + j) * H + h) * D;
        for (int64_t d = 0; d < D; ++d) {
          dk[d] = dk_t[d * M + j] * fscale;
          dv[d] = dv_t[d * M + j];
        }
      }
    }
    at::native::cpublas::brgemm_release(/*is_vnni=*/false);
  });
  return {grad_q, grad_k, grad_v};
}

// Whether ATen's brgemm multiplies blocks of `dtype` natively here (bfloat16 and float16: on CPUs with AMX), the
// products PyTorch's own flash attention uses for that dtype.
bool native_block_products(at::ScalarType dtype) { return at::native::cpublas::could_pack(dtype); }

}  // namespace

TORCH_LIBRARY(cvt, m) {
  m.def("native_block_products(ScalarType dtype) -> bool", &native_block_products);
  m.def("onednn_attention(Tensor q, Tensor k, Tensor v, float scale) -> (Tensor, Tensor)");
  m.def("onednn_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor logsumexp, "
        "float scale) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(cvt, CPU, m) {
  m.impl("onednn_attention", &onednn_attention);
  m.impl("onednn_attention_backward", &onednn_attention_backward);
}
