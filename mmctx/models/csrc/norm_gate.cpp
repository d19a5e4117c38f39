// Training-mode BatchNorm + a gate + residual add + ReLU of a bottleneck,
// as passes over the rows of the (B * C, H * W) map: a global Gather-Excite
// gate, one value per row (mmctx/models/norm_gate.py), or Patch Spatial
// Interaction's, one value per image and pixel
// (mmctx/models/norm_pixel_gate.py). The per-row, per-pixel and
// per-channel algebra is done by the callers; these loops only read and
// write maps.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <utility>

namespace {

// Sums that go with a masked store are taken in float over chunks of this
// many values (a double accumulator there does not vectorise), and the
// chunks' sums in double.
constexpr int64_t kChunk = 1024;

// Loops over fewer values than this run in one thread.
constexpr int64_t kSerial = 16384;

void check_map(const torch::Tensor& t, const torch::Tensor& like,
               const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous() &&
                  t.scalar_type() == like.scalar_type() &&
                  t.sizes() == like.sizes(),
              name, " must be a contiguous CPU tensor like z");
}

// A (C, H, W) kernel for a (B, C, H, W) map.
void check_kernel(const torch::Tensor& kernel, const torch::Tensor& z) {
  TORCH_CHECK(kernel.device().is_cpu() && kernel.is_contiguous() &&
                  kernel.scalar_type() == z.scalar_type() &&
                  kernel.numel() == z.numel() / z.size(0),
              "kernel must be a contiguous CPU (C, H, W) tensor for z");
}

torch::Tensor values_like(const torch::Tensor& t, const torch::Tensor& z) {
  return t.to(z.scalar_type()).contiguous();
}

// The data of an optional (C) float64 output of per-channel kernel sums.
double* checked_sums(const c10::optional<torch::Tensor>& sums,
                     int64_t channels) {
  if (!sums) return nullptr;
  TORCH_CHECK(sums->device().is_cpu() && sums->is_contiguous() &&
                  sums->scalar_type() == torch::kFloat64 &&
                  sums->numel() == channels,
              "kernel_sums must be a contiguous CPU (C) float64 tensor");
  return sums->data_ptr<double>();
}

}  // namespace

// Per row of z: its sum, its sum of squares and, with a kernel, its dot
// product with its channel's kernel; each (B, C) in double.
std::vector<torch::Tensor> row_moments(torch::Tensor z,
                                       c10::optional<torch::Tensor> kernel) {
  TORCH_CHECK(z.dim() == 4, "z must be (B, C, H, W)");
  check_map(z, z, "z");
  if (kernel) check_kernel(*kernel, z);
  const int64_t channels = z.size(1), rows = z.size(0) * channels,
                n = z.numel() / rows;
  auto opts = z.options().dtype(torch::kFloat64);
  auto sums = torch::empty({z.size(0), channels}, opts);
  auto squares = torch::empty({z.size(0), channels}, opts);
  auto dots = kernel ? torch::empty({z.size(0), channels}, opts)
                     : torch::Tensor();
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "row_moments", [&] {
    const scalar_t* zp = z.data_ptr<scalar_t>();
    const scalar_t* kp = kernel ? kernel->data_ptr<scalar_t>() : nullptr;
    double *s1 = sums.data_ptr<double>(), *s2 = squares.data_ptr<double>();
    double* s3 = kernel ? dots.data_ptr<double>() : nullptr;
    at::parallel_for(0, rows, 1, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const scalar_t* zr = zp + r * n;
        double a = 0, b = 0, c = 0;
        if (kp) {
          const scalar_t* kr = kp + (r % channels) * n;
          _Pragma("omp simd reduction(+ : a, b, c)")
          for (int64_t i = 0; i < n; ++i) {
            const double v = zr[i];
            a += v;
            b += v * v;
            c += v * kr[i];
          }
          s3[r] = c;
        } else {
          _Pragma("omp simd reduction(+ : a, b)")
          for (int64_t i = 0; i < n; ++i) {
            const double v = zr[i];
            a += v;
            b += v * v;
          }
        }
        s1[r] = a;
        s2[r] = b;
      }
    });
  });
  if (kernel) return {sums, squares, dots};
  return {sums, squares};
}

// A new map like z, or the caller's out (z itself for in place: a store
// into lines the pass has just read needs no read of its own, which a
// fresh buffer's does; each loop reads a value before it writes it).
static torch::Tensor output_like(const torch::Tensor& z,
                          const c10::optional<torch::Tensor>& out) {
  if (!out) return torch::empty_like(z);
  check_map(*out, z, "out");
  return *out;
}

// relu(identity + z * scale[r] + shift[r]) per row r, into out if given.
torch::Tensor scale_shift_add_relu(torch::Tensor z, torch::Tensor identity,
                                   torch::Tensor scale, torch::Tensor shift,
                                   c10::optional<torch::Tensor> out_) {
  check_map(z, z, "z");
  check_map(identity, z, "identity");
  auto out = output_like(z, out_);
  const int64_t rows = z.size(0) * z.size(1), n = z.numel() / rows;
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "scale_shift_add_relu", [&] {
    auto sc = values_like(scale, z), sh = values_like(shift, z);
    const scalar_t *zp = z.data_ptr<scalar_t>(),
                   *ip = identity.data_ptr<scalar_t>(),
                   *scp = sc.data_ptr<scalar_t>(), *shp = sh.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, rows, 1, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const scalar_t *zr = zp + r * n, *ir = ip + r * n;
        scalar_t* orow = op + r * n;
        const scalar_t a = scp[r], b = shp[r];
        _Pragma("omp simd")
        for (int64_t i = 0; i < n; ++i) {
          const scalar_t v = ir[i] + (zr[i] * a + b);
          orow[i] = v > scalar_t(0) ? v : scalar_t(0);
        }
      }
    });
  });
  return out;
}

// z's gradient, grad_scale[r] * grad + z_scale[c] * z + shift[r] per row r
// (channel c), plus kernel_scale[r] * kernel[c] with a kernel; then also
// the kernel's gradient, (C, H, W): per channel, z_scale2[c] * (sum over
// images b of kernel_grad[b, c] * z[b, c]) + kernel_shift[c].
std::vector<torch::Tensor> combine_rows(
    torch::Tensor grad, torch::Tensor z, torch::Tensor grad_scale,
    torch::Tensor z_scale, torch::Tensor shift,
    c10::optional<torch::Tensor> kernel,
    c10::optional<torch::Tensor> kernel_scale,
    c10::optional<torch::Tensor> kernel_grad,
    c10::optional<torch::Tensor> kernel_grad_scale,
    c10::optional<torch::Tensor> kernel_grad_shift) {
  check_map(z, z, "z");
  check_map(grad, z, "grad");
  TORCH_CHECK(!kernel || (kernel_scale && kernel_grad && kernel_grad_scale &&
                          kernel_grad_shift),
              "a kernel needs kernel_scale, kernel_grad, kernel_grad_scale "
              "and kernel_grad_shift");
  if (kernel) check_kernel(*kernel, z);
  auto result = torch::empty_like(z);
  const int64_t batch = z.size(0), channels = z.size(1),
                rows = batch * channels, n = z.numel() / rows;
  auto grad_kernel = kernel ? torch::empty_like(*kernel) : torch::Tensor();
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "combine_rows", [&] {
    auto gs = values_like(grad_scale, z), zs = values_like(z_scale, z),
         sh = values_like(shift, z);
    const scalar_t *gp = grad.data_ptr<scalar_t>(), *zp = z.data_ptr<scalar_t>(),
                   *gsp = gs.data_ptr<scalar_t>(), *zsp = zs.data_ptr<scalar_t>(),
                   *shp = sh.data_ptr<scalar_t>();
    scalar_t* rp = result.data_ptr<scalar_t>();
    if (!kernel) {
      at::parallel_for(0, rows, 1, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
          const scalar_t *gr = gp + r * n, *zr = zp + r * n;
          scalar_t* rr = rp + r * n;
          const scalar_t a = gsp[r], b = zsp[r % channels], c = shp[r];
          _Pragma("omp simd")
          for (int64_t i = 0; i < n; ++i) rr[i] = a * gr[i] + b * zr[i] + c;
        }
      });
      return;
    }
    auto ks = values_like(*kernel_scale, z), kg = values_like(*kernel_grad, z),
         kgs = values_like(*kernel_grad_scale, z),
         kgh = values_like(*kernel_grad_shift, z);
    const scalar_t *kp = kernel->data_ptr<scalar_t>(),
                   *ksp = ks.data_ptr<scalar_t>(), *kgp = kg.data_ptr<scalar_t>(),
                   *kgsp = kgs.data_ptr<scalar_t>(),
                   *kghp = kgh.data_ptr<scalar_t>();
    scalar_t* gkp = grad_kernel.data_ptr<scalar_t>();
    // By channel: its images' rows share the kernel and its gradient.
    at::parallel_for(0, channels, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t ch = c0; ch < c1; ++ch) {
        const scalar_t* kr = kp + ch * n;
        scalar_t* gkr = gkp + ch * n;
        std::fill(gkr, gkr + n, scalar_t(0));
        for (int64_t b = 0; b < batch; ++b) {
          const int64_t r = b * channels + ch;
          const scalar_t *gr = gp + r * n, *zr = zp + r * n;
          scalar_t* rr = rp + r * n;
          const scalar_t a = gsp[r], bz = zsp[ch], c = shp[r], d = ksp[r],
                         e = kgp[r];
          _Pragma("omp simd")
          for (int64_t i = 0; i < n; ++i) {
            rr[i] = a * gr[i] + bz * zr[i] + c + d * kr[i];
            gkr[i] += e * zr[i];
          }
        }
        const scalar_t f = kgsp[ch], g = kghp[ch];
        _Pragma("omp simd")
        for (int64_t i = 0; i < n; ++i) gkr[i] = f * gkr[i] + g;
      }
    });
  });
  if (kernel) return {result, grad_kernel};
  return {result};
}

// Adaptive average pooling's windows along one axis, in -> out values:
// window i covers [floor(i in / out), ceil((i + 1) in / out)).
static std::vector<std::pair<int64_t, int64_t>> pool_windows(int64_t in,
                                                             int64_t out) {
  std::vector<std::pair<int64_t, int64_t>> windows(out);
  for (int64_t i = 0; i < out; ++i)
    windows[i] = {i * in / out, ((i + 1) * in + out - 1) / out};
  return windows;
}

// For each of the in values, the windows (of pool_windows) that hold it.
static std::vector<std::vector<int64_t>> window_holders(
    const std::vector<std::pair<int64_t, int64_t>>& windows, int64_t in) {
  std::vector<std::vector<int64_t>> holders(in);
  for (int64_t a = 0; a < int64_t(windows.size()); ++a)
    for (int64_t y = windows[a].first; y < windows[a].second; ++y)
      holders[y].push_back(a);
  return holders;
}

// The adjoint of adaptive average pooling (H, W) -> (h, w), applied to
// (C, h, w) kernels: (C, H, W) kernels k with <x, k> = <pool(x), kernel>.
torch::Tensor pool_adjoint(torch::Tensor kernel, int64_t height,
                           int64_t width) {
  TORCH_CHECK(kernel.dim() == 3 && kernel.device().is_cpu() &&
                  kernel.is_contiguous(),
              "kernel must be a contiguous (C, h, w) CPU tensor");
  const int64_t channels = kernel.size(0), h = kernel.size(1),
                w = kernel.size(2);
  const auto rows = pool_windows(height, h), cols = pool_windows(width, w);
  const auto holders = window_holders(rows, height);
  auto out = torch::empty({channels, height, width}, kernel.options());
  AT_DISPATCH_FLOATING_TYPES(kernel.scalar_type(), "pool_adjoint", [&] {
    const scalar_t* kp = kernel.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, channels, 1, [&](int64_t c0, int64_t c1) {
      std::vector<scalar_t> spread(h * width);  // (h, W): along W first
      for (int64_t c = c0; c < c1; ++c) {
        std::fill(spread.begin(), spread.end(), scalar_t(0));
        for (int64_t i = 0; i < h; ++i) {
          const scalar_t* kr = kp + (c * h + i) * w;
          scalar_t* sr = spread.data() + i * width;
          for (int64_t j = 0; j < w; ++j) {
            const auto [start, end] = cols[j];
            const scalar_t v = kr[j] / scalar_t(end - start);
            for (int64_t x = start; x < end; ++x) sr[x] += v;
          }
        }
        for (int64_t i = 0; i < h; ++i) {  // the 1 / rows of each window
          const scalar_t inv =
              scalar_t(1) / scalar_t(rows[i].second - rows[i].first);
          scalar_t* sr = spread.data() + i * width;
          _Pragma("omp simd")
          for (int64_t x = 0; x < width; ++x) sr[x] *= inv;
        }
        // each output row written once: the sum of its windows' rows
        scalar_t* oc = op + c * height * width;
        for (int64_t y = 0; y < height; ++y) {
          scalar_t* orow = oc + y * width;
          const auto& windows = holders[y];
          const scalar_t* first = spread.data() + windows[0] * width;
          _Pragma("omp simd")
          for (int64_t x = 0; x < width; ++x) orow[x] = first[x];
          for (size_t a = 1; a < windows.size(); ++a) {
            const scalar_t* sr = spread.data() + windows[a] * width;
            _Pragma("omp simd")
            for (int64_t x = 0; x < width; ++x) orow[x] += sr[x];
          }
        }
      }
    });
  });
  return out;
}

