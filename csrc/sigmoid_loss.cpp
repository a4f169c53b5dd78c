// Fused, tiled sigmoid loss of the dual-stream objective on CPU (OpenMP).
//
// One kernel serves both streams. Rows are audio-side embeddings [M, D],
// columns text-side embeddings [N, D], z = scale * <row, col> + bias.
// Each row carries K "positive" ids, each column one id: y = +1 iff the
// column's id is among the row's positive ids, else -1. Each row may carry
// J "ignored" ids: entries whose column id is among them are not counted.
// The clip stream is the case K = 1 (the audio group), J = 0, normalised by M;
// the frame stream normalises by the number of counted entries. The caller
// computes the normaliser (finelap.kernels, the same for every backend).
//
// Work is split into tiles of (row block x column block). For each tile the
// cosines come from one BLAS call into a small per-thread buffer; then one
// pass over that cache-resident buffer forms the loss terms, the labels and
// dloss/dz, overwriting the cosines with the gradient coefficients, which two
// more BLAS calls fold into d(rows) and the row block's d(columns).
// Nothing of size [M, N] is ever allocated. The normaliser is known before the
// pass, so gradients are written scaled.
//
// Row blocks go to threads dynamically (a slow, shared core just does fewer),
// yet every result is bitwise reproducible and the same for any thread count:
// each row block's sums and d(columns) are formed by one thread in a fixed
// order, and the blocks' parts are added in block order. The results depend
// only on the tile sizes (and on the BLAS library and the CPU's instruction
// set), never on timing or on the number of threads.

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <vector>