// Adaptive average pooling of (N, H, W) planes to (N, h, w), as
// F.adaptive_avg_pool2d: one read of each plane, each input row added
// (vectorised) to the rows of the windows that hold it, an (h, W) buffer
// in cache, then the window sums along W. The gradient of pool_adjoint's
// kernel (GE-θ's global gather off its reference size in training), where
// the banded GEMMs read the (C, H, W) gradient about three times over.
torch::Tensor adaptive_avg_pool(torch::Tensor x, int64_t h, int64_t w) {
  TORCH_CHECK(x.dim() == 3 && x.device().is_cpu() && x.is_contiguous(),
              "x must be a contiguous (N, H, W) CPU tensor");
  TORCH_CHECK(h > 0 && w > 0, "the output size must be positive");
  const int64_t planes = x.size(0), height = x.size(1), width = x.size(2);
  const auto rows = pool_windows(height, h), cols = pool_windows(width, w);
  const auto holders = window_holders(rows, height);
  auto out = torch::empty({planes, h, w}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "adaptive_avg_pool", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, planes, 1, [&](int64_t p0, int64_t p1) {
      std::vector<scalar_t> sums(h * width);
      for (int64_t p = p0; p < p1; ++p) {
        std::fill(sums.begin(), sums.end(), scalar_t(0));
        const scalar_t* xr = xp + p * height * width;
        for (int64_t y = 0; y < height; ++y) {
          const scalar_t* row = xr + y * width;
          for (const int64_t a : holders[y]) {
            scalar_t* acc = sums.data() + a * width;
            _Pragma("omp simd")
            for (int64_t i = 0; i < width; ++i) acc[i] += row[i];
          }
        }
        scalar_t* oc = op + p * h * w;
        for (int64_t a = 0; a < h; ++a) {
          const scalar_t* acc = sums.data() + a * width;
          const int64_t row_count = rows[a].second - rows[a].first;
          for (int64_t j = 0; j < w; ++j) {
            const auto [start, end] = cols[j];
            scalar_t window = 0;
            for (int64_t i = start; i < end; ++i) window += acc[i];
            oc[a * w + j] = window / scalar_t(row_count * (end - start));
          }
        }
      }
    });
  });
  return out;
}

// An eval BatchNorm as x * scale[c] + shift[c]: scale = weight / sqrt(var +
// eps), shift = bias - mean * scale, computed in double and returned in
// double or in the norm's dtype; one call where the tensor ops make five
// (each fast path asks for its norms' values at every forward).
std::vector<torch::Tensor> norm_scale_shift(torch::Tensor weight,
                                            torch::Tensor bias,
                                            torch::Tensor mean,
                                            torch::Tensor var, double eps,
                                            bool as_double) {
  for (const auto* t : {&weight, &bias, &mean, &var})
    TORCH_CHECK(t->dim() == 1 && t->device().is_cpu() &&
                    t->is_contiguous() &&
                    t->scalar_type() == weight.scalar_type() &&
                    t->numel() == weight.numel(),
                "weight, bias, mean and var must be contiguous 1-D CPU "
                "tensors of one dtype and size");
  const int64_t channels = weight.numel();
  auto opts = as_double ? weight.options().dtype(torch::kFloat64)
                        : weight.options();
  auto scale = torch::empty({channels}, opts),
       shift = torch::empty({channels}, opts);
  AT_DISPATCH_FLOATING_TYPES(weight.scalar_type(), "norm_scale_shift", [&] {
    const scalar_t *wp = weight.data_ptr<scalar_t>(),
                   *bp = bias.data_ptr<scalar_t>(),
                   *mp = mean.data_ptr<scalar_t>(),
                   *vp = var.data_ptr<scalar_t>();
    auto fill = [&](auto* sp, auto* hp) {
      for (int64_t c = 0; c < channels; ++c) {
        const double a = double(wp[c]) / std::sqrt(double(vp[c]) + eps);
        sp[c] = a;
        hp[c] = double(bp[c]) - double(mp[c]) * a;
      }
    };
    if (as_double)
      fill(scale.data_ptr<double>(), shift.data_ptr<double>());
    else
      fill(scale.data_ptr<scalar_t>(), shift.data_ptr<scalar_t>());
  });
  return {scale, shift};
}

// A dense layer on a batch of rows: store(n, o, w[o] . in[n] + b[o]) for
// each row n of inputs (batch, in) and output o of weight (out, in), output
// rows in parallel.
template <typename scalar_t, typename Store>
void dense_rows(const scalar_t* weight, const scalar_t* bias,
                const scalar_t* inputs, int64_t batch, int64_t in, int64_t out,
                Store store) {
  // (a batch of 0 leaves nothing to compute: no division by it)
  const int64_t work = std::max<int64_t>(1, batch * in);
  at::parallel_for(0, out, std::max<int64_t>(1, 4 * kSerial / work),
                   [&](int64_t o0, int64_t o1) {
    for (int64_t o = o0; o < o1; ++o)
      for (int64_t n = 0; n < batch; ++n) {
        const scalar_t *row = weight + o * in, *x = inputs + n * in;
        scalar_t sum = 0;
        _Pragma("omp simd reduction(+ : sum)")
        for (int64_t i = 0; i < in; ++i) sum += row[i] * x[i];
        store(n, o, sum + bias[o]);
      }
  });
}

// GE-θ / θ⁺'s global gate in inference, folded with the block's eval
// bn3 (z a + s per channel): from the dot products `dots` (B, C) of conv3's
// output z (resampled to the kernel's size) with the gather kernel (C, h,
// w) and the kernel's sums per channel (both from channel_dots or
// pooled_dot), the per-row scale and shift of scale_shift_add_relu, gate *
// (a, s). The context of bn3(z) is a dot + s sum(kernel); the gather norm
// follows, then the gate: the sigmoid of that (θ), or of the excite MLP on
// its ReLU (1x1 convs (w1, b1), ReLU, (w2, b2): θ⁺). Norms are (weight, bias,
// running mean, running var), all tensors of dtype (the maps'); the algebra
// in double except the MLP's products (in dtype, as the convs). One call
// where the tensor ops make about fifteen small ones per block.
std::vector<torch::Tensor> global_gate_scale_shift(
    torch::Tensor dots, torch::Tensor kernel_sums,
    std::vector<torch::Tensor> norm,
    double eps, std::vector<torch::Tensor> gather_norm, double gather_eps,
    std::vector<torch::Tensor> excite, at::ScalarType dtype) {
  TORCH_CHECK(dots.dim() == 2 && dots.device().is_cpu() &&
                  dots.is_contiguous() &&
                  dots.scalar_type() == torch::kFloat64,
              "dots must be a contiguous CPU (B, C) float64 tensor");
  const int64_t batch = dots.size(0), channels = dots.size(1);
  const double* kernel_sum = checked_sums(kernel_sums, channels);
  TORCH_CHECK(norm.size() == 4 && gather_norm.size() == 4 &&
                  (excite.empty() || excite.size() == 4),
              "norms must be (weight, bias, mean, var), excite (w1, b1, w2, "
              "b2) or empty");
  std::vector<torch::Tensor> stats(norm);
  stats.insert(stats.end(), gather_norm.begin(), gather_norm.end());
  for (const auto& t : stats)
    TORCH_CHECK(t.dim() == 1 && t.numel() == channels && t.device().is_cpu() &&
                    t.is_contiguous() && t.scalar_type() == dtype,
                "norm tensors must be contiguous CPU tensors of dtype, one "
                "value per channel");
  const int64_t hidden = excite.empty() ? 0 : excite[0].size(0);
  if (!excite.empty()) {
    TORCH_CHECK(excite[0].numel() == hidden * channels &&
                    excite[1].numel() == hidden &&
                    excite[2].numel() == channels * hidden &&
                    excite[3].numel() == channels,
                "excite must be (H, C) and (C, H) convs with biases");
    for (const auto& t : excite)
      TORCH_CHECK(t.device().is_cpu() && t.is_contiguous() &&
                      t.scalar_type() == excite[0].scalar_type(),
                  "excite tensors must be contiguous CPU tensors of one "
                  "dtype");
  }
  TORCH_CHECK(at::isFloatingType(dtype) &&
                  (excite.empty() || excite[0].scalar_type() == dtype),
              "dtype must be a float dtype, the excite tensors' if given");
  auto opts = dots.options().dtype(dtype);
  auto scale_out = torch::empty({batch * channels}, opts),
       shift_out = torch::empty({batch * channels}, opts);
  std::vector<double> a(channels), s(channels), context(batch * channels);
  const double* dp = dots.data_ptr<double>();
  AT_DISPATCH_FLOATING_TYPES(dtype, "global_gate_scale_shift", [&] {
    const scalar_t *w = stats[0].data_ptr<scalar_t>(),
                   *b = stats[1].data_ptr<scalar_t>(),
                   *m = stats[2].data_ptr<scalar_t>(),
                   *v = stats[3].data_ptr<scalar_t>(),
                   *gw = stats[4].data_ptr<scalar_t>(),
                   *gb = stats[5].data_ptr<scalar_t>(),
                   *gm = stats[6].data_ptr<scalar_t>(),
                   *gv = stats[7].data_ptr<scalar_t>();
    for (int64_t c = 0; c < channels; ++c) {
      a[c] = double(w[c]) / std::sqrt(double(v[c]) + eps);
      s[c] = double(b[c]) - double(m[c]) * a[c];
      const double g = double(gw[c]) / std::sqrt(double(gv[c]) + gather_eps),
                   h = double(gb[c]) - double(gm[c]) * g,
                   shift = s[c] * kernel_sum[c];
      for (int64_t n = 0; n < batch; ++n)
        context[n * channels + c] =
            (dp[n * channels + c] * a[c] + shift) * g + h;
    }
    if (hidden) {
      // the excite MLP, products in the weights' dtype
      const scalar_t *w1 = excite[0].data_ptr<scalar_t>(),
                     *b1 = excite[1].data_ptr<scalar_t>(),
                     *w2 = excite[2].data_ptr<scalar_t>(),
                     *b2 = excite[3].data_ptr<scalar_t>();
      std::vector<scalar_t> inputs(batch * channels), mids(batch * hidden);
      for (int64_t i = 0; i < batch * channels; ++i)
        inputs[i] = scalar_t(context[i] > 0 ? context[i] : 0);
      dense_rows(w1, b1, inputs.data(), batch, channels, hidden,
                 [&](int64_t n, int64_t j, scalar_t out) {
                   mids[n * hidden + j] = out > scalar_t(0) ? out : scalar_t(0);
                 });
      dense_rows(w2, b2, mids.data(), batch, hidden, channels,
                 [&](int64_t n, int64_t c, scalar_t out) {
                   context[n * channels + c] = double(out);
                 });
    }
    scalar_t *sp = scale_out.data_ptr<scalar_t>(),
             *hp = shift_out.data_ptr<scalar_t>();
    for (int64_t n = 0; n < batch; ++n)
      for (int64_t c = 0; c < channels; ++c) {
        const double gate = 1 / (1 + std::exp(-context[n * channels + c]));
        sp[n * channels + c] = a[c] * gate;
        hp[n * channels + c] = s[c] * gate;
      }
  });
  return {scale_out, shift_out};
}

// PSI's patch values from its per-offset maps (B, ph * pw, H, W): the maps
// adaptively average-pooled to the (gh * ph, gw * pw) reference grid, patch
// (a, c) taking its pixel at offset (i, j) from map i * pw + j; (B, gh, gw).
// Only the pooling windows of each map's own offset are summed (each input
// row added, vectorised, to the windows of offset i that hold it), per map
// in parallel, then the maps' (gh, gw) values are added per image. Equal to
// F.adaptive_avg_pool2d and the picking up to float rounding.
torch::Tensor offset_patches(torch::Tensor maps, int64_t ph, int64_t pw,
                             int64_t gh, int64_t gw) {
  TORCH_CHECK(maps.dim() == 4 && maps.device().is_cpu() &&
                  maps.is_contiguous(),
              "maps must be a contiguous (B, ph * pw, H, W) CPU tensor");
  TORCH_CHECK(ph > 0 && pw > 0 && gh > 0 && gw > 0 &&
                  maps.size(1) == ph * pw,
              "maps must hold ph * pw offset maps, and the grid be positive");
  const int64_t batch = maps.size(0), offsets = ph * pw,
                height = maps.size(2), width = maps.size(3);
  const auto rows = pool_windows(height, gh * ph),
             cols = pool_windows(width, gw * pw);
  auto partial = torch::empty({batch * offsets, gh, gw},
                              maps.options().dtype(torch::kFloat64));
  AT_DISPATCH_FLOATING_TYPES(maps.scalar_type(), "offset_patches", [&] {
    const scalar_t* mp = maps.data_ptr<scalar_t>();
    double* pp = partial.data_ptr<double>();
    at::parallel_for(0, batch * offsets, 1, [&](int64_t m0, int64_t m1) {
      std::vector<scalar_t> acc(width);
      for (int64_t m = m0; m < m1; ++m) {
        const int64_t i = (m % offsets) / pw, j = m % pw;
        const scalar_t* plane = mp + m * height * width;
        for (int64_t a = 0; a < gh; ++a) {
          const auto [y0, y1] = rows[a * ph + i];
          std::fill(acc.begin(), acc.end(), scalar_t(0));
          for (int64_t y = y0; y < y1; ++y) {
            const scalar_t* row = plane + y * width;
            _Pragma("omp simd")
            for (int64_t x = 0; x < width; ++x) acc[x] += row[x];
          }
          for (int64_t c = 0; c < gw; ++c) {
            const auto [x0, x1] = cols[c * pw + j];
            double window = 0;
            for (int64_t x = x0; x < x1; ++x) window += acc[x];
            pp[(m * gh + a) * gw + c] =
                window / double((y1 - y0) * (x1 - x0));
          }
        }
      }
    });
  });
  return partial.view({batch, offsets, gh, gw}).sum(1).to(
      maps.scalar_type());
}

// Per image and channel, the dot product of the channel's (h, w) kernel with
// the map adaptively average-pooled to (h, w): GE-θ's global gather away
// from its reference size, in double. One read of x: each input row is
// added (vectorised) to the rows of the output windows that hold it, an
// (h, W) buffer in cache; then each buffer row's window sums along W meet
// the kernel. Equal to the pool followed by the dot product up to float
// rounding.
torch::Tensor pooled_dot(torch::Tensor x, torch::Tensor kernel,
                         c10::optional<torch::Tensor> kernel_sums) {
  TORCH_CHECK(x.dim() == 4 && x.device().is_cpu() && x.is_contiguous(),
              "x must be a contiguous CPU (B, C, H, W) tensor");
  TORCH_CHECK(kernel.dim() == 3 && kernel.device().is_cpu() &&
                  kernel.is_contiguous() &&
                  kernel.scalar_type() == x.scalar_type() &&
                  kernel.size(0) == x.size(1),
              "kernel must be a contiguous CPU (C, h, w) tensor for x");
  const int64_t channels = x.size(1), height = x.size(2), width = x.size(3),
                h = kernel.size(1), w = kernel.size(2);
  const auto rows = pool_windows(height, h), cols = pool_windows(width, w);
  const auto holders = window_holders(rows, height);
  auto out = torch::empty({x.size(0), channels},
                          x.options().dtype(torch::kFloat64));
  double* sums_out = checked_sums(kernel_sums, channels);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "pooled_dot", [&] {
    const scalar_t *xp = x.data_ptr<scalar_t>(),
                   *kp = kernel.data_ptr<scalar_t>();
    double* op = out.data_ptr<double>();
    at::parallel_for(0, x.size(0) * channels, 1, [&](int64_t r0,
                                                      int64_t r1) {
      std::vector<scalar_t> sums(h * width);
      for (int64_t r = r0; r < r1; ++r) {
        std::fill(sums.begin(), sums.end(), scalar_t(0));
        const scalar_t* xr = xp + r * height * width;
        for (int64_t y = 0; y < height; ++y) {
          const scalar_t* row = xr + y * width;
          for (const int64_t a : holders[y]) {
            scalar_t* acc = sums.data() + a * width;
            _Pragma("omp simd")
            for (int64_t i = 0; i < width; ++i) acc[i] += row[i];
          }
        }
        const scalar_t* kc = kp + (r % channels) * h * w;
        double total = 0;
        for (int64_t a = 0; a < h; ++a) {
          const scalar_t* acc = sums.data() + a * width;
          double row_total = 0;
          for (int64_t j = 0; j < w; ++j) {
            const auto [start, end] = cols[j];
            scalar_t window = 0;
            for (int64_t i = start; i < end; ++i) window += acc[i];
            row_total += double(kc[a * w + j]) * window / double(end - start);
          }
          total += row_total / double(rows[a].second - rows[a].first);
        }
        op[r] = total;
        if (sums_out && r < channels) {
          double kernel_total = 0;
          for (int64_t i = 0; i < h * w; ++i) kernel_total += kc[i];
          sums_out[r] = kernel_total;
        }
      }
    });
  });
  return out;
}

// The per-pixel loops below run over (image, chunk of kChunk pixels) tasks,
// each looping over the image's channels: a chunk's per-pixel values (gate
// weights, sums over channels, the squeeze maps' gradients) stay in cache
// while every channel's row passes by.
template <typename F>
void for_pixel_chunks(int64_t batch, int64_t n, F f,
                      int64_t size = kChunk) {
  const int64_t chunks = (n + size - 1) / size;
  at::parallel_for(0, batch * chunks, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / chunks, chunk = t % chunks, i0 = chunk * size;
      f(b, chunk, i0, std::min(n, i0 + size));
    }
  });
}

void check_pixels(const torch::Tensor& weights, const torch::Tensor& z) {
  TORCH_CHECK(weights.device().is_cpu() && weights.is_contiguous() &&
                  weights.scalar_type() == z.scalar_type() &&
                  weights.numel() == z.size(0) * (z.numel() / z.size(0) /
                                                  z.size(1)),
              "weights must be a contiguous CPU (B, H, W) tensor for z");
}

// relu(identity + (z * scale[c] + shift[c]) * weights[b, i]) at pixel i of
// row (b, c), into out if given.
torch::Tensor pixel_scale_shift_add_relu(torch::Tensor z,
                                         torch::Tensor identity,
                                         torch::Tensor scale,
                                         torch::Tensor shift,
                                         torch::Tensor weights,
                                         c10::optional<torch::Tensor> out_) {
  TORCH_CHECK(z.dim() == 4, "z must be (B, C, H, W)");
  check_map(z, z, "z");
  check_map(identity, z, "identity");
  check_pixels(weights, z);
  auto out = output_like(z, out_);
  const int64_t channels = z.size(1), rows = z.size(0) * channels,
                n = z.numel() / rows;
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "pixel_scale_shift_add_relu",
                             [&] {
    auto sc = values_like(scale, z), sh = values_like(shift, z);
    const scalar_t *zp = z.data_ptr<scalar_t>(),
                   *ip = identity.data_ptr<scalar_t>(),
                   *wp = weights.data_ptr<scalar_t>(),
                   *scp = sc.data_ptr<scalar_t>(), *shp = sh.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, rows, 1, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const scalar_t *zr = zp + r * n, *ir = ip + r * n,
                       *wr = wp + (r / channels) * n;
        scalar_t* orow = op + r * n;
        const scalar_t a = scp[r % channels], b = shp[r % channels];
        _Pragma("omp simd")
        for (int64_t i = 0; i < n; ++i) {
          const scalar_t v = ir[i] + (zr[i] * a + b) * wr[i];
          orow[i] = v > scalar_t(0) ? v : scalar_t(0);
        }
      }
    });
  });
  return out;
}

// ReLU's backward, masked = grad * (out > 0), written out (it is the
// identity's gradient); per image and pixel, the sum over channels of
// masked * (z * scale[c] + shift[c]) (the gate weight's gradient); per row,
// the sums of masked * weights and of masked * weights * z (double).
std::vector<torch::Tensor> relu_grad_pixel_moments(
    torch::Tensor grad, torch::Tensor out, torch::Tensor z,
    torch::Tensor weights, torch::Tensor scale, torch::Tensor shift) {
  TORCH_CHECK(z.dim() == 4, "z must be (B, C, H, W)");
  check_map(z, z, "z");
  check_map(grad, z, "grad");
  check_map(out, z, "out");
  check_pixels(weights, z);
  const int64_t batch = z.size(0), channels = z.size(1),
                n = z.numel() / (batch * channels),
                chunks = (n + kChunk - 1) / kChunk;
  auto masked = torch::empty_like(z);
  auto pixel_sums = torch::empty({batch, n}, z.options());
  auto opts = z.options().dtype(torch::kFloat64);
  // per row and chunk; the caller adds up the chunks
  auto sums = torch::empty({batch, channels, chunks}, opts);
  auto dots = torch::empty({batch, channels, chunks}, opts);
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "relu_grad_pixel_moments", [&] {
    auto sc = values_like(scale, z), sh = values_like(shift, z);
    const scalar_t *gp = grad.data_ptr<scalar_t>(),
                   *op = out.data_ptr<scalar_t>(), *zp = z.data_ptr<scalar_t>(),
                   *wp = weights.data_ptr<scalar_t>(),
                   *scp = sc.data_ptr<scalar_t>(), *shp = sh.data_ptr<scalar_t>();
    scalar_t *mp = masked.data_ptr<scalar_t>(),
             *pp = pixel_sums.data_ptr<scalar_t>();
    double *s1 = sums.data_ptr<double>(), *s2 = dots.data_ptr<double>();
    for_pixel_chunks(batch, n, [&](int64_t b, int64_t chunk, int64_t i0,
                                   int64_t i1) {
      const int64_t len = i1 - i0;
      std::vector<double> acc(len, 0.);
      double* ap = acc.data();
      const scalar_t* wr = wp + b * n + i0;
      for (int64_t c = 0; c < channels; ++c) {
        const int64_t r = b * channels + c, off = r * n + i0;
        const scalar_t *gr = gp + off, *orow = op + off, *zr = zp + off;
        scalar_t* mr = mp + off;
        const scalar_t a = scp[c], s = shp[c];
        scalar_t ca = 0, cb = 0;
        _Pragma("omp simd reduction(+ : ca, cb)")
        for (int64_t i = 0; i < len; ++i) {
          const scalar_t v = orow[i] > scalar_t(0) ? gr[i] : scalar_t(0);
          mr[i] = v;
          ap[i] += double(v * (zr[i] * a + s));
          const scalar_t vw = v * wr[i];
          ca += vw;
          cb += vw * zr[i];
        }
        s1[r * chunks + chunk] = ca;
        s2[r * chunks + chunk] = cb;
      }
      scalar_t* pr = pp + b * n + i0;
      for (int64_t i = 0; i < len; ++i) pr[i] = scalar_t(ap[i]);
    });
  });
  return {masked, pixel_sums, sums, dots};
}