namespace {

#define FINELAP_INLINE inline __attribute__((always_inline))

// exp(x) for x <= 0 in float, branch-free so that loops over it vectorise.
// Cephes expf: x = n ln2 + r, |r| <= ln2 / 2 (up to rounding), exp(r) by a
// degree-6 polynomial.
// Arguments below -87 are clamped (the result, ~1e-38, then only ever adds
// to 1 or multiplies a value that is itself that small).
FINELAP_INLINE float exp_nonpositive(float x) {
  x = x > -87.0f ? x : -87.0f;
  // n = x / ln2 rounded to nearest: adding and removing 1.5 * 2^23 rounds a
  // float of magnitude < 2^22 to an integer, with no branch or library call.
  const float round_magic = 12582912.0f;
  const float n = (x * 1.44269504088896341f + round_magic) - round_magic;
  float r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float exp_r = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float two_to_n;
  std::memcpy(&two_to_n, &bits, sizeof(float));
  return exp_r * two_to_n;
}

// log(1 + e) for e in [0, 1], float, accurate relative to the result also for
// tiny e: log1p(e) = 2 atanh(s) with s = e / (2 + e) <= 1/3, odd series in s.
FINELAP_INLINE float log1p_unit(float e) {
  const float s = e / (2.0f + e);
  const float s2 = s * s;
  float p = 1.0f / 13.0f;
  p = p * s2 + 1.0f / 11.0f;
  p = p * s2 + 1.0f / 9.0f;
  p = p * s2 + 1.0f / 7.0f;
  p = p * s2 + 1.0f / 5.0f;
  p = p * s2 + 1.0f / 3.0f;
  p = p * s2 + 1.0f;
  return 2.0f * s * p;
}

FINELAP_INLINE float exp_nonpositive_of(float x) { return exp_nonpositive(x); }
FINELAP_INLINE double exp_nonpositive_of(double x) { return __builtin_exp(x); }
FINELAP_INLINE float log1p_unit_of(float e) { return log1p_unit(e); }
FINELAP_INLINE double log1p_unit_of(double e) { return __builtin_log1p(e); }

// Sums over the entries of one tile row.
template <typename acc_t>
struct RowSums {
  acc_t loss = 0;          // sum of counted softplus(-y z)
  acc_t grad_bias = 0;     // sum of dloss/dz
  acc_t grad_scale = 0;    // sum of dloss/dz * cosine
};

// One pass over a tile row: cosine[j] -> loss terms and, with_grad, also
// grad_out[j] = grad_factor * dloss/dz (grad_out may alias cosine).
// sign[j] in {+1, -1} is y, weight[j] in {0, 1} says whether the entry counts.
// softplus(x) = max(x, 0) + log1p(exp(-|x|)); sigmoid(x) from the same exp.
// Only builtins and operators inside, and every select between values already
// computed: library calls (not inlined into the instruction-set versions
// below) or conditionally evaluated arms would stop the loop vectorising.
template <typename acc_t, bool with_grad>
FINELAP_INLINE RowSums<acc_t> tile_row_body(const acc_t* cosine, const acc_t* sign,
                                            const acc_t* weight, int64_t n, acc_t scale,
                                            acc_t bias, acc_t grad_factor, acc_t* grad_out) {
  acc_t loss = 0, grad_bias = 0, grad_scale = 0;
#pragma omp simd reduction(+ : loss, grad_bias, grad_scale)
  for (int64_t j = 0; j < n; ++j) {
    const acc_t c = cosine[j];
    const acc_t y = sign[j];
    const acc_t w = weight[j];
    const acc_t x = -y * (scale * c + bias);
    const acc_t minus_x = -x;
    const acc_t e = exp_nonpositive_of(x > acc_t(0) ? minus_x : x);
    const acc_t log1p_e = log1p_unit_of(e);
    // A NaN logit stays NaN (the clamp inside exp_nonpositive and the selects would
    // otherwise turn it into a finite loss, hiding a diverged run): add x where x != x.
    const acc_t nan_of_x = x != x ? x : acc_t(0);
    const acc_t softplus_x = (x > acc_t(0) ? x : acc_t(0)) + log1p_e + nan_of_x;
    loss += w * softplus_x;
    if (with_grad) {
      const acc_t inv = acc_t(1) / (acc_t(1) + e);
      const acc_t e_inv = e * inv;
      const acc_t sigmoid_x = (x >= acc_t(0) ? inv : e_inv) + nan_of_x;
      const acc_t g = -y * w * sigmoid_x;
      grad_bias += g;
      grad_scale += g * c;
      grad_out[j] = g * grad_factor;
    }
  }
  RowSums<acc_t> sums;
  sums.loss = loss;
  sums.grad_bias = grad_bias;
  sums.grad_scale = grad_scale;
  return sums;
}

using FloatTileRow = RowSums<float> (*)(const float*, const float*, const float*, int64_t, float,
                                        float, float, float*);

template <bool with_grad>
RowSums<float> tile_row_baseline(const float* cosine, const float* sign, const float* weight,
                                 int64_t n, float scale, float bias, float grad_factor,
                                 float* grad_out) {
  return tile_row_body<float, with_grad>(cosine, sign, weight, n, scale, bias, grad_factor,
                                         grad_out);
}

// Instruction-set versions of the float pass, picked once at run time from
// the CPU, so the build stays portable (no -march=native).
#if defined(__GNUC__) && defined(__x86_64__)
template <bool with_grad>
__attribute__((target("avx512f,avx512vl,avx512dq,avx2,fma"))) RowSums<float> tile_row_avx512(
    const float* cosine, const float* sign, const float* weight, int64_t n, float scale,
    float bias, float grad_factor, float* grad_out) {
  return tile_row_body<float, with_grad>(cosine, sign, weight, n, scale, bias, grad_factor,
                                         grad_out);
}

template <bool with_grad>
__attribute__((target("avx2,fma"))) RowSums<float> tile_row_avx2(
    const float* cosine, const float* sign, const float* weight, int64_t n, float scale,
    float bias, float grad_factor, float* grad_out) {
  return tile_row_body<float, with_grad>(cosine, sign, weight, n, scale, bias, grad_factor,
                                         grad_out);
}

template <bool with_grad>
FloatTileRow pick_float_tile_row() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512dq")) {
    return tile_row_avx512<with_grad>;
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
    return tile_row_avx2<with_grad>;
  }
  return tile_row_baseline<with_grad>;
}
#else
template <bool with_grad>
FloatTileRow pick_float_tile_row() {
  return tile_row_baseline<with_grad>;
}
#endif