// z's gradient at pixel i of row (b, c): grad_scale[c] * masked * weights[b,
// i] + z_scale[c] * z + shift[c] + sum over k of map_scale[c, k] *
// maps_grad[b, k, i].
torch::Tensor combine_pixel_rows(torch::Tensor masked, torch::Tensor z,
                                 torch::Tensor weights,
                                 torch::Tensor maps_grad,
                                 torch::Tensor grad_scale,
                                 torch::Tensor map_scale,
                                 torch::Tensor z_scale, torch::Tensor shift) {
  TORCH_CHECK(z.dim() == 4, "z must be (B, C, H, W)");
  check_map(z, z, "z");
  check_map(masked, z, "masked");
  check_pixels(weights, z);
  const int64_t batch = z.size(0), channels = z.size(1),
                n = z.numel() / (batch * channels);
  TORCH_CHECK(maps_grad.device().is_cpu() && maps_grad.is_contiguous() &&
                  maps_grad.scalar_type() == z.scalar_type() &&
                  maps_grad.dim() == 3 && maps_grad.size(0) == batch &&
                  maps_grad.size(2) == n,
              "maps_grad must be a contiguous CPU (B, K, H * W) tensor");
  const int64_t maps = maps_grad.size(1);
  TORCH_CHECK(map_scale.numel() == channels * maps,
              "map_scale must be (C, K)");
  auto result = torch::empty_like(z);
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "combine_pixel_rows", [&] {
    auto gs = values_like(grad_scale, z), ms = values_like(map_scale, z),
         zs = values_like(z_scale, z), sh = values_like(shift, z);
    const scalar_t *mp = masked.data_ptr<scalar_t>(),
                   *zp = z.data_ptr<scalar_t>(),
                   *wp = weights.data_ptr<scalar_t>(),
                   *dp = maps_grad.data_ptr<scalar_t>(),
                   *gsp = gs.data_ptr<scalar_t>(), *msp = ms.data_ptr<scalar_t>(),
                   *zsp = zs.data_ptr<scalar_t>(), *shp = sh.data_ptr<scalar_t>();
    scalar_t* rp = result.data_ptr<scalar_t>();
    for_pixel_chunks(batch, n, [&](int64_t b, int64_t, int64_t i0,
                                   int64_t i1) {
      const int64_t len = i1 - i0;
      const scalar_t* wr = wp + b * n + i0;
      const scalar_t* dr = dp + b * maps * n + i0;
      for (int64_t c = 0; c < channels; ++c) {
        const int64_t off = (b * channels + c) * n + i0;
        const scalar_t *mr = mp + off, *zr = zp + off;
        scalar_t* rr = rp + off;
        const scalar_t a = gsp[c], bz = zsp[c], s = shp[c];
        _Pragma("omp simd")
        for (int64_t i = 0; i < len; ++i)
          rr[i] = a * mr[i] * wr[i] + bz * zr[i] + s;
        for (int64_t k = 0; k < maps; ++k) {
          const scalar_t e = msp[c * maps + k];
          const scalar_t* dk = dr + k * n;
          _Pragma("omp simd")
          for (int64_t i = 0; i < len; ++i) rr[i] += e * dk[i];
        }
      }
    });
  });
  return result;
}

// A 1x1 conv with few output maps (Spatial Bias's and PSI's squeezes):
// out[b, o, i] = sum_c weight[o, c] * x[b, c, i]. Per (image, chunk of
// pixels) task the chunk's O output rows accumulate in cache while every
// channel's row passes by once, so the map is read once; a GEMM with so few
// output rows packs the map first, and oneDNN's conv reorders it.
void check_few_maps(const torch::Tensor& weight, const torch::Tensor& x) {
  TORCH_CHECK(x.dim() == 4 && x.device().is_cpu() && x.is_contiguous(),
              "x must be a contiguous CPU (B, C, H, W) tensor");
  TORCH_CHECK(weight.dim() == 2 && weight.device().is_cpu() &&
                  weight.is_contiguous() &&
                  weight.scalar_type() == x.scalar_type() &&
                  weight.size(1) == x.size(1),
              "weight must be a contiguous CPU (O, C) tensor for x");
}

torch::Tensor few_maps_product(torch::Tensor weight, torch::Tensor x) {
  check_few_maps(weight, x);
  const int64_t size = kChunk;
  const int64_t outs = weight.size(0), channels = x.size(1),
                n = x.size(2) * x.size(3);
  auto out = torch::empty({x.size(0), outs, x.size(2), x.size(3)},
                          x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "few_maps_product", [&] {
    const scalar_t *wp = weight.data_ptr<scalar_t>(),
                   *xp = x.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    for_pixel_chunks(x.size(0), n, [&](int64_t b, int64_t, int64_t i0,
                                       int64_t i1) {
      scalar_t* ob = op + b * outs * n;
      for (int64_t o = 0; o < outs; ++o)
        std::fill(ob + o * n + i0, ob + o * n + i1, scalar_t(0));
      // Four channels per update of an output row: a quarter of the
      // output loads and stores of one channel at a time.
      const scalar_t* xb = xp + b * channels * n;
      int64_t c = 0;
      for (; c + 4 <= channels; c += 4) {
        const scalar_t *x0 = xb + c * n, *x1 = x0 + n, *x2 = x1 + n,
                       *x3 = x2 + n;
        for (int64_t o = 0; o < outs; ++o) {
          const scalar_t* w = wp + o * channels + c;
          const scalar_t w0 = w[0], w1 = w[1], w2 = w[2], w3 = w[3];
          scalar_t* orow = ob + o * n;
          _Pragma("omp simd")
          for (int64_t i = i0; i < i1; ++i)
            orow[i] += w0 * x0[i] + w1 * x1[i] + w2 * x2[i] + w3 * x3[i];
        }
      }
      for (; c < channels; ++c) {
        const scalar_t* xr = xb + c * n;
        for (int64_t o = 0; o < outs; ++o) {
          const scalar_t w = wp[o * channels + c];
          scalar_t* orow = ob + o * n;
          _Pragma("omp simd")
          for (int64_t i = i0; i < i1; ++i) orow[i] += w * xr[i];
        }
      }
    }, size);
  });
  return out;
}

// relu(z * scale[c] + shift[c]) (an eval BatchNorm and its ReLU), written
// out, and that map's few_maps_product with weight in the same pass: Spatial
// Bias's squeeze of conv1's output in inference, where the plain ops write
// the norm's output, rewrite it with the ReLU and read it again.
std::vector<torch::Tensor> scale_shift_relu_few_maps(torch::Tensor z,
                                                     torch::Tensor scale,
                                                     torch::Tensor shift,
                                                     torch::Tensor weight) {
  check_few_maps(weight, z);
  const int64_t outs = weight.size(0), channels = z.size(1),
                n = z.size(2) * z.size(3);
  auto out = torch::empty_like(z);
  auto maps = torch::empty({z.size(0), outs, z.size(2), z.size(3)},
                           z.options());
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "scale_shift_relu_few_maps",
                             [&] {
    auto sc = values_like(scale, z), sh = values_like(shift, z);
    const scalar_t *wp = weight.data_ptr<scalar_t>(),
                   *zp = z.data_ptr<scalar_t>(),
                   *scp = sc.data_ptr<scalar_t>(), *shp = sh.data_ptr<scalar_t>();
    scalar_t *op = out.data_ptr<scalar_t>(), *mp = maps.data_ptr<scalar_t>();
    for_pixel_chunks(z.size(0), n, [&](int64_t b, int64_t, int64_t i0,
                                       int64_t i1) {
      scalar_t* mb = mp + b * outs * n;
      for (int64_t o = 0; o < outs; ++o)
        std::fill(mb + o * n + i0, mb + o * n + i1, scalar_t(0));
      for (int64_t c = 0; c < channels; ++c) {
        const int64_t row = (b * channels + c) * n;
        const scalar_t *zr = zp + row, a = scp[c], s = shp[c];
        scalar_t* orow = op + row;
        _Pragma("omp simd")
        for (int64_t i = i0; i < i1; ++i) {
          const scalar_t v = zr[i] * a + s;
          orow[i] = v > scalar_t(0) ? v : scalar_t(0);
        }
        for (int64_t o = 0; o < outs; ++o) {
          const scalar_t w = wp[o * channels + c];
          scalar_t* mrow = mb + o * n;
          _Pragma("omp simd")
          for (int64_t i = i0; i < i1; ++i) mrow[i] += w * orow[i];
        }
      }
    });
  });
  return {out, maps};
}

// Per chunk [i0, i1) of one image's pixels: the dot products of each of
// the outs gradient rows (grads, (outs, n)) with the maps' rows (maps,
// (channels, n)), four channels per gradient row read, into task[o *
// channels + c] for the channels of whole groups of four; returns the first
// channel left (the callers take the rest with their per-channel pass).
template <typename scalar_t>
static int64_t dots_by_four(const scalar_t* maps, const scalar_t* grads,
                            int64_t channels, int64_t outs, int64_t n,
                            int64_t i0, int64_t i1, double* task) {
  int64_t c4 = 0;
  for (; c4 + 4 <= channels; c4 += 4) {
    const scalar_t *x0 = maps + c4 * n, *x1 = x0 + n, *x2 = x1 + n,
                   *x3 = x2 + n;
    for (int64_t o = 0; o < outs; ++o) {
      const scalar_t* grow = grads + o * n;
      scalar_t d0 = 0, d1 = 0, d2 = 0, d3 = 0;
      _Pragma("omp simd reduction(+ : d0, d1, d2, d3)")
      for (int64_t i = i0; i < i1; ++i) {
        d0 += grow[i] * x0[i];
        d1 += grow[i] * x1[i];
        d2 += grow[i] * x2[i];
        d3 += grow[i] * x3[i];
      }
      double* t = task + o * channels + c4;
      t[0] = d0, t[1] = d1, t[2] = d2, t[3] = d3;
    }
  }
  return c4;
}

// few_maps_product's backward in one pass over x and grad: the gradient of
// x (per channel, the O gradient rows weighted by the channel's weights)
// and of the weight (per task, the chunk's dot products of the O gradient
// rows with every channel's row, summed over tasks in double).
std::vector<torch::Tensor> few_maps_product_backward(torch::Tensor weight,
                                                     torch::Tensor x,
                                                     torch::Tensor grad,
                                                     bool need_weight,
                                                     bool need_x) {
  check_few_maps(weight, x);
  const int64_t size = kChunk;
  const int64_t batch = x.size(0), outs = weight.size(0),
                channels = x.size(1), n = x.size(2) * x.size(3);
  TORCH_CHECK(grad.device().is_cpu() && grad.is_contiguous() &&
                  grad.scalar_type() == x.scalar_type() &&
                  grad.numel() == batch * outs * n,
              "grad must be a contiguous CPU (B, O, H, W) tensor");
  const int64_t tasks = batch * ((n + size - 1) / size);
  auto grad_x = need_x ? torch::empty_like(x) : torch::Tensor();
  auto partial = need_weight
      ? torch::zeros({tasks, outs, channels}, x.options().dtype(torch::kFloat64))
      : torch::Tensor();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "few_maps_product_backward",
                             [&] {
    const scalar_t *wp = weight.data_ptr<scalar_t>(),
                   *xp = x.data_ptr<scalar_t>(),
                   *gp = grad.data_ptr<scalar_t>();
    scalar_t* gxp = need_x ? grad_x.data_ptr<scalar_t>() : nullptr;
    double* pp = need_weight ? partial.data_ptr<double>() : nullptr;
    const int64_t chunks = (n + size - 1) / size;
    for_pixel_chunks(batch, n, [&](int64_t b, int64_t chunk, int64_t i0,
                                   int64_t i1) {
      const scalar_t* gb = gp + b * outs * n;
      double* task = need_weight ? pp + (b * chunks + chunk) * outs * channels
                                 : nullptr;
      const int64_t c4 = need_weight
          ? dots_by_four(xp + b * channels * n, gb, channels, outs, n, i0,
                         i1, task)
          : 0;
      for (int64_t c = 0; c < channels; ++c) {
        const int64_t row = (b * channels + c) * n;
        if (need_weight && c >= c4) {
          const scalar_t* xr = xp + row;
          for (int64_t o = 0; o < outs; ++o) {
            const scalar_t* grow = gb + o * n;
            scalar_t dot = 0;
            _Pragma("omp simd reduction(+ : dot)")
            for (int64_t i = i0; i < i1; ++i) dot += grow[i] * xr[i];
            task[o * channels + c] = dot;
          }
        }
        if (need_x) {
          scalar_t* gxr = gxp + row;
          const scalar_t w0 = wp[c];
          _Pragma("omp simd")
          for (int64_t i = i0; i < i1; ++i) gxr[i] = w0 * gb[i];
          for (int64_t o = 1; o < outs; ++o) {
            const scalar_t w = wp[o * channels + c];
            const scalar_t* grow = gb + o * n;
            _Pragma("omp simd")
            for (int64_t i = i0; i < i1; ++i) gxr[i] += w * grow[i];
          }
        }
      }
    }, size);
  });
  auto grad_weight = need_weight
      ? partial.sum(0).to(x.scalar_type()) : torch::Tensor();
  return {grad_weight, grad_x};
}

// Spatial Bias's block tail: u = z + weight @ maps, that is at pixel i of
// row (b, c) z's value plus sum_j weight[c, j] * maps[b, j, i], where conv3
// ran on conv2's channels only (z) and the k bias maps enter as a rank-k
// term; u is never written out.
void check_rank(const torch::Tensor& weight, const torch::Tensor& maps,
                const torch::Tensor& z) {
  TORCH_CHECK(z.dim() == 4, "z must be (B, C, H, W)");
  check_map(z, z, "z");
  TORCH_CHECK(weight.device().is_cpu() && weight.dim() == 2 &&
                  weight.size(0) == z.size(1) &&
                  weight.scalar_type() == z.scalar_type(),
              "weight must be a CPU (C, k) tensor for z");
  TORCH_CHECK(maps.device().is_cpu() && maps.is_contiguous() &&
                  maps.scalar_type() == z.scalar_type() &&
                  maps.dim() == 4 && maps.size(0) == z.size(0) &&
                  maps.size(1) == weight.size(1) &&
                  maps.size(2) == z.size(2) && maps.size(3) == z.size(3),
              "maps must be a contiguous CPU (B, k, H, W) tensor for z");
}