const FloatTileRow float_tile_row_loss = pick_float_tile_row<false>();
const FloatTileRow float_tile_row_grad = pick_float_tile_row<true>();

RowSums<float> tile_row(const float* cosine, const float* sign, const float* weight, int64_t n,
                        float scale, float bias, float grad_factor, float* grad_out) {
  if (grad_out == nullptr) {
    return float_tile_row_loss(cosine, sign, weight, n, scale, bias, 0.0f, nullptr);
  }
  return float_tile_row_grad(cosine, sign, weight, n, scale, bias, grad_factor, grad_out);
}

RowSums<double> tile_row(const double* cosine, const double* sign, const double* weight,
                         int64_t n, double scale, double bias, double grad_factor,
                         double* grad_out) {
  if (grad_out == nullptr) {
    return tile_row_body<double, false>(cosine, sign, weight, n, scale, bias, 0.0, nullptr);
  }
  return tile_row_body<double, true>(cosine, sign, weight, n, scale, bias, grad_factor,
                                     grad_out);
}

// Whether a row id takes part in matching: with negative ids as padding
// (frame stream) only ids >= 0 do; otherwise (clip groups) every id does.
inline bool is_real_id(int64_t id, bool negative_ids_are_padding) {
  return !negative_ids_are_padding || id >= 0;
}

// sign/weight of one tile row: y = +1 where the column id is a positive id of
// the row, weight 0 where it is an ignored id.
template <typename acc_t>
void tile_row_labels(const int64_t* col, int64_t n, const int64_t* positive, int64_t k_slots,
                     const int64_t* ignored, int64_t j_slots, bool negative_ids_are_padding,
                     acc_t* sign, acc_t* weight) {
  std::fill(sign, sign + n, acc_t(-1));
  std::fill(weight, weight + n, acc_t(1));
  for (int64_t k = 0; k < k_slots; ++k) {
    const int64_t id = positive[k];
    if (!is_real_id(id, negative_ids_are_padding)) continue;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) sign[j] = col[j] == id ? acc_t(1) : sign[j];
  }
  for (int64_t k = 0; k < j_slots; ++k) {
    const int64_t id = ignored[k];
    if (!is_real_id(id, negative_ids_are_padding)) continue;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) weight[j] = col[j] == id ? acc_t(0) : weight[j];
  }
}

// Sums the row blocks' column gradients in block order, total = ((p0 + p1) + p2)
// + ..., whichever thread formed each part and whenever it finished. A block
// forms its part in one of a ring of slots; the thread finishing the oldest
// outstanding block adds every part that is then next in order. A thread
// waits only when the ring is full, i.e. when the others have run a whole
// ring ahead of a block that is still being formed.
template <typename acc_t>
class OrderedColumnGradient {
 public:
  OrderedColumnGradient(int64_t blocks, int64_t slots, int64_t N, int64_t D,
                        const at::TensorOptions& options)
      : blocks_(blocks), total_(at::zeros({N, D}, options)), finished_(slots, false) {
    for (int64_t s = 0; s < slots; ++s) slots_.push_back(at::empty({N, D}, options));
  }

  // The slot for block's part once the part that used it before has been
  // added; nullptr when another thread failed (the caller stops).
  at::Tensor* acquire(int64_t block) {
    std::unique_lock<std::mutex> lock(mutex_);
    slot_freed_.wait(lock, [&] { return aborted_ || block < added_ + ring_size(); });
    return aborted_ ? nullptr : &slots_[block % ring_size()];
  }

  // block's part is complete: adds the parts that are now next in order.
  void release(int64_t block) {
    std::lock_guard<std::mutex> lock(mutex_);
    finished_[block % ring_size()] = true;
    bool freed = false;
    while (added_ < blocks_ && finished_[added_ % ring_size()]) {
      add_to_total(slots_[added_ % ring_size()]);
      finished_[added_ % ring_size()] = false;
      ++added_;
      freed = true;
    }
    if (freed) slot_freed_.notify_all();
  }

  // Wakes the waiting threads after a failure, so that the error can surface.
  void abort() {
    std::lock_guard<std::mutex> lock(mutex_);
    aborted_ = true;
    slot_freed_.notify_all();
  }

  const at::Tensor& total() const { return total_; }

 private:
  int64_t ring_size() const { return static_cast<int64_t>(slots_.size()); }

  // A plain loop: it measured faster here than a tensor add_, by 5-10% of
  // the whole call.
  void add_to_total(const at::Tensor& part) {
    acc_t* total = total_.data_ptr<acc_t>();
    const acc_t* addend = part.data_ptr<acc_t>();
    const int64_t count = total_.numel();
#pragma omp simd
    for (int64_t i = 0; i < count; ++i) total[i] += addend[i];
  }

  const int64_t blocks_;
  at::Tensor total_;
  std::vector<at::Tensor> slots_;
  std::vector<bool> finished_;
  int64_t added_ = 0;
  bool aborted_ = false;
  std::mutex mutex_;
  std::condition_variable slot_freed_;
};

// Ring slots per thread: with two, a core up to about twice as slow as the
// others (three times with two threads) never makes another thread wait.
constexpr int64_t kColumnGradientSlotsPerThread = 2;