// u's value at pixel i of a row: z's plus sum_j w[j] * maps[j * n + i]
// (the row's image's maps). K >= 0 fixes k at compile time, so that the sum
// unrolls inside the vectorised pixel loops (K = 0: u is z); K = -1 takes k
// at run time.
template <int K, typename scalar_t>
inline scalar_t rank_at(const scalar_t* zr, const scalar_t* mb,
                        const scalar_t* w, int64_t n, int64_t k, int64_t i) {
  scalar_t v = zr[i];
  const int64_t kk = K >= 0 ? K : k;
  for (int64_t j = 0; j < kk; ++j) v += w[j] * mb[j * n + i];
  return v;
}

// f(std::integral_constant<int, K>) with K = k for k up to 6 (the paper's
// range), else K = -1.
template <typename F>
void dispatch_rank(int64_t k, F f) {
  switch (k) {
    case 0: f(std::integral_constant<int, 0>()); break;
    case 1: f(std::integral_constant<int, 1>()); break;
    case 2: f(std::integral_constant<int, 2>()); break;
    case 3: f(std::integral_constant<int, 3>()); break;
    case 4: f(std::integral_constant<int, 4>()); break;
    case 5: f(std::integral_constant<int, 5>()); break;
    case 6: f(std::integral_constant<int, 6>()); break;
    default: f(std::integral_constant<int, -1>());
  }
}

// Spatial Bias's bn1 + ReLU + squeeze in training (mmctx/models/
// norm_squeeze.py), backward. At bn1's output (out, the ReLU's output) the
// gradient is grad plus the squeeze's, weight^T grad_maps, through ReLU's
// mask: g = (out > 0) (grad + weight^T grad_maps), formed per pixel (the
// squeeze's few maps as a rank term, rank_at) and never written out. The
// plain ops write the squeeze's gradient, add it to conv2's, write the
// ReLU's and read that twice in BatchNorm's backward.
void check_squeeze_grads(const torch::Tensor& weight, const torch::Tensor& x,
                         const torch::Tensor& grad, const torch::Tensor& out,
                         const torch::Tensor& grad_maps) {
  check_few_maps(weight, x);
  check_map(grad, x, "grad");
  check_map(out, x, "out");
  TORCH_CHECK(grad_maps.device().is_cpu() && grad_maps.is_contiguous() &&
                  grad_maps.scalar_type() == x.scalar_type() &&
                  grad_maps.numel() ==
                      x.size(0) * weight.size(0) * x.size(2) * x.size(3),
              "grad_maps must be a contiguous CPU (B, O, H, W) tensor");
}

// Per row (b, c): the sum of g and its dot product with x (bn1's input), in
// double (float over each chunk); with need_weight the squeeze weight's
// gradient, (O, C): sum over pixels of grad_maps[b, o] * out[b, c].
std::vector<torch::Tensor> relu_few_maps_grad_moments(
    torch::Tensor grad, torch::Tensor out, torch::Tensor x,
    torch::Tensor weight, torch::Tensor grad_maps, bool need_weight) {
  check_squeeze_grads(weight, x, grad, out, grad_maps);
  const int64_t size = kChunk;
  const int64_t batch = x.size(0), outs = weight.size(0),
                channels = x.size(1), n = x.size(2) * x.size(3),
                chunks = (n + size - 1) / size, tasks = batch * chunks;
  auto opts = x.options().dtype(torch::kFloat64);
  auto sums = torch::empty({batch, chunks, channels}, opts);
  auto dots = torch::empty({batch, chunks, channels}, opts);
  auto partial = need_weight ? torch::empty({tasks, outs, channels}, opts)
                             : torch::Tensor();
  auto per_channel = weight.t().contiguous();  // (C, O)
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "relu_few_maps_grad_moments",
                             [&] {
    const scalar_t *wp = per_channel.data_ptr<scalar_t>(),
                   *xp = x.data_ptr<scalar_t>(), *gp = grad.data_ptr<scalar_t>(),
                   *op = out.data_ptr<scalar_t>(),
                   *gmp = grad_maps.data_ptr<scalar_t>();
    double *sp = sums.data_ptr<double>(), *dp = dots.data_ptr<double>();
    double* pp = need_weight ? partial.data_ptr<double>() : nullptr;
    dispatch_rank(outs, [&](auto rank) {
      constexpr int K = decltype(rank)::value;
      for_pixel_chunks(batch, n, [&](int64_t b, int64_t chunk, int64_t i0,
                                     int64_t i1) {
        const int64_t t = b * chunks + chunk;
        const scalar_t* gmb = gmp + b * outs * n;
        double* task = need_weight ? pp + t * outs * channels : nullptr;
        // the squeeze weight's gradient
        const int64_t c4 = need_weight
            ? dots_by_four(op + b * channels * n, gmb, channels, outs, n, i0,
                           i1, task)
            : 0;
        for (int64_t c = 0; c < channels; ++c) {
          const int64_t row = (b * channels + c) * n;
          const scalar_t *orow = op + row, *xr = xp + row, *gr = gp + row,
                         *wc = wp + c * outs;
          if (need_weight && c >= c4) {
            for (int64_t o = 0; o < outs; ++o) {
              const scalar_t* gm = gmb + o * n;
              scalar_t d = 0;
              _Pragma("omp simd reduction(+ : d)")
              for (int64_t i = i0; i < i1; ++i) d += gm[i] * orow[i];
              task[o * channels + c] = d;
            }
          }
          scalar_t s = 0, d = 0;
          _Pragma("omp simd reduction(+ : s, d)")
          for (int64_t i = i0; i < i1; ++i) {
            const scalar_t g = rank_at<K>(gr, gmb, wc, n, outs, i);
            const scalar_t v = orow[i] > scalar_t(0) ? g : scalar_t(0);
            s += v;
            d += v * xr[i];
          }
          sp[t * channels + c] = s;
          dp[t * channels + c] = d;
        }
      }, size);
    });
  });
  auto grad_weight = need_weight
      ? partial.sum(0).to(x.scalar_type()) : torch::Tensor();
  return {sums.sum(1), dots.sum(1), grad_weight};
}

// x's gradient through bn1: g_scale[c] * g + x_scale[c] * x + shift[c].
torch::Tensor relu_few_maps_combine(torch::Tensor grad, torch::Tensor out,
                                    torch::Tensor x, torch::Tensor weight,
                                    torch::Tensor grad_maps,
                                    torch::Tensor g_scale,
                                    torch::Tensor x_scale,
                                    torch::Tensor shift) {
  check_squeeze_grads(weight, x, grad, out, grad_maps);
  const int64_t size = kChunk;
  const int64_t batch = x.size(0), outs = weight.size(0),
                channels = x.size(1), n = x.size(2) * x.size(3);
  auto result = torch::empty_like(x);
  auto per_channel = weight.t().contiguous();  // (C, O)
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "relu_few_maps_combine", [&] {
    auto gs = values_like(g_scale, x), xs = values_like(x_scale, x),
         sh = values_like(shift, x);
    const scalar_t *wp = per_channel.data_ptr<scalar_t>(),
                   *xp = x.data_ptr<scalar_t>(), *gp = grad.data_ptr<scalar_t>(),
                   *op = out.data_ptr<scalar_t>(),
                   *gmp = grad_maps.data_ptr<scalar_t>(),
                   *gsp = gs.data_ptr<scalar_t>(), *xsp = xs.data_ptr<scalar_t>(),
                   *shp = sh.data_ptr<scalar_t>();
    scalar_t* rp = result.data_ptr<scalar_t>();
    dispatch_rank(outs, [&](auto rank) {
      constexpr int K = decltype(rank)::value;
      for_pixel_chunks(batch, n, [&](int64_t b, int64_t, int64_t i0,
                                     int64_t i1) {
        const scalar_t* gmb = gmp + b * outs * n;
        for (int64_t c = 0; c < channels; ++c) {
          const int64_t row = (b * channels + c) * n;
          const scalar_t *orow = op + row, *xr = xp + row, *gr = gp + row,
                         *wc = wp + c * outs;
          scalar_t* rr = rp + row;
          const scalar_t a = gsp[c], bx = xsp[c], s = shp[c];
          _Pragma("omp simd")
          for (int64_t i = i0; i < i1; ++i) {
            const scalar_t g = rank_at<K>(gr, gmb, wc, n, outs, i);
            rr[i] = (orow[i] > scalar_t(0) ? a * g : scalar_t(0)) +
                    bx * xr[i] + s;
          }
        }
      }, size);
    });
  });
  return result;
}

// Two sums per row r of n values, into s1[r] and s2[r] (double): chunk(r,
// c0, c1) returns a chunk's two sums, taken in float (vectorised), added
// up in double.
template <typename scalar_t, typename F>
void for_row_sums(int64_t rows, int64_t n, double* s1, double* s2, F chunk) {
  at::parallel_for(0, rows, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      double a = 0, b = 0;
      for (int64_t c0 = 0; c0 < n; c0 += kChunk) {
        const std::pair<scalar_t, scalar_t> sums =
            chunk(r, c0, std::min(n, c0 + kChunk));
        a += sums.first;
        b += sums.second;
      }
      s1[r] = a;
      s2[r] = b;
    }
  });
}

// Per row of u: its sum and its sum of squares, (B, C) in double.
std::vector<torch::Tensor> rank_row_moments(torch::Tensor z,
                                            torch::Tensor weight,
                                            torch::Tensor maps) {
  check_rank(weight, maps, z);
  const int64_t channels = z.size(1), rows = z.size(0) * channels,
                n = z.numel() / rows, k = weight.size(1);
  auto opts = z.options().dtype(torch::kFloat64);
  auto sums = torch::empty({z.size(0), channels}, opts);
  auto squares = torch::empty({z.size(0), channels}, opts);
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "rank_row_moments", [&] {
    auto w = weight.contiguous();
    const scalar_t *zp = z.data_ptr<scalar_t>(), *mp = maps.data_ptr<scalar_t>(),
                   *wp = w.data_ptr<scalar_t>();
    double *s1 = sums.data_ptr<double>(), *s2 = squares.data_ptr<double>();
    dispatch_rank(k, [&](auto rank) {
      constexpr int K = decltype(rank)::value;
      for_row_sums<scalar_t>(rows, n, s1, s2, [&](int64_t r, int64_t c0,
                                                  int64_t c1) {
        const scalar_t *zr = zp + r * n, *mb = mp + (r / channels) * k * n,
                       *wr = wp + (r % channels) * k;
        scalar_t ca = 0, cb = 0;
        _Pragma("omp simd reduction(+ : ca, cb)")
        for (int64_t i = c0; i < c1; ++i) {
          const scalar_t v = rank_at<K>(zr, mb, wr, n, k, i);
          ca += v;
          cb += v * v;
        }
        return std::make_pair(ca, cb);
      });
    });
  });
  return {sums, squares};
}

// relu(identity + u * scale[c] + shift[c]) into out (z itself for in
// place): bn3 (the batch's statistics in training, running ones in
// inference), the residual add and the ReLU in one pass. With
// identity_scale and identity_shift the identity enters as identity *
// identity_scale[c] + identity_shift[c]: an eval BatchNorm of the
// downsample's conv in the same pass.
torch::Tensor rank_scale_shift_add_relu(torch::Tensor z,
                                        torch::Tensor identity,
                                        torch::Tensor scale,
                                        torch::Tensor shift,
                                        torch::Tensor weight,
                                        torch::Tensor maps,
                                        torch::Tensor out,
                                        c10::optional<torch::Tensor> identity_scale,
                                        c10::optional<torch::Tensor> identity_shift) {
  check_rank(weight, maps, z);
  check_map(identity, z, "identity");
  check_map(out, z, "out");
  TORCH_CHECK(identity_scale.has_value() == identity_shift.has_value(),
              "identity_scale and identity_shift go together");
  const int64_t channels = z.size(1), rows = z.size(0) * channels,
                n = z.numel() / rows, k = weight.size(1);
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "rank_scale_shift_add_relu",
                             [&] {
    auto sc = values_like(scale, z), sh = values_like(shift, z),
         w = weight.contiguous();
    auto isc = identity_scale ? values_like(*identity_scale, z)
                              : torch::ones({channels}, z.options());
    auto ish = identity_shift ? values_like(*identity_shift, z)
                              : torch::zeros({channels}, z.options());
    const scalar_t *zp = z.data_ptr<scalar_t>(), *mp = maps.data_ptr<scalar_t>(),
                   *wp = w.data_ptr<scalar_t>(), *ip = identity.data_ptr<scalar_t>(),
                   *scp = sc.data_ptr<scalar_t>(), *shp = sh.data_ptr<scalar_t>(),
                   *iscp = isc.data_ptr<scalar_t>(), *ishp = ish.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    dispatch_rank(k, [&](auto rank) {
      constexpr int K = decltype(rank)::value;
      at::parallel_for(0, rows, 1, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
          const int64_t c = r % channels;
          const scalar_t *zr = zp + r * n, *mb = mp + (r / channels) * k * n,
                         *wr = wp + c * k, *ir = ip + r * n;
          scalar_t* orow = op + r * n;  // may be zr: each value read first
          // (x * 1 + 0 is x: without the identity's affine map the sum is
          // the plain one)
          const scalar_t a = scp[c], s0 = shp[c], ia = iscp[c], ib = ishp[c];
          _Pragma("omp simd")
          for (int64_t i = 0; i < n; ++i) {
            const scalar_t v = (ir[i] * ia + ib) +
                               (rank_at<K>(zr, mb, wr, n, k, i) * a + s0);
            orow[i] = v > scalar_t(0) ? v : scalar_t(0);
          }
        }
      });
    });
  });
  return out;
}