template <typename acc_t>
std::vector<at::Tensor> fused_loss(const at::Tensor& rows, const at::Tensor& cols,
                                   const at::Tensor& positive_ids, const at::Tensor& col_ids,
                                   const at::Tensor& ignored_ids, double scale_value,
                                   double bias_value, bool negative_ids_are_padding,
                                   double inverse_normaliser, bool grad_rows, bool grad_cols,
                                   bool grad_logit_params, int64_t row_block,
                                   int64_t col_block) {
  const int64_t M = rows.size(0), N = cols.size(0), D = rows.size(1);
  const int64_t K = positive_ids.size(1), J = ignored_ids.size(1);
  const auto acc_type = c10::CppTypeToScalarType<acc_t>::value;
  const auto acc_options = rows.options().dtype(acc_type);
  const bool any_grad = grad_rows || grad_cols || grad_logit_params;
  const bool rows_are_acc = rows.scalar_type() == acc_type;

  const acc_t scale = static_cast<acc_t>(scale_value);
  const acc_t bias = static_cast<acc_t>(bias_value);
  // d(loss)/d<row, col> = scale * dloss/dz / normaliser, folded into the tile.
  const acc_t embedding_grad_factor = static_cast<acc_t>(scale_value * inverse_normaliser);

  const at::Tensor cols_acc = cols.to(acc_type).contiguous();
  at::Tensor grad_rows_out, grad_cols_out;
  if (grad_rows) grad_rows_out = at::empty({M, D}, rows.options());

  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t row_blocks = (M + row_block - 1) / row_block;
  // Per row block: loss, d/d(bias) and d/d(scale) sums, added in block order at the end.
  std::vector<double> block_sums(3 * row_blocks, 0.0);
  // Workspace of d(columns): the ring and the total, (min(2 x threads, row
  // blocks) + 1) x N x D accumulator-type numbers.
  std::unique_ptr<OrderedColumnGradient<acc_t>> column_gradient;
  if (grad_cols) {
    column_gradient = std::make_unique<OrderedColumnGradient<acc_t>>(
        row_blocks, std::min(kColumnGradientSlotsPerThread * threads, row_blocks), N, D,
        acc_options);
  }
  std::atomic<int64_t> next_row_block{0};

  const int64_t* col = col_ids.data_ptr<int64_t>();
  const int64_t* positive = positive_ids.data_ptr<int64_t>();
  const int64_t* ignored = J > 0 ? ignored_ids.data_ptr<int64_t>() : nullptr;

  // One chunk per worker; row blocks are handed out dynamically so that a
  // slow (shared) core does not hold the others up.
  at::parallel_for(0, threads, 1, [&](int64_t worker_begin, int64_t worker_end) {
    // Grad mode is thread-local: worker threads must not record this work.
    const at::NoGradGuard no_grad;
    try {
      for (int64_t worker = worker_begin; worker < worker_end; ++worker) {
        at::Tensor tile = at::empty({row_block * col_block}, acc_options);
        std::vector<acc_t> sign(col_block), weight(col_block);
        at::Tensor grad_rows_block;
        if (grad_rows && !rows_are_acc) grad_rows_block = at::empty({row_block, D}, acc_options);

        for (int64_t b = next_row_block++; b < row_blocks; b = next_row_block++) {
          const int64_t r0 = b * row_block, br = std::min(row_block, M - r0);
          const at::Tensor rows_block = rows.narrow(0, r0, br).to(acc_type);
          at::Tensor grad_rows_acc;
          if (grad_rows) {
            grad_rows_acc = rows_are_acc ? grad_rows_out.narrow(0, r0, br)
                                         : grad_rows_block.narrow(0, 0, br);
          }
          at::Tensor* grad_cols_part = nullptr;
          if (grad_cols) {
            grad_cols_part = column_gradient->acquire(b);
            if (grad_cols_part == nullptr) return;
          }
          double loss_sum = 0, grad_bias_sum = 0, grad_scale_sum = 0;
          for (int64_t c0 = 0; c0 < N; c0 += col_block) {
            const int64_t bc = std::min(col_block, N - c0);
            const at::Tensor cols_block = cols_acc.narrow(0, c0, bc);
            at::Tensor cosine = tile.narrow(0, 0, br * bc).view({br, bc});
            at::mm_out(cosine, rows_block, cols_block.t());
            acc_t* cosine_data = cosine.data_ptr<acc_t>();
            for (int64_t i = 0; i < br; ++i) {
              const int64_t row = r0 + i;
              tile_row_labels<acc_t>(col + c0, bc, positive + row * K, K,
                                     J > 0 ? ignored + row * J : nullptr, J,
                                     negative_ids_are_padding, sign.data(), weight.data());
              acc_t* cosine_row = cosine_data + i * bc;
              const RowSums<acc_t> sums =
                  tile_row(cosine_row, sign.data(), weight.data(), bc, scale, bias,
                           embedding_grad_factor, any_grad ? cosine_row : nullptr);
              loss_sum += sums.loss;
              grad_bias_sum += sums.grad_bias;
              grad_scale_sum += sums.grad_scale;
            }
            // The tile now holds scale * dloss/dz / normaliser.
            if (grad_rows) {
              if (c0 == 0) {
                at::mm_out(grad_rows_acc, cosine, cols_block);
              } else {
                grad_rows_acc.addmm_(cosine, cols_block);
              }
            }
            if (grad_cols) {
              at::Tensor part = grad_cols_part->narrow(0, c0, bc);
              at::mm_out(part, cosine.t(), rows_block);
            }
          }
          if (grad_rows && !rows_are_acc) grad_rows_out.narrow(0, r0, br).copy_(grad_rows_acc);
          if (grad_rows && N == 0) grad_rows_out.narrow(0, r0, br).zero_();
          if (grad_cols) column_gradient->release(b);
          block_sums[3 * b] = loss_sum;
          block_sums[3 * b + 1] = grad_bias_sum;
          block_sums[3 * b + 2] = grad_scale_sum;
        }
      }
    } catch (...) {
      if (column_gradient) column_gradient->abort();
      throw;
    }
  });

  if (grad_cols) grad_cols_out = column_gradient->total().to(cols.scalar_type());

  double loss = 0, grad_bias = 0, grad_scale = 0;
  for (int64_t b = 0; b < row_blocks; ++b) {
    loss += block_sums[3 * b];
    grad_bias += block_sums[3 * b + 1];
    grad_scale += block_sums[3 * b + 2];
  }
  const at::Tensor sums = at::tensor(
      {loss * inverse_normaliser, grad_scale * inverse_normaliser, grad_bias * inverse_normaliser},
      at::TensorOptions().dtype(at::kDouble));
  return {sums, grad_rows_out, grad_cols_out};
}

}  // namespace