// The backward's first pass over u = z + weight @ maps: ReLU's backward,
// masked = grad * (out > 0), written out (it is the identity's gradient),
// and per row (double) its sum and its dot product with u.
std::vector<torch::Tensor> rank_relu_grad_moments(torch::Tensor grad,
                                                  torch::Tensor out,
                                                  torch::Tensor z,
                                                  torch::Tensor weight,
                                                  torch::Tensor maps) {
  check_rank(weight, maps, z);
  check_map(grad, z, "grad");
  check_map(out, z, "out");
  const int64_t batch = z.size(0), channels = z.size(1), k = weight.size(1),
                rows = batch * channels, n = z.numel() / rows;
  auto masked = torch::empty_like(z);
  auto opts = z.options().dtype(torch::kFloat64);
  auto sums = torch::empty({batch, channels}, opts);
  auto dots = torch::empty({batch, channels}, opts);
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "rank_relu_grad_moments", [&] {
    auto w = weight.contiguous();
    const scalar_t *gp = grad.data_ptr<scalar_t>(), *op = out.data_ptr<scalar_t>(),
                   *zp = z.data_ptr<scalar_t>(), *mp = maps.data_ptr<scalar_t>(),
                   *wp = w.data_ptr<scalar_t>();
    scalar_t* gm = masked.data_ptr<scalar_t>();
    double *s1 = sums.data_ptr<double>(), *s2 = dots.data_ptr<double>();
    dispatch_rank(k, [&](auto rank) {
      constexpr int K = decltype(rank)::value;
      for_row_sums<scalar_t>(rows, n, s1, s2, [&](int64_t r, int64_t c0,
                                                  int64_t c1) {
        const scalar_t *gr = gp + r * n, *orow = op + r * n, *zr = zp + r * n,
                       *mb = mp + (r / channels) * k * n,
                       *wr = wp + (r % channels) * k;
        scalar_t* mr = gm + r * n;
        scalar_t ca = 0, cb = 0;
        _Pragma("omp simd reduction(+ : ca, cb)")
        for (int64_t i = c0; i < c1; ++i) {
          const scalar_t v = orow[i] > scalar_t(0) ? gr[i] : scalar_t(0);
          mr[i] = v;
          ca += v;
          cb += v * rank_at<K>(zr, mb, wr, n, k, i);
        }
        return std::make_pair(ca, cb);
      });
    });
  });
  return {masked, sums, dots};
}

// ReLU's backward, grad * (out > 0), written out (it is the identity's
// gradient), and per row its sum and its dot product with z (double): the
// rank-0 case of rank_relu_grad_moments (Gather-Excite's tail).
std::vector<torch::Tensor> relu_grad_moments(torch::Tensor grad,
                                             torch::Tensor out,
                                             torch::Tensor z) {
  TORCH_CHECK(z.dim() == 4, "z must be (B, C, H, W)");
  return rank_relu_grad_moments(
      grad, out, z, z.new_empty({z.size(1), 0}),
      z.new_empty({z.size(0), 0, z.size(2), z.size(3)}));
}

// The backward's second pass: u's gradient, g = grad_scale[r] * masked +
// u_scale[c] * u + shift[r] per row r (channel c); the maps' gradient, per
// image and pixel the sum over channels c of weight[c, j] * g; and
// weight's, (C, k) in double, per channel the sum over images and pixels
// of g * maps[b, j].
std::vector<torch::Tensor> rank_combine(torch::Tensor masked, torch::Tensor z,
                                        torch::Tensor weight,
                                        torch::Tensor maps,
                                        torch::Tensor grad_scale,
                                        torch::Tensor u_scale,
                                        torch::Tensor shift) {
  check_rank(weight, maps, z);
  check_map(masked, z, "masked");
  const int64_t batch = z.size(0), channels = z.size(1), k = weight.size(1),
                n = z.numel() / batch / channels;
  auto grad_u = torch::empty_like(z);
  auto grad_maps = torch::empty_like(maps);
  // per thread, summed at the end: the tasks of all threads touch every
  // channel
  auto partial = torch::zeros({at::get_num_threads(), channels, k},
                              z.options().dtype(torch::kFloat64));
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "rank_combine", [&] {
    auto gs = values_like(grad_scale, z), us = values_like(u_scale, z),
         sh = values_like(shift, z), w = weight.contiguous();
    const scalar_t *gp = masked.data_ptr<scalar_t>(), *zp = z.data_ptr<scalar_t>(),
                   *mp = maps.data_ptr<scalar_t>(), *wp = w.data_ptr<scalar_t>(),
                   *gsp = gs.data_ptr<scalar_t>(), *usp = us.data_ptr<scalar_t>(),
                   *shp = sh.data_ptr<scalar_t>();
    scalar_t *rp = grad_u.data_ptr<scalar_t>(), *gmp = grad_maps.data_ptr<scalar_t>();
    double* pp = partial.data_ptr<double>();
    dispatch_rank(k, [&](auto rank) {
      constexpr int K = decltype(rank)::value;
      for_pixel_chunks(batch, n, [&](int64_t b, int64_t, int64_t i0,
                                     int64_t i1) {
        const int64_t len = i1 - i0;
        const scalar_t* mb = mp + b * k * n;
        scalar_t* gmb = gmp + b * k * n + i0;
        double* pt = pp + at::get_thread_num() * channels * k;
        for (int64_t j = 0; j < k; ++j)
          std::fill(gmb + j * n, gmb + j * n + len, scalar_t(0));
        scalar_t g[kChunk];
        for (int64_t c = 0; c < channels; ++c) {
          const int64_t r = b * channels + c;
          const scalar_t *zr = zp + r * n, *gr = gp + r * n + i0,
                         *wr = wp + c * k;
          scalar_t* rr = rp + r * n + i0;
          const scalar_t a = gsp[r], bu = usp[c], s0 = shp[r];
          _Pragma("omp simd")
          for (int64_t i = 0; i < len; ++i) {
            g[i] = a * gr[i] + bu * rank_at<K>(zr, mb, wr, n, k, i0 + i) + s0;
            rr[i] = g[i];
          }
          for (int64_t j = 0; j < k; ++j) {
            const scalar_t wj = wr[j], *mj = mb + j * n + i0;
            scalar_t* gmj = gmb + j * n;
            scalar_t d = 0;
            _Pragma("omp simd reduction(+ : d)")
            for (int64_t i = 0; i < len; ++i) {
              gmj[i] += wj * g[i];
              d += g[i] * mj[i];
            }
            pt[c * k + j] += d;
          }
        }
      });
    });
  });
  return {grad_u, grad_maps, partial.sum(0)};
}

// Spatial Bias's branch in inference, after its squeeze conv: the squeezed
// maps' eval BatchNorm and ReLU and the adaptive pooling to the (r, r) grid
// in one read (pool_windows' windows, as adaptive_avg_pool2d /
// adaptive_max_pool2d), written as the windows of the kernel-3 Conv1d
// that slides along the maps: out[b, c, p, t] = pooled[b, c + t, p] for
// the k = C - 2 output maps, so that the Conv1d is one GEMM of (B * k,
// 3 r^2) rows with its (r^2, r^2 * 3) weight.
torch::Tensor scale_shift_relu_pool_windows(torch::Tensor z,
                                            torch::Tensor scale,
                                            torch::Tensor shift, int64_t r,
                                            bool max_pool) {
  TORCH_CHECK(z.dim() == 4 && z.device().is_cpu() && z.is_contiguous() &&
                  z.size(1) >= 3,
              "z must be a contiguous CPU (B, C, H, W) tensor, C >= 3");
  TORCH_CHECK(r >= 1, "r must be positive");
  const int64_t batch = z.size(0), channels = z.size(1), height = z.size(2),
                width = z.size(3), k = channels - 2;
  const auto rows = pool_windows(height, r), cols = pool_windows(width, r);
  const auto holders = window_holders(rows, height);
  auto out = torch::empty({batch, k, r * r, 3}, z.options());
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "scale_shift_relu_pool", [&] {
    std::vector<scalar_t> inv_counts(r * r);  // 1 / each window's size
    for (int64_t i = 0; i < r; ++i)
      for (int64_t j = 0; j < r; ++j)
        inv_counts[i * r + j] =
            scalar_t(1) / scalar_t((rows[i].second - rows[i].first) *
                                   (cols[j].second - cols[j].first));
    auto sc = values_like(scale, z), sh = values_like(shift, z);
    const scalar_t *zp = z.data_ptr<scalar_t>(),
                   *scp = sc.data_ptr<scalar_t>(), *shp = sh.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    // (little work in one thread: the threads' start costs more; a
    // window costs about 8 input values)
    const int64_t grain =
        std::max<int64_t>(1, kSerial / (height * width + 8 * r * r));
    at::parallel_for(0, batch * channels, grain, [&](int64_t p0,
                                                     int64_t p1) {
      // (r, W): each input row folded into its windows' rows first
      std::vector<scalar_t> acc(r * width), row(width);
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t b = p / channels, c = p % channels;
        const scalar_t a = scp[c], s = shp[c];
        std::fill(acc.begin(), acc.end(), scalar_t(0));
        const scalar_t* zr = zp + p * height * width;
        for (int64_t y = 0; y < height; ++y) {
          _Pragma("omp simd")
          for (int64_t x = 0; x < width; ++x) {
            const scalar_t v = zr[y * width + x] * a + s;
            row[x] = v > scalar_t(0) ? v : scalar_t(0);
          }
          for (const int64_t i : holders[y]) {
            scalar_t* ar = acc.data() + i * width;
            if (max_pool) {
              // (acc starts at 0 = the ReLU's floor, so 0 is a max's floor)
              _Pragma("omp simd")
              for (int64_t x = 0; x < width; ++x)
                ar[x] = row[x] > ar[x] ? row[x] : ar[x];
            } else {
              _Pragma("omp simd")
              for (int64_t x = 0; x < width; ++x) ar[x] += row[x];
            }
          }
        }
        // pooled[b, c, i * r + j] is window t = c - m of output map m
        const int64_t t0 = std::max<int64_t>(0, c - k + 1),
                      t1 = std::min<int64_t>(2, c);
        scalar_t* ob = op + b * k * r * r * 3;
        for (int64_t i = 0; i < r; ++i) {
          const scalar_t* ar = acc.data() + i * width;
          for (int64_t j = 0; j < r; ++j) {
            const auto [start, end] = cols[j];
            scalar_t v = 0;
            if (max_pool) {
              for (int64_t x = start; x < end; ++x) v = ar[x] > v ? ar[x] : v;
            } else {
              for (int64_t x = start; x < end; ++x) v += ar[x];
              v *= inv_counts[i * r + j];
            }
            for (int64_t t = t0; t <= t1; ++t)
              ob[((c - t) * r * r + i * r + j) * 3 + t] = v;
          }
        }
      }
    });
  });
  return out;
}

// Bilinear resampling's source pair and weights along one axis, in -> out
// values, as F.interpolate(mode='bilinear', align_corners=False) with an
// output size: source position (o + 0.5) in / out - 0.5, clamped at 0,
// computed in T (PyTorch's: the map's float type).
template <typename T>
struct Lerp {
  int64_t i0, i1;
  T w0, w1;
};

template <typename T>
static std::vector<Lerp<T>> bilinear_lerps(int64_t in, int64_t out) {
  std::vector<Lerp<T>> lerps(out);
  const T scale = T(in) / T(out);
  for (int64_t o = 0; o < out; ++o) {
    T src = scale * (T(o) + T(0.5)) - T(0.5);
    if (src < 0) src = 0;
    const int64_t i0 = std::min<int64_t>(int64_t(src), in - 1);
    const int64_t i1 = i0 + (i0 < in - 1 ? 1 : 0);
    const T w1 = src - T(i0);
    lerps[o] = {i0, i1, T(1) - w1, w1};
  }
  return lerps;
}

// relu(upsample(maps) * scale[c] + shift[c]) (the ReLU if `relu`): Spatial
// Bias's (B, k, r, r) bias maps resized bilinearly to (height, width) and
// passed through the block's eval bn2 (its bias channels) and ReLU in one
// write. Rows of the output planes are split among threads; each task
// first resamples its plane's r rows along W.
static torch::Tensor upsample_scale_shift(torch::Tensor maps, int64_t height,
                                          int64_t width, torch::Tensor scale,
                                          torch::Tensor shift, bool relu) {
  TORCH_CHECK(maps.dim() == 4 && maps.device().is_cpu() &&
                  maps.is_contiguous(),
              "maps must be a contiguous CPU (B, k, h, w) tensor");
  TORCH_CHECK(height >= 1 && width >= 1, "the size must be positive");
  const int64_t channels = maps.size(1), planes = maps.size(0) * channels,
                h = maps.size(2), w = maps.size(3);
  auto out = torch::empty({maps.size(0), channels, height, width},
                          maps.options());
  AT_DISPATCH_FLOATING_TYPES(maps.scalar_type(), "upsample_scale_shift", [&] {
    const auto ys = bilinear_lerps<scalar_t>(h, height),
               xs = bilinear_lerps<scalar_t>(w, width);
    auto sc = values_like(scale, maps), sh = values_like(shift, maps);
    const scalar_t *mp = maps.data_ptr<scalar_t>(),
                   *scp = sc.data_ptr<scalar_t>(), *shp = sh.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    std::vector<int64_t> x0(width), x1(width);
    std::vector<scalar_t> wx0(width), wx1(width);
    for (int64_t x = 0; x < width; ++x) {
      x0[x] = xs[x].i0;
      x1[x] = xs[x].i1;
      wx0[x] = xs[x].w0;
      wx1[x] = xs[x].w1;
    }
    const int64_t grain = std::max<int64_t>(height, kSerial / width);
    at::parallel_for(0, planes * height, grain, [&](int64_t q0, int64_t q1) {
      std::vector<scalar_t> across(h * width);  // the plane's rows along W
      int64_t plane = -1;
      for (int64_t q = q0; q < q1; ++q) {
        const int64_t p = q / height, y = q % height;
        if (p != plane) {
          plane = p;
          const scalar_t* src = mp + p * h * w;
          for (int64_t i = 0; i < h; ++i) {
            const scalar_t* sr = src + i * w;
            scalar_t* ar = across.data() + i * width;
            for (int64_t x = 0; x < width; ++x)
              ar[x] = wx0[x] * sr[x0[x]] + wx1[x] * sr[x1[x]];
          }
        }
        const scalar_t a = scp[p % channels], s = shp[p % channels];
        const scalar_t w0 = ys[y].w0, w1 = ys[y].w1;
        const scalar_t *r0 = across.data() + ys[y].i0 * width,
                       *r1 = across.data() + ys[y].i1 * width;
        scalar_t* orow = op + q * width;
        _Pragma("omp simd")
        for (int64_t x = 0; x < width; ++x) {
          const scalar_t v = (w0 * r0[x] + w1 * r1[x]) * a + s;
          orow[x] = !relu || v > scalar_t(0) ? v : scalar_t(0);
        }
      }
    });
  });
  return out;
}

torch::Tensor upsample_scale_shift_relu(torch::Tensor maps, int64_t height,
                                        int64_t width, torch::Tensor scale,
                                        torch::Tensor shift) {
  return upsample_scale_shift(maps, height, width, scale, shift, true);
}

// Spatial Bias's branch in training, after its squeeze conv (see
// mmctx/models/bias_maps.py): a BatchNorm (`norm`) and ReLU of the
// squeezed maps (B, k + 2, H, W), adaptive average pooling to (r, r), the
// kernel-3 Conv1d along the maps (one GEMM over its windows), bilinear
// resampling to (height, width), then the block's bn2 on those k channels
// (`bn`) and its ReLU. A norm with batch statistics (`*_batch`) updates
// its running ones in place (if given) with `*_factor`, as BatchNorm's
// forward; otherwise it applies them. Per-channel statistics in double.
struct ChannelAffine {
  // per channel: mean, 1 / sqrt(var + eps), and the norm as z * a + s
  std::vector<double> mean, invstd, scale, shift;
};

static ChannelAffine channel_affine(const torch::Tensor& z,
                                    const torch::Tensor& weight,
                                    const torch::Tensor& bias,
                                    const c10::optional<torch::Tensor>& mean,
                                    const c10::optional<torch::Tensor>& var,
                                    bool batch_stats, double factor,
                                    double eps) {
  const int64_t batch = z.size(0), channels = z.size(1),
                count = z.numel() / channels;
  TORCH_CHECK(weight.numel() == channels && bias.numel() == channels,
              "a norm's weight and bias must have one value per channel");
  TORCH_CHECK(bool(mean) == bool(var) &&
                  (!mean || (mean->numel() == channels &&
                             var->numel() == channels &&
                             mean->is_contiguous() && var->is_contiguous())),
              "running statistics must be both or none, one per channel");
  TORCH_CHECK(batch_stats ? count > 1 : bool(mean),
              "batch statistics need more than one value per channel, "
              "fixed ones the running statistics");
  ChannelAffine n;
  n.mean.resize(channels);
  n.invstd.resize(channels);
  std::vector<double> var_of(channels);
  if (batch_stats) {
    const auto moments = row_moments(z, c10::nullopt);
    const double *s1 = moments[0].data_ptr<double>(),
                 *s2 = moments[1].data_ptr<double>();
    for (int64_t c = 0; c < channels; ++c) {
      double a = 0, b = 0;
      for (int64_t i = 0; i < batch; ++i) {
        a += s1[i * channels + c];
        b += s2[i * channels + c];
      }
      n.mean[c] = a / count;
      var_of[c] = std::max(0.0, b / count - n.mean[c] * n.mean[c]);
    }
    if (mean) {
      // BatchNorm's update (unbiased variance), in place through the data
      // as BatchNorm's kernel does: no version bump, which would fail the
      // backward of a batch_norm that saved another slice of these buffers
      TORCH_CHECK(var->scalar_type() == mean->scalar_type(),
                  "running statistics must have one dtype");
      AT_DISPATCH_FLOATING_TYPES(mean->scalar_type(), "running_update", [&] {
        scalar_t *mp = mean->data_ptr<scalar_t>(),
                 *vp = var->data_ptr<scalar_t>();
        for (int64_t c = 0; c < channels; ++c) {
          mp[c] += factor * (n.mean[c] - double(mp[c]));
          vp[c] += factor * (var_of[c] * count / (count - 1) - double(vp[c]));
        }
      });
    }
  } else {
    auto m = mean->to(torch::kFloat64), v = var->to(torch::kFloat64);
    std::copy_n(m.data_ptr<double>(), channels, n.mean.begin());
    std::copy_n(v.data_ptr<double>(), channels, var_of.begin());
  }
  auto w = weight.to(torch::kFloat64).contiguous(),
       b = bias.to(torch::kFloat64).contiguous();
  const double *wp = w.data_ptr<double>(), *bp = b.data_ptr<double>();
  n.scale.resize(channels);
  n.shift.resize(channels);
  for (int64_t c = 0; c < channels; ++c) {
    n.invstd[c] = 1 / std::sqrt(var_of[c] + eps);
    n.scale[c] = wp[c] * n.invstd[c];
    n.shift[c] = bp[c] - n.mean[c] * n.scale[c];
  }
  return n;
}

// (4, C) float64: mean, invstd, scale, shift, the state the backward needs.
static torch::Tensor affine_state(const ChannelAffine& n) {
  const int64_t channels = n.mean.size();
  auto state = torch::empty({4, channels},
                            torch::TensorOptions().dtype(torch::kFloat64));
  double* sp = state.data_ptr<double>();
  for (const auto* row : {&n.mean, &n.invstd, &n.scale, &n.shift}) {
    std::copy(row->begin(), row->end(), sp);
    sp += channels;
  }
  return state;
}

static torch::Tensor as_tensor(const std::vector<double>& values) {
  return torch::tensor(values, torch::TensorOptions().dtype(torch::kFloat64));
}

// Returns the output (B, k, height, width), then what the backward needs:
// the resampled maps before bn2, the Conv1d's windows, the two norms'
// states (affine_state).
std::vector<torch::Tensor> bias_maps_train(
    torch::Tensor maps, torch::Tensor norm_weight, torch::Tensor norm_bias,
    c10::optional<torch::Tensor> norm_mean,
    c10::optional<torch::Tensor> norm_var, bool norm_batch,
    double norm_factor, double norm_eps, torch::Tensor mix_weight,
    torch::Tensor mix_bias, int64_t r, int64_t height, int64_t width,
    torch::Tensor bn_weight, torch::Tensor bn_bias,
    c10::optional<torch::Tensor> bn_mean,
    c10::optional<torch::Tensor> bn_var, bool bn_batch, double bn_factor,
    double bn_eps) {
  TORCH_CHECK(maps.dim() == 4 && maps.device().is_cpu() &&
                  maps.is_contiguous() && maps.size(1) >= 3,
              "maps must be a contiguous CPU (B, C, H, W) tensor, C >= 3");
  const int64_t batch = maps.size(0), k = maps.size(1) - 2;
  TORCH_CHECK(mix_weight.numel() == r * r * r * r * 3 &&
                  mix_bias.numel() == r * r,
              "mix must be a (r * r, r * r, 3) Conv1d with bias");
  const auto norm = channel_affine(maps, norm_weight, norm_bias, norm_mean,
                                   norm_var, norm_batch, norm_factor,
                                   norm_eps);
  auto windows = scale_shift_relu_pool_windows(
      maps, as_tensor(norm.scale), as_tensor(norm.shift), r, false);
  auto bias = at::addmm(values_like(mix_bias, maps),
                        windows.view({batch * k, 3 * r * r}),
                        values_like(mix_weight, maps)
                            .view({r * r, 3 * r * r}).t());
  auto ones = torch::ones({k}, torch::TensorOptions().dtype(torch::kFloat64));
  auto u = upsample_scale_shift(bias.view({batch, k, r, r}), height, width,
                                ones, torch::zeros_like(ones), false);
  const auto bn = channel_affine(u, bn_weight, bn_bias, bn_mean, bn_var,
                                 bn_batch, bn_factor, bn_eps);
  auto out = torch::empty_like(u);
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "bias_maps_train", [&] {
    const scalar_t* up = u.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const int64_t n = height * width;
    at::parallel_for(0, batch * k, std::max<int64_t>(1, kSerial / n),
                     [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) {
        const scalar_t a = bn.scale[p % k], s = bn.shift[p % k];
        const scalar_t* ur = up + p * n;
        scalar_t* orow = op + p * n;
        _Pragma("omp simd")
        for (int64_t i = 0; i < n; ++i) {
          const scalar_t v = ur[i] * a + s;
          orow[i] = v > scalar_t(0) ? v : scalar_t(0);
        }
      }
    });
  });
  return {out, u, windows, affine_state(norm), affine_state(bn)};
}

// BatchNorm's backward as z's gradient = alpha g + beta z + gamma per
// channel, from the masked gradient's sums (of g and of g z) over a
// channel's `count` values; with fixed statistics an affine map.
struct NormGrad {
  std::vector<double> alpha, beta, gamma, grad_weight, grad_bias;
};

static NormGrad norm_grad(const torch::Tensor& state,
                          const std::vector<double>& sums,
                          const std::vector<double>& dots, int64_t count,
                          bool batch_stats) {
  const int64_t channels = state.size(1);
  const double *mean = state.data_ptr<double>(), *invstd = mean + channels,
               *scale = invstd + channels;
  NormGrad g;
  for (auto* v : {&g.alpha, &g.beta, &g.gamma, &g.grad_weight,
                  &g.grad_bias})
    v->assign(channels, 0);
  for (int64_t c = 0; c < channels; ++c) {
    const double centred = dots[c] - mean[c] * sums[c];
    g.grad_weight[c] = centred * invstd[c];
    g.grad_bias[c] = sums[c];
    g.alpha[c] = scale[c];
    if (batch_stats) {
      g.beta[c] = -scale[c] * invstd[c] * invstd[c] * centred / count;
      g.gamma[c] = -g.beta[c] * mean[c] - scale[c] * sums[c] / count;
    }
  }
  return g;
}