// Returns [sums, grad_rows, grad_cols]: sums = float64 [3] holding the loss,
// d(loss)/d(scale) and d(loss)/d(bias); grad_rows [M, D] and grad_cols [N, D]
// in the embeddings' dtype, or undefined when not asked for.
std::vector<at::Tensor> fused_sigmoid_loss(const at::Tensor& rows, const at::Tensor& cols,
                                           const at::Tensor& positive_ids,
                                           const at::Tensor& col_ids,
                                           const at::Tensor& ignored_ids, double scale,
                                           double bias, bool negative_ids_are_padding,
                                           double inverse_normaliser, bool grad_rows,
                                           bool grad_cols, bool grad_logit_params,
                                           int64_t row_block, int64_t col_block) {
  TORCH_CHECK(rows.device().is_cpu() && cols.device().is_cpu(), "cpp backend needs CPU tensors");
  TORCH_CHECK(rows.dim() == 2 && cols.dim() == 2 && rows.size(1) == cols.size(1),
              "rows [M, D] and columns [N, D] must share D");
  TORCH_CHECK(rows.scalar_type() == cols.scalar_type(), "rows and columns must share a dtype");
  TORCH_CHECK(rows.is_contiguous() && cols.is_contiguous(), "embeddings must be contiguous");
  for (const at::Tensor* ids : {&positive_ids, &col_ids, &ignored_ids}) {
    TORCH_CHECK(ids->scalar_type() == at::kLong && ids->is_contiguous(),
                "id tensors must be contiguous int64");
  }
  TORCH_CHECK(positive_ids.dim() == 2 && positive_ids.size(0) == rows.size(0),
              "positive ids must be [M, K]");
  TORCH_CHECK(ignored_ids.dim() == 2 && ignored_ids.size(0) == rows.size(0),
              "ignored ids must be [M, J]");
  TORCH_CHECK(col_ids.dim() == 1 && col_ids.size(0) == cols.size(0), "column ids must be [N]");
  TORCH_CHECK(row_block > 0 && col_block > 0, "tile sizes must be positive");
  // The kernel only reads the embeddings; autograd is handled by the caller.
  const at::Tensor rows_data = rows.detach(), cols_data = cols.detach();
  if (rows.scalar_type() == at::kDouble) {
    return fused_loss<double>(rows_data, cols_data, positive_ids, col_ids, ignored_ids, scale, bias,
                              negative_ids_are_padding, inverse_normaliser, grad_rows, grad_cols,
                              grad_logit_params, row_block, col_block);
  }
  TORCH_CHECK(rows.scalar_type() == at::kFloat || rows.scalar_type() == at::kBFloat16 ||
                  rows.scalar_type() == at::kHalf,
              "embeddings must be float32, bfloat16, float16 or float64, got ",
              rows.scalar_type());
  return fused_loss<float>(rows_data, cols_data, positive_ids, col_ids, ignored_ids, scale, bias,
                           negative_ids_are_padding, inverse_normaliser, grad_rows, grad_cols,
                           grad_logit_params, row_block, col_block);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("fused_sigmoid_loss", &fused_sigmoid_loss,
        "Fused tiled sigmoid loss with gradients formed in the same pass (CPU, OpenMP)");
}