// The gradients of bias_maps_train's inputs from its output's `grad`:
// (maps, norm weight, norm bias, mix weight (r * r, 3 r * r), mix bias,
// bn weight, bn bias). Four reads of small maps: bn2's sums over the
// output's ReLU mask, then the resampling's adjoint of u's gradient
// (per plane, rows first); the Conv1d's as GEMMs; then the squeezed maps'
// ReLU mask with the pooling's adjoint, twice (the norm's sums, then the
// maps' gradient).
std::vector<torch::Tensor> bias_maps_train_backward(
    torch::Tensor grad, torch::Tensor out, torch::Tensor u,
    torch::Tensor windows, torch::Tensor maps, torch::Tensor norm_state,
    bool norm_batch, torch::Tensor mix_weight, torch::Tensor bn_state,
    bool bn_batch, int64_t r) {
  check_map(out, u, "out");
  check_map(grad, u, "grad");
  TORCH_CHECK(maps.dim() == 4 && maps.is_contiguous() &&
                  maps.scalar_type() == u.scalar_type() &&
                  maps.size(1) == u.size(1) + 2,
              "maps must be the contiguous (B, k + 2, H, W) input");
  const int64_t batch = u.size(0), k = u.size(1), height = u.size(2),
                width = u.size(3), channels = maps.size(1),
                mh = maps.size(2), mw = maps.size(3), n = height * width;
  auto grad_bias_maps = torch::empty({batch * k, r * r}, u.options());
  std::vector<double> sums(k), dots(k), pooled(batch * channels * r * r);
  auto grad_maps = torch::empty_like(maps);
  std::vector<double> norm_sums(channels), norm_dots(channels);
  NormGrad bn, norm;
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "bias_maps_backward", [&] {
    const scalar_t *gp = grad.data_ptr<scalar_t>(),
                   *op = out.data_ptr<scalar_t>(),
                   *up = u.data_ptr<scalar_t>();
    // bn2: the masked gradient's sums per plane, then per channel
    std::vector<double> plane_sums(batch * k), plane_dots(batch * k);
    at::parallel_for(0, batch * k, std::max<int64_t>(1, kSerial / n),
                     [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) {
        double a = 0, b = 0;
        for (int64_t i = p * n; i < (p + 1) * n; ++i) {
          const double g = op[i] > scalar_t(0) ? double(gp[i]) : 0.0;
          a += g;
          b += g * up[i];
        }
        plane_sums[p] = a;
        plane_dots[p] = b;
      }
    });
    for (int64_t p = 0; p < batch * k; ++p) {
      sums[p % k] += plane_sums[p];
      dots[p % k] += plane_dots[p];
    }
    bn = norm_grad(bn_state, sums, dots, batch * n, bn_batch);
    // u's gradient through the resampling's adjoint, per plane
    const auto ys = bilinear_lerps<scalar_t>(r, height),
               xs = bilinear_lerps<scalar_t>(r, width);
    scalar_t* gv = grad_bias_maps.data_ptr<scalar_t>();
    at::parallel_for(0, batch * k, 1, [&](int64_t p0, int64_t p1) {
      std::vector<double> across(r * width), row(width), plane(r * r);
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t c = p % k;
        const double alpha = bn.alpha[c], beta = bn.beta[c],
                     gamma = bn.gamma[c];
        std::fill(across.begin(), across.end(), 0.0);
        for (int64_t y = 0; y < height; ++y) {
          const int64_t i = p * n + y * width;
          for (int64_t x = 0; x < width; ++x) {
            const double g = op[i + x] > scalar_t(0) ? double(gp[i + x]) : 0.0;
            row[x] = alpha * g + beta * up[i + x] + gamma;
          }
          double *a0 = across.data() + ys[y].i0 * width,
                 *a1 = across.data() + ys[y].i1 * width;
          const double w0 = ys[y].w0, w1 = ys[y].w1;
          for (int64_t x = 0; x < width; ++x) {
            a0[x] += w0 * row[x];
            a1[x] += w1 * row[x];
          }
        }
        std::fill(plane.begin(), plane.end(), 0.0);
        for (int64_t i = 0; i < r; ++i)
          for (int64_t x = 0; x < width; ++x) {
            const double v = across[i * width + x];
            plane[i * r + xs[x].i0] += xs[x].w0 * v;
            plane[i * r + xs[x].i1] += xs[x].w1 * v;
          }
        for (int64_t j = 0; j < r * r; ++j) gv[p * r * r + j] = plane[j];
      }
    });
  });
  // the Conv1d: one GEMM each for its weight's and its windows' gradients
  auto windows2d = windows.view({batch * k, 3 * r * r});
  auto grad_mix_weight = grad_bias_maps.t().mm(windows2d);
  auto grad_mix_bias = grad_bias_maps.sum(0);
  auto grad_windows = grad_bias_maps.mm(
      values_like(mix_weight, maps).view({r * r, 3 * r * r}));
  AT_DISPATCH_FLOATING_TYPES(maps.scalar_type(), "bias_maps_backward", [&] {
    // the windows' adjoint: pooled[b, m + t, q] gets window t of map m
    const scalar_t* gw = grad_windows.data_ptr<scalar_t>();
    for (int64_t b = 0; b < batch; ++b)
      for (int64_t m = 0; m < k; ++m)
        for (int64_t q = 0; q < r * r; ++q)
          for (int64_t t = 0; t < 3; ++t)
            pooled[((b * channels) + m + t) * r * r + q] +=
                gw[((b * k + m) * r * r + q) * 3 + t];
    const auto rows = pool_windows(mh, r), cols = pool_windows(mw, r);
    const auto holders = window_holders(rows, mh);
    const double *state = norm_state.data_ptr<double>();
    const double *scale = state + 2 * channels, *shift = state + 3 * channels;
    const scalar_t* mp = maps.data_ptr<scalar_t>();
    const int64_t mn = mh * mw;
    // per plane: the pooling's adjoint along W per window row, (r, W);
    // each input row's gradient is its windows' rows summed, masked by the
    // ReLU of the forward (the same float arithmetic)
    auto for_rows = [&](int64_t p, auto&& f) {
      std::vector<double> expanded(r * mw, 0.0), row(mw);
      const double* gpool = pooled.data() + p * r * r;
      for (int64_t i = 0; i < r; ++i)
        for (int64_t j = 0; j < r; ++j) {
          const double v =
              gpool[i * r + j] /
              double((rows[i].second - rows[i].first) *
                     (cols[j].second - cols[j].first));
          for (int64_t x = cols[j].first; x < cols[j].second; ++x)
            expanded[i * mw + x] += v;
        }
      const int64_t c = p % channels;
      const scalar_t a = scalar_t(scale[c]), s = scalar_t(shift[c]);
      for (int64_t y = 0; y < mh; ++y) {
        std::fill(row.begin(), row.end(), 0.0);
        for (const int64_t i : holders[y])
          for (int64_t x = 0; x < mw; ++x) row[x] += expanded[i * mw + x];
        const scalar_t* mr = mp + p * mn + y * mw;
        for (int64_t x = 0; x < mw; ++x)
          if (!(mr[x] * a + s > scalar_t(0))) row[x] = 0;
        f(y, row.data(), mr);
      }
    };
    std::vector<double> plane_sums(batch * channels),
        plane_dots(batch * channels);
    at::parallel_for(0, batch * channels, std::max<int64_t>(1, kSerial / mn),
                     [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) {
        double a = 0, b = 0;
        for_rows(p, [&](int64_t, const double* g, const scalar_t* mr) {
          for (int64_t x = 0; x < mw; ++x) {
            a += g[x];
            b += g[x] * mr[x];
          }
        });
        plane_sums[p] = a;
        plane_dots[p] = b;
      }
    });
    for (int64_t p = 0; p < batch * channels; ++p) {
      norm_sums[p % channels] += plane_sums[p];
      norm_dots[p % channels] += plane_dots[p];
    }
    norm = norm_grad(norm_state, norm_sums, norm_dots, batch * mn,
                     norm_batch);
    scalar_t* gm = grad_maps.data_ptr<scalar_t>();
    at::parallel_for(0, batch * channels, std::max<int64_t>(1, kSerial / mn),
                     [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t c = p % channels;
        const double alpha = norm.alpha[c], beta = norm.beta[c],
                     gamma = norm.gamma[c];
        for_rows(p, [&](int64_t y, const double* g, const scalar_t* mr) {
          scalar_t* out_row = gm + p * mn + y * mw;
          for (int64_t x = 0; x < mw; ++x)
            out_row[x] = alpha * g[x] + beta * mr[x] + gamma;
        });
      }
    });
  });
  return {grad_maps, as_tensor(norm.grad_weight), as_tensor(norm.grad_bias),
          grad_mix_weight, grad_mix_bias, as_tensor(bn.grad_weight),
          as_tensor(bn.grad_bias)};
}

// Per row (b, c) of x: its dot product with channel c's kernel, in double
// (float sums over chunks, vectorised; the chunks' sums in double): a
// global depthwise gather (GE-θ / θ⁺ at the reference size) in inference,
// one read of the map. With kernel_sums (C, float64), also each channel's
// kernel sum, added up with the first image's dots (the kernel read once).
torch::Tensor channel_dots(torch::Tensor x, torch::Tensor kernel,
                           c10::optional<torch::Tensor> kernel_sums) {
  TORCH_CHECK(x.dim() == 4, "x must be (B, C, H, W)");
  check_map(x, x, "x");
  check_kernel(kernel, x);
  const int64_t channels = x.size(1), rows = x.size(0) * channels,
                n = x.numel() / rows;
  auto out = torch::empty({x.size(0), channels},
                          x.options().dtype(torch::kFloat64));
  double* sums_out = checked_sums(kernel_sums, channels);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "channel_dots", [&] {
    const scalar_t *xp = x.data_ptr<scalar_t>(),
                   *kp = kernel.data_ptr<scalar_t>();
    double* op = out.data_ptr<double>();
    const int64_t grain = std::max<int64_t>(1, kSerial / n);
    at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const scalar_t *xr = xp + r * n, *kr = kp + (r % channels) * n;
        const bool with_sum = sums_out && r < channels;
        double total = 0, kernel_total = 0;
        for (int64_t c0 = 0; c0 < n; c0 += kChunk) {
          const int64_t c1 = std::min(n, c0 + kChunk);
          scalar_t sum = 0, kernel_sum = 0;
          if (with_sum) {
            _Pragma("omp simd reduction(+ : sum, kernel_sum)")
            for (int64_t i = c0; i < c1; ++i) {
              sum += xr[i] * kr[i];
              kernel_sum += kr[i];
            }
          } else {
            _Pragma("omp simd reduction(+ : sum)")
            for (int64_t i = c0; i < c1; ++i) sum += xr[i] * kr[i];
          }
          total += sum;
          kernel_total += kernel_sum;
        }
        op[r] = total;
        if (with_sum) sums_out[r] = kernel_total;
      }
    });
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("pool_adjoint", &pool_adjoint);
  m.def("adaptive_avg_pool", &adaptive_avg_pool);
  m.def("offset_patches", &offset_patches);
  m.def("norm_scale_shift", &norm_scale_shift);
  m.def("global_gate_scale_shift", &global_gate_scale_shift);
  m.def("row_moments", &row_moments);
  m.def("scale_shift_add_relu", &scale_shift_add_relu);
  m.def("relu_grad_moments", &relu_grad_moments);
  m.def("combine_rows", &combine_rows);
  m.def("pixel_scale_shift_add_relu", &pixel_scale_shift_add_relu);
  m.def("relu_grad_pixel_moments", &relu_grad_pixel_moments);
  m.def("combine_pixel_rows", &combine_pixel_rows);
  m.def("few_maps_product", &few_maps_product);
  m.def("pooled_dot", &pooled_dot);
  m.def("scale_shift_relu_few_maps", &scale_shift_relu_few_maps);
  m.def("few_maps_product_backward", &few_maps_product_backward);
  m.def("rank_row_moments", &rank_row_moments);
  m.def("rank_scale_shift_add_relu", &rank_scale_shift_add_relu);
  m.def("rank_relu_grad_moments", &rank_relu_grad_moments);
  m.def("rank_combine", &rank_combine);
  m.def("scale_shift_relu_pool_windows", &scale_shift_relu_pool_windows);
  m.def("upsample_scale_shift_relu", &upsample_scale_shift_relu);
  m.def("bias_maps_train", &bias_maps_train);
  m.def("bias_maps_train_backward", &bias_maps_train_backward);
  m.def("channel_dots", &channel_dots);
  m.def("relu_few_maps_grad_moments", &relu_few_maps_grad_moments);
  m.def("relu_few_maps_combine", &relu_few_maps_combine);
}
